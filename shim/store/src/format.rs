//! The on-disk format of the snapshot store: pack files of compressed chunks and snapshot
//! manifests. Every file starts with a 6-byte magic and a little-endian u16 format version, so
//! later releases can read today's stores. See ARCHITECTURE.md for the byte-level description.

use std::collections::HashSet;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, io_err};
use crate::name;

/// Version of the pack files this release writes (and the newest it reads): 1.
pub const PACK_VERSION: u16 = 1;
/// Version of the snapshot manifests this release writes (and the newest it reads): 3, which
/// added [`Manifest::arrays`] (2 added [`Manifest::origin`] and [`Manifest::outputs`]).
/// Versions 1 and 2 are still read (see [`Manifest::decode`]).
pub const MANIFEST_VERSION: u16 = 3;
/// Most dimensions an array entry may have (numpy's own limit is 64).
pub const MAX_ARRAY_DIMS: usize = 32;
/// The newest format version of any store file (the manifest's, [`MANIFEST_VERSION`]).
pub const FORMAT_VERSION: u16 = MANIFEST_VERSION;
/// Longest output path a manifest may record, in bytes (Linux's `PATH_MAX`).
pub const MAX_OUTPUT_PATH: usize = 4096;
/// Magic at the start of every pack file.
pub const PACK_MAGIC: &[u8; 6] = b"SVPACK";
/// Magic at the start of every snapshot manifest.
pub const MANIFEST_MAGIC: &[u8; 6] = b"SVSNAP";
/// Length of a file header: magic + version.
pub const HEADER_LEN: usize = 8;
/// Size of the fixed chunks raw regions and values are cut into (64 KiB, see ARCHITECTURE.md
/// for the measurement behind the choice).
pub const CHUNK_SIZE: usize = 64 * 1024;

/// Longest chunk a reader accepts: 16 MiB, the largest chunk `SnapshotWriter::with_chunk_size`
/// makes. Every length read from disk is checked against a bound before anything is allocated.
pub const MAX_CHUNK_LEN: u32 = 16 << 20;
/// Longest manifest file a reader accepts: 1 GiB (about 20 million chunk references, over a TiB
/// of state in 64 KiB chunks). Check it before reading a manifest whole: see
/// [`check_manifest_len`] and [`read_manifest_bytes`].
pub const MAX_MANIFEST_LEN: u64 = 1 << 30;
/// Largest value entry (JSON) a reader reads into memory, and a writer accepts: 1 GiB.
pub const MAX_VALUE_LEN: u64 = 1 << 30;

/// The element types a slice entry may hold (as `Element::NAME` spells them) and their sizes.
pub const ELEMENT_TYPES: [(&str, u32); 10] = [
    ("u8", 1),
    ("i8", 1),
    ("u16", 2),
    ("i16", 2),
    ("u32", 4),
    ("i32", 4),
    ("u64", 8),
    ("i64", 8),
    ("f32", 4),
    ("f64", 8),
];

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
        let header = Self {
            hash,
            raw_len: u32_at(32),
            stored_len: u32_at(36),
            codec,
            shuffle: bytes[41],
        };
        header.check().map_err(corrupt)?;
        Ok(header)
    }

    /// Checks the fields against what a writer makes: a raw length of 1 byte to
    /// [`MAX_CHUNK_LEN`]; raw records stored as they are (stored length = raw length, no
    /// shuffle); zstd records smaller than the chunk (the encoder keeps a chunk raw unless
    /// zstd saves 1/32 of it) with a shuffle width of 0, 1, 2, 4 or 8.
    fn check(&self) -> std::result::Result<(), &'static str> {
        if self.raw_len == 0 || self.raw_len > MAX_CHUNK_LEN {
            return Err("chunk record has a raw length of 0 or above 16 MiB");
        }
        match self.codec {
            Codec::Raw if self.stored_len != self.raw_len => {
                Err("raw chunk record has a stored length other than its raw length")
            }
            Codec::Raw if self.shuffle != 0 => Err("raw chunk record has a shuffle width"),
            Codec::Zstd if self.stored_len >= self.raw_len => {
                Err("compressed chunk record is not smaller than its raw length")
            }
            Codec::Zstd if !matches!(self.shuffle, 0 | 1 | 2 | 4 | 8) => {
                Err("chunk record has an unknown shuffle width")
            }
            _ => Ok(()),
        }
    }

    /// Offset just past the record that starts at `offset` (header and stored bytes), or
    /// `None` if it does not fit in a u64.
    pub fn end(offset: u64, stored_len: u32) -> Option<u64> {
        offset
            .checked_add(Self::LEN as u64)?
            .checked_add(u64::from(stored_len))
    }
}

