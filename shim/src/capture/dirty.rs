//! Dirty-page collection: which 64 KiB chunks of a tracked region were written since its
//! base snapshot, read from the write tracker (see `tracker`), and how the pages read are
//! protected again: at once, or after the program goes on, by [`reprotect`], which keeps the
//! chunks written in between for the next snapshot.

use std::ops::Range;
use std::sync::Arc;

use supervise_store::control::WarningKind;
use supervise_store::format::CHUNK_SIZE;

use super::tracker::DirtyTracker;
use crate::region::RegionMem;
use crate::runtime::Shim;

/// A region's delta: the base snapshot and the numbers of the chunks written since.
pub(super) type Delta = (u64, Vec<usize>);

/// A region's delta, and the pages read as written but not yet protected again (empty when
/// they were protected as they were read).
pub(super) struct Dirty {
    pub(super) delta: Delta,
    pub(super) pages: Vec<Range<usize>>,
}

/// How pages read as written are protected again.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Protect {
    /// In the same step as they are read.
    AtOnce,
    /// Later ([`Shim::protect_now`] or [`reprotect`]): the read changes no page table entry,
    /// so it flushes no TLB and interrupts none of the program's other threads.
    Later,
}

impl Shim {
    /// For a region with tracking and a base: the chunks written since the last collection,
    /// with the chunks carried from the last snapshot (see [`reprotect`]). Otherwise `None`,
    /// after resetting the tracking, so the caller takes the region whole.
    pub(super) fn collect_dirty(
        &mut self,
        idx: usize,
        mem: &RegionMem,
        protect: Protect,
    ) -> Option<Dirty> {
        let slot = &mut self.regions[idx];
        let carried = std::mem::take(&mut slot.carried);
        let tracker = self.tracker.as_ref().filter(|_| slot.tracked)?;
        if let Some(base) = slot.baseline {
            self.ranges.clear();
            let read = match protect {
                Protect::AtOnce => tracker.collect(mem.addr(), mem.mapped, &mut self.ranges),
                Protect::Later => tracker.written(mem.addr(), mem.mapped, &mut self.ranges),
            };
            match read {
                Ok(()) => {
                    let dirty = merge_chunks(&self.ranges, mem.bytes, &carried);
                    let pages = match protect {
                        Protect::AtOnce => Vec::new(),
                        Protect::Later => self.ranges.clone(),
                    };
                    return Some(Dirty {
                        delta: (base, dirty),
                        pages,
                    });
                }
                Err(e) => self.tracking_failed(mem, &e),
            }
        }
        self.track_afresh(mem);
        None
    }

    /// Says that reading the written pages of `mem` failed (it is copied whole).
    pub(super) fn tracking_failed(&self, mem: &RegionMem, e: &std::io::Error) {
        self.shared.warn(
            WarningKind::RegionUntracked,
            format!(
                "dirty tracking failed for region {:?} ({e}); copying it whole",
                mem.name
            ),
        );
    }

    /// Protects all of `mem`, which this capture copies whole: tracking starts afresh from it.
    pub(super) fn track_afresh(&self, mem: &RegionMem) {
        let Some(tracker) = self.tracker.as_ref() else {
            return;
        };
        if let Err(e) = tracker.protect(mem.addr(), mem.mapped) {
            self.shared.warn(
                WarningKind::RegionUntracked,
                format!(
                    "cannot reset write tracking of region {:?} ({e}); its pages stay marked \
                     written and are taken again",
                    mem.name
                ),
            );
        }
    }

    /// Protects the pages a [`Protect::Later`] collection read, before the capture reads the
    /// region in place (there is no copy to compare with afterwards). On failure the region
    /// is taken whole next time.
    pub(super) fn protect_now(&mut self, idx: usize, mem: &RegionMem, pages: &[Range<usize>]) {
        let Some(tracker) = self.tracker.as_ref() else {
            return;
        };
        if let Err(e) = tracker.protect_pages(mem.addr(), pages) {
            self.shared.warn(
                WarningKind::RegionUntracked,
                format!(
                    "cannot protect the written pages of region {:?} again ({e}); copying it \
                     whole next time",
                    mem.name
                ),
            );
            self.regions[idx].baseline = None;
            self.in_flight_regions.retain(|&i| i != idx);
        }
    }
}

