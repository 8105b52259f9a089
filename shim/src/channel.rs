//! The shim's end of the control channel: the word of pending requests that `Shim::due`
//! reads, the thread that reads the supervisor's requests and sends liveness beats, and the
//! sending of events.

use std::io::{BufRead, BufReader, ErrorKind};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::socket::{MsgFlags, send};

use crate::rank::Link;

use supervise_store::config::OrphanMode;
use supervise_store::control::{Event, Request, WarningKind};
use supervise_store::error::{Error, Result};

/// Pending-request bits: a snapshot is requested.
pub(crate) const SNAP: u32 = 1;

/// Stop after the next snapshot (supervisor stop, SIGTERM, supervisor gone).
pub(crate) const STOP: u32 = 2;

/// The control thread wants a liveness beat (counted at the next safe point).
pub(crate) const BEAT: u32 = 4;

/// A rank: the control thread reported where the program is for an epoch; the program holds
/// at its next safe point until the target arrives.
pub(crate) const HOLD: u32 = 8;

/// A rank: an epoch's target safe point is known.
pub(crate) const AIM: u32 = 16;

/// A rank: the program reached an epoch's target; its next snapshot captures the part.
pub(crate) const DUE: u32 = 32;

/// How often the control thread asks for a liveness beat once the first one was reported.
const BEAT_EVERY: Duration = Duration::from_secs(1);

/// How often it asks before the first safe point was reached.
const FIRST_BEAT_POLL: Duration = Duration::from_millis(50);

/// State shared with signal handlers and the control thread.
pub(crate) struct Shared {
    pub(crate) pending: AtomicU32,
    pub(crate) beats: AtomicU64,
    /// The memory available for captures, in bytes (0: unknown), read off the program's pause:
    /// at start and by the writer thread after each snapshot.
    pub(crate) available: AtomicU64,
    pub(crate) control: Option<Mutex<Link>>,
    /// A rank of a job of many processes: safe points are counted and epochs coordinated.
    pub(crate) rank: Option<RankState>,
}

/// A rank's side of the epoch protocol.
pub(crate) struct RankState {
    /// The rank's number.
    pub(crate) rank: u32,
    /// The number of ranks.
    pub(crate) size: u32,
    /// The supervisor's answers to claims on chunks shared with other ranks.
    pub(crate) claims: crate::claims::ClaimBox,
    /// Safe points the program passed since the job's start (restored with the epoch).
    pub(crate) passed: AtomicU64,
    /// The epoch in hand.
    pub(crate) epoch: Mutex<EpochState>,
    /// Wakes a program held at a safe point.
    pub(crate) wake: Condvar,
    /// Epochs that were not published: a part of one is no base (it is removed). Taken by
    /// the next capture, after its settle.
    pub(crate) unpublished: Mutex<Vec<u64>>,
    /// Agreement: the newest epoch that ended (no part of it may be taken any more).
    pub(crate) ended: AtomicU64,
    /// The program agrees on each epoch's safe point itself: epochs are offered, no target.
    pub(crate) agree: bool,
    /// Agreement: the epoch offered, `epoch << 1 | stop` (0: none).
    pub(crate) offered: AtomicU64,
    /// Agreement: the newest epoch this rank captured (an offer that arrives after the
    /// program already took it, through the others' agreement, is not offered again).
    pub(crate) taken: AtomicU64,
}

/// Where the epoch in hand stands.
#[derive(Default)]
pub(crate) struct EpochState {
    /// Holding for this epoch until its target is known.
    pub(crate) holding: Option<u64>,
    /// The target: capture at this safe point.
    pub(crate) aim: Option<Aim>,
    /// The program reached the target: [`Shim::snapshot`](crate::Shim::snapshot) captures
    /// this epoch's part.
    pub(crate) due: Option<Aim>,
    /// The supervisor is gone: nobody will send a target.
    pub(crate) gone: bool,
}

/// An epoch's target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Aim {
    pub(crate) epoch: u64,
    pub(crate) step: u64,
    pub(crate) stop: bool,
}

impl RankState {
    pub(crate) fn new(rank: u32, size: u32, passed: u64, agree: bool) -> Self {
        Self {
            rank,
            size,
            claims: crate::claims::ClaimBox::default(),
            passed: AtomicU64::new(passed),
            epoch: Mutex::new(EpochState::default()),
            wake: Condvar::new(),
            unpublished: Mutex::new(Vec::new()),
            ended: AtomicU64::new(0),
            agree,
            offered: AtomicU64::new(0),
            taken: AtomicU64::new(0),
        }
    }