/// The distinct chunk records `manifests` use, each once (a record several snapshots or
/// entries share counts once), with the name of the pack it is in. What a set of snapshots
/// costs on disk is the sum of these records' lengths.
pub fn distinct_records<'a>(
    manifests: impl IntoIterator<Item = &'a Manifest>,
) -> Vec<(&'a str, &'a ChunkRef)> {
    let mut seen = HashSet::new();
    let mut records = Vec::new();
    for m in manifests {
        for chunk in m.entries.iter().flat_map(|e| &e.chunks) {
            let pack = m.packs[chunk.pack as usize].as_str();
            if seen.insert((pack, chunk.offset)) {
                records.push((pack, chunk));
            }
        }
    }
    records
}

/// The version this release writes for files of `magic` (and the newest it reads):
/// [`MANIFEST_VERSION`] for manifests, [`PACK_VERSION`] for packs.
pub fn current_version(magic: &[u8; 6]) -> u16 {
    if magic == MANIFEST_MAGIC {
        MANIFEST_VERSION
    } else {
        PACK_VERSION
    }
}

/// The file header (magic + the version this release writes) of a store file.
pub fn file_header(magic: &[u8; 6]) -> [u8; HEADER_LEN] {
    file_header_of_version(magic, current_version(magic))
}

/// The file header of a store file of an explicit `version` (tests craft older files).
pub fn file_header_of_version(magic: &[u8; 6], version: u16) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[..6].copy_from_slice(magic);
    out[6..].copy_from_slice(&version.to_le_bytes());
    out
}

/// Checks a file header; returns the version found (1 to the newest this release reads for
/// that kind of file, [`current_version`]).
pub fn check_header(bytes: &[u8], magic: &[u8; 6], what: &str, path: &Path) -> Result<u16> {
    if bytes.len() < HEADER_LEN || &bytes[..6] != magic {
        return Err(Error::Corrupt {
            path: path.to_owned(),
            why: format!("not a supervise {what} file (bad magic or truncated)"),
        });
    }
    let version = u16::from_le_bytes([bytes[6], bytes[7]]);
    let newest = current_version(magic);
    if version == 0 || version > newest {
        return Err(Error::UnsupportedVersion {
            path: path.to_owned(),
            found: version,
            supported: newest,
        });
    }
    Ok(version)
}

/// Checks the length of a manifest file (e.g. from its metadata) before it is read whole:
/// [`Error::Corrupt`] naming `path` if it is longer than [`MAX_MANIFEST_LEN`].
pub fn check_manifest_len(len: u64, path: &Path) -> Result<()> {
    if len > MAX_MANIFEST_LEN {
        return Err(Error::Corrupt {
            path: path.to_owned(),
            why: format!("manifest is {len} bytes, more than any snapshot's ({MAX_MANIFEST_LEN})"),
        });
    }
    Ok(())
}

/// Reads a whole manifest file from `file` (opened from `path`), reading no more than
/// [`MAX_MANIFEST_LEN`] + 1 bytes: a longer file is [`Error::Corrupt`] without being read
/// whole. A file that grows while it is read is caught the same way.
pub fn read_manifest_bytes(file: impl Read, path: &Path) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    file.take(MAX_MANIFEST_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err("read", path))?;
    check_manifest_len(bytes.len() as u64, path)?;
    Ok(bytes)
}

/// True when `name` is a pack name as a writer makes it: snapshot number (20 digits), a nonce
/// (16 lower-case hex digits) and an index (3 to 10 digits), joined by `-`.
pub fn is_pack_name(name: &str) -> bool {
    let parts: Vec<&str> = name.split('-').collect();
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    matches!(parts.as_slice(), [seq, nonce, index]
        if seq.len() == 20 && digits(seq)
            && nonce.len() == 16 && hex(nonce)
            && (3..=10).contains(&index.len()) && digits(index))
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

/// What produced a snapshot: the program, as the supervisor started it (from
/// `SUPERVISE_ORIGIN`, see [`crate::config::ENV_ORIGIN`]). Manifest version 2 on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The program's canonical path.
    pub program: String,
    /// blake3 of the program file, 64 lower-case hex digits, if the supervisor hashed it.
    #[serde(default)]
    pub exe_blake3: Option<String>,
    /// Its arguments (without the program itself).
    #[serde(default)]
    pub args: Vec<String>,
}

impl Origin {
    /// Checks what a manifest requires of an origin: a program path without NUL, and a hash
    /// (if any) of 64 lower-case hex digits. Returns what is wrong.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.program.contains('\0') {
            return Err(format!("an invalid program path {:?}", self.program));
        }
        if let Some(hash) = &self.exe_blake3
            && !(hash.len() == 64 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        {
            return Err(format!("an invalid program hash {hash:?}"));
        }
        Ok(())
    }
}

