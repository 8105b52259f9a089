//! Writing snapshots: entries are cut into fixed-size chunks, hashed with blake3 and looked up
//! in the store's index; only chunks the store lacks are compressed and appended to new pack
//! files. Commit: fsync the packs, rename them into place, fsync the pack directory, then
//! publish the manifest (temp, fsync, rename, fsync). Until the manifest's rename the snapshot
//! does not exist; after it, everything it references is durable.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::claims::{ChunkAt, ChunkClaims};
use crate::codec::Encoder;
use crate::control::DamagedSnapshot;
use crate::error::{Error, Result};
use crate::format::{
    ArrayShape, CHUNK_SIZE, ChunkRef, EntryKind, EntryMeta, Hash, Manifest, Origin, OutputMark,
    RecordHeader, SnapshotStats, entry_root,
};
use crate::name;
use crate::pack::{FinishedPack, PackWriter};
use crate::store::{JobStore, Retention, RetentionReport};

/// Packs are closed once they reach this size: large enough that a 1 GiB state is a handful
/// of files and fsyncs, small enough that retention can free space of old snapshots.
pub const PACK_TARGET: u64 = 128 << 20;

/// Most new chunks the tables of a snapshot's new chunks make room for at once (those of
/// 1 GiB of 64 KiB chunks); beyond, they grow as they fill.
const RESERVE_MOST: usize = 16384;

/// Where a chunk the store holds lives.
#[derive(Clone, Debug)]
struct Loc {
    pack: Arc<str>,
    offset: u64,
    stored_len: u32,
    raw_len: u32,
}

/// The figures of a committed snapshot, as reported to the program and the supervisor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotReport {
    /// Sequence number.
    pub seq: u64,
    /// The program's progress tag.
    pub tag: Option<String>,
    /// Raw bytes of all entries.
    pub bytes_total: u64,
    /// Raw bytes of chunks that were new to the store.
    pub bytes_new: u64,
    /// Raw bytes of chunks rewritten out of mostly-dead packs (compaction).
    #[serde(default)]
    pub bytes_compacted: u64,
    /// Bytes written: packs plus the manifest.
    pub bytes_written: u64,
    /// Milliseconds from start to durable manifest.
    pub duration_ms: u64,
    /// Snapshots removed by retention afterwards.
    pub removed: Vec<u64>,
    /// How long the program was paused for it, in microseconds, from its request at the safe
    /// point (the wait for the previous snapshot's writer included) to going on; 0 when not
    /// measured (a report of an older shim).
    #[serde(default)]
    pub pause_us: u64,
    /// CPU time spent writing it (hashing, compressing, writing; the writer's thread and its
    /// workers), in microseconds: what it takes from the program's cores while it computes on.
    #[serde(default)]
    pub writer_cpu_us: u64,
}

/// Writes the snapshots of one job. Holds the index of the chunks the store's committed
/// snapshots reference, so each snapshot writes only what is new.
pub struct SnapshotWriter {
    job: JobStore,
    index: HashMap<Hash, Loc>,
    newest: Option<u64>,
    next_seq: u64,
    attempt: u32,
    threads: usize,
    chunk_size: usize,
    /// Packs mostly dead: chunks found there are rewritten rather than referenced.
    sparse: HashSet<Arc<str>>,
    /// The newest committed manifest, kept to build the next snapshot's deltas on.
    last: Option<Manifest>,
    /// Snapshots found damaged when the writer opened, and set aside.
    set_aside: Vec<DamagedSnapshot>,
    /// The writer of one rank's parts of a job's epochs ([`SnapshotWriter::open_part`]):
    /// other ranks write beside it, and the supervisor removes what epochs no longer need.
    part: bool,
    /// Part mode: the manifests indexed so far.
    indexed: HashSet<u64>,
    /// Part mode: settles with the epoch's other ranks which of them stores a chunk they
    /// hold in common (see [`crate::claims`]).
    claims: Option<Arc<dyn ChunkClaims>>,
}

impl SnapshotWriter {
    /// A writer of `job` with nothing indexed yet.
    fn empty(job: JobStore, attempt: u32, next_seq: u64, part: bool) -> Self {
        Self {
            newest: None,
            next_seq,
            job,
            index: HashMap::new(),
            attempt,
            threads: crate::worker_threads(),
            chunk_size: CHUNK_SIZE,
            sparse: HashSet::new(),
            last: None,
            set_aside: Vec::new(),
            part,
            indexed: HashSet::new(),
            claims: None,
        }
    }

    /// Opens the writer of `job`: removes temporary files a dead writer left, and indexes the
    /// chunks of every committed snapshot that reads back. `attempt` is recorded in manifests.
    pub fn open(job: JobStore, attempt: u32) -> Result<Self> {
        job.remove_leftovers()?;
        let next_seq = job.highest_seq()?.map_or(1, |s| s + 1);
        let mut writer = Self::empty(job, attempt, next_seq, false);
        let mut manifests = Vec::new();
        let mut unreadable = false;
        for seq in writer.job.snapshot_seqs()? {
            let checked = writer
                .job
                .read_manifest(seq)
                .and_then(|m| writer.job.open_packs(&m).map(|_| m));
            match checked {
                Ok(manifest) => {
                    writer.add_to_index(&manifest);
                    writer.newest = Some(seq);
                    manifests.push(manifest);
                }
                // A damaged snapshot (say an old one lost a pack) is set aside, so that it
                // neither stops the job nor lends a chunk to a new snapshot.
                Err(e) if e.is_corruption() => {
                    writer.job.quarantine(seq)?;
                    writer.set_aside.push(DamagedSnapshot {
                        seq,
                        why: e.to_string(),
                    });
                }
                // Unreadable for now (permissions, too many open files): not indexed.
                Err(_) => unreadable = true,
            }
        }
        // Packs no snapshot references are what a writer killed between a manifest's removal
        // and its packs' (retention), or between a pack's rename and its manifest's commit,
        // left behind; no other writer runs (we hold the job). Kept while any manifest could
        // not be read (what it needs is unknown), and when this open set a snapshot aside
        // (`verify --repair` may find good copies of its chunks in any pack).
        if !unreadable && writer.set_aside.is_empty() {
            writer.job.remove_unreferenced_packs(&manifests)?;
        }
        writer.set_sparse(writer.job.sparse_packs(&manifests)?);
        writer.last = manifests.pop();
        Ok(writer)
    }