    /// Agreement: the epoch offered and whether it is a final one.
    pub(crate) fn offered(&self) -> Option<(u64, bool)> {
        let word = self.offered.load(Ordering::Acquire);
        (word != 0).then_some((word >> 1, word & 1 == 1))
    }

    /// Agreement: the program takes its part of `epoch` now (the ranks agreed on it). False
    /// (nothing to capture) when this rank took it already or it ended: a late offer, or an
    /// epoch another rank still offered when this one heard it ended.
    pub(crate) fn take_agreed(&self, epoch: u64, stop: bool) -> bool {
        let mut st = self.lock();
        let _ = self
            .offered
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                (w >> 1 <= epoch).then_some(0)
            });
        if self.ended.load(Ordering::SeqCst) >= epoch
            || self.taken.fetch_max(epoch, Ordering::SeqCst) >= epoch
        {
            return false;
        }
        st.due = Some(Aim {
            epoch,
            step: 0,
            stop,
        });
        true
    }

    /// Notes that `epoch` was not published.
    fn unpublished(&self, epoch: u64) {
        self.unpublished
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(epoch);
    }

    /// The epochs not published since the last call.
    pub(crate) fn take_unpublished(&self) -> Vec<u64> {
        std::mem::take(&mut *self.unpublished.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, EpochState> {
        self.epoch.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The part the program must capture now, taken (once) by the snapshot.
    pub(crate) fn take_due(&self, pending: &AtomicU32) -> Option<Aim> {
        let mut st = self.lock();
        pending.fetch_and(!DUE, Ordering::SeqCst);
        st.due.take()
    }
}

impl Shared {
    /// True when a snapshot is due; counts a liveness beat when the control thread asked for
    /// one. One relaxed load when nothing is pending (a rank also counts the safe point).
    pub(crate) fn due(&self) -> bool {
        if let Some(rank) = &self.rank {
            // Counted before the pending word is read (both in the one total order of SeqCst
            // operations), and the control thread sets HOLD before it reads the count: a
            // program whose count it missed sees HOLD at this very safe point.
            let passed = rank.passed.fetch_add(1, Ordering::SeqCst) + 1;
            let pending = self.pending.load(Ordering::SeqCst);
            return pending != 0 && self.due_rank(rank, pending, passed);
        }
        let pending = self.pending.load(Ordering::Relaxed);
        pending != 0 && self.due_slow(pending)
    }

    /// A rank that agrees on epochs itself: the epoch offered, and whether it is a final one.
    pub(crate) fn epoch_offered(&self) -> Option<(u64, bool)> {
        let rank = self.rank.as_ref().filter(|r| r.agree)?;
        let pending = self.pending.load(Ordering::Relaxed);
        if pending != 0 {
            // Asked every few steps, it is where such a program beats.
            self.due_slow(pending & BEAT);
            if pending & STOP != 0 && rank.offered().is_none() {
                return Some((0, true));
            }
        }
        rank.offered()
    }

    #[cold]
    fn due_rank(&self, rank: &RankState, pending: u32, passed: u64) -> bool {
        let stop = self.due_slow(pending & !SNAP) || pending & STOP != 0;
        if pending & (HOLD | AIM | DUE) == 0 {
            return stop;
        }
        let mut st = rank.lock();
        if pending & DUE != 0
            && let Some(missed) = st.due.take()
        {
            // The program was told at its last safe point and took no snapshot: this rank's
            // part of that epoch will not come.
            self.pending.fetch_and(!DUE, Ordering::SeqCst);
            self.send(&Event::PartSkipped {
                epoch: missed.epoch,
            });
        }
        while st.holding.is_some() && st.aim.is_none() && !st.gone {
            st = rank.wake.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let Some(aim) = st.aim else {
            return stop;
        };
        if passed < aim.step {
            return stop;
        }
        st.aim = None;
        self.pending.fetch_and(!AIM, Ordering::SeqCst);
        if passed > aim.step {
            // Cannot happen by the protocol (the target is past every rank's count when it
            // was read); said rather than captured at the wrong point.
            drop(st);
            self.send(&Event::SnapshotFailed {
                error: format!(
                    "rank {} passed safe point {passed} before it learned epoch {}'s target {}",
                    rank.rank, aim.epoch, aim.step
                ),
            });
            return stop;
        }
        st.due = Some(aim);
        self.pending.fetch_or(DUE, Ordering::SeqCst);
        true
    }

    /// Reads the memory available now (see [`supervise_store::config::memory_available`]) for
    /// the next capture's budget.
    pub(crate) fn note_available(&self) {
        let bytes = supervise_store::config::memory_available().unwrap_or(0);
        self.available.store(bytes, Ordering::Relaxed);
    }

    /// The memory available as last read, if known.
    pub(crate) fn available(&self) -> Option<u64> {
        Some(self.available.load(Ordering::Relaxed)).filter(|&b| b > 0)
    }

    /// Counts a liveness beat if the control thread asked for one: for a program that is busy
    /// inside the shim (a capture in parts) rather than between safe points.
    pub(crate) fn beat(&self) {
        let pending = self.pending.load(Ordering::Relaxed);
        if pending & BEAT != 0 {
            self.due_slow(pending);
        }
    }

    #[cold]
    fn due_slow(&self, pending: u32) -> bool {
        if pending & BEAT != 0 {
            self.pending.fetch_and(!BEAT, Ordering::Relaxed);
            self.beats.fetch_add(1, Ordering::Relaxed);
        }
        pending & SNAP != 0
    }

    /// Reports something the supervisor should show (the shim prints nothing): as a
    /// [`Event::Warning`] to the supervisor, and as a `log` record the program may route.
    pub(crate) fn warn(&self, kind: WarningKind, message: String) {
        log::warn!("{message}");
        self.send(&Event::Warning { kind, message });
    }

    pub(crate) fn send(&self, event: &Event) {
        if let Some(stream) = &self.control {
            let stream = stream.lock().unwrap_or_else(|p| p.into_inner());
            let line = event.to_line();
            let mut buf = line.as_bytes();
            // MSG_NOSIGNAL: a supervisor that went away must not kill the program with SIGPIPE.
            while !buf.is_empty() {
                match send(stream.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL) {
                    Ok(n) => buf = &buf[n..],
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(_) => return,
                }
            }
        }
    }
}

/// Takes ownership of the inherited control socket and keeps it from leaking into programs
/// the child starts.
pub(crate) fn adopt_control_fd(fd: RawFd) -> Result<Link> {
    let bad = |why: String| Error::Env {
        var: supervise_store::config::ENV_CONTROL_FD,
        value: fd.to_string(),
        why,
    };
    // SAFETY: fstat on a raw descriptor number only fills `stat`; an fd that is not open
    // yields EBADF (no Rust object claims the fd before this check passes).
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut stat) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(bad(format!(
            "not an open file descriptor ({e}); was the variable inherited from a parent program?"
        )));
    }
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(bad(
            "not a socket; was the variable inherited from a parent program?".into(),
        ));
    }
    set_cloexec(fd, true).map_err(|e| bad(format!("cannot set close-on-exec ({e})")))?;
    // SAFETY: the supervisor passed this fd to us for the control channel and nothing else in
    // the process owns it; fcntl above proved it open. We take sole ownership here.
    Ok(Link::Unix(unsafe { UnixStream::from_raw_fd(fd) }))
}

