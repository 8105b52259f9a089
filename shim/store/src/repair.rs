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
use std::io::ErrorKind;

use crate::error::{Error, Result};
use crate::format::{self, ChunkRef, Hash, Manifest};
use crate::pack_scan::{PackScanner, RecordReader};
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
    let copies = find_good_copies(job, &wanted)?;
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

/// Scans every pack of the job for records of the `wanted` chunks (each record scanned is
/// verified; a pack's scan ends at its first damaged record).
fn find_good_copies(job: &JobStore, wanted: &HashSet<Hash>) -> Result<HashMap<Hash, Copy>> {
    let mut copies: HashMap<Hash, Copy> = HashMap::new();
    for pack in job.pack_names()? {
        let path = job.pack_path(&pack);
        let file = match job.open_pack(&pack) {
            Ok(f) => f,
            Err(Error::Io { source, .. }) if source.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let Ok(scan) = PackScanner::new(&file, &path) else {
            continue;
        };
        for record in scan.map_while(std::result::Result::ok) {
            let h = record.header;
            if wanted.contains(&h.hash) {
                copies.entry(h.hash).or_insert_with(|| Copy {
                    pack: pack.clone(),
                    offset: record.offset,
                    stored_len: h.stored_len,
                    raw_len: h.raw_len,
                });
            }
        }
    }
    Ok(copies)
}

/// Reads and verifies records, remembering each verdict.
struct Checker<'a> {
    job: &'a JobStore,
    records: RecordReader,
    files: HashMap<String, Option<File>>,
    verdicts: HashMap<(String, u64), bool>,
    raw: Vec<u8>,
}

impl<'a> Checker<'a> {
    fn new(job: &'a JobStore) -> Result<Self> {
        Ok(Self {
            job,
            records: RecordReader::new(job.dir())?,
            files: HashMap::new(),
            verdicts: HashMap::new(),
            raw: Vec::new(),
        })
    }

    /// True when the record `chunk` points at in `pack` holds that chunk, intact.
    fn good(&mut self, pack: &str, chunk: &ChunkRef) -> bool {
        let key = (pack.to_owned(), chunk.offset);
        if let Some(v) = self.verdicts.get(&key) {
            return *v;
        }
        let job = self.job;
        let file = self
            .files
            .entry(pack.to_owned())
            .or_insert_with(|| job.open_pack(pack).ok());
        let v = match file {
            Some(file) if chunk.raw_len <= format::MAX_CHUNK_LEN => {
                self.raw.resize(chunk.raw_len as usize, 0);
                self.records
                    .read(file, &job.pack_path(pack), chunk, &mut self.raw)
                    .is_ok()
            }
            _ => false,
        };
        self.verdicts.insert(key, v);
        v
    }
}
