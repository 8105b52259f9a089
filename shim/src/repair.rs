//! Offline repair (`supervise verify --repair`): a snapshot whose records rotted is mended by
//! pointing its manifest at good copies of the same chunks found elsewhere in the job's packs
//! (the scrub makes the next snapshot store fresh copies of every chunk it found damaged), and
//! a snapshot set aside as damaged that now verifies in full is put back.
//!
//! Only the job's owner may run it (the caller holds the job lock): it rewrites manifests.
//! A rewritten manifest names the same chunks (the same hashes, so the same entry roots) and is
//! published like any other (temp name, fsync, rename, fsync directory); a crash leaves either
//! the old manifest or the new one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, ErrorKind, Read};
use std::os::unix::fs::FileExt;

use crate::codec::Decoder;
use crate::error::{Error, Result, io_err};
use crate::format::{self, ChunkRef, Hash, Manifest, RecordHeader};
use crate::store::JobStore;

/// What a repair did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Snapshots whose damaged records were replaced by good copies.
    pub repaired: Vec<u64>,
    /// Snapshots set aside as damaged that verify in full now (or after repair), put back.
    pub put_back: Vec<u64>,
    /// Snapshots that stay damaged, and why.
    pub unrepairable: Vec<(u64, String)>,
}

/// A snapshot with damaged records.
struct Damaged {
    seq: u64,
    /// Committed, or set aside as damaged.
    committed: bool,
    manifest: Manifest,
    /// The damaged chunks, as (entry, chunk) positions.
    bad: Vec<(usize, usize)>,
}

/// Where a good copy of a chunk is stored.
#[derive(Clone, Debug)]
struct Copy {
    pack: String,
    offset: u64,
    stored_len: u32,
    raw_len: u32,
}

/// Mends what can be mended in `job` (see the module documentation).
pub fn repair(job: &JobStore) -> Result<RepairReport> {
    let mut report = RepairReport::default();
    let mut checker = Checker::new(job)?;
    let mut damaged: Vec<Damaged> = Vec::new();
    let candidates = job
        .snapshot_seqs()?
        .into_iter()
        .map(|s| (s, true))
        .chain(job.damaged_seqs()?.into_iter().map(|s| (s, false)));
    for (seq, committed) in candidates {
        let read = if committed {
            job.read_manifest(seq)
        } else {
            job.read_set_aside(seq)
        };
        let manifest = match read {
            Ok(m) => m,
            Err(e) => {
                report
                    .unrepairable
                    .push((seq, format!("its manifest is unreadable: {e}")));
                continue;
            }
        };
        let mut bad = Vec::new();
        for (e, entry) in manifest.entries.iter().enumerate() {
            for (c, chunk) in entry.chunks.iter().enumerate() {
                if !checker.good(&manifest.packs[chunk.pack as usize], chunk) {
                    bad.push((e, c));
                }
            }
        }
        match (bad.is_empty(), committed) {
            (true, true) => {}
            (true, false) => {
                job.put_back(&manifest)?;
                report.put_back.push(seq);
            }
            (false, _) => damaged.push(Damaged {
                seq,
                committed,
                manifest,
                bad,
            }),
        }
    }
    if damaged.is_empty() {
        return Ok(report);
    }
    let wanted: HashSet<Hash> = damaged
        .iter()
        .flat_map(|d| {
            d.bad
                .iter()
                .map(|(e, c)| d.manifest.entries[*e].chunks[*c].hash)
        })
        .collect();
    let copies = find_good_copies(job, &wanted, &mut checker)?;
    for Damaged {
        seq,
        committed,
        mut manifest,
        bad,
    } in damaged
    {
        let missing = bad
            .iter()
            .filter(|(e, c)| !copies.contains_key(&manifest.entries[*e].chunks[*c].hash))
            .count();
        if missing > 0 {
            report.unrepairable.push((
                seq,
                format!("{missing} damaged chunks have no good copy in the job's packs"),
            ));
            continue;
        }
        for (e, c) in bad {
            let chunk = manifest.entries[e].chunks[c];
            let copy = &copies[&chunk.hash];
            let pack = match manifest.packs.iter().position(|p| *p == copy.pack) {
                Some(i) => i,
                None => {
                    manifest.packs.push(copy.pack.clone());
                    manifest.packs.len() - 1
                }
            };
            manifest.entries[e].chunks[c] = ChunkRef {
                hash: chunk.hash,
                pack: pack as u32,
                offset: copy.offset,
                stored_len: copy.stored_len,
                raw_len: copy.raw_len,
            };
        }
        drop_unused_packs(&mut manifest);
        if committed {
            job.republish(&manifest)?;
            report.repaired.push(seq);
        } else {
            job.put_back(&manifest)?;
            report.repaired.push(seq);
            report.put_back.push(seq);
        }
    }
    Ok(report)
}

