//! Typed errors of the shim and the snapshot store. Each names the path, job, snapshot or entry
//! involved, so the message alone tells a user what to look at.

use std::io;
use std::path::PathBuf;

/// Everything the shim and the store can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A job or entry name that cannot be used (it would escape the store or garble a listing).
    #[error("invalid {what} name {name:?}: {why}")]
    InvalidName {
        /// What the name is for: "job" or "entry".
        what: &'static str,
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        why: &'static str,
    },
    /// An I/O operation on a file or directory failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// The operation, e.g. "create", "fsync", "rename".
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A file in the store is damaged: bad magic, wrong checksum, truncated, or a chunk whose
    /// hash does not match.
    #[error("{path}: damaged: {why}")]
    Corrupt {
        /// The damaged file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// A store file written by a newer release than this one.
    #[error("{path}: format version {found} is newer than this release reads (up to {supported})")]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version found in the file.
        found: u16,
        /// The newest version this release reads.
        supported: u16,
    },
    /// A snapshot that was asked for by number does not exist.
    #[error("job {job:?} has no snapshot {seq}")]
    NoSuchSnapshot {
        /// The job.
        job: String,
        /// The missing snapshot's sequence number.
        seq: u64,
    },
    /// A job that is not in the store.
    #[error("store {store}: no job {job:?} (jobs there: {known})")]
    NoSuchJob {
        /// The job asked for.
        job: String,
        /// The store looked in.
        store: PathBuf,
        /// The jobs there are, comma-separated.
        known: String,
    },

    /// Two entries of one snapshot have the same name.
    #[error("entry {name:?} is added twice to one snapshot")]
    DuplicateEntry {
        /// The entry name.
        name: String,
    },
    /// A restore into memory whose size differs from what the snapshot holds (the program's
    /// parameters changed: an older snapshot would not fit either).
    #[error(
        "entry {name:?}: snapshot {seq} holds {stored} bytes but the program's has {dest} bytes (were the program's parameters changed?)"
    )]
    SizeMismatch {
        /// The entry name.
        name: String,
        /// The snapshot restored.
        seq: u64,
        /// Bytes in the snapshot.
        stored: u64,
        /// Bytes in the destination.
        dest: u64,
    },
    /// An entry exists but is of another kind (a value where a slice was asked, or the other way).
    #[error("entry {name:?} is a {found}, not a {wanted}")]
    WrongKind {
        /// The entry name.
        name: String,
        /// The kind stored.
        found: String,
        /// The kind asked for.
        wanted: String,
    },
    /// A typed value whose JSON is larger than a snapshot may hold (a reader would refuse it).
    #[error(
        "entry {name:?}: a value of {len} bytes is larger than a snapshot holds (at most {max})"
    )]
    ValueTooLarge {
        /// The entry name.
        name: String,
        /// Its serialized length.
        len: u64,
        /// The largest accepted ([`crate::format::MAX_VALUE_LEN`]).
        max: u64,
    },
    /// A typed value could not be serialized or deserialized.
    #[error("entry {name:?}: {source}")]
    Serde {
        /// The entry name.
        name: String,
        /// The serde_json error.
        #[source]
        source: serde_json::Error,
    },
    /// An environment variable the shim reads has a value it cannot use.
    #[error("environment variable {var}={value:?}: {why}")]
    Env {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// A snapshot written in the background failed; earlier snapshots are intact.
    #[error("snapshot failed: {0}")]
    SnapshotFailed(String),
    /// The snapshot closure of the program returned an error of its own.
    #[error("snapshot aborted by the program: {0}")]
    Aborted(String),
    /// A file or directory of the store that is not safe to use: a symbolic link or other
    /// unexpected kind of file, or one another user owns or may write. Nothing was done to it.
    #[error("{path}: refusing to use it: {kind}; {}", kind.remedy())]
    Unsafe {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong with it.
        kind: UnsafeKind,
    },
    /// A region whose byte length does not fit in memory's address range.
    #[error("region {name:?}: {len} elements of {elem_size} bytes are more than memory holds")]
    RegionTooLarge {
        /// The entry name.
        name: String,
        /// Elements asked for.
        len: usize,
        /// Bytes per element.
        elem_size: usize,
    },
    /// An output file that cannot be used as one (see [`crate::Shim::output`]).
    #[error("output file {path}: {why}")]
    Output {
        /// The path as the program gave it.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// An output file shorter than the length a snapshot recorded: bytes the resumed program
    /// counts on are gone (the file was cut or replaced after the snapshot).
    #[error(
        "output file {path} is {found} bytes, shorter than the {recorded} bytes {} recorded; it was cut or replaced since: put the file back, or resume from an older snapshot or afresh",
        seq.map_or_else(|| "this run".to_owned(), |s| format!("snapshot {s}"))
    )]
    OutputShorter {
        /// The file.
        path: PathBuf,
        /// The snapshot that recorded the length (`None`: this run, before it was reopened).
        seq: Option<u64>,
        /// The length recorded.
        recorded: u64,
        /// The length found.
        found: u64,
    },
    /// A manifest larger than any this release writes or reads.
    #[error("{path}: manifest is {len} bytes, more than the {max} a manifest may have")]
    TooLarge {
        /// The manifest file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The bound.
        max: u64,
    },
}

