//! Taking a snapshot in a forked copy-on-write process: [`Shim::fork_wanted`] decides,
//! [`Shim::capture_forked`] collects the dirty pages here and forks; the child runs the
//! program's closure, reads regions in place, writes the snapshot with a writer of its own,
//! reports through a pipe and leaves through [`leave_forked_child`], the one place the shim
//! ends a process. [`await_forked`] is the writer thread's side: it reads the report and reaps
//! the child.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Instant;

use supervise_store::config::CaptureMode;
use supervise_store::error::{Error, Result};
use supervise_store::store::Retention;
use supervise_store::writer::{SnapshotReport, SnapshotWriter};

use super::background::{Work, write_task};
use super::copy::copy_chunks;
use super::dirty::{Delta, Protect};
use super::{Capture, CaptureTask, Item, OutputsAt};
use crate::region::RegionMem;
use crate::runtime::Shim;

/// Whole region copies of at least this many bytes are taken by a forked process in auto mode
/// when the process fits the capture memory budget (below it, copying is cheaper than a fork
/// and the copy-on-write faults that follow).
const FORK_ABOVE: usize = 64 << 20;

impl Shim {
    /// Whether this snapshot should be taken by a forked process: always in fork mode; in auto
    /// mode when regions must be copied whole, that is a lot to copy, and the fork's worst case
    /// fits the capture memory budget: while the snapshot process reads, every page the program
    /// writes is copied, up to all the memory the process has.
    pub(crate) fn fork_wanted(&mut self) -> bool {
        // A rank's parts are written by its own writer (numbered by the epoch), never forked.
        if self.shared.rank.is_some() {
            return false;
        }
        match self.config.capture {
            CaptureMode::Fork => true,
            CaptureMode::Auto => {
                let whole: usize = self
                    .regions
                    .iter()
                    .filter(|slot| {
                        !(slot.tracked && slot.baseline.is_some() && self.tracker.is_some())
                    })
                    .filter_map(|slot| slot.mem.upgrade().map(|m| m.bytes))
                    .sum();
                if whole < FORK_ABOVE {
                    return false;
                }
                let state = self
                    .regions
                    .iter()
                    .filter_map(|slot| slot.mem.upgrade().map(|m| m.bytes))
                    .sum();
                let budget = self.capture_budget(state);
                resident_anonymous().is_some_and(|bytes| bytes <= budget)
            }
            _ => false,
        }
    }

