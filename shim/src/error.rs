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
    /// A restore into memory whose size differs from what the snapshot holds.
    #[error("entry {name:?}: snapshot holds {stored} bytes but the destination has {dest} bytes")]
    SizeMismatch {
        /// The entry name.
        name: String,
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
