//! Choosing the snapshot to restore at start: the newest that opens and whose entries all
//! verify; damaged ones are set aside and reported.

use std::collections::HashMap;

use supervise_store::config::RestoreFrom;
use supervise_store::control::DamagedSnapshot;
use supervise_store::error::Result;
use supervise_store::format::EntryKind;
use supervise_store::reader::SnapshotReader;
use supervise_store::store::JobStore;

/// The restored snapshot, with its value entries already read and verified.
pub(crate) struct Restored {
    pub(crate) reader: SnapshotReader,
    pub(crate) values: HashMap<String, Vec<u8>>,
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
/// program fills its memory (when it has already seen values of this one).
fn open_restored(job: &JobStore, seq: u64) -> Result<Restored> {
    let reader = SnapshotReader::open(job, seq)?;
    reader.verify()?;
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
    Ok(Restored { reader, values })
}
