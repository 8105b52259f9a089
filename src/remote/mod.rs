//! Durable tiers beyond the node: the places the supervisor copies committed snapshots to, in
//! the background, so that a job resumes on another machine after its node is lost.
//!
//! The program writes to the local store (the node's cache tier) exactly as it always has. A
//! [`Tier`] is any other place that can hold the job's files as named objects: an
//! S3-compatible object store ([`object`]) or a directory ([`dir`]), optionally sealed with a
//! key ([`seal`]). Every tier has the same layout ([`layout`]), and the same commit rule as the
//! local store: a manifest is published only after every pack it names is there.
//!
//! Tiers are blocking: the supervisor's threads call them directly (the object tier runs its
//! own small async runtime inside; nothing async leaks out, and nothing here is linked into
//! the program).

pub mod bench;
pub mod dir;
pub mod fetch;
pub mod lease;
pub mod object;
pub mod seal;
pub mod upload;

use std::fmt;
use std::io::{Read, Write};

/// An object's version, as the tier tells it (an S3 ETag; a directory tier's content hash):
/// what a compare-and-swap ([`Tier::replace`]) checks.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Version(pub String);

/// One object found by [`Tier::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Its key, relative to the tier's root (`job/packs/NAME.pack`).
    pub key: String,
    /// Its size in bytes (as stored: sealed objects are larger than their content).
    pub size: u64,
    /// When it was last written, in milliseconds since the epoch (the tier's clock).
    pub modified_unix_ms: u64,
}

/// Why a tier operation failed.
#[derive(Debug)]
pub enum TierError {
    /// No object has this key.
    NotFound {
        /// The tier.
        tier: String,
        /// The key.
        key: String,
    },
    /// A conditional write lost: the object exists ([`Tier::create`]) or changed or vanished
    /// since the version given ([`Tier::replace`]).
    Conflict {
        /// The tier.
        tier: String,
        /// The key.
        key: String,
    },
    /// An object is larger than the caller's bound.
    TooLarge {
        /// The tier.
        tier: String,
        /// The key.
        key: String,
        /// The bound.
        max: u64,
    },
    /// An object's bytes are not what was written: failed authentication (sealed tiers),
    /// a wrong length, or a format the reader does not know.
    Damaged {
        /// The tier.
        tier: String,
        /// The key.
        key: String,
        /// What is wrong.
        why: String,
    },
    /// A sealed object was sealed with another key (`--encrypt-key`): never read as damage,
    /// never a reason to start afresh.
    WrongKey {
        /// The tier.
        tier: String,
        /// The key of the object.
        key: String,
    },
    /// The tier refused or could not be reached (network, permissions, full, read-only):
    /// worth retrying later.
    Unavailable {
        /// The tier.
        tier: String,
        /// The key or prefix involved.
        key: String,
        /// What the tier or the system said.
        why: String,
    },
}

impl TierError {
    /// True when retrying later may succeed (the tier was unreachable or refused).
    pub fn is_transient(&self) -> bool {
        matches!(self, TierError::Unavailable { .. })
    }
}

impl fmt::Display for TierError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TierError::NotFound { tier, key } => write!(f, "{tier}: no object {key}"),
            TierError::Conflict { tier, key } => {
                write!(f, "{tier}: {key} was written by someone else meanwhile")
            }
            TierError::TooLarge { tier, key, max } => {
                write!(f, "{tier}: {key} is larger than the bound of {max} bytes")
            }
            TierError::Damaged { tier, key, why } => write!(f, "{tier}: {key} is damaged: {why}"),
            TierError::WrongKey { tier, key } => write!(
                f,
                "{tier}: {key} was sealed with another key than --encrypt-key gives"
            ),
            TierError::Unavailable { tier, key, why } => {
                write!(f, "{tier}: cannot reach {key}: {why}")
            }
        }
    }
}

impl std::error::Error for TierError {}

/// The result of a tier operation.
pub type TierResult<T> = std::result::Result<T, TierError>;

/// A place that holds objects by key: the job's files beyond the node. Keys are relative
/// paths with `/` separators ([`layout`]); each object is written whole and atomically
/// (a reader sees the old object, the new one, or none, never a part).
pub trait Tier: Send + Sync {
    /// The tier as the user named it (`s3://bucket/prefix`, a directory), for messages.
    fn describe(&self) -> &str;

    /// Every object whose key starts with `prefix` (recursively), in no particular order.
    fn list(&self, prefix: &str) -> TierResult<Vec<ObjectMeta>>;

    /// Streams the object `key` into `out`, refusing one of more than `max` bytes
    /// ([`TierError::TooLarge`], checked before anything is written to `out` when the tier
    /// knows the size up front). Returns its version.
    fn get(&self, key: &str, out: &mut dyn Write, max: u64) -> TierResult<Version>;