    /// Opens the writer of one rank's parts of a job's epochs (see [`crate::epoch`]): the
    /// ranks write side by side into the job's directories, so this writer removes nothing it
    /// did not write (no leftovers of others, no unreferenced packs, no retention: the
    /// supervisor does that between epochs, while no rank writes) and sets nothing aside. It
    /// indexes the chunks of every manifest that reads, so a chunk any rank stored is stored
    /// once, and builds deltas on `base` (this rank's part that was restored). Each snapshot's
    /// number is given by [`prepare_part`](Self::prepare_part).
    pub fn open_part(job: JobStore, attempt: u32, base: Option<u64>) -> Result<Self> {
        let mut writer = Self::empty(job, attempt, 0, true);
        writer.newest = base;
        writer.refresh()?;
        if let Some(seq) = base {
            writer.last = Some(writer.job.read_manifest(seq)?);
        }
        Ok(writer)
    }

    /// Part mode: the next snapshot is numbered `seq`. First brings the index up to date:
    /// chunks whose packs the supervisor removed are forgotten, and those of manifests other
    /// ranks committed since are added.
    pub fn prepare_part(&mut self, seq: u64) -> Result<()> {
        self.next_seq = seq;
        self.refresh()
    }

    fn refresh(&mut self) -> Result<()> {
        let packs: HashSet<String> = self.job.pack_names()?.into_iter().collect();
        self.index.retain(|_, loc| packs.contains(&*loc.pack));
        let seqs = self.job.snapshot_seqs()?;
        self.indexed.retain(|s| seqs.binary_search(s).is_ok());
        for seq in seqs {
            if self.indexed.contains(&seq) {
                continue;
            }
            // A manifest that does not read (another rank's, being removed, or damaged) lends
            // nothing; the restore of its epoch finds the damage.
            if let Ok(manifest) = self.job.read_manifest(seq)
                && manifest.packs.iter().all(|p| packs.contains(p))
            {
                self.add_to_index(&manifest);
                self.indexed.insert(seq);
            }
        }
        Ok(())
    }

    /// Part mode: chunks new to this rank are claimed through `claims` before they are
    /// stored, so that a chunk several ranks hold for the first time in one epoch is stored
    /// by one of them (see [`crate::claims`]).
    pub fn set_claims(&mut self, claims: Arc<dyn ChunkClaims>) {
        if self.part {
            self.claims = Some(claims);
        }
    }

    /// Uses chunks of `bytes` (4 KiB to 16 MiB) for later snapshots instead of
    /// [`CHUNK_SIZE`]; for measurements. Readers need no setting: each chunk records its length.
    pub fn with_chunk_size(mut self, bytes: usize) -> Self {
        self.chunk_size = bytes.clamp(4096, 16 << 20);
        self
    }

    fn add_to_index(&mut self, manifest: &Manifest) {
        let packs: Vec<Arc<str>> = manifest
            .packs
            .iter()
            .map(|p| Arc::from(p.as_str()))
            .collect();
        for chunk in manifest.entries.iter().flat_map(|e| &e.chunks) {
            self.index.entry(chunk.hash).or_insert_with(|| Loc {
                pack: packs[chunk.pack as usize].clone(),
                offset: chunk.offset,
                stored_len: chunk.stored_len,
                raw_len: chunk.raw_len,
            });
        }
    }

    /// Snapshots found damaged when the writer opened (an old snapshot whose pack is missing or
    /// truncated, say), which it set aside as [`JobStore::quarantine`] does.
    pub fn set_aside(&self) -> &[DamagedSnapshot] {
        &self.set_aside
    }

    /// Stops trusting stored records the scrub found damaged, given as `(pack, offset, hash)`:
    /// every committed snapshot that references one is set aside (it no longer restores), and
    /// a chunk with such a hash is no longer referenced there, so the next snapshot that holds
    /// those bytes stores them anew. Returns the snapshots set aside.
    pub fn distrust(&mut self, records: &[(String, u64, Hash)]) -> Result<Vec<u64>> {
        let mut bad: HashSet<(&str, u64)> = HashSet::new();
        for (pack, offset, hash) in records {
            bad.insert((pack.as_str(), *offset));
            if self
                .index
                .get(hash)
                .is_some_and(|loc| *loc.pack == **pack && loc.offset == *offset)
            {
                self.index.remove(hash);
            }
        }
        let mut set_aside = Vec::new();
        for seq in self.job.snapshot_seqs()? {
            let Ok(manifest) = self.manifest_of(seq) else {
                continue;
            };
            let uses = manifest.entries.iter().flat_map(|e| &e.chunks).any(|c| {
                manifest
                    .packs
                    .get(c.pack as usize)
                    .is_some_and(|p| bad.contains(&(p.as_str(), c.offset)))
            });
            if uses {
                self.job.quarantine(seq)?;
                set_aside.push(seq);
                if self.last.as_ref().is_some_and(|m| m.seq == seq) {
                    self.last = None;
                }
            }
        }
        Ok(set_aside)
    }

    /// The job this writer writes.
    pub fn job(&self) -> &JobStore {
        &self.job
    }

    /// The attempt number recorded in manifests.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The newest committed snapshot.
    pub fn newest(&self) -> Option<u64> {
        self.newest
    }