/// Makes the supervisor's own stderr this program's stderr again (see
/// [`supervise_store::config::ENV_STDERR_FD`]: `fd:dev:inode:pipe dev:pipe inode`), once the shim has
/// told the supervisor it started (what it wrote before, an error of its start included, went
/// through the supervisor, which shows the last lines of a program that fails at once). Only
/// when fd 2 is still the supervisor's pipe: a program (or a script before it) that sent its
/// stderr elsewhere keeps it there. Only when the named descriptor is open and still the file
/// it names: a stale variable inherited by a program this one starts redirects nothing.
pub(crate) fn take_back_stderr() {
    let Ok(value) = std::env::var(supervise_store::config::ENV_STDERR_FD) else {
        return;
    };
    let fields: Vec<u64> = value.split(':').filter_map(|f| f.parse().ok()).collect();
    let [fd, dev, ino, pipe_dev, pipe_ino] = fields[..] else {
        return;
    };
    let Ok(fd) = RawFd::try_from(fd) else {
        return;
    };
    if fd <= 2 {
        return;
    }
    let identity = |fd: RawFd| {
        // SAFETY: fstat on a raw descriptor number only fills `stat`; a closed fd yields EBADF.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        (unsafe { libc::fstat(fd, &mut stat) } == 0).then_some((stat.st_dev, stat.st_ino))
    };
    if identity(fd) != Some((dev, ino)) {
        return;
    }
    // SAFETY: dup2 makes fd 2 a copy of `fd` (checked open and the file it names above), which
    // closes the old fd 2 (checked to be the pipe to the supervisor); `fd` is owned by nothing
    // else in this process: the supervisor passed it for this alone, and it is closed either
    // way.
    unsafe {
        if identity(2) == Some((pipe_dev, pipe_ino)) {
            libc::dup2(fd, 2);
        }
        libc::close(fd);
    }
}