    /// Writes the object `key` from `data` (`len` bytes), replacing any object of that key.
    fn put(&self, key: &str, data: &mut dyn Read, len: u64) -> TierResult<Version>;

    /// Creates the object `key` only if no object has that key ([`TierError::Conflict`]
    /// otherwise), atomically with respect to every other writer.
    fn create(&self, key: &str, bytes: &[u8]) -> TierResult<Version>;

    /// Replaces the object `key` only if its current version is `version`
    /// ([`TierError::Conflict`] otherwise, also when it was removed).
    fn replace(&self, key: &str, bytes: &[u8], version: &Version) -> TierResult<Version>;

    /// Removes the object `key`; a missing one is not an error.
    fn delete(&self, key: &str) -> TierResult<()>;

    /// Reads a small object whole (at most `max` bytes), with its version.
    fn get_bytes(&self, key: &str, max: u64) -> TierResult<(Vec<u8>, Version)> {
        let mut bytes = Vec::new();
        let version = self.get(key, &mut bytes, max)?;
        Ok((bytes, version))
    }

    /// Writes a small object whole, replacing any object of that key.
    fn put_bytes(&self, key: &str, bytes: &[u8]) -> TierResult<Version> {
        let mut data = bytes;
        self.put(key, &mut data, bytes.len() as u64)
    }
}

/// The one layout of a job on every tier, local names kept:
///
/// ```text
/// <job>/snapshots/<generation:010>-<seq:020>.snap   a committed manifest (the local bytes)
/// <job>/packs/<name>.pack                            a pack (the local file, same name)
/// <job>/lease                                        who holds the job ([`lease`])
/// ```
///
/// The lease generation in a manifest's key keeps two owners' snapshots apart (an owner that
/// lost its lease may still be uploading) and orders them: a restore takes the newest
/// snapshot of the highest generation.
pub mod layout {
    /// The key of the job's lease object.
    pub fn lease(job: &str) -> String {
        format!("{job}/lease")
    }

    /// The prefix under which the job's manifests live.
    pub fn snapshots(job: &str) -> String {
        format!("{job}/snapshots/")
    }

    /// The prefix under which the job's packs live.
    pub fn packs(job: &str) -> String {
        format!("{job}/packs/")
    }

    /// The key of snapshot `seq`, published under lease generation `generation`.
    pub fn manifest(job: &str, generation: u64, seq: u64) -> String {
        format!("{job}/snapshots/{generation:010}-{seq:020}.snap")
    }

    /// The key of the pack `name` (its local name, without `.pack`).
    pub fn pack(job: &str, name: &str) -> String {
        format!("{job}/packs/{name}.pack")
    }

    /// The generation and seq of a manifest key (`None`: not a manifest key of this job).
    pub fn parse_manifest(job: &str, key: &str) -> Option<(u64, u64)> {
        let name = key.strip_prefix(&snapshots(job))?.strip_suffix(".snap")?;
        let (generation, seq) = name.split_once('-')?;
        if generation.len() != 10 || seq.len() != 20 {
            return None;
        }
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if !digits(generation) || !digits(seq) {
            return None;
        }
        Some((generation.parse().ok()?, seq.parse().ok()?))
    }

    /// The pack name of a pack key (`None`: not a pack key of this job).
    pub fn parse_pack<'a>(job: &str, key: &'a str) -> Option<&'a str> {
        let rest = key.strip_prefix(job)?.strip_prefix("/packs/")?;
        let name = rest.strip_suffix(".pack")?;
        (!name.is_empty() && !name.contains('/')).then_some(name)
    }
}

#[cfg(test)]
mod tests {
    use super::layout;

    #[test]
    fn manifest_keys_round_trip_and_sort_by_generation_then_seq() {
        let a = layout::manifest("heat-1", 2, 99);
        let b = layout::manifest("heat-1", 10, 3);
        assert!(a < b, "{a} {b}");
        assert_eq!(layout::parse_manifest("heat-1", &a), Some((2, 99)));
        assert_eq!(layout::parse_manifest("heat-1", &b), Some((10, 3)));
        assert_eq!(layout::parse_manifest("heat-2", &a), None);
        assert_eq!(
            layout::parse_manifest("heat-1", "heat-1/snapshots/1-2.snap"),
            None
        );
        assert_eq!(
            layout::parse_pack("heat-1", &layout::pack("heat-1", "0001-ab-000")),
            Some("0001-ab-000")
        );
        assert_eq!(layout::parse_pack("heat-1", "heat-1/packs/x/y.pack"), None);
    }
}
