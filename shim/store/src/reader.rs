//! Reading snapshots back: every chunk is read, decompressed straight into the destination,
//! and checked against its blake3 hash; each entry's root is checked against its chunk list.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::format::{
    ChunkRef, EntryKind, EntryMeta, MAX_VALUE_LEN, Manifest, RecordHeader, entry_root,
};
use crate::pack_scan::RecordReader;
use crate::store::JobStore;

/// Most bytes [`SnapshotReader::read_entry`] (and so [`SnapshotReader::verify`]) holds in
/// memory at once: chunks are read in batches of about this size (at least one chunk).
pub const READ_BATCH: usize = 32 << 20;

/// How far a parallel read asks the kernel to read ahead of its workers, in record bytes.
const AHEAD: u64 = 128 << 20;

/// An open snapshot whose manifest decoded and whose packs are all present and long enough.
pub struct SnapshotReader {
    manifest: Manifest,
    packs: Vec<(PathBuf, File)>,
    threads: usize,
}

impl SnapshotReader {
    /// Opens snapshot `seq` of `job`.
    pub fn open(job: &JobStore, seq: u64) -> Result<Self> {
        let manifest = job.read_manifest(seq)?;
        let packs = job.open_packs(&manifest)?;
        Ok(Self {
            manifest,
            packs,
            threads: crate::worker_threads(),
        })
    }

    /// The snapshot's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Reads a value entry's bytes (JSON); `None` if the snapshot has no entry of that name.
    pub fn value_bytes(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let Some(entry) = self.manifest.entry(name) else {
            return Ok(None);
        };
        if entry.kind != EntryKind::Value {
            return Err(Error::WrongKind {
                name: name.to_owned(),
                found: entry.kind.describe(),
                wanted: "value".into(),
            });
        }
        if entry.len > MAX_VALUE_LEN {
            return Err(self.damaged(format!(
                "entry {name:?} is a value of {} bytes, more than any value's ({MAX_VALUE_LEN})",
                entry.len
            )));
        }
        let mut out = vec![0u8; entry.len as usize];
        self.fill(entry, &mut out)?;
        Ok(Some(out))
    }

    /// Fills `dest` from a slice entry of element type `elem`; `false` if there is no such entry.
    pub fn slice_into(&self, name: &str, elem: &str, dest: &mut [u8]) -> Result<bool> {
        let Some(entry) = self.manifest.entry(name) else {
            return Ok(false);
        };
        match &entry.kind {
            EntryKind::Slice { elem: stored, .. } if stored == elem => {}
            other => {
                return Err(Error::WrongKind {
                    name: name.to_owned(),
                    found: other.describe(),
                    wanted: format!("[{elem}] slice"),
                });
            }
        }
        if entry.len != dest.len() as u64 {
            return Err(Error::SizeMismatch {
                name: name.to_owned(),
                seq: self.manifest.seq,
                stored: entry.len,
                dest: dest.len() as u64,
            });
        }
        self.fill(entry, dest)?;
        Ok(true)
    }

    /// Reads and verifies every chunk of every entry without keeping the data (at most about
    /// [`READ_BATCH`] bytes in memory at once, whatever the entries' lengths).
    pub fn verify(&self) -> Result<()> {
        for entry in &self.manifest.entries {
            self.read_entry(entry, |_| Ok(()))?;
        }
        Ok(())
    }

    /// Reads an entry in order, verified, handing `sink` one batch of whole chunks after
    /// another (about [`READ_BATCH`] bytes each; the chunks of a batch are read in parallel),
    /// so an entry of any length is read with bounded memory.
    pub fn read_entry(
        &self,
        entry: &EntryMeta,
        mut sink: impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        self.check_root(entry)?;
        let mut buf = Vec::new();
        let mut rest = entry.chunks.as_slice();
        while !rest.is_empty() {
            let (mut n, mut bytes) = (0, 0usize);
            while let Some(c) = rest.get(n) {
                let len = c.raw_len as usize;
                if n > 0 && bytes + len > READ_BATCH {
                    break;
                }
                bytes += len;
                n += 1;
            }
            let (batch, tail) = rest.split_at(n);
            buf.resize(bytes, 0);
            self.fill_chunks(batch, &mut buf)?;
            sink(&buf)?;
            rest = tail;
        }
        Ok(())
    }

    /// Decodes an entry into `dest` (exactly `entry.len` bytes), in parallel.
    pub fn fill(&self, entry: &EntryMeta, dest: &mut [u8]) -> Result<()> {
        self.check_root(entry)?;
        if dest.len() as u64 != entry.len {
            return Err(Error::SizeMismatch {
                name: entry.name.clone(),
                seq: self.manifest.seq,
                stored: entry.len,
                dest: dest.len() as u64,
            });
        }
        self.fill_chunks(&entry.chunks, dest)
    }