    /// Starts a snapshot; add entries to the builder, then commit it.
    pub fn begin(&mut self, tag: Option<&str>) -> SnapshotBuilder<'_> {
        self.begin_at(tag, Instant::now())
    }

    /// Starts a snapshot whose duration counts from `started` (when it was captured).
    pub fn begin_at(&mut self, tag: Option<&str>, started: Instant) -> SnapshotBuilder<'_> {
        let seq = self.next_seq;
        SnapshotBuilder {
            seq,
            started,
            tag: tag.map(str::to_owned),
            entries: Vec::new(),
            pack_table: Vec::new(),
            pack_ids: HashMap::new(),
            current: None,
            finished: Vec::new(),
            spare_blocks: Vec::new(),
            new_locs: HashMap::new(),
            claimed: Mutex::new(HashSet::new()),
            deferred: HashSet::new(),
            located: HashMap::new(),
            stats: SnapshotStats::default(),
            packs_made: 0,
            committed: false,
            origin: None,
            outputs: Vec::new(),
            arrays: Vec::new(),
            workers_cpu: std::time::Duration::ZERO,
            writer: self,
        }
    }

    /// Applies retention (keep the newest `keep`), forgets chunks whose packs were removed, and
    /// notes which packs to compact.
    pub fn apply_retention(&mut self, policy: impl Into<Retention>) -> Result<RetentionReport> {
        if self.part {
            return Ok(RetentionReport::default());
        }
        let report = self.job.apply_retention(policy)?;
        if !report.removed_packs.is_empty() {
            let gone: HashSet<&str> = report.removed_packs.iter().map(String::as_str).collect();
            self.index.retain(|_, loc| !gone.contains(&*loc.pack));
        }
        self.set_sparse(report.sparse_packs.clone());
        Ok(report)
    }

    /// The manifest of committed snapshot `seq` (from memory for the newest).
    pub fn manifest_of(&self, seq: u64) -> Result<Manifest> {
        match &self.last {
            Some(m) if m.seq == seq => Ok(m.clone()),
            _ => self.job.read_manifest(seq),
        }
    }

    fn set_sparse(&mut self, packs: Vec<String>) {
        self.sparse = packs.into_iter().map(Arc::from).collect();
    }
}

/// A snapshot being built. Dropping it without [`commit`](Self::commit) removes what it wrote.
pub struct SnapshotBuilder<'w> {
    writer: &'w mut SnapshotWriter,
    seq: u64,
    started: Instant,
    tag: Option<String>,
    entries: Vec<EntryMeta>,
    pack_table: Vec<String>,
    pack_ids: HashMap<Arc<str>, u32>,
    current: Option<PackWriter>,
    finished: Vec<FinishedPack>,
    /// The blocks of the last finished pack, for the next one.
    spare_blocks: Vec<crate::direct::AlignedBuf>,
    new_locs: HashMap<Hash, Loc>,
    claimed: Mutex<HashSet<Hash>>,
    /// Chunks another rank of the epoch stores (see [`crate::claims`]): referenced with
    /// [`DEFERRED`] as their pack until commit learns where they lie.
    deferred: HashSet<Hash>,
    /// Where the deferred chunks lie, once other ranks said.
    located: HashMap<Hash, Loc>,
    stats: SnapshotStats,
    packs_made: u32,
    committed: bool,
    origin: Option<Origin>,
    outputs: Vec<OutputMark>,
    arrays: Vec<ArrayShape>,
    /// CPU time of the worker threads so far.
    workers_cpu: std::time::Duration,
}

/// What a worker found for one chunk.
enum Found {
    /// The store already holds it.
    Known(Hash),
    /// Another chunk of this snapshot with the same hash is being stored.
    Twin(Hash),
    /// Another rank of the epoch stores it (its length).
    Deferred(Hash, u32),
}

/// The pack number of a chunk reference whose location another rank reports at commit.
const DEFERRED: u32 = u32::MAX;

/// Bytes [`SnapshotBuilder::add_file`] reads and stores at a time.
pub const STREAM_BATCH: usize = 64 << 20;

/// An entry being added in parts: [`SnapshotBuilder::begin_whole`] or
/// [`SnapshotBuilder::begin_delta`], then [`SnapshotBuilder::add_chunks`], then
/// [`SnapshotBuilder::end_entry`].
pub struct EntryInParts<'b> {
    name: String,
    kind: EntryKind,
    len: u64,
    /// Bytes in each chunk but maybe the last.
    chunk: usize,
    /// A delta's base: where the chunks never given are.
    base: Option<&'b EntryMeta>,
    refs: Vec<Option<ChunkRef>>,
}

impl EntryInParts<'_> {
    /// The entry's number of chunks.
    pub fn count(&self) -> usize {
        self.refs.len()
    }

    /// The length of chunk `i` (the last may be short).
    pub fn chunk_len(&self, i: usize) -> usize {
        let start = (i * self.chunk) as u64;
        (self.len.saturating_sub(start)).min(self.chunk as u64) as usize
    }

    /// The bytes of the chunks numbered in `chunks`, together.
    pub fn bytes_of(&self, chunks: &[usize]) -> usize {
        chunks.iter().map(|&i| self.chunk_len(i)).sum()
    }
}

/// A plain-old-data element type that can be stored as a raw slice.
pub trait Element: bytemuck::Pod {
    /// Name recorded in the manifest.
    const NAME: &'static str;
}

