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
        let since = started
            .checked_sub(Duration::from_secs(1))
            .unwrap_or(started);
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
                    let found = cap.scan(Phase::Settle);
                    // A stop file left behind would stop the code at once if it were run by
                    // hand; the next start removes it too.
                    if let Ask::Touch(stop) = &cap.spec().ask_stop {
                        let _ = std::fs::remove_file(cap.spec().dir.join(stop));
                    }
                    let _ = reply.send(found);
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
        for dir in cap.spec().checkpoint_dirs() {
            let flags = AddWatchFlags::IN_CLOSE_WRITE
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_CREATE;
            if let Ok(wd) = inotify.add_watch(&cap.spec().dir.join(dir), flags) {
                n.dirs.push((wd, dir.to_owned()));
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
    {
        let spec = cap.spec();
        let dirs: Vec<&std::path::Path> = spec
            .checkpoints
            .iter()
            .chain(&spec.companions)
            .map(|p| p.dir.as_path())
            .chain([std::path::Path::new("")])
            .collect();
        restore::remove_leftovers(&dir, &dirs);
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
    // stored first when its step is past the newest stored one; never when snapshots are
    // skipped on purpose (--from, a rollback), which would resume past them.
    if skip.is_empty() {
        let newest_step = candidates(&job)?.into_iter().find_map(|seq| {
            let reader = supervise_store::reader::SnapshotReader::open(&job, seq).ok()?;
            restore::read_meta(&reader).ok().map(|m| m.step)
        });
        prepared.found = cap.scan(Phase::Prepare {
            newest_step: newest_step.flatten(),
        });
    }
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
            // Another kind of snapshot of this job (the shim's): not ours to restore or set aside.
            Err(restore::RestoreError::NotFiles(_)) => {}
            Err(restore::RestoreError::Local(why)) => {
                return Err(format!("snapshot {seq}: {why}"));
            }
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

#[cfg(test)]
mod tests {
    use super::capture::Capturer;
    use super::spec::{Ask, Complete, FilePattern, FileSpec, StepFrom};
    use super::*;
    use std::path::Path;
    use supervise_store::Store;

    fn spec(dir: &Path, complete: Vec<Complete>) -> FileSpec {
        FileSpec {
            checkpoints: vec![FilePattern::parse("chk.*").unwrap()],
            complete,
            companions: vec![FilePattern::parse("traj").unwrap()],
            step: StepFrom::Name,
            ask_stop: Ask::Nothing,
            ..FileSpec::new(dir, &["code".into()])
        }
    }

    struct Setup {
        _tmp: tempfile::TempDir,
        dir: PathBuf,
        job: JobStore,
        cap: Capturer,
    }

    fn setup(complete: Vec<Complete>) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        std::fs::create_dir(&dir).unwrap();
        let job = Store::open(tmp.path().join("store"))
            .unwrap()
            .job("j")
            .unwrap();
        let writer = SnapshotWriter::open(job.clone(), 0).unwrap();
        let cap = Capturer::new(spec(&dir, complete), writer, Retention::from(10), None).unwrap();
        Setup {
            _tmp: tmp,
            dir,
            job,
            cap,
        }
    }

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn captured_steps(found: &[Found]) -> Vec<u64> {
        found
            .iter()
            .map(|f| match f {
                Found::Captured(c) => c
                    .report
                    .tag
                    .as_deref()
                    .and_then(|t| t.strip_prefix("step "))
                    .and_then(|s| s.parse().ok())
                    .unwrap(),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_checkpoint_and_its_companion_are_stored_and_put_back_exactly() {
        let mut s = setup(vec![Complete::Renamed]);
        let traj = bytes(200_000, 1);
        std::fs::write(s.dir.join("traj"), &traj).unwrap();
        std::fs::write(s.dir.join("chk.100"), bytes(70_000, 2)).unwrap();
        assert_eq!(captured_steps(&s.cap.scan(Phase::Running)), [100]);
        // Nothing new: nothing stored.
        assert!(s.cap.scan(Phase::Running).is_empty());
        let mut traj2 = traj.clone();
        traj2.extend(bytes(50_000, 3));
        std::fs::write(s.dir.join("traj"), &traj2).unwrap();
        let chk200 = bytes(70_000, 4);
        std::fs::write(s.dir.join("chk.200"), &chk200).unwrap();
        assert_eq!(captured_steps(&s.cap.scan(Phase::Running)), [200]);

        // The checkpoint lost, the companion damaged: both written anew.
        std::fs::remove_file(s.dir.join("chk.200")).unwrap();
        let mut bad = traj2.clone();
        bad[1000] ^= 1;
        std::fs::write(s.dir.join("traj"), &bad).unwrap();
        let p = prepare(&mut s.cap, &[], vec![], false).unwrap();
        let (seq, r) = p.resumed.unwrap();
        assert_eq!(
            (seq, r.meta.step, r.meta.checkpoint.as_str()),
            (2, Some(200), "chk.200")
        );
        assert_eq!(r.written, ["chk.200", "traj"]);
        assert!(r.cut.is_empty());
        assert_eq!(std::fs::read(s.dir.join("chk.200")).unwrap(), chk200);
        assert_eq!(std::fs::read(s.dir.join("traj")).unwrap(), traj2);
        // What was put back is not stored again.
        assert!(s.cap.scan(Phase::Running).is_empty());

        // A companion that grew past the checkpoint is cut back; the same one is left alone.
        let mut longer = traj2.clone();
        longer.extend(b"written after the checkpoint");
        std::fs::write(s.dir.join("traj"), &longer).unwrap();
        let (_, r) = prepare(&mut s.cap, &[], vec![], false)
            .unwrap()
            .resumed
            .unwrap();
        assert!(r.written.is_empty(), "{:?}", r.written);
        assert_eq!(r.cut, ["traj"]);
        assert_eq!(std::fs::read(s.dir.join("traj")).unwrap(), traj2);
        // Skipping snapshot 2 puts snapshot 1 back.
        let (seq, r) = prepare(&mut s.cap, &[(2, 2)], vec![], false)
            .unwrap()
            .resumed
            .unwrap();
        assert_eq!((seq, r.meta.step), (1, Some(100)));
        assert_eq!(std::fs::read(s.dir.join("traj")).unwrap(), traj);
    }

    #[test]
    fn a_damaged_snapshot_is_set_aside_and_the_one_before_it_put_back() {
        let mut s = setup(vec![Complete::Renamed]);
        std::fs::write(s.dir.join("chk.1"), bytes(100_000, 5)).unwrap();
        assert_eq!(captured_steps(&s.cap.scan(Phase::Running)), [1]);
        std::fs::write(s.dir.join("chk.2"), bytes(100_000, 6)).unwrap();
        assert_eq!(captured_steps(&s.cap.scan(Phase::Running)), [2]);
        // Snapshot 2's own pack rots.
        let pack = s
            .job
            .pack_names()
            .unwrap()
            .into_iter()
            .find(|p| p.starts_with(&format!("{:020}", 2)))
            .unwrap();
        let path = s.job.pack_path(&pack);
        let mut data = std::fs::read(&path).unwrap();
        let at = data.len() - 10;
        data[at] ^= 0xff;
        std::fs::write(&path, data).unwrap();
        let p = prepare(&mut s.cap, &[], vec![], false).unwrap();
        assert_eq!(p.set_aside.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [2]);
        let (seq, r) = p.resumed.unwrap();
        assert_eq!((seq, r.meta.checkpoint.as_str()), (1, "chk.1"));
        assert_eq!(s.job.damaged_seqs().unwrap(), [2]);
    }

    #[test]
    fn another_kind_of_snapshot_is_passed_by_and_skipped_ones_are_not_resumed_past() {
        let mut s = setup(vec![Complete::Renamed]);
        std::fs::write(s.dir.join("chk.5"), bytes(3000, 12)).unwrap();
        assert_eq!(captured_steps(&s.cap.scan(Phase::Running)), [5]);
        std::fs::write(s.dir.join("chk.6"), bytes(3000, 13)).unwrap();
        assert_eq!(captured_steps(&s.cap.scan(Phase::Running)), [6]);
        // A snapshot the shim took for this job (no sv-files entry) is not ours, not damage.
        let mut w = SnapshotWriter::open(s.job.clone(), 0).unwrap();
        let mut b = w.begin(Some("shim"));
        b.value("state", &1u32).unwrap();
        b.commit().unwrap();
        let p = prepare(&mut s.cap, &[], vec![], false).unwrap();
        assert!(p.set_aside.is_empty(), "{:?}", p.set_aside);
        assert_eq!(p.resumed.unwrap().0, 2);
        assert!(s.job.damaged_seqs().unwrap().is_empty());
        // Resuming from snapshot 1 on purpose (--from 1): the newer checkpoint the run
        // directory holds is not stored and resumed from instead.
        std::fs::write(s.dir.join("chk.7"), bytes(3000, 14)).unwrap();
        let p = prepare(&mut s.cap, &[(2, 3)], vec![], false).unwrap();
        assert!(p.found.is_empty(), "{:?}", p.found);
        assert_eq!(p.resumed.unwrap().1.meta.step, Some(5));
    }

    #[test]
    fn a_file_written_in_place_is_taken_once_unchanged_and_whole() {
        let marker = b"END!".to_vec();
        let mut s = setup(vec![Complete::Closed, Complete::Ends(marker.clone())]);
        std::fs::write(s.dir.join("chk.7"), bytes(1000, 7)).unwrap();
        // Seen once: it may still be written; a second look at once proves nothing.
        assert!(s.cap.scan(Phase::Running).is_empty());
        assert!(s.cap.scan(Phase::Running).is_empty());
        std::thread::sleep(SCAN_EVERY);
        // Unchanged a scan interval later, but without its end marker: refused, once.
        let found = s.cap.scan(Phase::Running);
        assert!(
            matches!(&found[..], [Found::Refused { path, .. }] if path == "chk.7"),
            "{found:?}"
        );
        assert!(s.cap.scan(Phase::Running).is_empty());
        let mut whole = bytes(1000, 7);
        whole.extend(&marker);
        std::fs::write(s.dir.join("chk.7"), &whole).unwrap();
        assert!(s.cap.scan(Phase::Running).is_empty());
        std::thread::sleep(SCAN_EVERY);
        assert_eq!(captured_steps(&s.cap.scan(Phase::Running)), [7]);
        // A temporary file of a restore is never a checkpoint, and is removed before a start.
        std::fs::write(s.dir.join(".sv-tmp-1-chk.9"), &whole).unwrap();
        std::thread::sleep(SCAN_EVERY);
        assert!(s.cap.scan(Phase::Running).is_empty());
        assert!(s.cap.scan(Phase::Running).is_empty());
        prepare(&mut s.cap, &[], vec![], false).unwrap();
        assert!(!s.dir.join(".sv-tmp-1-chk.9").exists());
        // Closed after writing (inotify): taken at once.
        std::fs::write(s.dir.join("chk.8"), &whole).unwrap();
        s.cap.mark_closed(Path::new("chk.8"));
        assert_eq!(captured_steps(&s.cap.scan(Phase::Running)), [8]);
    }

    #[test]
    fn a_linked_checkpoint_is_refused_and_a_newer_one_left_by_the_code_is_stored_first() {
        let mut s = setup(vec![Complete::Renamed]);
        std::fs::write(s.dir.join("chk.10"), bytes(5000, 8)).unwrap();
        assert_eq!(captured_steps(&s.cap.scan(Phase::Running)), [10]);
        std::os::unix::fs::symlink("/etc/passwd", s.dir.join("chk.11")).unwrap();
        let found = s.cap.scan(Phase::Running);
        assert!(
            matches!(&found[..], [Found::Refused { path, why }] if path == "chk.11" && why.contains("symbolic link")),
            "{found:?}"
        );
        std::fs::remove_file(s.dir.join("chk.11")).unwrap();
        // Written while nobody watched: an older step is not stored, a newer one is, first.
        let mut fresh = setup(vec![Complete::Renamed]);
        std::fs::write(fresh.dir.join("chk.30"), bytes(5000, 9)).unwrap();
        assert_eq!(captured_steps(&fresh.cap.scan(Phase::Running)), [30]);
        std::fs::write(fresh.dir.join("chk.20"), bytes(5000, 10)).unwrap();
        std::fs::write(fresh.dir.join("chk.40"), bytes(5000, 11)).unwrap();
        let p = prepare(&mut fresh.cap, &[], vec![], false).unwrap();
        assert_eq!(captured_steps(&p.found), [40]);
        let (_, r) = p.resumed.unwrap();
        assert_eq!(r.meta.step, Some(40));
        // And chk.20 is never taken later.
        assert!(fresh.cap.scan(Phase::Running).is_empty());
    }
}