/// Why a store path is refused (see [`Error::Unsafe`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnsafeKind {
    /// Not the kind of file expected there (a symbolic link, a directory where a file belongs,
    /// a socket, a FIFO...).
    NotExpectedKind {
        /// What was found.
        found: &'static str,
    },
    /// The store root is a symbolic link another user owns.
    ForeignLink {
        /// The link's owner.
        uid: u32,
    },
    /// Owned by another user than the one running this process.
    ForeignOwner {
        /// The owner.
        uid: u32,
        /// Its permission bits.
        mode: u32,
    },
    /// Writable by the group or by others.
    OpenToOthers {
        /// Its permission bits.
        mode: u32,
    },
    /// A file with more than one name (a hard link could point anywhere).
    HardLinked {
        /// How many names it has.
        links: u64,
    },
}

impl std::fmt::Display for UnsafeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnsafeKind::NotExpectedKind { found } => write!(f, "it is a {found}"),
            UnsafeKind::ForeignLink { uid } => {
                write!(
                    f,
                    "it is a symbolic link owned by uid {uid}, not by this user"
                )
            }
            UnsafeKind::ForeignOwner { uid, mode } => write!(
                f,
                "it is owned by uid {uid} (mode {mode:04o}), not by this user (uid {})",
                nix::unistd::geteuid()
            ),
            UnsafeKind::OpenToOthers { mode } => {
                write!(f, "its mode {mode:04o} lets the group or others write it")
            }
            UnsafeKind::HardLinked { links } => write!(f, "it has {links} hard links"),
        }
    }
}

impl UnsafeKind {
    /// What the user can do about it.
    pub fn remedy(&self) -> &'static str {
        match self {
            UnsafeKind::NotExpectedKind { .. } | UnsafeKind::HardLinked { .. } => {
                "the store never follows links inside it: remove it (supervise recreates what it needs)"
            }
            UnsafeKind::ForeignLink { .. } => {
                "use the real directory as --store, or a link of your own"
            }
            UnsafeKind::ForeignOwner { .. } => {
                "use a store of your own (--store), or chown it if it is yours; read-only commands (ls, show, verify, log, restore --to) can look with --allow-foreign-store"
            }
            UnsafeKind::OpenToOthers { .. } => {
                "run chmod go-w on it (supervise creates its directories 0700 and files 0600)"
            }
        }
    }
}

/// Result with the shim's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Wraps an `io::Error` with the operation and path, for `map_err`.
pub(crate) fn io_err(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { op, path, source }
}

impl Error {
    /// True when the error says stored data is damaged (as opposed to a usage or I/O error).
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::Corrupt { .. })
    }
}