/// How long an output file of the program was when a snapshot was taken (see `Shim::output`
/// in `supervise-shim`): a restore cuts the file back to this length. Manifest version 2 on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputMark {
    /// The file's absolute path: its directory's canonical path joined with its name, as
    /// resolved when the program opened it.
    pub path: String,
    /// Its length in bytes: everything the program wrote to it before the snapshot's safe point.
    pub len: u64,
}

/// The shape of an array entry, as the program gave it (manifest version 3 on), so that
/// `supervise restore --to` writes the entry as a `.npy` file numpy opens without the program,
/// and a resumed program finds the array it left.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArrayShape {
    /// The entry (a slice).
    pub entry: String,
    /// Its dimensions, outermost first (C order); their product times the element size is the
    /// entry's length.
    pub shape: Vec<u64>,
    /// numpy's type string for one element (e.g. `"<c16"`, `"|b1"`) when the entry's element
    /// type does not say it (a `u8` entry of bytes); `None`: the element type's (see
    /// [`numpy_dtype`]).
    pub dtype: Option<String>,
}

/// numpy's type string for an element type of the store (`"f64"` is `"<f8"`), on this
/// little-endian layout.
pub fn numpy_dtype(elem: &str) -> Option<&'static str> {
    Some(match elem {
        "u8" => "|u1",
        "i8" => "|i1",
        "u16" => "<u2",
        "i16" => "<i2",
        "u32" => "<u4",
        "i32" => "<i4",
        "u64" => "<u8",
        "i64" => "<i8",
        "f32" => "<f4",
        "f64" => "<f8",
        _ => return None,
    })
}

/// The store's element type (name and size) whose numpy type string is `dtype`, if any: the
/// inverse of [`numpy_dtype`].
pub fn element_of_dtype(dtype: &str) -> Option<(&'static str, u32)> {
    ELEMENT_TYPES
        .iter()
        .find(|(elem, _)| numpy_dtype(elem) == Some(dtype))
        .copied()
}

/// The size in bytes of one element of numpy type string `dtype`: a byte order (`<`, `>`, `|`
/// or `=`), a kind letter, the size in digits, then for dates and times a unit in brackets
/// (`"<f8"`, `"|b1"`, `"<U10"`, `"<M8[ns]"`). `None` when it is not one numpy makes: another
/// kind (structured and object types are not plain), or a size the kind does not have.
pub fn dtype_itemsize(dtype: &str) -> Option<u64> {
    let b = dtype.as_bytes();
    if b.len() < 3 || b.len() > 16 || !matches!(b[0], b'<' | b'>' | b'|' | b'=') {
        return None;
    }
    let kind = b[1];
    let digits = b[2..].iter().take_while(|c| c.is_ascii_digit()).count();
    let rest = &dtype[2 + digits..];
    let unit = rest.len() > 2
        && rest.starts_with('[')
        && rest.ends_with(']')
        && rest[1..rest.len() - 1]
            .bytes()
            .all(|c| c.is_ascii_alphanumeric());
    if digits == 0 || digits > 6 || !(rest.is_empty() || (unit && matches!(kind, b'M' | b'm'))) {
        return None;
    }
    let n: u64 = dtype[2..2 + digits].parse().ok()?;
    let fits = match kind {
        b'b' => n == 1,
        b'i' | b'u' => matches!(n, 1 | 2 | 4 | 8),
        b'f' => matches!(n, 2 | 4 | 8 | 16),
        b'c' => matches!(n, 8 | 16 | 32),
        b'M' | b'm' => n == 8,
        b'S' | b'V' | b'U' => n > 0,
        _ => false,
    };
    // A `U` element is that many UCS-4 characters.
    fits.then_some(if kind == b'U' { n * 4 } else { n })
}

/// Checks array shapes against the entries they name: each names an entry once and fits it
/// (see [`ArrayShape::check`]). Returns the array and what is wrong with it.
pub fn check_arrays(
    entries: &[EntryMeta],
    arrays: &[ArrayShape],
) -> std::result::Result<(), (String, String)> {
    if arrays.is_empty() {
        return Ok(());
    }
    let by_name: std::collections::HashMap<&str, &EntryMeta> =
        entries.iter().map(|e| (e.name.as_str(), e)).collect();
    let mut shaped = HashSet::with_capacity(arrays.len());
    for array in arrays {
        let bad = |why: String| (array.entry.clone(), why);
        let entry = by_name
            .get(array.entry.as_str())
            .ok_or_else(|| bad("no entry of that name in the snapshot".into()))?;
        if !shaped.insert(array.entry.as_str()) {
            return Err(bad("two shapes".into()));
        }
        array.check(entry).map_err(bad)?;
    }
    Ok(())
}