/// The chunks (of a region of `len` bytes) that hold the pages of `ranges` (sorted, as the
/// tracker reports them) or are in `carried` (sorted), in order, each once.
fn merge_chunks(ranges: &[Range<usize>], len: usize, carried: &[usize]) -> Vec<usize> {
    let mut dirty = Vec::new();
    let mut chunks = Chunks::new(carried.to_vec());
    chunks.add_pages(ranges, len, |c| dirty.push(c));
    chunks.finish(|c| dirty.push(c));
    dirty
}

/// A delta's chunks as pages are read, in order and each once: the chunks holding the pages
/// (two ranges may share a chunk) merged with the chunks carried from the last snapshot.
pub(super) struct Chunks {
    carried: std::iter::Peekable<std::vec::IntoIter<usize>>,
    last: Option<usize>,
}

impl Chunks {
    /// Chunks merged with `carried` (sorted).
    pub(super) fn new(carried: Vec<usize>) -> Self {
        Self {
            carried: carried.into_iter().peekable(),
            last: None,
        }
    }

    /// Gives `found` each chunk not given yet up to those holding `ranges` (sorted, after
    /// those of the last call) of a region of `len` bytes.
    pub(super) fn add_pages(
        &mut self,
        ranges: &[Range<usize>],
        len: usize,
        mut found: impl FnMut(usize),
    ) {
        for r in ranges {
            for chunk in chunks_of(r, len) {
                while let Some(c) = self.carried.next_if(|&c| c < chunk) {
                    self.give(c, &mut found);
                }
                self.give(chunk, &mut found);
            }
        }
    }

    /// Gives `found` the carried chunks after the last pages.
    pub(super) fn finish(mut self, mut found: impl FnMut(usize)) {
        while let Some(c) = self.carried.next() {
            self.give(c, &mut found);
        }
    }

    fn give(&mut self, chunk: usize, found: &mut impl FnMut(usize)) {
        if self.last.is_none_or(|last| last < chunk) {
            self.last = Some(chunk);
            found(chunk);
        }
    }
}

/// The chunks (of a region of `len` bytes) that hold the bytes of `range`: none when it lies
/// past the region's end (its mapping is rounded up to whole pages).
fn chunks_of(range: &Range<usize>, len: usize) -> Range<usize> {
    if range.start >= len || range.is_empty() {
        return 0..0;
    }
    range.start / CHUNK_SIZE..(range.end.min(len) - 1) / CHUNK_SIZE + 1
}

/// A region's pages read as written at a safe point whose copy went to the writer, to be
/// protected again after the program went on.
pub(crate) struct Reprotect {
    /// The region's slot in the shim.
    pub(crate) slot: usize,
    pub(crate) mem: Arc<RegionMem>,
    pub(crate) tracker: Arc<DirtyTracker>,
    /// The pages, relative to the region.
    pub(crate) pages: Vec<Range<usize>>,
    /// The capture's item holding the copy (an [`Item::Delta`](super::Item::Delta)).
    pub(crate) item: usize,
}

/// What [`reprotect`] found for a region: the chunks written between the copy and the
/// protection (for the next snapshot), or `None` when the pages could not be protected (the
/// region is taken whole next time).
pub(crate) type Carried = (usize, Option<Vec<usize>>);

