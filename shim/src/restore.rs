//! Choosing the snapshot to restore at start: the newest that opens and whose entries all
//! verify; damaged ones are set aside and reported. Large slice entries are decoded once, into
//! memory of their own, as they are verified (staged): a region of the name takes that memory
//! as it is, so a restore reads and decodes each chunk once, not once to verify and again to
//! fill.

use std::collections::HashMap;
use std::sync::Arc;

use supervise_store::config::RestoreFrom;
use supervise_store::control::DamagedSnapshot;
use supervise_store::error::Result;
use supervise_store::format::EntryKind;
use supervise_store::reader::SnapshotReader;
use supervise_store::store::JobStore;

use crate::region::RegionMem;

/// Slice entries at least this large are staged (smaller ones are verified, then decoded
/// again when the program asks: cheap).
const STAGE_ABOVE: u64 = 1 << 20;

/// The restored snapshot, with its value entries already read and verified.
pub(crate) struct Restored {
    pub(crate) reader: SnapshotReader,
    pub(crate) values: HashMap<String, Vec<u8>>,
    /// Large slice entries decoded and verified into memory of their own: a region of the
    /// name and kind takes it as its memory, a load copies from it. Each is freed once taken,
    /// and those not taken at the first snapshot.
    pub(crate) staged: HashMap<String, Arc<RegionMem>>,
}

/// Picks the snapshot to restore: the newest that opens and whose values verify; damaged ones
/// are set aside and reported.
pub(crate) fn choose_restore(
    job: &JobStore,
    from: &RestoreFrom,
) -> Result<(Option<Restored>, Vec<DamagedSnapshot>)> {
    let candidates = from.candidates_in(job)?;
    let mut damaged = Vec::new();
    for seq in candidates {
        match open_restored(job, seq) {
            Ok(r) => return Ok((Some(r), damaged)),
            Err(e) if e.is_corruption() && !matches!(from, RestoreFrom::Exact(_)) => {
                job.quarantine(seq)?;
                damaged.push(DamagedSnapshot {
                    seq,
                    why: e.to_string(),
                });
            }
            Err(e) => return Err(e),
        }
    }
    Ok((None, damaged))
}

/// Opens snapshot `seq` and verifies every chunk of it before the program is given any of its
/// data: damage is found here, where an older snapshot can still take its place, not while the
/// program fills its memory (when it has already seen values of this one). Large slice entries
/// are staged as they are verified, when memory allows (see [`stage_fits`]).
fn open_restored(job: &JobStore, seq: u64) -> Result<Restored> {
    let reader = SnapshotReader::open(job, seq)?;
    let large =
        |kind: &EntryKind, len: u64| matches!(kind, EntryKind::Slice { .. }) && len >= STAGE_ABOVE;
    let staged_bytes: u64 = reader
        .manifest()
        .entries
        .iter()
        .filter(|e| large(&e.kind, e.len))
        .map(|e| e.len)
        .fold(0, u64::saturating_add);
    let mut staged = HashMap::new();
    if staged_bytes > 0 && stage_fits(staged_bytes, supervise_store::config::memory_available()) {
        for entry in &reader.manifest().entries {
            let EntryKind::Slice { elem_size, .. } = &entry.kind else {
                continue;
            };
            if !large(&entry.kind, entry.len) {
                reader.read_entry(entry, |_| Ok(()))?;
                continue;
            }
            // Bounded: every staged length together fits in half the memory available.
            let len = entry.len as usize;
            let shuffle = u8::try_from(*elem_size).unwrap_or(0);
            match RegionMem::new(&entry.name, entry.kind.clone(), len, shuffle, None) {
                Ok(mem) => {
                    reader.fill(entry, mem.bytes_mut_unshared())?;
                    staged.insert(entry.name.clone(), mem);
                }
                // Memory refused (a `ulimit -v`, strict overcommit): verified only, and decoded
                // again when the program asks.
                Err(_) => reader.read_entry(entry, |_| Ok(()))?,
            }
        }
    } else {
        reader.verify()?;
    }
    let mut values = HashMap::new();
    let value_names = reader
        .manifest()
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::Value);
    for entry in value_names {
        let bytes = reader.value_bytes(&entry.name)?.unwrap_or_default();
        values.insert(entry.name.clone(), bytes);
    }
    Ok(Restored {
        reader,
        values,
        staged,
    })
}

/// Whether `bytes` of large slices can be staged with `available` bytes of memory available:
/// twice over, since a program may load each into memory of its own (a region takes the staged
/// memory as it is). Unknown memory: no staging.
pub(crate) fn stage_fits(bytes: u64, available: Option<u64>) -> bool {
    match (bytes.checked_mul(2), available) {
        (Some(twice), Some(a)) => twice <= a,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn large_slices_are_staged_only_when_twice_their_size_is_available() {
        use super::stage_fits;
        assert!(stage_fits(1 << 30, Some(2 << 30)));
        assert!(!stage_fits(1 << 30, Some((2 << 30) - 1)));
        assert!(!stage_fits(1, None));
        assert!(!stage_fits(u64::MAX, Some(u64::MAX)));
    }
}