impl ArrayShape {
    /// Checks the shape against its entry: a slice whose length is the product of the
    /// dimensions times the element size, at most [`MAX_ARRAY_DIMS`] dimensions, and a valid
    /// numpy type string (if given). Returns what is wrong.
    pub fn check(&self, entry: &EntryMeta) -> std::result::Result<(), String> {
        let EntryKind::Slice { elem, elem_size } = &entry.kind else {
            return Err("it is a value, not an array".into());
        };
        if self.shape.len() > MAX_ARRAY_DIMS {
            return Err(format!(
                "{} dimensions (at most {MAX_ARRAY_DIMS})",
                self.shape.len()
            ));
        }
        let itemsize = match &self.dtype {
            None => {
                numpy_dtype(elem).ok_or_else(|| format!("no numpy type for {elem}"))?;
                u64::from(*elem_size)
            }
            Some(d) => dtype_itemsize(d).ok_or_else(|| format!("an invalid numpy type {d:?}"))?,
        };
        let bytes = self
            .shape
            .iter()
            .try_fold(itemsize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| format!("shape {:?} overflows", self.shape))?;
        if bytes != entry.len {
            return Err(format!(
                "shape {:?} of {itemsize}-byte elements is {bytes} bytes, the entry {}",
                self.shape, entry.len
            ));
        }
        Ok(())
    }
}

/// The body of a version 2 manifest: a version 3 body without `arrays`.
#[derive(Deserialize, Serialize)]
struct ManifestV2 {
    job: String,
    seq: u64,
    parent: Option<u64>,
    created_unix_ms: u64,
    attempt: u32,
    tag: Option<String>,
    stats: SnapshotStats,
    packs: Vec<String>,
    entries: Vec<EntryMeta>,
    origin: Option<Origin>,
    outputs: Vec<OutputMark>,
}

impl From<ManifestV2> for Manifest {
    fn from(m: ManifestV2) -> Self {
        Manifest {
            job: m.job,
            seq: m.seq,
            parent: m.parent,
            created_unix_ms: m.created_unix_ms,
            attempt: m.attempt,
            tag: m.tag,
            stats: m.stats,
            packs: m.packs,
            entries: m.entries,
            origin: m.origin,
            outputs: m.outputs,
            arrays: Vec::new(),
        }
    }
}

/// The body of a version 1 manifest: a version 2 body without `origin` and `outputs`.
#[derive(Deserialize, Serialize)]
struct ManifestV1 {
    job: String,
    seq: u64,
    parent: Option<u64>,
    created_unix_ms: u64,
    attempt: u32,
    tag: Option<String>,
    stats: SnapshotStats,
    packs: Vec<String>,
    entries: Vec<EntryMeta>,
}

impl From<ManifestV1> for Manifest {
    fn from(m: ManifestV1) -> Self {
        ManifestV2 {
            job: m.job,
            seq: m.seq,
            parent: m.parent,
            created_unix_ms: m.created_unix_ms,
            attempt: m.attempt,
            tag: m.tag,
            stats: m.stats,
            packs: m.packs,
            entries: m.entries,
            origin: None,
            outputs: Vec::new(),
        }
        .into()
    }
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
    /// What produced the snapshot, when the supervisor said (`None` in version 1 manifests).
    #[serde(default)]
    pub origin: Option<Origin>,
    /// The program's output files and their lengths at the snapshot (empty in version 1
    /// manifests).
    #[serde(default)]
    pub outputs: Vec<OutputMark>,
    /// The shapes of the entries the program gave as arrays (empty before version 3).
    #[serde(default)]
    pub arrays: Vec<ArrayShape>,
}

