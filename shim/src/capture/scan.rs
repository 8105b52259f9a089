//! Reading a region's written pages on a thread of its own while the program copies the
//! chunks found so far: the program's pause is then about the copy alone, not the page-table
//! walk plus the copy (the walk reads every entry of the region, 0.3-0.5 ms for 1 GiB).
//!
//! The region is read in pieces of [`PIECE`] bytes, which the scanner and the program both
//! claim in order: the program takes each piece's pages in turn, and reads a piece itself
//! when the scanner has not claimed it yet, or has not read it soon enough, so a scanner
//! that is slow to start or stopped mid-piece (its core busy) costs the pause little.
//!
//! The scanner reads without protecting (see [`DirtyTracker::written`]): it changes no page
//! table entry, so it interrupts neither the program's thread copying beside it nor any
//! other. It runs on the process's other cores: woken on the program's own core, it would run
//! there at once, and the program would wait for its whole scan (measured: 0.5 ms lost).

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::tracker::DirtyTracker;
use crate::region::RegionMem;

/// Bytes of a region read in one step: small enough that the program starts copying soon,
/// large enough that handing a piece over costs little beside reading it (~10 us).
const PIECE: usize = 32 << 20;

/// How long the program waits for a piece the scanner claimed before reading it itself:
/// several times what reading a piece takes (~10 us).
const LATE: Duration = Duration::from_micros(100);

/// Pages read in one piece, relative to the region, in order.
type Pages = io::Result<Vec<Range<usize>>>;

/// One region's scan, shared by the scanner and the program.
pub(crate) struct Scan {
    tracker: Arc<DirtyTracker>,
    mem: Arc<RegionMem>,
    pieces: usize,
    /// The next piece nobody claimed.
    next: AtomicUsize,
    /// The pieces the scanner read, until the program takes them.
    read: Mutex<Vec<Option<Pages>>>,
    more: Condvar,
}

impl Scan {
    /// A scan of `mem`, nothing read yet.
    pub(crate) fn new(tracker: &Arc<DirtyTracker>, mem: &Arc<RegionMem>) -> Self {
        let pieces = mem.mapped.div_ceil(PIECE);
        Self {
            tracker: Arc::clone(tracker),
            mem: Arc::clone(mem),
            pieces,
            next: AtomicUsize::new(0),
            read: Mutex::new((0..pieces).map(|_| None).collect()),
            more: Condvar::new(),
        }
    }

    /// How many pieces the region is read in.
    pub(crate) fn pieces(&self) -> usize {
        self.pieces
    }

    /// The written pages of piece `k` (taken in order, each once): read here if the scanner
    /// has not claimed it, else waited for, up to [`LATE`]: a scanner whose core was taken
    /// from it mid-piece (by the host of a VM, say) would hold the pause for as long. Reading
    /// a piece twice is harmless (it changes nothing); the scanner's late answer is dropped.
    pub(crate) fn piece(&self, k: usize) -> Pages {
        if self
            .next
            .compare_exchange(k, k + 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return self.read_piece(k);
        }
        let deadline = Instant::now() + LATE;
        let mut read = self.read.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(pages) = read.get_mut(k).and_then(Option::take) {
                return pages;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(read);
                return self.read_piece(k);
            }
            read = self
                .more
                .wait_timeout(read, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn read_piece(&self, k: usize) -> Pages {
        let at = k * PIECE;
        let len = PIECE.min(self.mem.mapped - at);
        let mut pages = Vec::new();
        self.tracker
            .written(self.mem.addr() + at, len, &mut pages)?;
        for r in &mut pages {
            *r = r.start + at..r.end + at;
        }
        Ok(pages)
    }

    /// The scanner's side: reads the pieces nobody claimed yet, in order.
    fn run(&self) {
        loop {
            let k = self.next.fetch_add(1, Ordering::AcqRel);
            if k >= self.pieces {
                return;
            }
            let pages = self.read_piece(k);
            let mut read = self.read.lock().unwrap_or_else(PoisonError::into_inner);
            read[k] = Some(pages);
            drop(read);
            self.more.notify_one();
        }
    }
}

/// The scanner thread. Scans start once the program's snapshot closure has run (it may
/// write a region).
pub(crate) struct Scanner {
    /// Its thread id, for its CPU affinity.
    tid: Arc<AtomicI32>,
    scans: Option<Sender<Arc<Scan>>>,
    thread: Option<JoinHandle<()>>,
}

impl Scanner {
    /// Starts the scanner thread.
    pub(crate) fn spawn() -> io::Result<Self> {
        let (scans, rx) = channel::<Arc<Scan>>();
        let tid = Arc::new(AtomicI32::new(0));
        let own = Arc::clone(&tid);
        let thread = std::thread::Builder::new()
            .name("supervise-scan".into())
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                own.store(unsafe { libc::gettid() }, Ordering::Release);
                for scan in rx {
                    scan.run();
                }
            })?;
        Ok(Self {
            tid,
            scans: Some(scans),
            thread: Some(thread),
        })
    }

