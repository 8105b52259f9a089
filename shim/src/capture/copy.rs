//! Copying at the safe point, the program's whole pause: the values and slices the program's
//! closure adds, and every registered region, whole or only its chunks written since its base.
//! When the regions' copies would exceed the capture memory budget, the writer reads them in
//! place, part by part (a [`Feed`]), while the program waits.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::Instant;

use supervise_store::error::Result;
use supervise_store::format::CHUNK_SIZE;

use super::dirty::{Chunks, Delta, Dirty, Protect, Reprotect};
use super::scan::Scan;
use super::{
    Buffer, Capture, CaptureTask, Item, OutputsAt, Part, PartBytes, append_streamed, empty_buffer,
    reserve_capture,
};
use crate::channel::Shared;
use crate::region::RegionMem;
use crate::runtime::Shim;

impl Shim {
    /// Copies what the snapshot needs; the program is paused for exactly this (and, when the
    /// regions' copies would exceed the capture memory budget, for the [`Feed`] returned with
    /// the task, which hands them to the writer part by part).
    pub(crate) fn capture<F>(
        &mut self,
        tag: Option<&str>,
        fill: F,
        started: Instant,
        outputs: OutputsAt,
    ) -> Result<(CaptureTask, Option<Feed>)>
    where
        F: FnOnce(&mut Capture<'_>) -> Result<()>,
    {
        self.regions.retain(|slot| slot.mem.strong_count() > 0);
        let mut names: HashSet<String> = self
            .regions
            .iter()
            .filter_map(|slot| slot.mem.upgrade().map(|m| m.name.clone()))
            .collect();
        let mut items = Vec::new();
        let mut arrays = Vec::new();
        fill(&mut Capture {
            items: &mut items,
            buffers: &mut self.buffers,
            names: &mut names,
            arrays: &mut arrays,
        })?;
        // The written pages of tracked regions are read on the scanner thread from now on,
        // while the program copies. Not before the closure ran: it may write a region.
        let mut scans = self.start_scans();
        self.in_flight_regions.clear();
        let mut plan: Vec<Planned> = Vec::new();
        for idx in 0..self.regions.len() {
            if let Some(mem) = self.regions[idx].mem.upgrade() {
                let (dirty, copy) = match scans.get_mut(idx).and_then(Option::take) {
                    Some(scan) => self.copy_scanned(idx, &mem, &scan),
                    None => (self.collect_dirty(idx, &mem, Protect::Later), None),
                };
                arrays.extend(mem.array_shape());
                plan.push(Planned {
                    slot: idx,
                    mem,
                    dirty,
                    copy,
                });
                self.in_flight_regions.push(idx);
            }
        }
        // The values and slices are copied already, and the writer needs some memory of its
        // own to store chunks; the regions get what the budget leaves.
        let copied: usize = items.iter().map(Item::held).sum();
        let state = plan.iter().map(|p| p.mem.bytes).sum::<usize>() + copied;
        let budget = self.capture_budget(state);
        let room = budget.saturating_sub(copied + WRITER_RESERVE);
        let need: usize = plan
            .iter()
            .map(|p| to_copy(&p.mem, p.dirty.as_ref().map(|d| &d.delta)))
            .sum();
        let mut reprotect = Vec::new();
        let feed = if need <= room {
            // Spare buffers are memory held: within the room, counting the copies made as the
            // scanner read (their buffers) and those still to make, unless one region's copy
            // is still to be made and reuses the largest spare.
            let (held, made) = plan
                .iter()
                .filter_map(|p| p.copy.as_ref())
                .fold((0, 0), |(held, made), b| {
                    (held + b.capacity(), made + b.len())
                });
            let rest = need.saturating_sub(made);
            self.buffers
                .sort_by_key(|b| std::cmp::Reverse(b.capacity()));
            let reused = plan.len() == 1
                && held == 0
                && self.buffers.first().is_some_and(|b| b.capacity() >= need);
            let mut spare = if reused {
                room
            } else {
                room.saturating_sub(held + rest)
            };
            self.buffers.retain(|b| {
                let fits = b.capacity() <= spare;
                if fits {
                    spare -= b.capacity();
                }
                fits
            });
            for Planned {
                slot,
                mem,
                dirty,
                copy,
            } in plan
            {
                let Some(Dirty { delta, pages }) = dirty else {
                    items.push(self.copy_region(&mem, None, &mut spare));
                    continue;
                };
                items.push(match copy {
                    Some(data) => Item::Delta {
                        name: mem.name.clone(),
                        base: delta.0,
                        dirty: delta.1,
                        data,
                        shuffle: mem.shuffle,
                    },
                    None => self.copy_region(&mem, Some(delta), &mut spare),
                });
                if let (Some(s), Some(Item::Delta { data, .. })) =
                    (self.regions.get_mut(slot), items.last())
                {
                    s.copied = data.len();
                }
                if let Some(tracker) = self.tracker.as_ref().filter(|_| !pages.is_empty()) {
                    // Protected again by the writer, which has the copy to compare with.
                    reprotect.push(Reprotect {
                        slot,
                        mem,
                        tracker: Arc::clone(tracker),
                        pages,
                        item: items.len() - 1,
                    });
                }
            }
            None
        } else {
            // Spare buffers would only add to what the parts hold.
            self.buffers.clear();
            let (returns, returned) = channel();
            let (read, done) = channel();
            let mut regions = Vec::new();
            for Planned {
                slot, mem, dirty, ..
            } in plan
            {
                let (tx, parts) = channel();
                let (base, chunks) = match dirty {
                    Some(Dirty {
                        delta: (base, dirty),
                        pages,
                    }) => {
                        // Read in place or copied while the program waits: protected first,
                        // so every write from now on is recorded.
                        self.protect_now(slot, &mem, &pages);
                        (Some(base), dirty)
                    }
                    None => (None, (0..mem.bytes.div_ceil(CHUNK_SIZE)).collect()),
                };
                items.push(Item::Parts {
                    name: mem.name.clone(),
                    kind: mem.kind.clone(),
                    len: mem.bytes as u64,
                    base,
                    shuffle: mem.shuffle,
                    chunks: chunks.len(),
                    parts,
                    returns: returns.clone(),
                    read: read.clone(),
                });
                regions.push((mem, chunks, tx));
            }
            // A rank's writer claims chunks by hash before it stores them, so it would copy
            // what it reads in place anyway: a rank copies its parts.
            #[cfg(test)]
            let in_place = self.part_seq.is_none() && !self.copy_parts;
            #[cfg(not(test))]
            let in_place = self.part_seq.is_none();
            Some(Feed::new(
                regions,
                room,
                in_place,
                returned,
                done,
                Arc::clone(&self.shared),
            ))
        };
        let task = CaptureTask {
            tag: tag.map(str::to_owned),
            items,
            started,
            origin: self.config.origin.clone(),
            outputs,
            seq: self.part_seq,
            arrays,
            reprotect,
        };
        Ok((task, feed))
    }

    /// The capture memory budget for `state` bytes of state, in bytes (also kept as the bound
    /// on spare buffers).
    pub(crate) fn capture_budget(&mut self, state: usize) -> usize {
        // As read at start or after the last snapshot: reading it here would lengthen the pause.
        let available = self.shared.available();
        let budget = self.config.capture_memory.bytes(state as u64, available);
        self.budget = usize::try_from(budget).unwrap_or(usize::MAX);
        self.budget
    }

    /// Starts reading the written pages of each tracked region with a base on the scanner
    /// thread (indexed like the regions; `None` where the region is read here instead).
    fn start_scans(&self) -> Vec<Option<Arc<Scan>>> {
        let (Some(scanner), Some(tracker)) = (&self.scanner, &self.tracker) else {
            return Vec::new();
        };
        let scanned: Vec<Option<Arc<RegionMem>>> = self
            .regions
            .iter()
            .map(|slot| {
                let read = slot.tracked && slot.baseline.is_some();
                slot.mem.upgrade().filter(|_| read)
            })
            .collect();
        let regions: Vec<Arc<RegionMem>> = scanned.iter().flatten().cloned().collect();
        if regions.is_empty() {
            return Vec::new();
        }
        let Some(mut scans) = scanner.start(tracker, &regions) else {
            return Vec::new();
        };
        scans.reverse();
        scanned
            .into_iter()
            .map(|mem| mem.and_then(|_| scans.pop()))
            .collect()
    }

    /// Copies the written chunks of a region as they are read, piece by piece, with the
    /// chunks carried from the last snapshot, into a spare buffer while they fit in it.
    /// Returns the region's delta (`None`: the scan failed, so the region is copied whole and
    /// tracked afresh) and the copy if it is whole (else the caller copies the delta).
    fn copy_scanned(
        &mut self,
        idx: usize,
        mem: &RegionMem,
        scan: &Scan,
    ) -> (Option<Dirty>, Option<Buffer>) {
        // The smallest spare that held the region's last delta (else the largest): with
        // several regions, each takes about what it took last time.
        self.buffers.sort_by_key(Buffer::capacity);
        let last = self.regions[idx].copied;
        let at = self.buffers.iter().position(|b| b.capacity() >= last);
        let mut data = match at {
            Some(at) => self.buffers.remove(at),
            None => self.buffers.pop().unwrap_or_else(empty_buffer),
        };
        data.clear();
        let mut copy = Copying {
            bytes: mem.bytes(),
            chunks: Vec::new(),
            data,
            fits: true,
        };
        let mut chunks = Chunks::new(std::mem::take(&mut self.regions[idx].carried));
        let mut pages = Vec::new();
        let mut end = Ok(());
        for k in 0..scan.pieces() {
            let found = match scan.piece(k) {
                Ok(found) => found,
                Err(e) => {
                    end = Err(e);
                    break;
                }
            };
            chunks.add_pages(&found, mem.bytes, |c| copy.add(c));
            pages.extend(found);
        }
        chunks.finish(|c| copy.add(c));
        let Copying {
            chunks, data, fits, ..
        } = copy;
        let base = self.regions[idx].baseline;
        match (end, base) {
            (Ok(()), Some(base)) => {
                let dirty = Dirty {
                    delta: (base, chunks),
                    pages,
                };
                // Nothing written: the spare stays one.
                if fits && !data.is_empty() {
                    return (Some(dirty), Some(data));
                }
                self.buffers.push(data);
                (Some(dirty), None)
            }
            (end, _) => {
                self.buffers.push(data);
                if let Err(e) = end {
                    self.tracking_failed(mem, &e);
                }
                self.track_afresh(mem);
                (None, None)
            }
        }
    }

    /// Copies one region: its written chunks when `delta` says which (since its base), else
    /// all of it. A new buffer for a delta has up to an eighth more room, taken from `slack`
    /// (what the capture memory budget leaves): the next delta, a little larger, is copied
    /// into it as the scanner reads it (see [`copy_scanned`](Self::copy_scanned)), and a new
    /// buffer is slow to fault in.
    fn copy_region(&mut self, mem: &RegionMem, delta: Option<Delta>, slack: &mut usize) -> Item {
        // The largest spare buffer: a whole copy needs all of it. A region not written since
        // its base copies nothing, and leaves the spare for the next capture.
        self.buffers.sort_by_key(Buffer::capacity);
        let unchanged = delta.as_ref().is_some_and(|(_, dirty)| dirty.is_empty());
        let mut data = match unchanged {
            true => empty_buffer(),
            false => self.buffers.pop().unwrap_or_else(empty_buffer),
        };
        match delta {
            Some((base, dirty)) => {
                let len = dirty.len() * CHUNK_SIZE;
                if data.capacity() < len {
                    let extra = (len / 8).min(*slack);
                    *slack -= extra;
                    reserve_capture(&mut data, len + extra);
                }
                data.clear();
                append_chunks(&mut data, mem.bytes(), &dirty);
                Item::Delta {
                    name: mem.name.clone(),
                    base,
                    dirty,
                    data,
                    shuffle: mem.shuffle,
                }
            }
            None => {
                reserve_capture(&mut data, mem.bytes);
                data.extend_from_slice(mem.bytes());
                Item::Whole {
                    name: mem.name.clone(),
                    kind: mem.kind.clone(),
                    data,
                    shuffle: mem.shuffle,
                }
            }
        }
    }
}

/// A delta being copied as its chunks are found (in order, each once).
struct Copying<'a> {
    /// The region's bytes.
    bytes: &'a [u8],
    /// The chunks found so far.
    chunks: Vec<usize>,
    /// Their copy, while it fits in the buffer's capacity.
    data: Buffer,
    fits: bool,
}