    /// Takes the snapshot in a forked copy-on-write process: here only the dirty pages are
    /// collected (and tracking reset); the child runs `fill`, reads regions in place, writes
    /// the snapshot with a writer of its own and reports through a pipe.
    pub(crate) fn capture_forked<F>(
        &mut self,
        tag: Option<&str>,
        fill: F,
        started: Instant,
        outputs: OutputsAt,
    ) -> Result<Work>
    where
        F: FnOnce(&mut Capture<'_>) -> Result<()>,
    {
        self.regions.retain(|slot| slot.mem.strong_count() > 0);
        let mut plan: Vec<(Arc<RegionMem>, Option<Delta>)> = Vec::new();
        self.in_flight_regions.clear();
        for idx in 0..self.regions.len() {
            let Some(mem) = self.regions[idx].mem.upgrade() else {
                continue;
            };
            let delta = self
                .collect_dirty(idx, &mem, Protect::AtOnce)
                .map(|d| d.delta);
            plan.push((mem, delta));
            self.in_flight_regions.push(idx);
        }
        let job = self
            .job
            .clone()
            .ok_or_else(|| Error::Aborted("no store".into()))?;
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::Io {
                op: "create pipe for snapshot process",
                path: job.dir().to_owned(),
                source: e.into(),
            })?;
        #[cfg(test)]
        if std::mem::take(&mut self.fail_next_fork) {
            return Err(Error::Aborted("injected fork failure".into()));
        }
        let parent = std::process::id() as libc::pid_t;
        let (attempt, keep) = (self.config.attempt, self.config.retention());
        let origin = self.config.origin.clone();
        // SAFETY: the child only runs the snapshot code path (allocation, file I/O, thread
        // creation for hashing, all of which glibc keeps usable after fork) and the program's
        // `fill` closure, and leaves through `leave_forked_child` (`_exit`). The shim
        // itself takes none of its locks and writes nothing to stdout or stderr there; what the
        // program's closure does is the program's (it should only add entries).
        match unsafe { nix::unistd::fork() } {
            Err(e) => Err(Error::Io {
                op: "fork snapshot process",
                path: job.dir().to_owned(),
                source: e.into(),
            }),
            Ok(nix::unistd::ForkResult::Parent { child }) => {
                drop(write);
                Ok(Work::Forked {
                    pid: child.as_raw(),
                    report: std::fs::File::from(read),
                })
            }
            Ok(nix::unistd::ForkResult::Child) => {
                drop(read);
                // The snapshot process must never outlive the program (a restarted program
                // would be a second writer): killed when its parent dies, and gone at once if
                // that happened already.
                let orphaned = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .is_err()
                    || nix::unistd::getppid().as_raw() != parent;
                if orphaned {
                    leave_forked_child(1);
                }
                let built = (|| {
                    let mut items = Vec::new();
                    let mut names: HashSet<String> =
                        plan.iter().map(|(m, _)| m.name.clone()).collect();
                    let mut buffers = Vec::new();
                    let mut arrays = Vec::new();
                    fill(&mut Capture {
                        items: &mut items,
                        buffers: &mut buffers,
                        names: &mut names,
                        arrays: &mut arrays,
                    })?;
                    arrays.extend(plan.iter().filter_map(|(mem, _)| mem.array_shape()));
                    for (mem, delta) in &plan {
                        items.push(match delta {
                            Some((base, dirty)) => Item::Delta {
                                name: mem.name.clone(),
                                base: *base,
                                data: copy_chunks(mem.bytes(), dirty),
                                dirty: dirty.clone(),
                                shuffle: mem.shuffle,
                            },
                            None => Item::Mapped {
                                name: mem.name.clone(),
                                kind: mem.kind.clone(),
                                addr: mem.addr(),
                                len: mem.bytes,
                                shuffle: mem.shuffle,
                            },
                        });
                    }
                    Ok(CaptureTask {
                        tag: tag.map(str::to_owned),
                        items,
                        started,
                        origin,
                        outputs,
                        seq: None,
                        arrays,
                        reprotect: Vec::new(),
                    })
                })();
                forked_child(job, attempt, keep, built, std::fs::File::from(write))
            }
        }
    }
}

/// The process's resident memory that is not backed by files (`resident - shared` of
/// `/proc/self/statm`), in bytes: what a fork's copy-on-write can at most duplicate.
fn resident_anonymous() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let mut fields = statm.split_whitespace().skip(1);
    let resident: usize = fields.next()?.parse().ok()?;
    let shared: usize = fields.next()?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    resident.saturating_sub(shared).checked_mul(page)
}

/// What a forked snapshot process reports through its pipe (as JSON): the snapshot's figures
/// or why it failed, and why retention failed after it (it prints nothing itself).
#[derive(serde::Serialize, serde::Deserialize)]
struct ForkedReport {
    result: Result<SnapshotReport, String>,
    retention_failed: Option<String>,
}

/// Waits for a forked snapshot process: reads its report, reaps exactly that process (never
/// another child of the program), and reopens the writer on the store it changed. Returns the
/// outcome and why retention failed after it. The process's own error comes as text through
/// the pipe: [`Error::SnapshotFailed`].
pub(super) fn await_forked(
    writer: &mut SnapshotWriter,
    pid: libc::pid_t,
    mut report: File,
) -> (Result<SnapshotReport, Arc<Error>>, Option<String>) {
    let mut text = String::new();
    let read = report.read_to_string(&mut text);
    let reaped = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
    let (result, retention_failed) = match serde_json::from_str::<ForkedReport>(&text) {
        Ok(r) => (r.result.map_err(Error::SnapshotFailed), r.retention_failed),
        Err(_) => {
            let why = match (read, reaped) {
                (Err(e), _) => format!("cannot read the snapshot process's report: {e}"),
                (_, Ok(nix::sys::wait::WaitStatus::Signaled(_, signal, _))) => {
                    format!(
                        "the snapshot process was killed by signal {}",
                        signal as i32
                    )
                }
                _ => "the snapshot process ended without a report".to_owned(),
            };
            (Err(Error::SnapshotFailed(why)), None)
        }
    };
    // It wrote (and applied retention to) the store behind this writer's back.
    match SnapshotWriter::open(writer.job().clone(), writer.attempt()) {
        Ok(fresh) => *writer = fresh,
        Err(e) => return (Err(Arc::new(e)), retention_failed),
    }
    (result.map_err(Arc::new), retention_failed)
}