pub(crate) fn set_cloexec(fd: RawFd, on: bool) -> nix::Result<()> {
    // SAFETY: only used on the control fd, which this process owns for its whole life.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let flags = if on {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    fcntl(borrowed, FcntlArg::F_SETFD(flags)).map(|_| ())
}

/// Reads requests from the supervisor, sends liveness beats once a second, and on the channel
/// closing (supervisor gone) asks the program for a final snapshot and a stop (the program's
/// next safe point returns the stop; the shim never ends the process: a program that reaches
/// no safe point is ended from outside, by the supervisor's lifeline process, which sends
/// SIGTERM and then SIGKILL to the job's process group), or with [`OrphanMode::Continue`] lets
/// it run on, snapshotting every `every`.
pub(crate) fn control_loop(
    shared: &Shared,
    stream: Link,
    orphan: OrphanMode,
    every: Option<Duration>,
) {
    // Beat quickly until the first safe point is reported: the supervisor tells a program that
    // dies before its first safe point after a restore (which points at the snapshot) from
    // one that was running; then once a second.
    let _ = stream.set_read_timeout(Some(FIRST_BEAT_POLL));
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let mut last_beats = 0;
    loop {
        let gone = match reader.read_line(&mut line) {
            Ok(0) => true,
            Ok(_) if line.ends_with('\n') => {
                match serde_json::from_str::<Request>(&line) {
                    Ok(Request::Snapshot) => shared.pending.fetch_or(SNAP, Ordering::SeqCst),
                    Ok(Request::Stop) => shared.pending.fetch_or(SNAP | STOP, Ordering::SeqCst),
                    Ok(
                        request @ (Request::EpochBegin { .. }
                        | Request::EpochTarget { .. }
                        | Request::EpochEnd { .. }),
                    ) => {
                        epoch_request(shared, request);
                        0
                    }
                    Ok(request @ (Request::ClaimAnswer { .. } | Request::ChunksAt { .. }))
                        if shared.rank.is_some() =>
                    {
                        if let Some(rank) = &shared.rank {
                            rank.claims.file(request);
                        }
                        0
                    }
                    Ok(other) => {
                        shared.warn(
                            WarningKind::BadControlMessage,
                            format!("ignoring a control message out of place: {other:?}"),
                        );
                        0
                    }
                    Err(e) => {
                        shared.warn(
                            WarningKind::BadControlMessage,
                            format!("ignoring bad control message {:?}: {e}", line.trim_end()),
                        );
                        0
                    }
                };
                line.clear();
                false
            }
            Ok(_) => false,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                shared.pending.fetch_or(BEAT, Ordering::Relaxed);
                let beats = shared.beats.load(Ordering::Relaxed);
                if beats != last_beats {
                    if last_beats == 0 {
                        let _ = reader.get_ref().set_read_timeout(Some(BEAT_EVERY));
                    }
                    last_beats = beats;
                    shared.send(&Event::Progress { count: beats });
                }
                false
            }
            Err(_) => true,
        };
        if !gone {
            continue;
        }
        if let Some(rank) = &shared.rank {
            rank.claims.gone();
            // Nobody will send a target: a rank held at its safe point goes on.
            let mut st = rank.lock();
            st.gone = true;
            st.holding = None;
            st.aim = None;
            st.due = None;
            rank.offered.store(0, Ordering::SeqCst);
            shared
                .pending
                .fetch_and(!(HOLD | AIM | DUE), Ordering::SeqCst);
            rank.wake.notify_all();
            drop(st);
            if orphan == OrphanMode::Continue {
                // A rank alone takes no snapshot (it would belong to no epoch): it runs on.
                log::warn!("supervisor gone; running on unsupervised, without snapshots");
                return;
            }
        }
        if orphan == OrphanMode::Continue {
            let every = every.unwrap_or(Duration::from_secs(600));
            log::warn!(
                "supervisor gone; running on unsupervised, a snapshot every {}",
                humantime::format_duration(every)
            );
            loop {
                std::thread::sleep(every);
                shared.pending.fetch_or(SNAP, Ordering::SeqCst);
            }
        }
        if shared.rank.is_some() {
            // A rank cannot take a snapshot alone (it would belong to no epoch): it stops at
            // its next safe point, and the job resumes from its last epoch.
            log::warn!("supervisor gone; stop at the next safe point");
            shared.pending.fetch_or(SNAP | STOP, Ordering::SeqCst);
            return;
        }
        log::warn!("supervisor gone; final snapshot and stop at the next safe point");
        shared.pending.fetch_or(SNAP | STOP, Ordering::SeqCst);
        return;
    }
}