impl Copying<'_> {
    /// Adds `chunk`, copying it while the copy fits.
    fn add(&mut self, chunk: usize) {
        self.chunks.push(chunk);
        let piece = chunk_bytes(self.bytes, chunk);
        self.fits = self.fits && self.data.len() + piece.len() <= self.data.capacity();
        if self.fits {
            append_streamed(&mut self.data, piece);
        }
    }
}

/// A region in a capture: its slot, what was written since its base (`None`: it is copied
/// whole), and its copy if it was made as the scanner read it.
struct Planned {
    slot: usize,
    mem: Arc<RegionMem>,
    dirty: Option<Dirty>,
    copy: Option<Buffer>,
}

/// What the writer holds while it stores a capture, besides the capture's copies: its pack
/// blocks (up to three of 2 MiB), compressors, and chunks on their way (measured with
/// `supervise bench`: the 100% changed memory row).
const WRITER_RESERVE: usize = 48 << 20;

/// The bytes a region's capture copies: its written chunks, or all of it.
fn to_copy(mem: &RegionMem, delta: Option<&Delta>) -> usize {
    delta.map_or(mem.bytes, |(_, dirty)| dirty.len() * CHUNK_SIZE)
}

/// The regions of a capture larger than the capture memory budget, still to be given to the
/// writer part by part. The program waits at its safe point while the writer reads them in
/// place (copying nothing: its pause grows instead of its memory); a rank, whose writer must
/// claim chunks before it stores them, copies them part by part into at most the budget's
/// worth of buffers instead, waiting for a buffer back whenever all are out.
///
/// Copying the last budget's worth of an in-place capture, so that the program could go on
/// while the writer stores it, was measured and left out: on two cores the copy (into fresh
/// memory) slowed the writer as much as it shortened the wait (`supervise bench`, 1 GiB: a
/// pause of 0.54-0.92 s and durable in 0.70-1.05 s with it, 0.55-0.68 s and 0.62-0.72 s
/// without).
pub(crate) struct Feed {
    /// Each region, the numbers of the chunks to give, and where its parts go.
    regions: Vec<(Arc<RegionMem>, Vec<usize>, Sender<Part>)>,
    /// Chunks in one part.
    per_part: usize,
    /// Copied parts out at most.
    buffers: usize,
    /// Whether the writer reads the regions in place (else the parts are copied).
    in_place: bool,
    /// The buffers the writer is done with.
    returned: Receiver<Buffer>,
    /// One message for each part the writer is done reading in place.
    done: Receiver<()>,
    /// Where liveness beats are counted: the program is busy in the shim, not hung.
    shared: Arc<Shared>,
}

