//! Dirty-page collection: which 64 KiB chunks of a tracked region were written since its
//! base snapshot, read from the write tracker (see `tracker`), which protects them again.

use supervise_store::control::WarningKind;
use supervise_store::format::CHUNK_SIZE;

use crate::region::RegionMem;
use crate::runtime::Shim;

/// A region's delta: the base snapshot and the numbers of the chunks written since.
pub(super) type Delta = (u64, Vec<usize>);

impl Shim {
    /// For a region with tracking and a base: the chunks written since the last collection
    /// (which protects them again). Otherwise `None`, after resetting the tracking, so the
    /// caller takes the region whole.
    pub(super) fn collect_dirty(&mut self, idx: usize, mem: &RegionMem) -> Option<Delta> {
        let slot = &self.regions[idx];
        let tracker = self.tracker.as_ref().filter(|_| slot.tracked)?;
        if let Some(base) = slot.baseline {
            self.ranges.clear();
            match tracker.collect(mem.addr(), mem.mapped, &mut self.ranges) {
                Ok(()) => {
                    let len = mem.bytes;
                    let mut dirty: Vec<usize> = Vec::new();
                    for r in self.ranges.iter().filter(|r| r.start < len) {
                        let last = (r.end.min(len) - 1) / CHUNK_SIZE;
                        for chunk in r.start / CHUNK_SIZE..=last {
                            if dirty.last() != Some(&chunk) {
                                dirty.push(chunk);
                            }
                        }
                    }
                    return Some((base, dirty));
                }
                Err(e) => self.shared.warn(
                    WarningKind::RegionUntracked,
                    format!(
                        "dirty tracking failed for region {:?} ({e}); copying it whole",
                        mem.name
                    ),
                ),
            }
        }
        // Start tracking afresh from this whole copy.
        if let Err(e) = tracker.protect(mem.addr(), mem.mapped) {
            self.shared.warn(
                WarningKind::RegionUntracked,
                format!("cannot reset write tracking of region {:?} ({e})", mem.name),
            );
        }
        None
    }
}