/// A rank's control thread carries out the epoch protocol's requests.
fn epoch_request(shared: &Shared, request: Request) {
    let Some(rank) = &shared.rank else {
        shared.warn(
            WarningKind::BadControlMessage,
            format!("ignoring an epoch request to a program that is no rank: {request:?}"),
        );
        return;
    };
    if let Request::EpochEnd { epoch, .. } = request {
        rank.claims.ended(epoch);
    }
    if rank.agree {
        // Under the lock `take_agreed` takes: an offer and its taking never cross.
        let st = rank.lock();
        match request {
            Request::EpochBegin { epoch, stop }
                if rank.taken.load(Ordering::SeqCst) < epoch
                    && rank.ended.load(Ordering::SeqCst) < epoch =>
            {
                rank.offered
                    .store(epoch << 1 | u64::from(stop), Ordering::Release);
            }
            Request::EpochEnd { epoch, published } => {
                rank.ended.fetch_max(epoch, Ordering::SeqCst);
                let _ = rank
                    .offered
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                        (w >> 1 <= epoch).then_some(0)
                    });
                let took = rank.taken.load(Ordering::SeqCst) >= epoch;
                drop(st);
                if !took {
                    shared.send(&Event::PartSkipped { epoch });
                }
                if !published {
                    rank.unpublished(epoch);
                }
            }
            _ => {}
        }
        return;
    }
    match request {
        Request::EpochBegin { epoch, .. } => {
            let mut st = rank.lock();
            st.holding = Some(epoch);
            st.aim = None;
            drop(st);
            // HOLD before the count is read: see `Shared::due`.
            shared.pending.fetch_or(HOLD, Ordering::SeqCst);
            let step = rank.passed.load(Ordering::SeqCst);
            shared.send(&Event::EpochAt { epoch, step });
        }
        Request::EpochTarget { epoch, step, stop } => {
            let mut st = rank.lock();
            st.holding = None;
            st.aim = Some(Aim { epoch, step, stop });
            shared.pending.fetch_or(AIM, Ordering::SeqCst);
            shared.pending.fetch_and(!HOLD, Ordering::SeqCst);
            rank.wake.notify_all();
        }
        Request::EpochEnd { epoch, published } => {
            let mut st = rank.lock();
            // A target this rank had not reached, or reached without taking the snapshot: its
            // part will not come (said, so that the supervisor waits for no write of it).
            let skipped = st.aim.is_some_and(|a| a.epoch == epoch)
                || st.due.is_some_and(|a| a.epoch == epoch);
            if st.due.is_some_and(|a| a.epoch == epoch) {
                st.due = None;
                shared.pending.fetch_and(!DUE, Ordering::SeqCst);
            }
            if st.holding == Some(epoch) || st.aim.is_some_and(|a| a.epoch == epoch) {
                st.holding = None;
                st.aim = None;
                shared.pending.fetch_and(!(HOLD | AIM), Ordering::SeqCst);
                rank.wake.notify_all();
            }
            drop(st);
            if skipped {
                shared.send(&Event::PartSkipped { epoch });
            }
            if !published {
                rank.unpublished(epoch);
            }
        }
        _ => {}
    }
}
