//! The on-disk format of the snapshot store: pack files of compressed chunks and snapshot
//! manifests. Every file starts with a 6-byte magic and a little-endian u16 format version, so
//! later releases can read today's stores. See ARCHITECTURE.md for the byte-level description.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Format version written by this release (and the newest it reads).
pub const FORMAT_VERSION: u16 = 1;
/// Magic at the start of every pack file.
pub const PACK_MAGIC: &[u8; 6] = b"SVPACK";
/// Magic at the start of every snapshot manifest.
pub const MANIFEST_MAGIC: &[u8; 6] = b"SVSNAP";
/// Length of a file header: magic + version.
pub const HEADER_LEN: usize = 8;
/// Size of the fixed chunks raw regions and values are cut into (64 KiB, see ARCHITECTURE.md
/// for the measurement behind the choice).
pub const CHUNK_SIZE: usize = 64 * 1024;

/// A blake3 hash.
pub type Hash = [u8; 32];

/// Codec of a stored chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    /// Stored as is (compression did not pay).
    Raw = 0,
    /// zstd frame.
    Zstd = 1,
}

/// Header of one chunk record in a pack: the chunk's hash (of its raw bytes), raw and stored
/// length, codec and the byte-shuffle width applied before compression (0 or 1: none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// blake3 of the raw (uncompressed, unshuffled) chunk bytes.
    pub hash: Hash,
    /// Length of the raw chunk.
    pub raw_len: u32,
    /// Length of the stored bytes that follow the header.
    pub stored_len: u32,
    /// How the stored bytes are encoded.
    pub codec: Codec,
    /// Byte-shuffle element width applied before compression (0 or 1 means none).
    pub shuffle: u8,
}

impl RecordHeader {
    /// Encoded length of a record header.
    pub const LEN: usize = 44;

    /// Encodes the header.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..32].copy_from_slice(&self.hash);
        out[32..36].copy_from_slice(&self.raw_len.to_le_bytes());
        out[36..40].copy_from_slice(&self.stored_len.to_le_bytes());
        out[40] = self.codec as u8;
        out[41] = self.shuffle;
        out
    }

    /// Decodes a header; `path` names the pack in the error.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Self> {
        let corrupt = |why: &str| Error::Corrupt {
            path: path.to_owned(),
            why: why.to_owned(),
        };
        if bytes.len() < Self::LEN {
            return Err(corrupt("chunk record header is truncated"));
        }
        let u32_at =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let codec = match bytes[40] {
            0 => Codec::Raw,
            1 => Codec::Zstd,
            _ => return Err(corrupt("chunk record has an unknown codec")),
        };
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&bytes[..32]);
        Ok(Self {
            hash,
            raw_len: u32_at(32),
            stored_len: u32_at(36),
            codec,
            shuffle: bytes[41],
        })
    }
}

/// The file header (magic + version) of a store file.
pub fn file_header(magic: &[u8; 6]) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[..6].copy_from_slice(magic);
    out[6..].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    out
}

/// Checks a file header; returns the version found.
pub fn check_header(bytes: &[u8], magic: &[u8; 6], what: &str, path: &Path) -> Result<u16> {
    if bytes.len() < HEADER_LEN || &bytes[..6] != magic {
        return Err(Error::Corrupt {
            path: path.to_owned(),
            why: format!("not a supervise {what} file (bad magic or truncated)"),
        });
    }
    let version = u16::from_le_bytes([bytes[6], bytes[7]]);
    if version == 0 || version > FORMAT_VERSION {
        return Err(Error::UnsupportedVersion {
            path: path.to_owned(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    Ok(version)
}

/// Figures recorded with each snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotStats {
    /// Raw bytes of all entries.
    pub bytes_total: u64,
    /// Raw bytes of chunks the store did not hold before this snapshot.
    pub bytes_new: u64,
    /// Bytes written to pack files (compressed chunks and record headers).
    pub bytes_packed: u64,
    /// Raw bytes of chunks the store held, rewritten because their old pack was mostly dead
    /// (compaction; not counted in `bytes_new`).
    pub bytes_compacted: u64,
    /// Milliseconds from the start of the snapshot to its manifest being durable (as known when
    /// the manifest was encoded, i.e. without the manifest's own write).
    pub duration_ms: u64,
}

/// What an entry holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A typed value, serialized as JSON.
    Value,
    /// A raw plain-old-data slice; `elem` names the element type (e.g. "f64").
    Slice {
        /// Element type name.
        elem: String,
        /// Element size in bytes.
        elem_size: u32,
    },
}

impl EntryKind {
    /// Short name for messages and listings.
    pub fn describe(&self) -> String {
        match self {
            EntryKind::Value => "value".to_owned(),
            EntryKind::Slice { elem, .. } => format!("[{elem}] slice"),
        }
    }
}

/// Where one chunk of an entry is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// blake3 of the raw chunk.
    pub hash: Hash,
    /// Index into [`Manifest::packs`].
    pub pack: u32,
    /// Offset of the chunk's record header in the pack.
    pub offset: u64,
    /// Stored length (after the record header).
    pub stored_len: u32,
    /// Raw length.
    pub raw_len: u32,
}

/// One named entry of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryMeta {
    /// Entry name.
    pub name: String,
    /// Value or slice.
    pub kind: EntryKind,
    /// Raw length in bytes.
    pub len: u64,
    /// blake3 over the entry: `len` (u64 LE) followed by every chunk hash in order.
    pub root: Hash,
    /// The chunks, in order.
    pub chunks: Vec<ChunkRef>,
}