    /// Starts scans of `regions`, read beside the calling thread: `None` when the scanner
    /// cannot run on another of the process's cores than the caller's current one (then the
    /// caller reads them itself).
    pub(crate) fn start(
        &self,
        tracker: &Arc<DirtyTracker>,
        regions: &[Arc<RegionMem>],
    ) -> Option<Vec<Arc<Scan>>> {
        if !self.keep_off_this_cpu() {
            return None;
        }
        let scans = self.scans.as_ref()?;
        regions
            .iter()
            .map(|mem| {
                let scan = Arc::new(Scan::new(tracker, mem));
                scans.send(Arc::clone(&scan)).ok()?;
                Some(scan)
            })
            .collect()
    }

    /// Lets the scanner run on every core the calling thread may run on but the one it runs
    /// on now; false if there is none (or the scanner has not started).
    fn keep_off_this_cpu(&self) -> bool {
        let tid = self.tid.load(Ordering::Acquire);
        // A thread that ended has given its id back for reuse.
        let running = self.thread.as_ref().is_some_and(|t| !t.is_finished());
        if tid <= 0 || !running {
            return false;
        }
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: sched_getcpu has no preconditions; the CPU set is our own, zeroed (a valid
        // empty set) and `size` long; sched_setaffinity changes only the scanner thread's
        // affinity, to cores the caller may use.
        unsafe {
            let cpu = libc::sched_getcpu();
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if !(0..8 * size as libc::c_int).contains(&cpu)
                || libc::sched_getaffinity(0, size, &mut set) != 0
            {
                return false;
            }
            libc::CPU_CLR(cpu as usize, &mut set);
            libc::CPU_COUNT(&set) > 0 && libc::sched_setaffinity(tid, size, &set) == 0
        }
    }
}

impl Drop for Scanner {
    fn drop(&mut self) {
        drop(self.scans.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, Shim};

    #[test]
    fn a_piece_the_scanner_claimed_but_never_read_is_read_by_the_program() {
        let dir = tempfile::tempdir().unwrap();
        let mut shim = Shim::open(Config::local(dir.path().join("store"), "late")).unwrap();
        let Some(tracker) = shim.tracker.clone() else {
            eprintln!("skipped: no dirty tracking here");
            return;
        };
        // Two pieces and a bit.
        let mut r = shim
            .region::<u64>("r", (PIECE * 2 + (4 << 20)) / 8)
            .unwrap();
        let _ = shim.snapshot(None, |_| Ok(())).unwrap();
        shim.wait_durable().unwrap().unwrap();
        r[PIECE / 8 + 3] = 1;
        let mem = shim.regions[0].mem.upgrade().unwrap();
        let scan = Scan::new(&tracker, &mem);
        assert_eq!(scan.pieces(), 3);
        // Piece 0 is read here; piece 1 is claimed as the scanner would, and never read.
        assert_eq!(scan.piece(0).unwrap(), Vec::<Range<usize>>::new());
        assert_eq!(scan.next.fetch_add(1, Ordering::AcqRel), 1);
        let at = Instant::now();
        assert_eq!(scan.piece(1).unwrap(), vec![PIECE..PIECE + 4096]);
        assert!(at.elapsed() >= LATE, "waited {:?}", at.elapsed());
        assert_eq!(scan.piece(2).unwrap(), Vec::<Range<usize>>::new());
    }
}