    fn check_root(&self, entry: &EntryMeta) -> Result<()> {
        let root = entry_root(entry.len, entry.chunks.iter().map(|c| c.hash));
        if root != entry.root {
            return Err(self.damaged(format!(
                "entry {:?}: chunk list does not match its root hash",
                entry.name
            )));
        }
        Ok(())
    }

    /// Decodes `chunks` one after another into `dest`, in parallel.
    fn fill_chunks(&self, chunks: &[ChunkRef], dest: &mut [u8]) -> Result<()> {
        // Split the destination by each chunk's recorded length.
        let mut pieces = Vec::with_capacity(chunks.len());
        let mut rest = dest;
        for chunk in chunks {
            let Some((piece, tail)) = rest.split_at_mut_checked(chunk.raw_len as usize) else {
                return Err(self.damaged("chunk lengths do not add up to the entry's".into()));
            };
            pieces.push(piece);
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(self.damaged("chunk lengths do not add up to the entry's".into()));
        }
        let work = Mutex::new(pieces.into_iter().zip(chunks.iter()));
        let threads = self.threads.min(chunks.len()).max(1);
        let failure: Mutex<Option<Error>> = Mutex::new(None);
        let done = AtomicBool::new(false);
        let taken = AtomicU64::new(0);
        std::thread::scope(|scope| {
            if chunks.len() > 1 {
                // Best effort: without it the workers only read slower.
                let _ = std::thread::Builder::new()
                    .name("supervise-ahead".into())
                    .spawn_scoped(scope, || self.read_ahead(chunks, &taken, &done));
            }
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        if let Err(e) = self.fill_worker(&work, &taken) {
                            failure
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(e);
                        }
                    })
                })
                .collect();
            let joined: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
            done.store(true, Ordering::Relaxed);
            for worker in joined {
                if let Err(panic) = worker {
                    std::panic::resume_unwind(panic);
                }
            }
        });
        match failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Asks the kernel to read the records of `chunks` into the page cache ahead of the
    /// workers, in order and in large pieces, until `done`: the workers read one record at a
    /// time, and for those the kernel reads only 128 KiB ahead (a disk's usual read-ahead),
    /// which leaves a cold read waiting on many small requests. It keeps at most `AHEAD`
    /// bytes ahead of the records the workers have `taken`, so that what it reads is not
    /// evicted before it is used when memory is short.
    fn read_ahead(&self, chunks: &[ChunkRef], taken: &AtomicU64, done: &AtomicBool) {
        const PIECE: u64 = 8 << 20;
        // Record bytes asked for, counted in the workers' order like `taken`.
        let mut asked = 0u64;
        // Records next to each other in one pack make one extent.
        let mut extents: Vec<(u32, u64, u64)> = Vec::new();
        for c in chunks {
            let end = c.offset.saturating_add(record_len(c));
            match extents.last_mut() {
                Some((pack, _, last)) if *pack == c.pack && c.offset == *last => *last = end,
                _ => extents.push((c.pack, c.offset, end)),
            }
        }
        for (pack, mut start, end) in extents {
            let Some((_, file)) = self.packs.get(pack as usize) else {
                continue;
            };
            while start < end {
                loop {
                    if done.load(Ordering::Relaxed) {
                        return;
                    }
                    if asked <= taken.load(Ordering::Relaxed).saturating_add(AHEAD) {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                let len = PIECE.min(end - start);
                let (Ok(at), Ok(n)) = (i64::try_from(start), i64::try_from(len)) else {
                    return;
                };
                let advice = nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED;
                if nix::fcntl::posix_fadvise(file, at, n, advice).is_err() {
                    return;
                }
                start += len;
                asked += len;
            }
        }
    }

    fn fill_worker<'a, I>(&self, work: &Mutex<I>, taken: &AtomicU64) -> Result<()>
    where
        I: Iterator<Item = (&'a mut [u8], &'a ChunkRef)>,
    {
        let mut records = RecordReader::new(&self.packs_dir())?;
        loop {
            let next = work.lock().unwrap_or_else(|p| p.into_inner()).next();
            let Some((out, chunk)) = next else {
                return Ok(());
            };
            taken.fetch_add(record_len(chunk), Ordering::Relaxed);
            let Some((path, file)) = self.packs.get(chunk.pack as usize) else {
                return Err(self.damaged(format!("a chunk names pack #{}", chunk.pack)));
            };
            records.read(file, path, chunk, out)?;
        }
    }

    fn packs_dir(&self) -> PathBuf {
        self.packs
            .first()
            .map(|(p, _)| p.clone())
            .unwrap_or_default()
    }

    fn damaged(&self, why: String) -> Error {
        Error::SnapshotDamaged {
            job: self.manifest.job.clone(),
            seq: self.manifest.seq,
            why,
        }
    }
}

/// The bytes of `chunk`'s record in its pack: its header and its stored bytes.
fn record_len(chunk: &ChunkRef) -> u64 {
    RecordHeader::LEN as u64 + u64::from(chunk.stored_len)
}
