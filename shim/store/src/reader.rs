//! Reading snapshots back: every chunk is read, decompressed straight into the destination,
//! and checked against its blake3 hash; each entry's root is checked against its chunk list.

use std::fs::File;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::extent::{self, Packs};
use crate::format::{ChunkRef, EntryKind, EntryMeta, MAX_VALUE_LEN, Manifest, entry_root};
use crate::store::JobStore;

/// Most decoded bytes [`SnapshotReader::read_entry`] (and so [`SnapshotReader::verify`])
/// holds at once: chunks are read in batches of about this size (at least one chunk). Reading
/// a batch also holds a read buffer of about 4 MiB (the longest extent read, or one record) per
/// reading and decoding thread, and four more.
pub const READ_BATCH: usize = 32 << 20;

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

    /// Reads and verifies every chunk of every entry without keeping the data (about
    /// [`READ_BATCH`] decoded bytes in memory at once, whatever the entries' lengths).
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
        let items: Vec<_> = pieces.into_iter().zip(chunks).collect();
        let most = extent::extent_len(&items, self.threads);
        Packs::new(&self.packs).read_all(extent::plan(items, most), self.threads)
    }

    fn damaged(&self, why: String) -> Error {
        Error::SnapshotDamaged {
            job: self.manifest.job.clone(),
            seq: self.manifest.seq,
            why,
        }
    }
}
