//! Typed errors of the shim and the snapshot store. Each names the path, job, snapshot or entry
//! involved, so the message alone tells a user what to look at.

use std::io;
use std::path::PathBuf;

/// Everything the shim and the store can fail with. Not `#[non_exhaustive]`: the C ABI maps
/// every variant to a code in an exhaustive match, so a new variant must be given one.
#[derive(Debug)]
pub enum Error {
    /// A job or entry name that cannot be used (it would escape the store or garble a listing).
    InvalidName {
        /// What the name is for: "job" or "entry".
        what: &'static str,
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        why: &'static str,
    },
    /// An I/O operation on a file or directory failed.
    Io {
        /// The operation, e.g. "create", "fsync", "rename".
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A file in the store is damaged: bad magic, wrong checksum, truncated, or a chunk whose
    /// hash does not match.
    Corrupt {
        /// The damaged file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// A snapshot whose files each decode but which does not hold together (its chunk list
    /// does not match an entry's root hash, its chunk lengths do not add up): damage found in
    /// the snapshot as a whole rather than in one file.
    SnapshotDamaged {
        /// The job.
        job: String,
        /// The damaged snapshot.
        seq: u64,
        /// What is wrong with it.
        why: String,
    },
    /// An invariant of the store or the shim does not hold: a bug in supervise, not damage to
    /// stored data (so no snapshot is set aside for it).
    Internal {
        /// The job.
        job: String,
        /// The snapshot being written or read, if any.
        seq: Option<u64>,
        /// Which invariant failed.
        why: String,
    },
    /// A delta entry that cannot be built on the earlier snapshot's entry it names: the dirty
    /// chunks given do not fit it, or one of its clean chunks is not in the store any more. No
    /// stored data is damaged; a whole (not delta) snapshot of the entry works.
    DeltaBase {
        /// The job.
        job: String,
        /// The entry.
        entry: String,
        /// What does not fit.
        why: String,
    },
    /// A length or offset computed from the program's input does not fit its type.
    Overflow {
        /// The job.
        job: String,
        /// The entry whose lengths overflowed.
        entry: String,
        /// What was being computed.
        what: &'static str,
    },
    /// A store file written by a newer release than this one.
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version found in the file.
        found: u16,
        /// The newest version this release reads.
        supported: u16,
    },
    /// A snapshot that was asked for by number does not exist.
    NoSuchSnapshot {
        /// The job.
        job: String,
        /// The missing snapshot's sequence number.
        seq: u64,
    },
    /// A job that is not in the store.
    NoSuchJob {
        /// The job asked for.
        job: String,
        /// The store looked in.
        store: PathBuf,
        /// The jobs there are, comma-separated.
        known: String,
    },

    /// Two entries of one snapshot have the same name.
    DuplicateEntry {
        /// The entry name.
        name: String,
    },
    /// A restore into memory whose size differs from what the snapshot holds (the program's
    /// parameters changed: an older snapshot would not fit either).
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
    /// An array restored with another shape than the snapshot holds it in (the same number of
    /// bytes, laid out otherwise: the program's parameters changed).
    ShapeMismatch {
        /// The entry name.
        name: String,
        /// The snapshot restored.
        seq: u64,
        /// The shape in the snapshot.
        stored: Vec<u64>,
        /// The shape the program asked for.
        wanted: Vec<u64>,
    },
    /// An array the program gave whose shape or element type cannot be recorded (the shape does
    /// not match its data, or the type is not a plain numpy type).
    BadArray {
        /// The entry name.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// An entry exists but is of another kind (a value where a slice was asked, or the other way).
    WrongKind {
        /// The entry name.
        name: String,
        /// The kind stored.
        found: String,
        /// The kind asked for.
        wanted: String,
    },
    /// A typed value whose JSON is larger than a snapshot may hold (a reader would refuse it).
    ValueTooLarge {
        /// The entry name.
        name: String,
        /// Its serialized length.
        len: u64,
        /// The largest accepted ([`crate::format::MAX_VALUE_LEN`]).
        max: u64,
    },
    /// A typed value could not be serialized or deserialized.
    Serde {
        /// The entry name.
        name: String,
        /// The serde_json error.
        source: serde_json::Error,
    },
    /// An environment variable the shim reads has a value it cannot use.
    Env {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// A snapshot written in the background failed; earlier snapshots are intact.
    SnapshotFailed(String),
    /// The snapshot closure of the program returned an error of its own.
    Aborted(String),
    /// A file or directory of the store that is not safe to use: a symbolic link or other
    /// unexpected kind of file, or one another user owns or may write. Nothing was done to it.
    Unsafe {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong with it.
        kind: UnsafeKind,
    },
    /// A region whose byte length does not fit in memory's address range.
    RegionTooLarge {
        /// The entry name.
        name: String,
        /// Elements asked for.
        len: usize,
        /// Bytes per element.
        elem_size: usize,
    },
    /// An output file that cannot be used as one (see `Shim::output` in `supervise-shim`).
    Output {
        /// The path as the program gave it.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// An output file shorter than the length a snapshot recorded: bytes the resumed program
    /// counts on are gone (the file was cut or replaced after the snapshot).
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
    TooLarge {
        /// The manifest file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The bound.
        max: u64,
    },
    /// A path that must be a directory (the store, or a directory on the way to it) is another
    /// kind of file.
    NotADirectory {
        /// The path that is not a directory.
        path: PathBuf,
        /// What it is instead ("regular file", "symbolic link", ...).
        found: &'static str,
    },
    // The runtime's variants (supervise-shim).
    /// The shim could not install its handler of a signal.
    SignalHandler {
        /// The signal's number.
        signal: i32,
        /// Why.
        source: io::Error,
    },
    /// The shim could not start one of its threads.
    Thread {
        /// The thread's name.
        name: &'static str,
        /// Why.
        source: io::Error,
    },
    /// An operation on the control socket to the supervisor failed.
    Control {
        /// What was being done.
        op: &'static str,
        /// Why.
        source: io::Error,
    },
    /// A rank of a job of many processes could not join its supervisor (unreachable, refused,
    /// or the supervisor's proof did not hold).
    RankLink {
        /// The endpoint (`unix:/path` or `tcp:host:port`).
        endpoint: String,
        /// Why.
        why: String,
    },
    /// A rank's part could not settle with the other ranks which of them stores the chunks
    /// they hold in common (see [`crate::claims`]): the epoch ended, or the supervisor is gone.
    SharedChunks {
        /// The part's snapshot number.
        seq: u64,
        /// Why.
        why: String,
    },
    /// A snapshot written in the background failed; earlier snapshots are intact. The error is
    /// the writer's own, so a full disk ([`Error::Io`]) can be told from damage
    /// ([`Error::Corrupt`]).
    Background(std::sync::Arc<Error>),
    /// The snapshot this run resumes from turned out to be damaged after the program was given
    /// data from it: it was set aside, and the program must start again to resume from an
    /// older one (the shim never restarts the program itself).
    RestoreDamaged {
        /// The job.
        job: String,
        /// The snapshot set aside.
        seq: u64,
        /// What is damaged.
        why: String,
    },
}

/// The message names the path, job, snapshot or entry involved and includes the text of the
/// underlying error (for [`Error::Io`] and [`Error::Serde`]), so that `to_string()` alone tells
/// the whole story. For that reason [`std::error::Error::source`] returns `None`: a reporter
/// that prints the chain of causes (anyhow's `{:#}`) would otherwise print the cause twice
/// ("File exists (os error 17): File exists (os error 17)").
impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::InvalidName { what, name, why } => {
                write!(f, "invalid {what} name {name:?}: {why}")
            }
            Error::Io { op, path, source } => write!(f, "{op} {}: {source}", path.display()),
            Error::Corrupt { path, why } => write!(f, "{}: damaged: {why}", path.display()),
            Error::SnapshotDamaged { job, seq, why } => {
                write!(f, "job {job:?} snapshot {seq}: damaged: {why}")
            }
            Error::Internal { job, seq, why } => {
                write!(f, "job {job:?}")?;
                if let Some(seq) = seq {
                    write!(f, " snapshot {seq}")?;
                }
                write!(
                    f,
                    ": internal error (a bug in supervise, not damage to the store): {why}"
                )
            }
            Error::DeltaBase { job, entry, why } => write!(
                f,
                "job {job:?} entry {entry:?}: cannot build on the earlier snapshot's data: {why}"
            ),
            Error::Overflow { job, entry, what } => write!(
                f,
                "job {job:?} entry {entry:?}: {what} does not fit in this machine's integers"
            ),
            Error::UnsupportedVersion {
                path,
                found,
                supported,
            } => write!(
                f,
                "{}: format version {found} is newer than this release reads (up to {supported})",
                path.display()
            ),
            Error::NoSuchSnapshot { job, seq } => write!(f, "job {job:?} has no snapshot {seq}"),
            Error::NoSuchJob { job, store, known } => write!(
                f,
                "store {}: no job {job:?} (jobs there: {known})",
                store.display()
            ),
            Error::DuplicateEntry { name } => {
                write!(f, "entry {name:?} is added twice to one snapshot")
            }
            Error::SizeMismatch {
                name,
                seq,
                stored,
                dest,
            } => write!(
                f,
                "entry {name:?}: snapshot {seq} holds {stored} bytes but the program's has {dest} \
                 bytes (were the program's parameters changed?)"
            ),
            Error::ShapeMismatch {
                name,
                seq,
                stored,
                wanted,
            } => write!(
                f,
                "array {name:?}: snapshot {seq} holds it with shape {stored:?} but the program \
                 asks for {wanted:?} (were the program's parameters changed?)"
            ),
            Error::BadArray { name, why } => write!(f, "array {name:?}: {why}"),
            Error::RegionTooLarge {
                name,
                len,
                elem_size,
            } => write!(
                f,
                "region {name:?}: {len} elements of {elem_size} bytes are more than memory holds"
            ),
            Error::Output { path, why } => write!(f, "output file {}: {why}", path.display()),
            Error::OutputShorter {
                path,
                seq,
                recorded,
                found,
            } => write!(
                f,
                "output file {} is {found} bytes, shorter than the {recorded} bytes {} recorded; \
                 it was cut or replaced since: put the file back, or resume from an older \
                 snapshot or afresh",
                path.display(),
                seq.map_or_else(|| "this run".to_owned(), |s| format!("snapshot {s}"))
            ),
            Error::WrongKind {
                name,
                found,
                wanted,
            } => write!(f, "entry {name:?} is a {found}, not a {wanted}"),
            Error::ValueTooLarge { name, len, max } => write!(
                f,
                "entry {name:?}: a value of {len} bytes is larger than a snapshot holds (at most {max})"
            ),
            Error::Serde { name, source } => write!(f, "entry {name:?}: {source}"),
            Error::Env { var, value, why } => {
                write!(f, "environment variable {var}={value:?}: {why}")
            }
            Error::SnapshotFailed(why) => write!(f, "snapshot failed: {why}"),
            Error::Aborted(why) => write!(f, "snapshot aborted by the program: {why}"),
            Error::Unsafe { path, kind } => write!(
                f,
                "{}: refusing to use it: {kind}; {}",
                path.display(),
                kind.remedy()
            ),
            Error::TooLarge { path, len, max } => write!(
                f,
                "{}: manifest is {len} bytes, more than the {max} a manifest may have",
                path.display()
            ),
            Error::NotADirectory { path, found } => {
                write!(f, "{} is not a directory (it is a {found})", path.display())
            }
            Error::SignalHandler { signal, source } => {
                write!(f, "cannot install the handler of signal {signal}: {source}")
            }
            Error::Thread { name, source } => write!(f, "cannot start thread {name}: {source}"),
            Error::Control { op, source } => {
                write!(f, "control socket to the supervisor: cannot {op}: {source}")
            }
            Error::RankLink { endpoint, why } => {
                write!(f, "cannot join the job's supervisor at {endpoint}: {why}")
            }
            Error::SharedChunks { seq, why } => {
                write!(f, "part {seq}: the chunks shared with other ranks: {why}")
            }
            Error::Background(error) => {
                write!(f, "{error} (earlier snapshots are intact)")
            }
            Error::RestoreDamaged { job, seq, why } => write!(
                f,
                "snapshot {seq} of job {job} is damaged ({why}); it is set aside: start the program again to resume from an older one"
            ),
        }
    }
}

/// No variant has a `source()`: each one's message already includes its cause (see the
/// `Display` impl).
impl std::error::Error for Error {}

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
pub fn io_err(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { op, path, source }
}

impl Error {
    /// True when the error says stored data is damaged (as opposed to a usage or I/O error).
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::Corrupt { .. } | Error::SnapshotDamaged { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails to compile when a variant is added, so that [`one_of_each`] stays complete.
    fn covered(e: &Error) {
        match e {
            Error::InvalidName { .. }
            | Error::Io { .. }
            | Error::Corrupt { .. }
            | Error::SnapshotDamaged { .. }
            | Error::Internal { .. }
            | Error::DeltaBase { .. }
            | Error::Overflow { .. }
            | Error::UnsupportedVersion { .. }
            | Error::NoSuchSnapshot { .. }
            | Error::NoSuchJob { .. }
            | Error::DuplicateEntry { .. }
            | Error::SizeMismatch { .. }
            | Error::ShapeMismatch { .. }
            | Error::BadArray { .. }
            | Error::WrongKind { .. }
            | Error::ValueTooLarge { .. }
            | Error::Serde { .. }
            | Error::Env { .. }
            | Error::SnapshotFailed(_)
            | Error::Aborted(_)
            | Error::Unsafe { .. }
            | Error::TooLarge { .. }
            | Error::RegionTooLarge { .. }
            | Error::Output { .. }
            | Error::OutputShorter { .. }
            | Error::NotADirectory { .. }
            | Error::SignalHandler { .. }
            | Error::Thread { .. }
            | Error::Control { .. }
            | Error::RankLink { .. }
            | Error::SharedChunks { .. }
            | Error::Background(_)
            | Error::RestoreDamaged { .. } => {}
        }
    }

    /// One error of each variant, with the text of its underlying cause when it has one.
    fn one_of_each() -> Vec<(Error, Option<String>)> {
        let io = || io::Error::from_raw_os_error(17);
        let io_text = io().to_string();
        let serde = || serde_json::from_str::<u8>("x").unwrap_err();
        let serde_text = serde().to_string();
        let path = || PathBuf::from("/s/j/f");
        vec![
            (
                Error::InvalidName {
                    what: "job",
                    name: "../x".into(),
                    why: "it has a slash",
                },
                None,
            ),
            (
                Error::Io {
                    op: "create directory",
                    path: path(),
                    source: io(),
                },
                Some(io_text.clone()),
            ),
            (
                Error::Corrupt {
                    path: path(),
                    why: "bad magic".into(),
                },
                None,
            ),
            (
                Error::SnapshotDamaged {
                    job: "j".into(),
                    seq: 3,
                    why: "chunk list does not match its root hash".into(),
                },
                None,
            ),
            (
                Error::Internal {
                    job: "j".into(),
                    seq: Some(3),
                    why: "a repeated chunk was never written".into(),
                },
                None,
            ),
            (
                Error::DeltaBase {
                    job: "j".into(),
                    entry: "e".into(),
                    why: "no chunk 9".into(),
                },
                None,
            ),
            (
                Error::Overflow {
                    job: "j".into(),
                    entry: "e".into(),
                    what: "the end of a dirty chunk",
                },
                None,
            ),
            (
                Error::UnsupportedVersion {
                    path: path(),
                    found: 9,
                    supported: 1,
                },
                None,
            ),
            (
                Error::NoSuchSnapshot {
                    job: "j".into(),
                    seq: 3,
                },
                None,
            ),
            (
                Error::NoSuchJob {
                    job: "j".into(),
                    store: path(),
                    known: "a, b".into(),
                },
                None,
            ),
            (Error::DuplicateEntry { name: "e".into() }, None),
            (
                Error::SizeMismatch {
                    name: "e".into(),
                    seq: 4,
                    stored: 1,
                    dest: 2,
                },
                None,
            ),
            (
                Error::ShapeMismatch {
                    name: "e".into(),
                    seq: 4,
                    stored: vec![3, 4],
                    wanted: vec![4, 3],
                },
                None,
            ),
            (
                Error::BadArray {
                    name: "e".into(),
                    why: "shape [2] is 16 bytes, the data 8".into(),
                },
                None,
            ),
            (
                Error::RegionTooLarge {
                    name: "e".into(),
                    len: usize::MAX,
                    elem_size: 8,
                },
                None,
            ),
            (
                Error::Output {
                    path: path(),
                    why: "it is a directory".into(),
                },
                None,
            ),
            (
                Error::OutputShorter {
                    path: path(),
                    seq: Some(3),
                    recorded: 10,
                    found: 5,
                },
                None,
            ),
            (
                Error::WrongKind {
                    name: "e".into(),
                    found: "value".into(),
                    wanted: "slice".into(),
                },
                None,
            ),
            (
                Error::ValueTooLarge {
                    name: "e".into(),
                    len: 2,
                    max: 1,
                },
                None,
            ),
            (
                Error::Serde {
                    name: "e".into(),
                    source: serde(),
                },
                Some(serde_text),
            ),
            (
                Error::Env {
                    var: "SUPERVISE_X",
                    value: "y".into(),
                    why: "bad".into(),
                },
                None,
            ),
            (Error::SnapshotFailed("disk full".into()), None),
            (Error::Aborted("no".into()), None),
            (
                Error::Unsafe {
                    path: path(),
                    kind: UnsafeKind::HardLinked { links: 2 },
                },
                None,
            ),
            (
                Error::TooLarge {
                    path: path(),
                    len: 2,
                    max: 1,
                },
                None,
            ),
            (
                Error::NotADirectory {
                    path: path(),
                    found: "regular file",
                },
                None,
            ),
            (
                Error::SignalHandler {
                    signal: 15,
                    source: io(),
                },
                Some(io_text.clone()),
            ),
            (
                Error::Thread {
                    name: "supervise-writer",
                    source: io(),
                },
                Some(io_text.clone()),
            ),
            (
                Error::Control {
                    op: "clone it",
                    source: io(),
                },
                Some(io_text.clone()),
            ),
            (
                Error::RankLink {
                    endpoint: "tcp:node1:4000".into(),
                    why: "refused: wrong secret".into(),
                },
                None,
            ),
            (
                Error::SharedChunks {
                    seq: 3 << 20 | 1,
                    why: "epoch 3 ended first".into(),
                },
                None,
            ),
            (
                Error::Background(std::sync::Arc::new(Error::Io {
                    op: "write pack",
                    path: path(),
                    source: io(),
                })),
                Some(io_text.clone()),
            ),
            (
                Error::RestoreDamaged {
                    job: "j".into(),
                    seq: 3,
                    why: "bad hash".into(),
                },
                None,
            ),
        ]
    }

    #[test]
    fn every_cause_is_told_once_in_the_chain() {
        let errors = one_of_each();
        assert_eq!(errors.len(), 33, "one of each variant");
        for (e, cause) in errors {
            covered(&e);
            // The chain as a reporter prints it (anyhow's `{:#}`): each error, then its sources.
            let mut chain = vec![e.to_string()];
            let mut next = std::error::Error::source(&e);
            while let Some(c) = next {
                chain.push(c.to_string());
                next = c.source();
            }
            for (i, text) in chain.iter().enumerate() {
                for later in &chain[i + 1..] {
                    assert!(!text.contains(later.as_str()), "{chain:?}");
                }
            }
            let report = chain.join(": ");
            if let Some(cause) = cause {
                assert_eq!(report.matches(cause.as_str()).count(), 1, "{report}");
            }
        }
    }

    #[test]
    fn only_damage_to_stored_data_counts_as_corruption() {
        // Corruption sets a snapshot aside: a bug or an overflow must not.
        for (e, _) in one_of_each() {
            let damage = matches!(e, Error::Corrupt { .. } | Error::SnapshotDamaged { .. });
            assert_eq!(e.is_corruption(), damage, "{e}");
        }
    }

    #[test]
    fn messages_name_the_job_and_snapshot_not_a_made_up_path() {
        let damaged = Error::SnapshotDamaged {
            job: "heat".into(),
            seq: 7,
            why: "w".into(),
        };
        assert_eq!(damaged.to_string(), "job \"heat\" snapshot 7: damaged: w");
        let bug = Error::Internal {
            job: "heat".into(),
            seq: None,
            why: "w".into(),
        };
        assert!(
            bug.to_string().starts_with("job \"heat\": internal error"),
            "{bug}"
        );
        let overflow = Error::Overflow {
            job: "heat".into(),
            entry: "grid".into(),
            what: "the end of a dirty chunk",
        };
        assert!(
            overflow.to_string().contains("entry \"grid\""),
            "{overflow}"
        );
    }
}