/// Protects the pages of `re` again, then compares them with `copy` (the region's chunks
/// `chunks` copied at the safe point, one after another): a page that differs was
/// written after the copy and before its protection, which the tracker no longer shows, so
/// its chunk is carried to the next snapshot. A write after the protection is recorded by
/// the tracker as usual.
pub(crate) fn reprotect(re: &Reprotect, chunks: &[usize], copy: &[u8]) -> Carried {
    if re.tracker.protect_pages(re.mem.addr(), &re.pages).is_err() {
        return (re.slot, None);
    }
    let mut carried = Vec::new();
    for r in &re.pages {
        let end = r.end.min(re.mem.bytes);
        let mut at = r.start;
        while at < end {
            let chunk = at / CHUNK_SIZE;
            let upto = end.min((chunk + 1) * CHUNK_SIZE);
            let Ok(i) = chunks.binary_search(&chunk) else {
                // Not copied (it cannot be: every written page's chunk is); keep it.
                carried.push(chunk);
                at = upto;
                continue;
            };
            let offset = i * CHUNK_SIZE + (at - chunk * CHUNK_SIZE);
            let copied = copy.get(offset..offset + (upto - at));
            if copied.is_none_or(|c| re.mem.differs(at, c)) && carried.last() != Some(&chunk) {
                carried.push(chunk);
            }
            at = upto;
        }
    }
    (re.slot, Some(carried))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, Shim};

    #[test]
    fn a_page_written_between_the_copy_and_its_protection_is_carried_and_later_ones_tracked() {
        let dir = tempfile::tempdir().unwrap();
        let mut shim = Shim::open(Config::local(dir.path().join("store"), "carry")).unwrap();
        let Some(tracker) = shim.tracker.clone() else {
            eprintln!("skipped: no dirty tracking here");
            return;
        };
        let mut r = shim.region::<u64>("r", (4 << 20) / 8).unwrap();
        let _ = shim.snapshot(None, |_| Ok(())).unwrap();
        shim.wait_durable().unwrap().unwrap();
        let mem = shim.regions[0].mem.upgrade().unwrap();
        let written = |pages: &mut Vec<Range<usize>>| {
            pages.clear();
            tracker.written(mem.addr(), mem.mapped, pages).unwrap();
        };
        r[2 * 8192] = 1;
        r[5 * 8192 + 600] = 1;
        let mut pages = Vec::new();
        written(&mut pages);
        assert_eq!(merge_chunks(&pages, mem.bytes, &[]), vec![2, 5]);
        let copy = super::super::copy::copy_chunks(mem.bytes(), &[2, 5]);
        // The program goes on and writes chunk 5 again before the writer protects it.
        r[5 * 8192 + 600] = 2;
        let re = Reprotect {
            slot: 0,
            mem: Arc::clone(&mem),
            tracker: Arc::clone(&tracker),
            pages,
            item: 0,
        };
        assert_eq!(reprotect(&re, &[2, 5], &copy), (0, Some(vec![5])));
        let mut pages = Vec::new();
        written(&mut pages);
        assert!(pages.is_empty(), "protected again: {pages:?}");
        r[2 * 8192 + 1] = 3;
        written(&mut pages);
        assert_eq!(merge_chunks(&pages, mem.bytes, &[]), vec![2]);
    }

    #[test]
    fn chunks_merge_written_pages_and_carried_chunks_in_order_once() {
        let c = CHUNK_SIZE;
        let ranges = [0..4096, c + 4096..3 * c, 5 * c..5 * c + 4096];
        assert_eq!(merge_chunks(&ranges, 10 * c, &[]), vec![0, 1, 2, 5]);
        assert_eq!(
            merge_chunks(&ranges, 10 * c, &[1, 3, 4, 9]),
            vec![0, 1, 2, 3, 4, 5, 9]
        );
        assert_eq!(merge_chunks(&[], 10 * c, &[2, 7]), vec![2, 7]);
        // Pages past the region's length (its mapping is rounded up) are not chunks of it.
        assert_eq!(
            merge_chunks(&[2 * c..3 * c, 4 * c..5 * c], 2 * c, &[]),
            Vec::<usize>::new()
        );
    }
}
