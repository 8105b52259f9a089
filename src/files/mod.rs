//! File mode: running a code that cannot link the shim (GROMACS, LAMMPS, any binary) but writes
//! its own checkpoint files. The supervisor captures those files into the store as snapshots
//! (the same writer, dedup, verification, retention and durable tiers as the shim's), asks the
//! code for a stop the way it understands, and before each start puts the newest complete
//! checkpoint and its companions back and adds the code's resume arguments.
//!
//! [`spec`] says what a code does, [`preset`] fills it in for known codes, [`capture`] stores
//! checkpoints, [`restore`] puts them back; [`Files`] runs capture on a thread of its own so that
//! a large trajectory being stored never holds up the supervisor's loop.

pub mod capture;
pub mod preset;
pub mod restore;
pub mod spec;

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::time::Instant;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use supervise_store::JobStore;
use supervise_store::format::Origin;
use supervise_store::retention::Retention;
use supervise_store::writer::SnapshotWriter;

pub use capture::{Found, Phase};
pub use spec::{Ask, FileSpec};

use capture::Capturer;

/// How often the run directory is looked at while the program runs, whatever inotify says.
/// Looking is a directory listing and a `stat` per checkpoint file; it works on every file
/// system (on NFS and Lustre inotify does not see writes made by other nodes). Inotify, where
/// it can watch the directory, makes a new checkpoint seen at once: a file renamed into place,
/// or closed after writing (which also counts as "unchanged since the last scan").
pub const SCAN_EVERY: Duration = Duration::from_millis(500);

/// Where a life starts.
#[derive(Debug)]
pub struct Prepared {
    /// The snapshot put back, what it holds and which files had to be written or cut.
    pub resumed: Option<(u64, restore::Restored)>,
    /// Checkpoints found in the run directory newer than the store's (stored first).
    pub found: Vec<Found>,
    /// Snapshots found damaged and set aside: (seq, why).
    pub set_aside: Vec<(u64, String)>,
}

enum Cmd {
    Prepare {
        skip: Vec<(u64, u64)>,
        suspect: Vec<(u64, u64)>,
        fresh: bool,
        reply: Sender<Result<Prepared, String>>,
    },
    Live(bool),
    Settle {
        reply: Sender<Vec<Found>>,
    },
}

/// File mode's capture thread and what the supervisor's loop asks of it.
pub struct Files {
    spec: FileSpec,
    cmds: Option<Sender<Cmd>>,
    /// A byte written here wakes the thread for a command.
    wake: UnixStream,
    reports: Receiver<Found>,
    thread: Option<JoinHandle<()>>,
}

impl Files {
    /// Opens the job's writer and starts the capture thread.
    pub fn start(
        spec: FileSpec,
        job: JobStore,
        retention: Retention,
        origin: Option<Origin>,
    ) -> Result<Self, String> {
        let writer = SnapshotWriter::open(job, 0).map_err(|e| e.to_string())?;
        let capturer = Capturer::new(spec.clone(), writer, retention, origin)
            .map_err(|e| format!("cannot make a scratch directory: {e}"))?;
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let (report_tx, reports) = mpsc::channel();
        let (wake, woken) = UnixStream::pair()
            .map_err(|e| format!("cannot make the capture thread's socket: {e}"))?;
        woken
            .set_nonblocking(true)
            .map_err(|e| format!("cannot make the capture thread's socket: {e}"))?;
        let thread = std::thread::Builder::new()
            .name("supervise-files".into())
            .spawn(move || run(capturer, &cmd_rx, &report_tx, &woken))
            .map_err(|e| format!("cannot start the capture thread: {e}"))?;
        Ok(Self {
            spec,
            cmds: Some(cmd_tx),
            wake,
            reports,
            thread: Some(thread),
        })
    }

    /// The spec.
    pub fn spec(&self) -> &FileSpec {
        &self.spec
    }

    fn send(&self, cmd: Cmd) {
        if let Some(tx) = &self.cmds {
            let _ = tx.send(cmd);
            let _ = (&self.wake).write(&[1]);
        }
    }