/// A snapshot manifest: what makes a snapshot exist.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The job.
    pub job: String,
    /// Sequence number, increasing within the job.
    pub seq: u64,
    /// The newest snapshot that existed when this one was taken.
    pub parent: Option<u64>,
    /// Wall-clock time of the snapshot, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Which run of the program took it (0 for the first, counting restarts).
    pub attempt: u32,
    /// The program's own progress tag, if it gave one.
    pub tag: Option<String>,
    /// Figures.
    pub stats: SnapshotStats,
    /// Pack files (names without directory) the chunks live in.
    pub packs: Vec<String>,
    /// The entries.
    pub entries: Vec<EntryMeta>,
}

/// The root hash of an entry from its length and chunk hashes.
pub fn entry_root(len: u64, chunks: impl IntoIterator<Item = Hash>) -> Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&len.to_le_bytes());
    for hash in chunks {
        hasher.update(&hash);
    }
    *hasher.finalize().as_bytes()
}

impl Manifest {
    /// Encodes the manifest file: header, body length (u64 LE), postcard body, blake3 of body.
    pub fn encode(&self) -> Vec<u8> {
        let body = postcard::to_stdvec(self).expect("manifest serialization cannot fail");
        let mut out = Vec::with_capacity(HEADER_LEN + 8 + body.len() + 32);
        out.extend_from_slice(&file_header(MANIFEST_MAGIC));
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&body);
        out.extend_from_slice(blake3::hash(&body).as_bytes());
        out
    }

    /// Decodes and checks a manifest file read from `path`.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Self> {
        check_header(bytes, MANIFEST_MAGIC, "snapshot manifest", path)?;
        let corrupt = |why: String| Error::Corrupt {
            path: path.to_owned(),
            why,
        };
        let rest = &bytes[HEADER_LEN..];
        if rest.len() < 8 {
            return Err(corrupt("manifest is truncated".into()));
        }
        let body_len = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
        let rest = &rest[8..];
        if (rest.len() as u64) != body_len.saturating_add(32) {
            return Err(corrupt(format!(
                "manifest is truncated or has trailing bytes ({} bytes after the length field, {} expected)",
                rest.len(),
                body_len.saturating_add(32)
            )));
        }
        let (body, sum) = rest.split_at(body_len as usize);
        if blake3::hash(body).as_bytes() != sum {
            return Err(corrupt(
                "manifest checksum does not match its content".into(),
            ));
        }
        let manifest: Manifest = postcard::from_bytes(body)
            .map_err(|e| corrupt(format!("manifest does not decode: {e}")))?;
        for entry in &manifest.entries {
            if let Some(c) = entry
                .chunks
                .iter()
                .find(|c| c.pack as usize >= manifest.packs.len())
            {
                return Err(corrupt(format!(
                    "entry {:?} names pack #{} of {}",
                    entry.name,
                    c.pack,
                    manifest.packs.len()
                )));
            }
            let sum: u64 = entry.chunks.iter().map(|c| u64::from(c.raw_len)).sum();
            if sum != entry.len {
                return Err(corrupt(format!(
                    "entry {:?}: chunks add up to {sum} bytes, entry says {}",
                    entry.name, entry.len
                )));
            }
        }
        Ok(manifest)
    }

    /// Looks up an entry by name.
    pub fn entry(&self, name: &str) -> Option<&EntryMeta> {
        self.entries.iter().find(|e| e.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let chunk = ChunkRef {
            hash: [7; 32],
            pack: 0,
            offset: 8,
            stored_len: 10,
            raw_len: 100,
        };
        Manifest {
            job: "j".into(),
            seq: 3,
            parent: Some(2),
            created_unix_ms: 1,
            attempt: 0,
            tag: Some("step 10".into()),
            stats: SnapshotStats::default(),
            packs: vec!["p".into()],
            entries: vec![EntryMeta {
                name: "e".into(),
                kind: EntryKind::Value,
                len: 100,
                root: entry_root(100, [[7; 32]]),
                chunks: vec![chunk],
            }],
        }
    }

    #[test]
    fn manifest_round_trips() {
        let m = sample();
        assert_eq!(Manifest::decode(&m.encode(), Path::new("m")).unwrap(), m);
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_detected() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            assert!(
                Manifest::decode(&bytes[..len], Path::new("m")).is_err(),
                "truncated to {len}"
            );
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(
                Manifest::decode(&b, Path::new("m")).is_err(),
                "flipped byte {i}"
            );
        }
    }

    #[test]
    fn newer_version_is_refused_by_name() {
        let mut bytes = sample().encode();
        bytes[6] = 9;
        let err = Manifest::decode(&bytes, Path::new("m")).unwrap_err();
        assert!(
            matches!(err, Error::UnsupportedVersion { found: 9, .. }),
            "{err}"
        );
    }

    #[test]
    fn record_header_round_trips() {
        let h = RecordHeader {
            hash: [1; 32],
            raw_len: 65536,
            stored_len: 1234,
            codec: Codec::Zstd,
            shuffle: 8,
        };
        assert_eq!(
            RecordHeader::decode(&h.encode(), Path::new("p")).unwrap(),
            h
        );
    }
}