/// A manifest file of `version` around an encoded `body`: header, body length (u64 LE), the
/// body, blake3 of the body.
fn frame(version: u16, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + 8 + body.len() + 32);
    out.extend_from_slice(&file_header_of_version(MANIFEST_MAGIC, version));
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(blake3::hash(body).as_bytes());
    out
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
    /// Encodes the manifest file: header, body length (u64 LE), postcard body, blake3 of body;
    /// in the version 2 layout when it has no arrays (so that a release before version 3 reads
    /// every snapshot of a program that gives none), else version 3.
    /// (The writer's manifests pass [`Manifest::check`]; encoding does not enforce it, so tests
    /// can craft damaged ones.)
    pub fn encode(&self) -> Vec<u8> {
        // Without arrays, the version 2 layout: a release before version 3 reads it.
        if self.arrays.is_empty() {
            return self.encode_v2();
        }
        let body = postcard::to_stdvec(self).expect("manifest serialization cannot fail");
        frame(MANIFEST_VERSION, &body)
    }

    /// Encodes the manifest as a version 1 file (without `origin` and `outputs`), as the
    /// release before version 2 wrote it; for tests of reading old stores.
    pub fn encode_v1(&self) -> Vec<u8> {
        let v1 = ManifestV1 {
            job: self.job.clone(),
            seq: self.seq,
            parent: self.parent,
            created_unix_ms: self.created_unix_ms,
            attempt: self.attempt,
            tag: self.tag.clone(),
            stats: self.stats.clone(),
            packs: self.packs.clone(),
            entries: self.entries.clone(),
        };
        let body = postcard::to_stdvec(&v1).expect("manifest serialization cannot fail");
        frame(1, &body)
    }

    /// Encodes the manifest as a version 2 file (without `arrays`), as the release before
    /// version 3 wrote it, and as [`encode`](Self::encode) writes a manifest without arrays.
    pub fn encode_v2(&self) -> Vec<u8> {
        let v2 = ManifestV2 {
            job: self.job.clone(),
            seq: self.seq,
            parent: self.parent,
            created_unix_ms: self.created_unix_ms,
            attempt: self.attempt,
            tag: self.tag.clone(),
            stats: self.stats.clone(),
            packs: self.packs.clone(),
            entries: self.entries.clone(),
            origin: self.origin.clone(),
            outputs: self.outputs.clone(),
        };
        let body = postcard::to_stdvec(&v2).expect("manifest serialization cannot fail");
        frame(2, &body)
    }

    /// Decodes and checks a manifest file read from `path`: header, length, checksum, and
    /// everything a writer guarantees (see [`Manifest::check`]), so that no field read from
    /// disk can make a reader allocate without bound, read out of bounds or write outside a
    /// directory. Reads version 1 (decoded in its own layout, then given no origin and no
    /// outputs), version 2 (its own layout, given no arrays) and version 3.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Self> {
        check_manifest_len(bytes.len() as u64, path)?;
        let version = check_header(bytes, MANIFEST_MAGIC, "snapshot manifest", path)?;
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
        // The whole body must be used: a body of another version must not decode by chance.
        let decoded = match version {
            1 => postcard::take_from_bytes::<ManifestV1>(body).map(|(m, rest)| (m.into(), rest)),
            2 => postcard::take_from_bytes::<ManifestV2>(body).map(|(m, rest)| (m.into(), rest)),
            _ => postcard::take_from_bytes::<Manifest>(body),
        };
        let manifest = match decoded {
            Ok((manifest, [])) => manifest,
            Ok((_, rest)) => {
                return Err(corrupt(format!(
                    "manifest (version {version}) has {} bytes after its body",
                    rest.len()
                )));
            }
            Err(e) => {
                return Err(corrupt(format!(
                    "manifest (version {version}) does not decode: {e}"
                )));
            }
        };
        manifest.check().map_err(corrupt)?;
        Ok(manifest)
    }

    /// Checks what a writer guarantees: the job, entry and element names are valid (as when
    /// they are written: they become file names), the pack names are plain pack names, no
    /// entry name repeats, every chunk names a pack of the list, has a raw length of 1 byte to
    /// [`MAX_CHUNK_LEN`], a stored length no larger (a chunk is stored raw unless compression
    /// saves), a record inside the address range of a pack after its header; the chunks add
    /// up to the entry's length, a whole number of elements, and a value is at most
    /// [`MAX_VALUE_LEN`]; output paths are absolute, at most [`MAX_OUTPUT_PATH`] bytes, without
    /// NUL, and none repeats; an origin's program has no NUL and its hash, if any, is 64
    /// lower-case hex digits; an array shape names an entry of the snapshot, at most once, and
    /// fits it (see [`ArrayShape::check`]). Returns what is wrong.
    pub fn check(&self) -> std::result::Result<(), String> {
        name::validate("job", &self.job).map_err(|e| format!("manifest has an {e}"))?;
        let mut paths = HashSet::with_capacity(self.outputs.len());
        for out in &self.outputs {
            if !out.path.starts_with('/')
                || out.path.len() > MAX_OUTPUT_PATH
                || out.path.contains('\0')
            {
                return Err(format!(
                    "manifest names an invalid output path {:?} (absolute, at most {MAX_OUTPUT_PATH} bytes, no NUL)",
                    out.path
                ));
            }
            if !paths.insert(out.path.as_str()) {
                return Err(format!("output {:?} appears twice", out.path));
            }
        }
        if let Some(origin) = &self.origin {
            origin.check().map_err(|e| format!("manifest has {e}"))?;
        }
        if let Some(p) = self.packs.iter().find(|p| !is_pack_name(p)) {
            return Err(format!("manifest names an invalid pack {p:?}"));
        }
        let mut names = HashSet::with_capacity(self.entries.len());
        for entry in &self.entries {
            name::validate("entry", &entry.name).map_err(|e| format!("manifest has an {e}"))?;
            if !names.insert(entry.name.as_str()) {
                return Err(format!("entry {:?} appears twice", entry.name));
            }
            let bad = |why: String| format!("entry {:?}: {why}", entry.name);
            match &entry.kind {
                EntryKind::Value if entry.len > MAX_VALUE_LEN => {
                    return Err(bad(format!(
                        "a value of {} bytes (at most {MAX_VALUE_LEN})",
                        entry.len
                    )));
                }
                EntryKind::Value => {}
                EntryKind::Slice { elem, elem_size } => {
                    if !ELEMENT_TYPES.contains(&(elem.as_str(), *elem_size)) {
                        return Err(bad(format!(
                            "unknown element type {elem:?} of {elem_size} bytes"
                        )));
                    }
                    if entry.len % u64::from(*elem_size) != 0 {
                        return Err(bad(format!(
                            "{} bytes are not a whole number of {elem}",
                            entry.len
                        )));
                    }
                }
            }
            let mut sum = 0u64;
            for c in &entry.chunks {
                if c.pack as usize >= self.packs.len() {
                    return Err(bad(format!(
                        "names pack #{} of {}",
                        c.pack,
                        self.packs.len()
                    )));
                }
                if c.raw_len == 0 || c.raw_len > MAX_CHUNK_LEN || c.stored_len > c.raw_len {
                    return Err(bad(format!(
                        "a chunk of {} bytes stored in {} (at most {MAX_CHUNK_LEN}, stored in no more)",
                        c.raw_len, c.stored_len
                    )));
                }
                if c.offset < HEADER_LEN as u64
                    || RecordHeader::end(c.offset, c.stored_len).is_none()
                {
                    return Err(bad(format!("a chunk at offset {}", c.offset)));
                }
                sum = sum.checked_add(u64::from(c.raw_len)).ok_or_else(|| {
                    bad("its chunk lengths add up to more than a u64 holds".into())
                })?;
            }
            if sum != entry.len {
                return Err(bad(format!(
                    "chunks add up to {sum} bytes, entry says {}",
                    entry.len
                )));
            }
        }
        check_arrays(&self.entries, &self.arrays)
            .map_err(|(name, why)| format!("array {name:?}: {why}"))
    }

    /// The recorded shape of entry `name`, if the program gave it as an array.
    pub fn array_shape(&self, name: &str) -> Option<&ArrayShape> {
        self.arrays.iter().find(|a| a.entry == name)
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
            packs: vec!["00000000000000000003-0123456789abcdef-000".into()],
            entries: vec![EntryMeta {
                name: "e".into(),
                kind: EntryKind::Value,
                len: 100,
                root: entry_root(100, [[7; 32]]),
                chunks: vec![chunk],
            }],
            origin: Some(Origin {
                program: "/usr/bin/heat".into(),
                exe_blake3: Some("ab".repeat(32)),
                args: vec!["--n".into(), "64".into()],
            }),
            outputs: vec![OutputMark {
                path: "/tmp/out.txt".into(),
                len: 1234,
            }],
            arrays: Vec::new(),
        }
    }

    /// `sample()` with a second entry, a slice of 6 f64 shaped (2, 3).
    fn with_array() -> Manifest {
        let mut m = sample();
        let chunk = ChunkRef {
            hash: [9; 32],
            pack: 0,
            offset: 200,
            stored_len: 48,
            raw_len: 48,
        };
        m.entries.push(EntryMeta {
            name: "u".into(),
            kind: EntryKind::Slice {
                elem: "f64".into(),
                elem_size: 8,
            },
            len: 48,
            root: entry_root(48, [[9; 32]]),
            chunks: vec![chunk],
        });
        m.arrays.push(ArrayShape {
            entry: "u".into(),
            shape: vec![2, 3],
            dtype: None,
        });
        m
    }

    #[test]
    fn array_shapes_round_trip_and_must_fit_their_entry() {
        let m = with_array();
        assert_eq!(Manifest::decode(&m.encode(), Path::new("m")).unwrap(), m);
        assert_eq!(m.array_shape("u").unwrap().shape, [2, 3]);
        type Edit = fn(&mut Manifest);
        let bad: [(&str, Edit); 7] = [
            ("wrong size", |m| m.arrays[0].shape = vec![2, 4]),
            ("missing entry", |m| m.arrays[0].entry = "v".into()),
            ("a value", |m| m.arrays[0].entry = "e".into()),
            ("twice", |m| m.arrays.push(m.arrays[0].clone())),
            ("overflow", |m| m.arrays[0].shape = vec![u64::MAX, 2]),
            ("too many dims", |m| m.arrays[0].shape = vec![1; 33]),
            ("bad dtype", |m| m.arrays[0].dtype = Some("O8".into())),
        ];
        for (what, edit) in bad {
            let mut m = with_array();
            edit(&mut m);
            assert_corrupt(Manifest::decode(&m.encode(), Path::new("m")), what);
        }
        // Bytes with a numpy type of their own: 3 complex128 are 48 bytes.
        let mut m = with_array();
        m.entries[1].kind = EntryKind::Slice {
            elem: "u8".into(),
            elem_size: 1,
        };
        m.arrays[0].shape = vec![3];
        m.arrays[0].dtype = Some("<c16".into());
        Manifest::decode(&m.encode(), Path::new("m")).unwrap();
    }

    #[test]
    fn numpy_type_strings_give_their_item_size() {
        for (d, n) in [
            ("<f8", 8),
            ("|b1", 1),
            ("<c16", 16),
            ("<M8[ns]", 8),
            ("|S10", 10),
        ] {
            assert_eq!(dtype_itemsize(d), Some(n), "{d}");
        }
        for d in [
            "", "f8", "<8", "|O8", "<f", "<f0", "<M8[ns", "<M8[n/s]", "<f8x",
        ] {
            assert_eq!(dtype_itemsize(d), None, "{d}");
        }
        for (elem, size) in ELEMENT_TYPES {
            let d = numpy_dtype(elem).unwrap();
            assert_eq!(dtype_itemsize(d), Some(u64::from(size)), "{elem}");
            assert_eq!(element_of_dtype(d), Some((elem, size)));
        }
        assert_eq!(element_of_dtype("<c16"), None);
    }

    #[test]
    fn a_version_2_manifest_decodes_without_arrays() {
        let m = with_array();
        let old = Manifest::decode(&m.encode_v2(), Path::new("m")).unwrap();
        assert!(old.arrays.is_empty());
        assert_eq!(
            (old.entries, old.outputs, old.origin),
            (m.entries, m.outputs, m.origin)
        );
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

    /// `sample()` changed by `edit`, re-encoded with a valid checksum, decoded.
    fn decode_edited(edit: impl FnOnce(&mut Manifest)) -> Result<Manifest> {
        let mut m = sample();
        edit(&mut m);
        Manifest::decode(&m.encode(), Path::new("m"))
    }

    fn assert_corrupt(result: Result<Manifest>, what: &str) {
        match result {
            Err(Error::Corrupt { path, .. }) => assert_eq!(path, Path::new("m"), "{what}"),
            other => panic!("{what}: {other:?}"),
        }
    }

    /// Sets the only entry's chunks to `n` copies of `chunk` (length and root made to agree).
    fn set_chunks(m: &mut Manifest, chunk: ChunkRef, n: usize) {
        let e = &mut m.entries[0];
        e.chunks = vec![chunk; n];
        e.len = e.chunks.iter().map(|c| u64::from(c.raw_len)).sum();
        e.root = entry_root(e.len, e.chunks.iter().map(|c| c.hash));
    }

    #[test]
    fn lengths_beyond_what_a_writer_makes_are_corrupt() {
        let chunk = sample().entries[0].chunks[0];
        let max = 16u32 << 20;
        for (what, bad) in [
            (
                "raw length 0xffffffff",
                ChunkRef {
                    raw_len: u32::MAX,
                    ..chunk
                },
            ),
            (
                "raw length above 16 MiB",
                ChunkRef {
                    raw_len: max + 1,
                    stored_len: 1,
                    ..chunk
                },
            ),
            (
                "stored above raw",
                ChunkRef {
                    raw_len: 100,
                    stored_len: 101,
                    ..chunk
                },
            ),
            (
                "offset inside the file header",
                ChunkRef { offset: 3, ..chunk },
            ),
            (
                "record end overflows",
                ChunkRef {
                    offset: u64::MAX - 10,
                    ..chunk
                },
            ),
        ] {
            assert_corrupt(decode_edited(|m| set_chunks(m, bad, 4096)), what);
        }
        let biggest = ChunkRef {
            raw_len: max,
            stored_len: max,
            ..chunk
        };
        decode_edited(|m| set_chunks(m, biggest, 3)).unwrap();
    }

    #[test]
    fn names_that_could_escape_a_directory_are_corrupt() {
        for bad in [
            "../../../escaped",
            "/abs/path",
            "",
            "a/b",
            ".hidden",
            "nul\0",
        ] {
            assert_corrupt(decode_edited(|m| m.entries[0].name = bad.into()), bad);
            assert_corrupt(decode_edited(|m| m.job = bad.into()), bad);
            assert_corrupt(decode_edited(|m| m.packs[0] = bad.into()), bad);
            assert_corrupt(
                decode_edited(|m| {
                    m.entries[0].kind = EntryKind::Slice {
                        elem: bad.into(),
                        elem_size: 8,
                    }
                }),
                bad,
            );
        }
        for bad in [
            "p",
            "0000-0123456789abcdef-000",
            "00000000000000000003-0123456789ABCDEF-000",
        ] {
            assert_corrupt(decode_edited(|m| m.packs[0] = bad.into()), bad);
        }
        for bad in [("f64", 4), ("f65", 8)] {
            let kind = EntryKind::Slice {
                elem: bad.0.into(),
                elem_size: bad.1,
            };
            assert_corrupt(decode_edited(|m| m.entries[0].kind = kind), bad.0);
        }
        decode_edited(|m| {
            m.entries[0].kind = EntryKind::Slice {
                elem: "u8".into(),
                elem_size: 1,
            }
        })
        .unwrap();
        // 100 bytes are not a whole number of f64.
        assert_corrupt(
            decode_edited(|m| {
                m.entries[0].kind = EntryKind::Slice {
                    elem: "f64".into(),
                    elem_size: 8,
                }
            }),
            "100 bytes of f64",
        );
    }

    #[test]
    fn version_1_manifests_decode_without_origin_and_outputs() {
        let m = sample();
        let v1 = m.encode_v1();
        assert_eq!(&v1[6..8], &1u16.to_le_bytes());
        let decoded = Manifest::decode(&v1, Path::new("m")).unwrap();
        assert_eq!(
            decoded,
            Manifest {
                origin: None,
                outputs: Vec::new(),
                ..m.clone()
            }
        );
        // Every bound still holds in version 1.
        let mut bad = m.clone();
        bad.entries[0].name = "../x".into();
        assert_corrupt(
            Manifest::decode(&bad.encode_v1(), Path::new("m")),
            "v1 name",
        );
        for len in 0..v1.len() {
            assert!(Manifest::decode(&v1[..len], Path::new("m")).is_err());
        }
    }

    #[test]
    fn a_body_under_the_other_version_number_is_corrupt() {
        let mut v2 = sample().encode();
        v2[6..8].copy_from_slice(&1u16.to_le_bytes());
        assert_corrupt(Manifest::decode(&v2, Path::new("m")), "v2 body as v1");
        let mut v1 = sample().encode_v1();
        v1[6..8].copy_from_slice(&2u16.to_le_bytes());
        assert_corrupt(Manifest::decode(&v1, Path::new("m")), "v1 body as v2");
        let mut v3 = with_array().encode();
        assert_eq!(&v3[6..8], &3u16.to_le_bytes());
        v3[6..8].copy_from_slice(&2u16.to_le_bytes());
        assert_corrupt(Manifest::decode(&v3, Path::new("m")), "v3 body as v2");
        let mut v2 = sample().encode();
        assert_eq!(&v2[6..8], &2u16.to_le_bytes(), "no arrays: version 2");
        v2[6..8].copy_from_slice(&3u16.to_le_bytes());
        assert_corrupt(Manifest::decode(&v2, Path::new("m")), "v2 body as v3");
    }

    #[test]
    fn bad_outputs_and_origins_are_corrupt() {
        for bad in [
            "",
            "relative/out",
            "/nul\0",
            &format!("/{}", "a".repeat(4096)),
        ] {
            assert_corrupt(decode_edited(|m| m.outputs[0].path = bad.into()), bad);
        }
        assert_corrupt(
            decode_edited(|m| m.outputs.push(m.outputs[0].clone())),
            "repeated output",
        );
        for bad in ["AB".repeat(32), "ab".repeat(31), "zz".repeat(32)] {
            assert_corrupt(
                decode_edited(|m| {
                    if let Some(o) = &mut m.origin {
                        o.exe_blake3 = Some(bad.clone())
                    }
                }),
                &bad,
            );
        }
        decode_edited(|m| m.origin = None).unwrap();
        decode_edited(|m| m.outputs.clear()).unwrap();
    }

    #[test]
    fn packs_keep_version_1() {
        assert_eq!(&file_header(PACK_MAGIC)[6..], &1u16.to_le_bytes());
        assert_eq!(&file_header(MANIFEST_MAGIC)[6..], &3u16.to_le_bytes());
        let mut pack = file_header(PACK_MAGIC);
        pack[6] = 2;
        assert!(matches!(
            check_header(&pack, PACK_MAGIC, "pack", Path::new("p")),
            Err(Error::UnsupportedVersion {
                found: 2,
                supported: 1,
                ..
            })
        ));
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