    /// Before a start: stores a newer checkpoint the run directory holds, puts the newest
    /// complete snapshot (not in `skip`) back, and removes a stale stop file.
    pub fn prepare(
        &self,
        skip: &[(u64, u64)],
        suspect: &[(u64, u64)],
        fresh: bool,
    ) -> Result<Prepared, String> {
        let (reply, answer) = mpsc::channel();
        self.send(Cmd::Prepare {
            skip: skip.to_vec(),
            suspect: suspect.to_vec(),
            fresh,
            reply,
        });
        answer
            .recv()
            .map_err(|_| "the capture thread ended".to_owned())?
    }

    /// Starts (or stops) looking for new checkpoints while the program runs.
    pub fn live(&self, on: bool) {
        self.send(Cmd::Live(on));
    }

    /// What the capture thread found since last asked.
    pub fn found(&self) -> Vec<Found> {
        self.reports.try_iter().collect()
    }

    /// After the program ended: stops looking, stores what it left, and returns everything
    /// found since last asked (so the choice of what to restore sees its last checkpoint).
    pub fn settle(&self) -> Vec<Found> {
        self.send(Cmd::Live(false));
        let (reply, answer) = mpsc::channel();
        self.send(Cmd::Settle { reply });
        let settled = answer.recv().unwrap_or_default();
        // The thread reports what a scan found before it answers the next command: a scan
        // that was under way is in the channel now, and comes first.
        let mut found = self.found();
        found.extend(settled);
        found
    }