macro_rules! element {
    ($($t:ty),*) => { $(impl Element for $t { const NAME: &'static str = stringify!($t); })* };
}
element!(u8, i8, u16, i16, u32, i32, u64, i64, f32, f64);

impl SnapshotBuilder<'_> {
    /// The sequence number this snapshot will have.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Adds a typed value (serialized as JSON, so `supervise restore` can show it).
    pub fn value<T: Serialize + ?Sized>(&mut self, name: &str, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec(value).map_err(|source| Error::Serde {
            name: name.to_owned(),
            source,
        })?;
        if bytes.len() as u64 > crate::format::MAX_VALUE_LEN {
            return Err(Error::ValueTooLarge {
                name: name.to_owned(),
                len: bytes.len() as u64,
                max: crate::format::MAX_VALUE_LEN,
            });
        }
        self.add(name, EntryKind::Value, &bytes, 0)
    }

    /// Adds a raw slice, read in place (no intermediate copy). Floating-point and multi-byte
    /// integer slices are byte-shuffled before compression.
    pub fn slice<T: Element>(&mut self, name: &str, data: &[T]) -> Result<()> {
        let kind = EntryKind::Slice {
            elem: T::NAME.to_owned(),
            elem_size: std::mem::size_of::<T>() as u32,
        };
        self.add(
            name,
            kind,
            bytemuck::cast_slice(data),
            std::mem::size_of::<T>() as u8,
        )
    }

    fn check_new_name(&self, name: &str) -> Result<()> {
        name::validate("entry", name)?;
        if self.entries.iter().any(|e| e.name == name) {
            return Err(Error::DuplicateEntry {
                name: name.to_owned(),
            });
        }
        Ok(())
    }

    /// The manifest of committed snapshot `seq`, to build deltas on.
    pub fn manifest_of(&self, seq: u64) -> Result<Manifest> {
        self.writer.manifest_of(seq)
    }

    /// Records what produced the snapshot (see [`Manifest::origin`]).
    pub fn set_origin(&mut self, origin: Option<Origin>) {
        self.origin = origin;
    }

    /// Records the program's output files and their lengths (see [`Manifest::outputs`]). The
    /// caller makes their bytes durable before [`commit`](Self::commit).
    pub fn set_outputs(&mut self, outputs: Vec<OutputMark>) {
        self.outputs = outputs;
    }

    /// Records the shapes of the entries the program gave as arrays (see
    /// [`Manifest::arrays`]); [`commit`](Self::commit) checks each against its entry.
    pub fn set_arrays(&mut self, arrays: Vec<ArrayShape>) {
        self.arrays = arrays;
    }

    /// Adds an entry of any kind from its bytes, byte-shuffled with width `shuffle` (0: none).
    pub fn add_whole(
        &mut self,
        name: &str,
        kind: EntryKind,
        data: &[u8],
        shuffle: u8,
    ) -> Result<()> {
        self.add(name, kind, data, shuffle)
    }

    /// Adds an entry of `len` bytes read from `file` at offset 0, in batches of
    /// [`STREAM_BATCH`] bytes, so a file of any length is stored with bounded memory. The file
    /// must hold at least `len` bytes while it is read (a shorter one is an error naming
    /// `path`); bytes past `len` are not read.
    pub fn add_file(
        &mut self,
        name: &str,
        kind: EntryKind,
        file: &std::fs::File,
        len: u64,
        path: &std::path::Path,
        shuffle: u8,
    ) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let mut entry = self.begin_whole(name, kind, len)?;
        let per_batch = (STREAM_BATCH / entry.chunk).max(1);
        let mut buf = Vec::new();
        let mut first = 0;
        while first < entry.count() {
            let chunks: Vec<usize> = (first..(first + per_batch).min(entry.count())).collect();
            let start = (first * entry.chunk) as u64;
            buf.resize(entry.bytes_of(&chunks), 0);
            file.read_exact_at(&mut buf, start)
                .map_err(crate::error::io_err("read", path))?;
            self.add_chunks(&mut entry, &chunks, &buf, shuffle)?;
            first += per_batch;
        }
        self.end_entry(entry)
    }

    fn add(&mut self, name: &str, kind: EntryKind, data: &[u8], shuffle: u8) -> Result<()> {
        let mut entry = self.begin_whole(name, kind, data.len() as u64)?;
        let all: Vec<usize> = (0..entry.count()).collect();
        self.add_chunks(&mut entry, &all, data, shuffle)?;
        self.end_entry(entry)
    }

    /// Adds an entry that equals `base` (the same entry in an earlier snapshot) except for the
    /// chunks numbered in `dirty` (ascending), whose new bytes `data` holds one after another.
    /// Clean chunks are neither copied nor hashed again: they are referenced as they are.
    pub fn add_delta(
        &mut self,
        name: &str,
        base: &EntryMeta,
        dirty: &[usize],
        data: &[u8],
        shuffle: u8,
    ) -> Result<()> {
        let mut entry = self.begin_delta(name, base)?;
        self.add_chunks(&mut entry, dirty, data, shuffle)?;
        self.end_entry(entry)
    }

    /// Begins entry `name` of `kind` and `len` bytes, to be given in parts with
    /// [`add_chunks`](Self::add_chunks) (every chunk once, in any order) and finished with
    /// [`end_entry`](Self::end_entry): an entry of any length stored with the memory of one
    /// part.
    pub fn begin_whole(
        &mut self,
        name: &str,
        kind: EntryKind,
        len: u64,
    ) -> Result<EntryInParts<'static>> {
        self.check_new_name(name)?;
        let chunk = self.writer.chunk_size;
        let count = usize::try_from(len.div_ceil(chunk as u64)).map_err(|_| Error::Overflow {
            job: self.writer.job.name().to_owned(),
            entry: name.to_owned(),
            what: "the entry's chunk count",
        })?;
        Ok(EntryInParts {
            name: name.to_owned(),
            kind,
            len,
            chunk,
            base: None,
            refs: vec![None; count],
        })
    }

    /// Begins entry `name` as a change of `base` (the same entry in an earlier snapshot): the
    /// chunks given with [`add_chunks`](Self::add_chunks) are its new bytes; those never given
    /// are referenced as `base` has them, neither copied nor hashed again.
    pub fn begin_delta<'b>(&mut self, name: &str, base: &'b EntryMeta) -> Result<EntryInParts<'b>> {
        self.check_new_name(name)?;
        let uniform = base.chunks.split_last().is_none_or(|(last, rest)| {
            rest.iter().all(|c| c.raw_len as usize == CHUNK_SIZE)
                && last.raw_len as usize <= CHUNK_SIZE
        });
        let whole_chunks = (base.len as usize).div_ceil(CHUNK_SIZE) == base.chunks.len();
        if !uniform || !whole_chunks {
            return Err(Error::DeltaBase {
                job: self.writer.job.name().to_owned(),
                entry: name.to_owned(),
                why: format!("its chunks are not all {CHUNK_SIZE} bytes"),
            });
        }
        Ok(EntryInParts {
            name: name.to_owned(),
            kind: base.kind.clone(),
            len: base.len,
            chunk: CHUNK_SIZE,
            refs: vec![None; base.chunks.len()],
            base: Some(base),
        })
    }

    /// Stores the chunks of `entry` numbered in `chunks` (ascending), whose bytes `data` holds
    /// one after another (each chunk is the entry's chunk size, the last one possibly
    /// shorter). Chunks the store holds are only referenced.
    pub fn add_chunks(
        &mut self,
        entry: &mut EntryInParts<'_>,
        chunks: &[usize],
        data: &[u8],
        shuffle: u8,
    ) -> Result<()> {
        let mut offset = 0usize;
        let pieces = self.pieces(entry, chunks, |len| {
            let piece = data.get(offset..offset + len);
            offset += len;
            piece
        })?;
        if offset != data.len() {
            return Err(self.mismatch(entry, "the chunks' data is too long".into()));
        }
        self.store_chunks(&pieces, shuffle, &mut entry.refs)
    }

    /// Stores the chunks of `entry` numbered in `chunks` (ascending), read where they are in
    /// `all`, the entry's whole bytes, which another thread may be writing meanwhile: each
    /// chunk is copied into a small buffer of its worker (it stays in the CPU's cache) and
    /// hashed and compressed from there, so that its record holds exactly what its hash says.
    /// With shared chunk claims (a rank of a job), whose hashes are claimed before anything is
    /// stored, the chunks are copied first. Chunks the store holds are only referenced.
    pub fn add_chunks_in_place(
        &mut self,
        entry: &mut EntryInParts<'_>,
        chunks: &[usize],
        all: &[u8],
        shuffle: u8,
    ) -> Result<()> {
        if all.len() as u64 != entry.len {
            return Err(self.mismatch(
                entry,
                format!("{} bytes given for an entry of {}", all.len(), entry.len),
            ));
        }
        let chunk = entry.chunk;
        let mut at = chunks.iter();
        let pieces = self.pieces(entry, chunks, |len| {
            let start = at.next()? * chunk;
            all.get(start..start + len)
        })?;
        if self.writer.claims.is_some() {
            let mut copied = Vec::with_capacity(pieces.iter().map(|(_, b)| b.len()).sum());
            for (_, bytes) in &pieces {
                copied.extend_from_slice(bytes);
            }
            return self.add_chunks(entry, chunks, &copied, shuffle);
        }
        self.store_pieces(&pieces, None, shuffle, &mut entry.refs, true)
    }

    /// Checks that `chunks` ascend and are new to `entry`, and pairs each with its bytes:
    /// `bytes(len)` gives the next chunk's `len` bytes, or `None` when they are missing.
    fn pieces<'d>(
        &self,
        entry: &EntryInParts<'_>,
        chunks: &[usize],
        mut bytes: impl FnMut(usize) -> Option<&'d [u8]>,
    ) -> Result<Vec<(usize, &'d [u8])>> {
        let mut pieces = Vec::with_capacity(chunks.len());
        for (k, &i) in chunks.iter().enumerate() {
            if k > 0 && chunks[k - 1] >= i {
                return Err(self.mismatch(entry, "chunk numbers not ascending".into()));
            }
            match entry.refs.get(i) {
                None => return Err(self.mismatch(entry, format!("no chunk {i}"))),
                Some(Some(_)) => {
                    return Err(self.mismatch(entry, format!("chunk {i} given twice")));
                }
                Some(None) => {}
            }
            let piece = bytes(entry.chunk_len(i))
                .ok_or_else(|| self.mismatch(entry, "the chunks' data is too short".into()))?;
            pieces.push((i, piece));
        }
        Ok(pieces)
    }

    /// The error for chunks that do not fit `entry`.
    fn mismatch(&self, entry: &EntryInParts<'_>, why: String) -> Error {
        Error::DeltaBase {
            job: self.writer.job.name().to_owned(),
            entry: entry.name.clone(),
            why,
        }
    }

    /// Finishes `entry`: chunks never given are referenced as its base has them (a whole
    /// entry must have been given every chunk).
    pub fn end_entry(&mut self, entry: EntryInParts<'_>) -> Result<()> {
        let EntryInParts {
            name,
            kind,
            len,
            base,
            mut refs,
            ..
        } = entry;
        // Another entry of the name may have been finished since this one began.
        self.check_new_name(&name)?;
        let job = self.writer.job.name().to_owned();
        let mismatch = |why: String| Error::DeltaBase {
            job: job.clone(),
            entry: name.clone(),
            why,
        };
        for (i, slot) in refs.iter_mut().enumerate() {
            if slot.is_some() {
                continue;
            }
            let chunk = base
                .and_then(|b| b.chunks.get(i))
                .ok_or_else(|| mismatch(format!("chunk {i} was never given")))?;
            let loc = match self.new_locs.get(&chunk.hash) {
                Some(loc) => loc.clone(),
                None => {
                    let held = self.writer.index.get(&chunk.hash).cloned();
                    let loc =
                        held.ok_or_else(|| mismatch("a clean chunk is not in the store".into()))?;
                    if self.writer.sparse.contains(&loc.pack) {
                        match self.copy_record(chunk.hash, &loc) {
                            Ok(copied) => copied,
                            Err(e) if e.is_corruption() => {
                                // Found rotten on the way: no later snapshot may use it.
                                let record = (loc.pack.to_string(), loc.offset, chunk.hash);
                                let _ = self.writer.distrust(&[record]);
                                return Err(e);
                            }
                            Err(e) => return Err(e),
                        }
                    } else {
                        loc
                    }
                }
            };
            *slot = Some(self.chunk_ref(chunk.hash, &loc));
        }
        self.stats.bytes_total += len;
        self.finish_entry(&name, kind, len, refs);
        Ok(())
    }

    /// Compaction of a chunk the capture did not copy: its stored record is read from the
    /// mostly-dead pack, checked, and appended to this snapshot's pack as it is.
    fn copy_record(&mut self, hash: Hash, loc: &Loc) -> Result<Loc> {
        let path = self.writer.job.pack_path(&loc.pack);
        let file = self.writer.job.open_pack(&loc.pack)?;
        let mut buf = vec![0u8; RecordHeader::LEN + loc.stored_len as usize];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, loc.offset)
            .map_err(crate::error::io_err("read", &path))?;
        let header = RecordHeader::decode(&buf, &path)?;
        let mut raw = vec![0u8; header.raw_len as usize];
        crate::codec::Decoder::new()
            .map_err(crate::error::io_err("create decompressor", &path))?
            .decode(&header, &buf[RecordHeader::LEN..], &mut raw, &path)?;
        if header.hash != hash {
            return Err(Error::Corrupt {
                path,
                why: format!(
                    "record at offset {} is not the chunk the index says",
                    loc.offset
                ),
            });
        }
        self.append(&header, &buf[RecordHeader::LEN..], true)
    }

    fn finish_entry(&mut self, name: &str, kind: EntryKind, len: u64, refs: Vec<Option<ChunkRef>>) {
        let chunks: Vec<ChunkRef> = refs
            .into_iter()
            .map(|r| r.expect("every chunk resolved"))
            .collect();
        self.entries.push(EntryMeta {
            name: name.to_owned(),
            kind,
            len,
            root: entry_root(len, chunks.iter().map(|c| c.hash)),
            chunks,
        });
    }

    /// Hashes the `(index, bytes)` chunks in parallel, references those the store holds,
    /// stores the rest once, and fills `refs[index]` for each.
    fn store_chunks(
        &mut self,
        pieces: &[(usize, &[u8])],
        shuffle: u8,
        refs: &mut [Option<ChunkRef>],
    ) -> Result<()> {
        let Some(claims) = self.writer.claims.clone() else {
            return self.store_pieces(pieces, None, shuffle, refs, false);
        };
        // Hashed first, so that the chunks new to this rank are claimed before any is stored.
        let (hashes, cpu) = hash_pieces(pieces, self.writer.threads);
        self.workers_cpu += cpu;
        let mut fresh = Vec::new();
        {
            let claimed = self.claimed.get_mut().unwrap_or_else(|p| p.into_inner());
            let mut seen = HashSet::new();
            for hash in &hashes {
                if !self.writer.index.contains_key(hash)
                    && !self.deferred.contains(hash)
                    && !claimed.contains(hash)
                    && seen.insert(*hash)
                {
                    fresh.push(*hash);
                }
            }
        }
        for batch in fresh.chunks(crate::claims::MAX_BATCH) {
            for i in claims.claim(self.seq, batch)? {
                let hash = batch.get(i).ok_or_else(|| Error::SharedChunks {
                    seq: self.seq,
                    why: format!("claim answer names chunk {i} of {}", batch.len()),
                })?;
                self.deferred.insert(*hash);
            }
        }
        self.store_pieces(pieces, Some(&hashes), shuffle, refs, false)
    }

    /// [`store_chunks`](Self::store_chunks) once claimed: `hashes` are the pieces' hashes
    /// when known; with `unsteady`, each piece is copied before it is hashed and compressed
    /// (another thread may be writing it).
    fn store_pieces(
        &mut self,
        pieces: &[(usize, &[u8])],
        hashes: Option<&[Hash]>,
        shuffle: u8,
        refs: &mut [Option<ChunkRef>],
        unsteady: bool,
    ) -> Result<()> {
        debug_assert!(
            !(unsteady && hashes.is_some()),
            "hashed once, from one copy"
        );
        let n = pieces.len();
        let next = AtomicUsize::new(0);
        // Room for every piece to be new, made once: grown entry by entry under the workers'
        // lock, the tables were rebuilt a dozen times in fresh memory for a large snapshot.
        // At most `RESERVE_MOST` entries, as most pieces may be known (every chunk of a
        // snapshot without dirty tracking is given): 3 MiB of tables at most.
        let room = n.min(RESERVE_MOST);
        self.new_locs.reserve(room);
        self.claimed
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .reserve(room);
        // Read-only for the workers, which append to the pack through `appender`; put back
        // below.
        let index_owned = std::mem::take(&mut self.writer.index);
        let index = &index_owned;
        let sparse_owned = std::mem::take(&mut self.writer.sparse);
        let sparse = &sparse_owned;
        let claimed_owned = std::mem::take(&mut self.claimed);
        let claimed = &claimed_owned;
        let deferred_owned = std::mem::take(&mut self.deferred);
        let deferred = &deferred_owned;
        let threads = self.writer.threads.min(n);
        let job_dir = self.writer.job.dir().to_owned();
        // Each worker appends its new chunks to the pack itself, under this lock, from its
        // own output buffer while the bytes are still in its core's cache. Handing them to
        // this thread instead took a third busy thread on two cores, a wake-up per batch of
        // four and a copy out of the other core's cache (`supervise bench`, 1 GiB, twelve runs
        // alternated: a full snapshot durable in 0.47-0.53 s against 0.49-0.70 s, and 100%
        // changed while written in 0.46-0.54 s against 0.52-0.63 s).
        let appender = Mutex::new(&mut *self);
        let first_err: Mutex<Option<Error>> = Mutex::new(None);
        let failed = AtomicBool::new(false);
        // Workers keep what they found (known chunks, twins) and where they stored new ones to
        // themselves until they are done: a message per chunk cost more in wake-ups than its
        // hashing.
        let mut settled: Vec<(usize, Found)> = Vec::new();
        let mut stored: Vec<(usize, ChunkRef)> = Vec::new();
        let mut workers_cpu = std::time::Duration::ZERO;
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    let (next, appender, first_err, failed) =
                        (&next, &appender, &first_err, &failed);
                    let job_dir = &job_dir;
                    scope.spawn(move || {
                        let mut local = Vec::new();
                        let mut mine = Vec::new();
                        let mut encoder = None;
                        let mut steady = Vec::new();
                        let mut record = Vec::new();
                        while !failed.load(Ordering::Relaxed) {
                            let k = next.fetch_add(1, Ordering::Relaxed);
                            if k >= n {
                                break;
                            }
                            let (i, mut chunk) = pieces[k];
                            if unsteady {
                                steady.clear();
                                steady.extend_from_slice(chunk);
                                chunk = &steady;
                            }
                            let hash = match hashes {
                                Some(h) => h[k],
                                None => *blake3::hash(chunk).as_bytes(),
                            };
                            if deferred.contains(&hash) {
                                local.push((i, Found::Deferred(hash, chunk.len() as u32)));
                                continue;
                            }
                            let held = index.get(&hash);
                            let compact = held.is_some_and(|loc| sparse.contains(&loc.pack));
                            if held.is_some() && !compact {
                                local.push((i, Found::Known(hash)));
                                continue;
                            }
                            if !claimed
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(hash)
                            {
                                local.push((i, Found::Twin(hash)));
                                continue;
                            }
                            let enc = match encoder.as_mut() {
                                Some(e) => Ok(e),
                                None => Encoder::new().map(|e| encoder.insert(e)),
                            };
                            let encoded =
                                enc.and_then(|e| e.encode_into(chunk, hash, shuffle, &mut record));
                            let result = match encoded {
                                Ok(header) => {
                                    // Poisoned: another worker panicked while appending,
                                    // which the join below raises; storing more is waste.
                                    let Ok(mut builder) = appender.lock() else {
                                        break;
                                    };
                                    builder
                                        .append(&header, &record, compact)
                                        .map(|loc| builder.chunk_ref(hash, &loc))
                                }
                                Err(e) => Err(Error::Io {
                                    op: "compress chunk",
                                    path: job_dir.clone(),
                                    source: e,
                                }),
                            };
                            match result {
                                Ok(r) => mine.push((i, r)),
                                Err(e) => {
                                    failed.store(true, Ordering::Relaxed);
                                    first_err
                                        .lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .get_or_insert(e);
                                }
                            }
                        }
                        (local, mine, crate::clock::thread_cpu())
                    })
                })
                .collect();
            for worker in workers {
                match worker.join() {
                    Ok((local, mine, cpu)) => {
                        settled.extend(local);
                        stored.extend(mine);
                        workers_cpu += cpu;
                    }
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
        });
        let first_err = first_err.into_inner().unwrap_or_else(|p| p.into_inner());
        self.workers_cpu += workers_cpu;
        self.writer.index = index_owned;
        self.writer.sparse = sparse_owned;
        self.claimed = claimed_owned;
        self.deferred = deferred_owned;
        if let Some(e) = first_err {
            return Err(e);
        }
        for (i, r) in stored {
            refs[i] = Some(r);
        }
        for (i, found) in settled {
            let loc = match found {
                Found::Known(hash) => self.writer.index.get(&hash).cloned().map(|l| (hash, l)),
                Found::Twin(hash) => self.new_locs.get(&hash).cloned().map(|l| (hash, l)),
                Found::Deferred(hash, raw_len) => {
                    refs[i] = Some(ChunkRef {
                        hash,
                        pack: DEFERRED,
                        offset: 0,
                        stored_len: 0,
                        raw_len,
                    });
                    continue;
                }
            };
            let (hash, loc) = loc.ok_or_else(|| Error::Internal {
                job: self.writer.job.name().to_owned(),
                seq: Some(self.seq),
                why: "a repeated chunk was never written".into(),
            })?;
            refs[i] = Some(self.chunk_ref(hash, &loc));
        }
        Ok(())
    }

    fn chunk_ref(&mut self, hash: Hash, loc: &Loc) -> ChunkRef {
        let next_id = self.pack_table.len() as u32;
        let pack = *self.pack_ids.entry(loc.pack.clone()).or_insert(next_id);
        if pack == next_id {
            self.pack_table.push(loc.pack.to_string());
        }
        ChunkRef {
            hash,
            pack,
            offset: loc.offset,
            stored_len: loc.stored_len,
            raw_len: loc.raw_len,
        }
    }

    fn append(&mut self, header: &RecordHeader, data: &[u8], compacted: bool) -> Result<Loc> {
        if self
            .current
            .as_ref()
            .is_some_and(|p| p.len() >= PACK_TARGET)
        {
            let full = self.current.take().expect("checked");
            let (finished, blocks) = full.finish()?;
            self.finished.push(finished);
            self.spare_blocks = blocks;
        }
        let pack = match self.current.as_mut() {
            Some(p) => p,
            None => {
                let name = pack_name(self.seq, self.packs_made);
                self.packs_made += 1;
                let spare = std::mem::take(&mut self.spare_blocks);
                self.current
                    .insert(self.writer.job.create_pack(name, spare)?)
            }
        };
        let offset = pack.append(header, data)?;
        let loc = Loc {
            pack: Arc::from(pack.name.as_str()),
            offset,
            stored_len: header.stored_len,
            raw_len: header.raw_len,
        };
        if compacted {
            self.stats.bytes_compacted += u64::from(header.raw_len);
        } else {
            self.stats.bytes_new += u64::from(header.raw_len);
        }
        self.stats.bytes_packed += (RecordHeader::LEN + data.len()) as u64;
        self.new_locs.insert(header.hash, loc.clone());
        Ok(loc)
    }

    /// Part mode, once this part's packs are durable: reports where the chunks it stored lie,
    /// then learns where those other ranks store lie and points the references at them.
    fn settle_claims(&mut self, claims: &dyn ChunkClaims) -> Result<()> {
        if !self.new_locs.is_empty() {
            let stored: Vec<ChunkAt> = self
                .new_locs
                .iter()
                .map(|(hash, loc)| ChunkAt {
                    hash: crate::claims::hash_hex(hash),
                    pack: loc.pack.to_string(),
                    offset: loc.offset,
                    stored_len: loc.stored_len,
                    raw_len: loc.raw_len,
                })
                .collect();
            claims.stored(self.seq, &stored)?;
        }
        if self.deferred.is_empty() {
            return Ok(());
        }
        let wanted: Vec<Hash> = self.deferred.iter().copied().collect();
        for at in claims.locate(self.seq, &wanted)? {
            let bad = |why: String| Error::SharedChunks { seq: self.seq, why };
            let hash = at
                .hash()
                .ok_or_else(|| bad(format!("a location with a bad hash {:?}", at.hash)))?;
            if !self.deferred.contains(&hash) {
                continue;
            }
            if !crate::format::is_pack_name(&at.pack) {
                return Err(bad(format!("a location in {:?}, not a pack", at.pack)));
            }
            self.located.insert(
                hash,
                Loc {
                    pack: Arc::from(at.pack.as_str()),
                    offset: at.offset,
                    stored_len: at.stored_len,
                    raw_len: at.raw_len,
                },
            );
        }
        let mut entries = std::mem::take(&mut self.entries);
        for chunk in entries.iter_mut().flat_map(|e| &mut e.chunks) {
            if chunk.pack != DEFERRED {
                continue;
            }
            let loc =
                self.located
                    .get(&chunk.hash)
                    .cloned()
                    .ok_or_else(|| Error::SharedChunks {
                        seq: self.seq,
                        why: format!(
                            "no rank said where chunk {} lies",
                            crate::claims::hash_hex(&chunk.hash)
                        ),
                    })?;
            if loc.raw_len != chunk.raw_len {
                return Err(Error::SharedChunks {
                    seq: self.seq,
                    why: format!(
                        "chunk {} is {} bytes here, {} where it is stored",
                        crate::claims::hash_hex(&chunk.hash),
                        chunk.raw_len,
                        loc.raw_len
                    ),
                });
            }
            *chunk = self.chunk_ref(chunk.hash, &loc);
        }
        self.entries = entries;
        Ok(())
    }

    /// Makes the snapshot durable and visible. On error nothing becomes visible and the
    /// earlier snapshots are untouched.
    pub fn commit(mut self) -> Result<SnapshotReport> {
        // A shape that does not fit its entry would make the manifest unreadable.
        crate::format::check_arrays(&self.entries, &self.arrays)
            .map_err(|(name, why)| Error::BadArray { name, why })?;
        if let Some(pack) = self.current.take() {
            self.finished.push(pack.finish()?.0);
        }
        let finished = std::mem::take(&mut self.finished);
        self.writer.job.publish_packs(&finished)?;
        if let Some(claims) = self.writer.claims.clone() {
            self.settle_claims(&*claims)?;
        }
        self.stats.duration_ms = crate::clock::millis(self.started.elapsed());
        let manifest = Manifest {
            job: self.writer.job.name().to_owned(),
            seq: self.seq,
            parent: self.writer.newest,
            created_unix_ms: crate::clock::now_unix_ms(),
            attempt: self.writer.attempt,
            tag: self.tag.take(),
            stats: self.stats.clone(),
            packs: std::mem::take(&mut self.pack_table),
            entries: std::mem::take(&mut self.entries),
            origin: self.origin.take(),
            outputs: std::mem::take(&mut self.outputs),
            arrays: std::mem::take(&mut self.arrays),
        };

        let manifest_len = self.writer.job.publish_manifest(&manifest)?;
        let tag = manifest.tag.clone();
        let writer = &mut *self.writer;
        writer.index.extend(self.new_locs.drain());
        writer.index.extend(self.located.drain());
        writer.newest = Some(self.seq);
        writer.next_seq = self.seq + 1;
        writer.last = Some(manifest);
        self.committed = true;
        Ok(SnapshotReport {
            seq: self.seq,
            tag,
            bytes_total: self.stats.bytes_total,
            bytes_new: self.stats.bytes_new,
            bytes_compacted: self.stats.bytes_compacted,
            bytes_written: self.stats.bytes_packed + manifest_len,
            duration_ms: crate::clock::millis(self.started.elapsed()),
            removed: Vec::new(),
            pause_us: 0,
            writer_cpu_us: crate::clock::micros(self.workers_cpu),
        })
    }
}