/// The body of a forked snapshot process: write `task` with a writer of its own, send the
/// outcome through `report`, and leave without running the program's exit handlers.
fn forked_child(
    job_store: supervise_store::store::JobStore,
    attempt: u32,
    keep: Retention,
    task: Result<CaptureTask>,
    mut report: File,
) -> ! {
    let forked = match task.and_then(|task| {
        let mut writer = SnapshotWriter::open(job_store, attempt)?;
        Ok(write_task(&mut writer, &keep, task))
    }) {
        Ok(written) => ForkedReport {
            result: written.result.map_err(|e| e.to_string()),
            retention_failed: written.retention_failed,
        },
        Err(e) => ForkedReport {
            result: Err(e.to_string()),
            retention_failed: None,
        },
    };
    let text = serde_json::to_string(&forked).unwrap_or_default();
    let _ = report.write_all(text.as_bytes());
    drop(report);
    leave_forked_child(0)
}

/// Ends a forked snapshot process: the one place the shim ends a process. The forked process
/// is a copy of the program made only to write a snapshot, not the program itself: it must not
/// run the program's exit handlers, flush its stdio buffers a second time, or take a lock
/// another thread held at the fork. It prints nothing and takes no lock.
pub(crate) fn leave_forked_child(code: i32) -> ! {
    // SAFETY: `_exit` ends the calling process at once; it takes an integer and touches no
    // memory of the program.
    unsafe { libc::_exit(code) }
}

#[cfg(test)]
mod tests {
    use supervise_store::config::{CaptureMode, Config};
    use supervise_store::reader::SnapshotReader;
    use supervise_store::store::Store;

    use crate::capture::Buffer;
    use crate::runtime::{Next, Shim};

    fn fork_shim(dir: &std::path::Path) -> Shim {
        let mut config = Config::local(dir.join("store"), "t");
        config.capture = CaptureMode::Fork;
        Shim::open(config).unwrap()
    }

    fn restored(dir: &std::path::Path, seq: u64, len: usize) -> Vec<u64> {
        let job = Store::open(dir.join("store")).unwrap().job("t").unwrap();
        let mut out = vec![0u64; len];
        SnapshotReader::open(&job, seq)
            .unwrap()
            .slice_into("r", "u64", bytemuck::cast_slice_mut(&mut out))
            .unwrap();
        out
    }

    #[test]
    fn writes_collected_by_a_failed_capture_are_in_the_next_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let mut shim = fork_shim(dir.path());
        let len = (8 << 20) / 8;
        let mut r = shim.region::<u64>("r", len).unwrap();
        r.fill(1);
        assert!(matches!(
            shim.snapshot(None, |_| Ok(())).unwrap(),
            Next::Continue(_)
        ));
        shim.wait_durable().unwrap();
        r[3 * 8192] = 7; // collected (and protected again) by the capture that fails
        shim.fail_next_fork = true;
        assert!(shim.snapshot(None, |_| Ok(())).is_err());
        r[100 * 8192] = 9;
        assert!(matches!(
            shim.snapshot(None, |_| Ok(())).unwrap(),
            Next::Continue(_)
        ));
        let report = shim.wait_durable().unwrap().unwrap();
        assert_eq!(restored(dir.path(), report.seq, len), &r[..]);
    }

    #[test]
    fn spare_buffers_stay_bounded_over_many_forked_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let mut shim = fork_shim(dir.path());
        let mut r = shim.region::<u64>("r", (64 << 20) / 8).unwrap();
        for round in 0..12u64 {
            r[(round as usize) * 8192] = round;
            assert!(matches!(
                shim.snapshot(None, |s| s.value("round", &round)).unwrap(),
                Next::Continue(_)
            ));
            shim.wait_durable().unwrap();
        }
        let held: usize = shim.buffers.iter().map(Buffer::capacity).sum();
        assert!(
            held < 1 << 20,
            "fork mode holds {held} bytes of spare buffers"
        );
    }
}