/// Removes pack names no chunk references any more and renumbers the chunks' pack indices.
fn drop_unused_packs(manifest: &mut Manifest) {
    let mut used: BTreeMap<u32, u32> = BTreeMap::new();
    for chunk in manifest.entries.iter().flat_map(|e| &e.chunks) {
        used.insert(chunk.pack, 0);
    }
    let mut packs = Vec::with_capacity(used.len());
    for (old, new) in used.iter_mut() {
        *new = packs.len() as u32;
        packs.push(manifest.packs[*old as usize].clone());
    }
    for chunk in manifest.entries.iter_mut().flat_map(|e| &mut e.chunks) {
        chunk.pack = used[&chunk.pack];
    }
    manifest.packs = packs;
}

/// Scans every pack of the job for records of the `wanted` chunks that verify.
fn find_good_copies(
    job: &JobStore,
    wanted: &HashSet<Hash>,
    checker: &mut Checker,
) -> Result<HashMap<Hash, Copy>> {
    let mut copies: HashMap<Hash, Copy> = HashMap::new();
    for pack in job.pack_names()? {
        let path = job.pack_path(&pack);
        let file = match job.open_pack(&pack) {
            Ok(f) => f,
            Err(Error::Io { source, .. }) if source.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let len = file.metadata().map_err(io_err("stat", &path))?.len();
        let mut reader = BufReader::with_capacity(1 << 20, &file);
        let mut head = [0u8; format::HEADER_LEN];
        if reader.read_exact(&mut head).is_err()
            || format::check_header(&head, format::PACK_MAGIC, "pack", &path).is_err()
        {
            continue;
        }
        let mut offset = format::HEADER_LEN as u64;
        let mut record = [0u8; RecordHeader::LEN];
        while offset + RecordHeader::LEN as u64 <= len {
            if reader.read_exact(&mut record).is_err() {
                break;
            }
            // A record header that does not decode ends what can be trusted of this pack.
            let Ok(header) = RecordHeader::decode(&record, &path) else {
                break;
            };
            let end = offset + RecordHeader::LEN as u64 + u64::from(header.stored_len);
            if end > len {
                break;
            }
            let chunk = ChunkRef {
                hash: header.hash,
                pack: 0,
                offset,
                stored_len: header.stored_len,
                raw_len: header.raw_len,
            };
            if wanted.contains(&header.hash)
                && !copies.contains_key(&header.hash)
                && checker.good(&pack, &chunk)
            {
                copies.insert(
                    header.hash,
                    Copy {
                        pack: pack.clone(),
                        offset,
                        stored_len: header.stored_len,
                        raw_len: header.raw_len,
                    },
                );
            }
            reader
                .seek_relative(i64::from(header.stored_len))
                .map_err(io_err("read", &path))?;
            offset = end;
        }
    }
    Ok(copies)
}

/// Reads and verifies records, remembering each verdict.
struct Checker<'a> {
    job: &'a JobStore,
    decoder: Decoder,
    files: HashMap<String, Option<File>>,
    verdicts: HashMap<(String, u64), bool>,
    record: Vec<u8>,
    raw: Vec<u8>,
}

impl<'a> Checker<'a> {
    fn new(job: &'a JobStore) -> Result<Self> {
        Ok(Self {
            job,
            decoder: Decoder::new().map_err(io_err("create decompressor", job.dir()))?,
            files: HashMap::new(),
            verdicts: HashMap::new(),
            record: Vec::new(),
            raw: Vec::new(),
        })
    }

    /// True when the record `chunk` points at in `pack` holds that chunk, intact.
    fn good(&mut self, pack: &str, chunk: &ChunkRef) -> bool {
        let key = (pack.to_owned(), chunk.offset);
        if let Some(v) = self.verdicts.get(&key) {
            return *v;
        }
        let v = self.check(pack, chunk);
        self.verdicts.insert(key, v);
        v
    }

    fn check(&mut self, pack: &str, chunk: &ChunkRef) -> bool {
        if chunk.raw_len > format::MAX_CHUNK_LEN || chunk.stored_len > chunk.raw_len {
            return false;
        }
        let job = self.job;
        let file = self
            .files
            .entry(pack.to_owned())
            .or_insert_with(|| job.open_pack(pack).ok());
        let Some(file) = file else {
            return false;
        };
        let path = job.pack_path(pack);
        self.record
            .resize(RecordHeader::LEN + chunk.stored_len as usize, 0);
        if file.read_exact_at(&mut self.record, chunk.offset).is_err() {
            return false;
        }
        let Ok(header) = RecordHeader::decode(&self.record, &path) else {
            return false;
        };
        if header.hash != chunk.hash
            || header.stored_len != chunk.stored_len
            || header.raw_len != chunk.raw_len
        {
            return false;
        }
        self.raw.resize(chunk.raw_len as usize, 0);
        let stored = &self.record[RecordHeader::LEN..];
        self.decoder
            .decode(&header, stored, &mut self.raw, &path)
            .is_ok()
    }
}