impl Drop for SnapshotBuilder<'_> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        // The snapshot failed or was abandoned: remove what it wrote.
        drop(self.current.take());
        for pack in self.finished.drain(..) {
            let _ = self.writer.job.remove_unfinished_pack(&pack.tmp);
        }
        // A later snapshot must not reuse the number of one that may be half-visible.
        self.writer.next_seq = self.seq + 1;
        // Other ranks' temporary files are theirs (the supervisor removes what dead ones left).
        if !self.writer.part {
            let _ = self.writer.job.remove_leftovers();
        }
    }
}

/// The blake3 of each piece, hashed on `threads` threads, and the CPU time they took.
fn hash_pieces(pieces: &[(usize, &[u8])], threads: usize) -> (Vec<Hash>, std::time::Duration) {
    let mut hashes = vec![[0u8; 32]; pieces.len()];
    let per = pieces.len().div_ceil(threads.max(1)).max(1);
    let cpu = std::thread::scope(|scope| {
        let workers: Vec<_> = hashes
            .chunks_mut(per)
            .zip(pieces.chunks(per))
            .map(|(out, input)| {
                scope.spawn(move || {
                    for (h, (_, chunk)) in out.iter_mut().zip(input) {
                        *h = *blake3::hash(chunk).as_bytes();
                    }
                    crate::clock::thread_cpu()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .sum()
    });
    (hashes, cpu)
}

/// A pack name unique across processes and attempts: snapshot number, a nonce, an index.
fn pack_name(seq: u64, index: u32) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let nonce = nanos ^ (u64::from(std::process::id()) << 40);
    format!("{seq:020}-{nonce:016x}-{index:03}")
}