    /// Asks the code for a stop (or a checkpoint) the way it understands; `false` when it cannot
    /// be asked this way.
    pub fn ask(&self, ask: &Ask, child: &crate::child::Child) -> bool {
        match ask {
            Ask::Signal(sig) => {
                child.kill_group(*sig);
                true
            }
            Ask::Touch(rel) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.spec.dir.join(rel))
                .is_ok(),
            Ask::Nothing => false,
        }
    }

    /// Whether an exit 0 of a life that started at `started` is the code's completion (its done
    /// file was written during the life), not a stop.
    pub fn finished(&self, started: SystemTime) -> bool {
        let Some(done) = &self.spec.done_file else {
            return true;
        };
        let since = started - Duration::from_secs(1);
        std::fs::metadata(self.spec.dir.join(done))
            .and_then(|m| m.modified())
            .is_ok_and(|t| t >= since)
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        self.cmds.take();
        let _ = (&self.wake).write(&[0]);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(mut cap: Capturer, cmds: &Receiver<Cmd>, reports: &Sender<Found>, woken: &UnixStream) {
    let mut live = false;
    let mut notify = Notify::new(&cap);
    let mut last_scan = Instant::now();
    loop {
        let timeout = SCAN_EVERY.saturating_sub(last_scan.elapsed());
        let (wake, changed) = {
            let mut fds = vec![PollFd::new(woken.as_fd(), PollFlags::POLLIN)];
            if let Some(n) = &notify.inotify {
                fds.push(PollFd::new(n.as_fd(), PollFlags::POLLIN));
            }
            let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
            let _ = poll(&mut fds, PollTimeout::from(ms));
            let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), fds.get(1).is_some_and(ready))
        };
        if wake {
            let mut buf = [0u8; 64];
            while matches!((&*woken).read(&mut buf), Ok(n) if n > 0) {}
        }
        loop {
            match cmds.try_recv() {
                Ok(Cmd::Live(on)) => live = on,
                Ok(Cmd::Settle { reply }) => {
                    let _ = reply.send(cap.scan(Phase::Settle));
                }
                Ok(Cmd::Prepare {
                    skip,
                    suspect,
                    fresh,
                    reply,
                }) => {
                    let _ = reply.send(prepare(&mut cap, &skip, suspect, fresh));
                    // A directory the code had not made yet may exist now.
                    notify = Notify::new(&cap);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
        let seen_change = changed && notify.take_events(&mut cap);
        if live && (seen_change || last_scan.elapsed() >= SCAN_EVERY) {
            last_scan = Instant::now();
            for found in cap.scan(Phase::Running) {
                let _ = reports.send(found);
            }
        } else if !live {
            last_scan = Instant::now();
        }
    }
}

/// Inotify on the checkpoints' directories, where the kernel allows it.
struct Notify {
    inotify: Option<Inotify>,
    /// Each watch and the directory (relative to the run directory) it watches.
    dirs: Vec<(WatchDescriptor, PathBuf)>,
}

impl Notify {
    fn new(cap: &Capturer) -> Self {
        let mut n = Notify {
            inotify: Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).ok(),
            dirs: Vec::new(),
        };
        let Some(inotify) = &n.inotify else { return n };
        let mut dirs: Vec<PathBuf> = cap
            .spec()
            .checkpoints
            .iter()
            .map(|p| p.dir.clone())
            .collect();
        dirs.sort();
        dirs.dedup();
        for dir in dirs {
            let flags = AddWatchFlags::IN_CLOSE_WRITE
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_CREATE;
            if let Ok(wd) = inotify.add_watch(&cap.spec().dir.join(&dir), flags) {
                n.dirs.push((wd, dir));
            }
        }
        n
    }

    /// Reads what happened; marks checkpoint files closed after writing; whether any
    /// checkpoint file changed.
    fn take_events(&mut self, cap: &mut Capturer) -> bool {
        let Some(inotify) = &self.inotify else {
            return false;
        };
        let mut changed = false;
        while let Ok(events) = inotify.read_events() {
            if events.is_empty() {
                break;
            }
            for e in events {
                let (Some((_, dir)), Some(name)) =
                    (self.dirs.iter().find(|(wd, _)| *wd == e.wd), e.name)
                else {
                    continue;
                };
                let rel = dir.join(name);
                if !cap.spec().is_checkpoint(&rel) {
                    continue;
                }
                changed = true;
                if e.mask.contains(AddWatchFlags::IN_CLOSE_WRITE) {
                    cap.mark_closed(&rel);
                }
            }
        }
        changed
    }
}

fn skipped(seq: u64, skip: &[(u64, u64)]) -> bool {
    skip.iter().any(|&(a, b)| (a..=b).contains(&seq))
}

fn prepare(
    cap: &mut Capturer,
    skip: &[(u64, u64)],
    suspect: Vec<(u64, u64)>,
    fresh: bool,
) -> Result<Prepared, String> {
    cap.set_suspect(suspect);
    let dir: PathBuf = cap.spec().dir.clone();
    if let Ask::Touch(stop) = &cap.spec().ask_stop {
        match std::fs::remove_file(dir.join(stop)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot remove {}: {e}", dir.join(stop).display())),
        }
    }
    let mut prepared = Prepared {
        resumed: None,
        found: Vec::new(),
        set_aside: Vec::new(),
    };
    if fresh {
        for rel in cap.checkpoint_files() {
            cap.mark_seen(&rel);
        }
        return Ok(prepared);
    }
    let job: JobStore = cap.writer().job().clone();
    let candidates = |job: &JobStore| -> Result<Vec<u64>, String> {
        let mut seqs = job.snapshot_seqs().map_err(|e| e.to_string())?;
        seqs.retain(|s| !skipped(*s, skip));
        seqs.sort_unstable_by(|a, b| b.cmp(a));
        Ok(seqs)
    };
    // A checkpoint the code wrote while no supervisor watched (or that the store lost) is
    // stored first when its step is past the newest stored one.
    let newest_step = candidates(&job)?.into_iter().find_map(|seq| {
        let reader = supervise_store::reader::SnapshotReader::open(&job, seq).ok()?;
        restore::read_meta(&reader).ok().map(|m| m.step)
    });
    prepared.found = cap.scan(Phase::Prepare {
        newest_step: newest_step.flatten(),
    });
    let mut reopen = false;
    for seq in candidates(&job)? {
        match restore::restore(&job, seq, &dir) {
            Ok(restored) => {
                prepared.resumed = Some((seq, restored));
                break;
            }
            Err(restore::RestoreError::Damaged(why)) => {
                job.quarantine(seq).map_err(|e| e.to_string())?;
                prepared.set_aside.push((seq, why));
                reopen = true;
            }
            Err(restore::RestoreError::Local(why)) => return Err(why),
        }
    }
    if reopen {
        // The writer's index must not offer chunks of a snapshot set aside to new ones.
        let writer = SnapshotWriter::open(job, 0).map_err(|e| e.to_string())?;
        cap.replace_writer(writer);
    }
    // Every checkpoint file present now is older than what was put back (or was just stored):
    // none of them is taken again.
    for rel in cap.checkpoint_files() {
        cap.mark_seen(&rel);
    }
    Ok(prepared)
}