impl Feed {
    /// A feed read in place, or copied within `room` bytes of buffers.
    fn new(
        regions: Vec<(Arc<RegionMem>, Vec<usize>, Sender<Part>)>,
        room: usize,
        in_place: bool,
        returned: Receiver<Buffer>,
        done: Receiver<()>,
        shared: Arc<Shared>,
    ) -> Self {
        // Copied: four parts or more in flight (copying one while the writer stores others),
        // of 1 to 32 MiB each. In place a part costs no memory: 32 MiB, so that the writer's
        // workers start and finish together seldom.
        let part = match in_place {
            true => 32 << 20,
            false => (room / 4).clamp(1 << 20, 32 << 20) / CHUNK_SIZE * CHUNK_SIZE,
        };
        Self {
            regions,
            per_part: part / CHUNK_SIZE,
            buffers: (room / part).max(2),
            in_place,
            returned,
            done,
            shared,
        }
    }

    /// Gives every region's chunks to the writer part by part, in place or copied as the
    /// writer makes room; then waits until the writer is done reading in place. Stops early
    /// when the writer has failed (it stops taking parts and reading; the snapshot's outcome
    /// says why). The copies' buffers are freed as the writer is done with them: a capture
    /// this large is not kept ready for. Liveness beats go on all the while: the program is
    /// busy in the shim, not hung.
    pub(crate) fn run(self) {
        let Feed {
            regions,
            per_part,
            buffers,
            in_place: may_read_in_place,
            returned,
            done,
            shared,
        } = self;
        let (mut out, mut in_place) = (0, 0);
        // Each region's sender is dropped after its last part: that tells the writer the
        // region is complete (it stores the regions in order).
        'regions: for (mem, chunks, parts) in regions {
            for group in chunks.chunks(per_part) {
                shared.beat();
                let bytes = if may_read_in_place {
                    in_place += 1;
                    PartBytes::InPlace(Arc::clone(&mem))
                } else {
                    let mut data = if out < buffers {
                        out += 1;
                        let mut data = empty_buffer();
                        reserve_capture(&mut data, per_part * CHUNK_SIZE);
                        data
                    } else {
                        match returned.recv() {
                            Ok(data) => data,
                            Err(_) => break 'regions,
                        }
                    };
                    data.clear();
                    append_chunks(&mut data, mem.bytes(), group);
                    PartBytes::Copied(data)
                };
                let part = Part {
                    chunks: group.to_vec(),
                    bytes,
                };
                if parts.send(part).is_err() {
                    break 'regions;
                }
            }
        }
        // The regions are the program's again only when the writer has read them. Its
        // senders go when the task ends, so a writer that failed ends the wait.
        while in_place > 0 {
            match done.recv_timeout(std::time::Duration::from_millis(500)) {
                Ok(()) => {
                    in_place -= 1;
                    shared.beat();
                }
                Err(RecvTimeoutError::Timeout) => shared.beat(),
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
    }
}

/// Appends the 64 KiB chunks numbered in `dirty` of `bytes` to `out`.
fn append_chunks(out: &mut Buffer, bytes: &[u8], dirty: &[usize]) {
    for &chunk in dirty {
        append_streamed(out, chunk_bytes(bytes, chunk));
    }
}

/// Chunk `chunk` of `bytes` (the last one may be short).
fn chunk_bytes(bytes: &[u8], chunk: usize) -> &[u8] {
    &bytes[chunk * CHUNK_SIZE..((chunk + 1) * CHUNK_SIZE).min(bytes.len())]
}

/// The chunks numbered in `dirty` of `bytes`, one after another.
pub(super) fn copy_chunks(bytes: &[u8], dirty: &[usize]) -> Buffer {
    let mut out = empty_buffer();
    reserve_capture(&mut out, dirty.len() * CHUNK_SIZE);
    append_chunks(&mut out, bytes, dirty);
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use supervise_store::config::CaptureMemory;

    use crate::channel::BEAT;
    use crate::{Config, Shim};

    /// A shim for `job` in a store under `dir` whose captures may hold `budget` bytes.
    fn budgeted(dir: &std::path::Path, job: &str, budget: u64) -> Shim {
        let mut config = Config::local(dir.join("store"), job);
        config.capture_memory = CaptureMemory::Bytes(budget);
        Shim::open(config).unwrap()
    }

    #[test]
    fn parts_copied_as_a_rank_copies_them_stay_within_the_room_and_restore_exactly() {
        let dir = tempfile::tempdir().unwrap();
        // 50 MiB, of which the writer's reserve leaves 2 MiB: parts of 1 MiB, two out at once.
        let mut shim = budgeted(dir.path(), "copied", 50 << 20);
        shim.copy_parts = true;
        let mut r = shim.region::<u64>("r", (8 << 20) / 8).unwrap();
        for (i, v) in r.iter_mut().enumerate() {
            *v = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
        let job = || {
            supervise_store::Store::open(dir.path().join("store"))
                .unwrap()
                .job("copied")
                .unwrap()
        };
        let len = r.len();
        let restored = |seq: u64| {
            let mut out = vec![0u64; len];
            supervise_store::SnapshotReader::open(&job(), seq)
                .unwrap()
                .slice_into("r", "u64", bytemuck::cast_slice_mut(&mut out))
                .unwrap();
            out
        };
        // Whole, then a delta of every other chunk (64 of 128): both beyond the room.
        let _ = shim.snapshot(None, |_| Ok(())).unwrap();
        let first = shim.wait_durable().unwrap().unwrap();
        assert_eq!(restored(first.seq), &r[..]);
        for chunk in (0..128).step_by(2) {
            r[chunk * 8192 + 3] ^= 0xFF;
        }
        let _ = shim.snapshot(None, |_| Ok(())).unwrap();
        let second = shim.wait_durable().unwrap().unwrap();
        assert_eq!(second.bytes_new, 64 * 65536, "{second:?}");
        assert_eq!(restored(second.seq), &r[..]);
        // The copies' buffers are not kept as spares.
        assert!(
            shim.buffers.is_empty(),
            "{} spare buffers",
            shim.buffers.len()
        );
    }

    #[test]
    fn the_program_beats_while_the_writer_reads_a_capture_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let mut shim = budgeted(dir.path(), "beats", 2 << 20);
        // Four parts of 32 MiB, far beyond the budget: read in place while the program waits.
        let mut r = shim.region::<u64>("r", (128 << 20) / 8).unwrap();
        for (i, v) in r.iter_mut().enumerate() {
            *v = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
        // Asks for a beat every millisecond, as the control thread does every second for a
        // supervisor watching for hangs: a program busy in the shim must answer.
        let shared = Arc::clone(&shim.shared);
        let stop = Arc::new(AtomicBool::new(false));
        let asking = {
            let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    shared.pending.fetch_or(BEAT, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        let before = shared.beats.load(Ordering::Relaxed);
        let _ = shim.snapshot(None, |_| Ok(())).unwrap();
        let beats = shared.beats.load(Ordering::Relaxed) - before;
        stop.store(true, Ordering::Relaxed);
        asking.join().unwrap();
        shim.wait_durable().unwrap().unwrap();
        // The parts are handed over in a moment (one beat at most); the wait for the writer
        // to read them must beat too, once a part is read (four parts: a margin of one for a
        // loaded machine, where the asking thread may miss an interval).
        assert!(
            beats >= 3,
            "{beats} beats while the writer read 128 MiB in place"
        );
    }

    #[test]
    fn a_scanned_region_is_copied_as_found_into_a_spare_that_holds_it_else_afterwards() {
        use super::super::scan::Scan;
        use super::super::{Buffer, empty_buffer, reserve_capture};
        use supervise_store::format::CHUNK_SIZE;

        let dir = tempfile::tempdir().unwrap();
        let mut shim = budgeted(dir.path(), "scanned", 1 << 30);
        let (Some(tracker), true) = (shim.tracker.clone(), shim.scanner.is_some()) else {
            eprintln!("skipped: no dirty tracking, or one core");
            return;
        };
        let mut r = shim.region::<u64>("r", (4 << 20) / 8).unwrap();
        for (i, v) in r.iter_mut().enumerate() {
            *v = i as u64;
        }
        let _ = shim.snapshot(None, |_| Ok(())).unwrap();
        shim.wait_durable().unwrap().unwrap();
        r[2 * 8192 + 1] = 7;
        r[9 * 8192 + 4000] = 8;
        let spare = |chunks: usize| {
            let mut b: Buffer = empty_buffer();
            reserve_capture(&mut b, chunks * CHUNK_SIZE);
            b
        };
        let mem = shim.regions[0].mem.upgrade().unwrap();
        let bytes: Vec<u8> = [2, 9]
            .iter()
            .flat_map(|c| mem.bytes()[c * CHUNK_SIZE..(c + 1) * CHUNK_SIZE].to_vec())
            .collect();
        // A spare that holds both written chunks: copied as they are found. The scan is not
        // given to the scanner, so the program reads every piece itself.
        shim.buffers = vec![spare(2)];
        let scan = Scan::new(&tracker, &mem);
        let (dirty, copy) = shim.copy_scanned(0, &mem, &scan);
        let dirty = dirty.unwrap();
        assert_eq!(dirty.delta.1, vec![2, 9]);
        assert_eq!(copy.as_deref(), Some(&bytes[..]));
        assert!(shim.buffers.is_empty());
        // The pages were read, not protected: read again, by the scanner, into a spare too
        // small for them.
        shim.buffers = vec![spare(1)];
        let scanner = shim.scanner.as_ref().unwrap();
        let Some(scans) = scanner.start(&tracker, std::slice::from_ref(&mem)) else {
            eprintln!("skipped: no other core for the scanner");
            return;
        };
        let (again, copy) = shim.copy_scanned(0, &mem, &scans[0]);
        assert_eq!(again.unwrap().delta.1, vec![2, 9]);
        assert!(
            copy.is_none(),
            "a copy that does not fit is made afterwards"
        );
        assert_eq!(shim.buffers.len(), 1, "the spare is kept");
    }
}
