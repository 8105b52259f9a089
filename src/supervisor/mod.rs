//! The supervisor's main loop: spawn the child, request snapshots on schedule and on SIGUSR1,
//! watch it over the control channel, and when it dies, restart it from the newest complete
//! snapshot under the restart policy. SIGINT/SIGTERM: final snapshot, stop, exit.

mod durable;
mod state;
mod watch;

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{Context, Result};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use supervise_store::config::{ChildEnv, OrphanMode, RestoreFrom};
use supervise_store::exit;
use supervise_store::lock::{JobLock, Owner, TryLock};
use supervise_store::{JobStore, Store};

use crate::blame::{Blame, Death, Verdict};
use crate::child::{self, Child, Ended, StderrPipe};
use crate::event::{From, JobEvent, Outcome as RunOutcome, Totals};
use crate::events::{self, EventLog, LastRun, Record};
use crate::files::Files;
use crate::human;
use crate::identity::{Origin, Program};
use crate::lifeline::Lifeline;
use crate::log::Log;
use crate::operator::{self, Status};
use crate::policy::{Decision, Failure, PolicyConfig, RestartPolicy};
use crate::signals::Signals;
use state::{EndNear, Outcome, Stop, signal_name};
use supervise_store::clock::{millis, now_unix_ms};
use watch::Watch;

pub use durable::DurableConfig;

/// Everything the supervisor needs to run one job.
#[derive(Clone, Debug)]
pub struct JobConfig {
    /// The command and its arguments.
    pub command: Vec<OsString>,
    /// The program the command runs, found as `execvp` would.
    pub program: Program,
    /// What the snapshots record as their origin.
    pub origin: Origin,
    /// The store directory.
    pub store: PathBuf,
    /// The job name.
    pub job: String,
    /// Snapshot schedule: an interval, or `--every auto`.
    pub every: crate::interval::EverySpec,
    /// Snapshots to keep.
    pub keep: usize,
    /// Also keep snapshots younger than this.
    pub keep_within: Option<Duration>,
    /// Restart policy.
    pub policy: PolicyConfig,
    /// How long to wait for the final snapshot and exit when stopping.
    pub stop_timeout: Duration,
    /// Ignore snapshots taken before this run.
    pub fresh: bool,
    /// Resume from this snapshot instead of the newest.
    pub from: Option<u64>,
    /// Wait for the job's current holder to finish instead of failing.
    pub wait: bool,
    /// Restart a child that reaches no safe point for this long.
    pub hang_timeout: Option<Duration>,
    /// After this many deaths right after restoring one snapshot, go back past it.
    pub rollback_after: u32,
    /// What to do with the job's snapshots when the command finishes with exit code 0.
    pub on_success: OnSuccess,
    /// Whether the child stops or runs on (and snapshots by itself) if the supervisor dies.
    pub orphan: OrphanMode,
    /// The scrub's period (`None`: off).
    pub scrub: Option<Duration>,
    /// The most memory a capture in the program may hold (`--capture-memory`).
    pub capture_memory: supervise_store::config::CaptureMemory,
    /// The durable tiers beyond the local store, if any.
    pub durable: Option<DurableConfig>,
    /// File mode: the program writes its own checkpoint files, which are captured.
    pub files: Option<crate::files::FileSpec>,
    /// A job of many ranks (MPI): where they join, and why ranks are expected.
    pub ranks: Option<(crate::ranks::Listen, String)>,
    /// The signal that means "the batch job ends soon" (`--requeue-signal`): inside a Slurm
    /// job, a final snapshot and a requeue; outside, a stop.
    pub requeue_signal: nix::sys::signal::Signal,
    /// Inside a Slurm batch job (unless `--no-slurm`): how it is requeued.
    pub slurm: Option<crate::slurm::SlurmConfig>,
}

/// What to do with a job's snapshots when its command finishes with exit code 0
/// (`--on-success`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnSuccess {
    /// Keep them.
    Keep,
    /// Delete them.
    Delete,
}

/// What a running supervisor knows about its job, for operators and for timing its final
/// snapshot.
struct JobState {
    status: Status,
    /// How long the last few snapshots took to be safe (ms), newest last.
    recent_snapshot_ms: Vec<u64>,
    /// When to ask for snapshots; with `--every auto`, what the interval is chosen from.
    schedule: crate::interval::Schedule,
}

impl JobState {
    /// The snapshots whose times count.
    const RECENT: usize = 5;

    /// Says a new interval `--every auto` chose: in the history, and in `status`.
    fn interval_chosen(&mut self, choice: crate::interval::Choice, log: &Log) {
        log.emit(&JobEvent::Interval(choice));
        self.status.every_ms = Some(choice.every_ms);
        self.status.every_why = Some(choice.why.name().to_owned());
    }

    /// Notes that a snapshot took `ms` to be safe.
    fn note_snapshot_time(&mut self, ms: u64) {
        if self.recent_snapshot_ms.len() == Self::RECENT {
            self.recent_snapshot_ms.remove(0);
        }
        self.recent_snapshot_ms.push(ms);
    }
}

/// Takes the job's lock: at once, or (with `wait`) when its holder lets go. With the lock,
/// when it was held at first: how many records the job's history had then (what the holder
/// did is what came after). `Ok(Err(code))`: the supervisor must exit with that code instead.
fn take_lock(
    job: &JobStore,
    command_line: &str,
    cfg: &JobConfig,
    signals: &Signals,
    log: &Log,
) -> Result<std::result::Result<(JobLock, Option<usize>), i32>> {
    let me = Owner::this_process(command_line);
    let mut said_waiting = false;
    let mut misses = 0;
    let mut history_when_held = None;
    loop {
        let taken = JobLock::try_take(job.dir(), &me)?;
        if matches!(taken, TryLock::Held(_)) && history_when_held.is_none() {
            history_when_held = Some(events::read(job.dir())?.len());
        }
        match taken {
            TryLock::Taken(lock) => return Ok(Ok((lock, history_when_held))),
            // A `status` probe holds the lock for an instant: look again before believing it.
            TryLock::Held(_) if misses < 3 => {
                misses += 1;
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            TryLock::Held(owner) => {
                let holder = describe_owner(owner.as_ref());
                if !cfg.wait {
                    log.emit(&JobEvent::Held {
                        holder,
                        waiting: false,
                    });
                    return Ok(Err(exit::HELD));
                }
                if !said_waiting {
                    log.emit(&JobEvent::Held {
                        holder,
                        waiting: true,
                    });
                    said_waiting = true;
                }
                if let Some(sig) = sleep_unless_stopped(signals, Duration::from_millis(500)) {
                    log.emit(&end(
                        RunOutcome::Stopped,
                        exit::stopped_by(sig),
                        format!("stopped by {} while waiting", signal_name(sig)),
                    ));
                    return Ok(Err(exit::stopped_by(sig)));
                }
            }
        }
    }
}

/// True when `pid` is a live process here (a zombie is not: it only waits to be reaped).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn describe_owner(owner: Option<&Owner>) -> String {
    let Some(o) = owner else {
        return "a process that did not say who it is".into();
    };
    let since = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(o.since_unix));
    let here = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy() == o.host)
        .unwrap_or(false);
    let alive = here && process_alive(o.pid);
    let state = if here && !alive {
        " (that supervisor is gone; the program it started still runs and holds the job)"
    } else {
        ""
    };
    format!(
        "supervisor pid {} on {} since {since}{state}",
        o.pid, o.host
    )
}

/// On a stop by `sig` that began at `began`, with durable tiers: waits (up to
/// `--stop-timeout` from `began`) for the newest snapshot to be on every tier. `Some(code)`
/// when it did not make it, after telling so; `None` when it did (or there is nothing to
/// flush), and the caller ends as without tiers.
fn flush_on_stop(
    durable: Option<&durable::Durable>,
    newest: Option<u64>,
    began: Instant,
    sig: i32,
    cfg: &JobConfig,
    log: &Log,
) -> Option<i32> {
    let (Some(d), Some(seq)) = (durable, newest) else {
        return None;
    };
    if d.flush(seq, began + cfg.stop_timeout, log) {
        return None;
    }
    let lagging = d.lagging(seq).join(", ");
    log.emit(&end(
        RunOutcome::Stopped,
        exit::STOPPED_NOT_OFF_NODE,
        format!(
            "stopped by {}; the final snapshot {seq} is in the local cache {} but did not reach \
             {lagging} within --stop-timeout {}: running the same command again on this node \
             resumes from it, on another node from the newest snapshot that did",
            signal_name(sig),
            cfg.store.display(),
            human::duration(cfg.stop_timeout)
        ),
    ));
    Some(exit::STOPPED_NOT_OFF_NODE)
}

/// How a file-mode code is asked for something, in words.
fn describe_ask(ask: &crate::files::Ask) -> String {
    match ask {
        crate::files::Ask::Signal(sig) => format!("one {}", sig.as_str()),
        crate::files::Ask::Touch(file) => format!("creating {}", file.display()),
        crate::files::Ask::Nothing => "SIGTERM".to_owned(),
    }
}

/// The end of a run stopped because its Slurm batch job was about to end.
struct Requeueing<'a> {
    cfg: &'a JobConfig,
    snaps: Numbers<'a>,
    /// The highest snapshot number when the run started.
    highest_at_start: Option<u64>,
}

impl Requeueing<'_> {
    /// Once the final snapshot is safe (off the node too, with durable tiers, within
    /// `--stop-timeout`), puts the job back in the queue, unless it was requeued
    /// `--max-requeues` times already or this run took no snapshot (a requeued run would
    /// start where this one did, over and over). Returns the exit code.
    /// `skip`: snapshots not to resume from; `began`: when the stop began.
    fn finish(
        &self,
        skip: &[(u64, u64)],
        durable: Option<&durable::Durable>,
        began: Instant,
        log: &Log,
    ) -> Result<i32> {
        let Some(slurm) = &self.cfg.slurm else {
            anyhow::bail!("a stop to requeue outside a Slurm job");
        };
        let job_id = slurm.job.id.clone();
        let newest = self.snaps.newest(skip)?;
        let mut lagging = String::new();
        if let (Some(d), Some(seq)) = (durable, newest)
            && !d.flush(seq, began + self.cfg.stop_timeout, log)
        {
            lagging = format!(
                " (it did not reach {} within --stop-timeout: a run on another node resumes \
                 from the newest snapshot that did)",
                d.lagging(seq).join(", ")
            );
        }
        use crate::event::NotRequeuedReason as Reason;
        let not_requeued = if slurm.job.restart_count >= slurm.max_requeues {
            Some((
                Reason::MaxRequeues,
                format!(
                    "it was requeued {} times already (--max-requeues {})",
                    slurm.job.restart_count, slurm.max_requeues
                ),
            ))
        } else if self.snaps.highest()? <= self.highest_at_start {
            Some((
                Reason::NoSnapshot,
                "this run took no snapshot, so a requeued run would start where this one did"
                    .to_owned(),
            ))
        } else {
            slurm.job.requeue().err().map(|e| {
                (
                    Reason::ScontrolFailed,
                    format!("scontrol could not requeue it: {e}"),
                )
            })
        };
        let resume = match newest {
            Some(seq) => format!("snapshot {seq}"),
            None => "the beginning".to_owned(),
        };
        if let Some((reason, why)) = not_requeued {
            log.emit(&JobEvent::NotRequeued {
                job_id: job_id.clone(),
                reason,
                why: why.clone(),
            });
            log.emit(&end(
                RunOutcome::Stopped,
                exit::STOPPED,
                format!(
                    "stopped before the end of Slurm job {job_id}, not requeued ({why}): submit \
                     the same script again to resume from {resume}{lagging}"
                ),
            ));
            return Ok(exit::STOPPED);
        }
        let restart_count = slurm.job.restart_count + 1;
        log.emit(&JobEvent::Requeued {
            job_id: job_id.clone(),
            restart_count,
            from: From(newest),
        });
        log.emit(&end(
            RunOutcome::Requeued,
            exit::STOPPED,
            format!(
                "stopped before the end of Slurm job {job_id} and requeued it: it resumes from \
                 {resume}{lagging}"
            ),
        ));
        Ok(exit::STOPPED)
    }
}

/// Tells that the job's lease is lost (`why`) and returns the exit code for it.
fn lease_lost(why: &str, log: &Log) -> i32 {
    log.emit(&end(
        RunOutcome::LeaseLost,
        exit::LEASE_LOST,
        format!(
            "lost the job's lease ({why}): the program was stopped (or not started) so that \
             two copies never run; the newest snapshot that reached the durable tiers is where \
             the job resumes"
        ),
    ));
    exit::LEASE_LOST
}

/// How long the lifeline lets the program run on after the supervisor died, to take its
/// final snapshot: `--stop-timeout`, but with durable tiers at most a fifth of the lease's
/// time-to-live. Nobody renews the lease once the supervisor is gone, and it has at least a
/// quarter of its ttl left whenever the program runs (less, and the supervisor stops it),
/// so the program is gone before another node may take the job over.
fn lifeline_grace(cfg: &JobConfig) -> Duration {
    match &cfg.durable {
        Some(d) => cfg.stop_timeout.min(d.lease_ttl / 5),
        None => cfg.stop_timeout,
    }
}

/// Runs the job to its end; returns the supervisor's exit code.
pub fn run(cfg: &JobConfig, log: &mut Log) -> Result<i32> {
    let store = Store::open(&cfg.store).context("cannot open the store")?;
    let job = store.job(&cfg.job)?;
    let store_dir =
        std::path::absolute(store.root()).context("cannot resolve the store directory")?;
    child::become_subreaper().context("cannot become a child subreaper")?;
    // Forked before the lock is taken, so that it does not hold the lock after we exit.
    // The program's stderr passes through the supervisor (which keeps its last lines to show
    // if it fails at once) unless it must outlive the supervisor. Made before the lifeline,
    // which keeps its read end.
    let stderr_pipe = if cfg.orphan == OrphanMode::Continue {
        None
    } else {
        Some(StderrPipe::new().context("cannot make the program's stderr pipe")?)
    };
    let mut lifeline = if cfg.orphan == OrphanMode::Continue {
        None
    } else {
        Some(
            Lifeline::start(lifeline_grace(cfg), stderr_pipe.as_ref())
                .context("cannot start the lifeline process")?,
        )
    };
    let signals = Signals::install(Some(cfg.requeue_signal as i32))
        .context("cannot install signal handlers")?;
    let command_line = cfg
        .command
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let (lock, history_when_held) = match take_lock(&job, &command_line, cfg, &signals, log)? {
        Ok(taken) => taken,
        Err(code) => return Ok(code),
    };
    // The child inherits the locked descriptor: the job stays held while it runs, even if
    // this supervisor dies.
    lock.inheritable()?;
    let history = events::history(job.dir())?;
    if let Some(detail) = events::skipped_note(job.dir(), &history) {
        log.emit(&JobEvent::HistoryDamaged { detail });
    }
    log.keep_history(EventLog::open(job.dir())?);
    let last = events::last_run(&history.records);
    // The holder we waited for (not a gc or repair holding the lock) completed the job.
    let completed_meanwhile = history_when_held.is_some_and(|n| {
        history
            .records
            .get(n..)
            .is_some_and(|new| new.iter().any(|r| r.kind == "end" && r.completed))
    });
    if completed_meanwhile
        && !cfg.fresh
        && cfg.from.is_none()
        && last == (LastRun::Ended { completed: true })
    {
        log.emit(&end(
            RunOutcome::AlreadyDone,
            0,
            "the job completed while this supervisor waited for it: nothing to do (--fresh \
             runs it again)"
                .into(),
        ));
        return Ok(0);
    }
    let mut durable = match &cfg.durable {
        Some(d) => {
            match durable::Durable::start(d, &job, cfg.fresh, cfg.wait, cfg.keep, &signals, log)? {
                Ok(durable) => Some(durable),
                Err(code) => return Ok(code),
            }
        }
        None => None,
    };
    log.emit(&JobEvent::Start {
        supervisor_pid: std::process::id(),
        command: command_line.clone(),
    });
    if cfg.files.is_none()
        && let Some(preset) = crate::files::preset::recognise(&cfg.command)
    {
        log.emit(&JobEvent::PresetHint {
            preset: preset.name().to_owned(),
        });
    }
    let server = operator::Server::bind(job.dir())?;
    // A rerun of a completed job, or --fresh, starts the code over in file mode too: what its
    // run directory holds is not resumed from.
    let files_fresh =
        cfg.fresh || (cfg.from.is_none() && last == (LastRun::Ended { completed: true }));
    let snaps = Numbers {
        job: &job,
        epochs: cfg.ranks.is_some(),
    };
    // A job's snapshots are either one program's or epochs of many ranks: run one way, its
    // store must not be written the other (numbers and retention would collide).
    if cfg.ranks.is_none() && supervise_store::epoch::has_epochs(&job)? {
        anyhow::bail!(
            "job {:?} is a job of many ranks (its snapshots are epochs): run it with its \
             launcher (mpirun, srun) or --mpi",
            cfg.job
        );
    }
    let mut skip = initial_skip(cfg, snaps, last, log)?;
    // A requeue needs a snapshot newer than those the run started with.
    let requeueing = Requeueing {
        cfg,
        snaps,
        highest_at_start: snaps.highest()?,
    };
    let end_time = cfg.slurm.as_ref().map(|slurm| {
        let (end_time, answer) = crate::slurm::EndTime::watch(&slurm.job);
        log.emit(&JobEvent::Slurm {
            job_id: slurm.job.id.clone(),
            restart_count: slurm.job.restart_count,
            requeue_signal: cfg.requeue_signal.as_str().to_owned(),
            ends_in_ms: answer.as_ref().ok().copied().flatten().map(millis),
            lead_ms: millis(end_time.lead(slurm.margin, &[])),
            unknown: answer.err(),
        });
        end_time
    });
    let relay = match &cfg.ranks {
        Some((listen, because)) => {
            if cfg.files.is_some() {
                anyhow::bail!("a job of many ranks (MPI) cannot use file mode");
            }
            if cfg.durable.is_some() {
                anyhow::bail!(
                    "a job of many ranks (MPI) cannot use --replica or --remote yet: its \
                     snapshots are epochs, which the durable tiers do not carry"
                );
            }
            let relay = crate::ranks::Relay::start(job.clone(), listen)
                .context("cannot open the endpoint ranks join")?;
            log.emit(&JobEvent::Ranks {
                endpoint: relay.endpoint().to_string(),
                because: because.clone(),
            });
            Some(relay)
        }
        None => None,
    };
    // File mode: the capture thread holds the job's writer from here on.
    let files = match &cfg.files {
        Some(spec) => {
            let retention = supervise_store::retention::Retention {
                keep: cfg.keep,
                within: cfg.keep_within,
                suspect: Vec::new(),
            };
            let files = Files::start(
                spec.clone(),
                job.clone(),
                retention,
                Some(cfg.origin.clone()),
            )
            .map_err(|e| anyhow::anyhow!("file mode: {e}"))?;
            log.emit(&JobEvent::FileMode {
                preset: spec.preset.map(str::to_owned),
                checkpoints: spec
                    .checkpoints
                    .iter()
                    .map(|p| p.text.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
                stop: describe_ask(&spec.ask_stop),
                advice: spec.advice.clone(),
            });
            Some(files)
        }
        None => None,
    };

    let mut state = JobState {
        status: Status {
            supervisor_pid: std::process::id(),
            started_unix_ms: now_unix_ms(),
            command: command_line.clone(),
            ..Status::default()
        },
        recent_snapshot_ms: Vec::new(),
        schedule: crate::interval::Schedule::new(cfg.every),
    };
    state.status.every_ms = Some(millis(state.schedule.every()));
    state.status.every_why = state.schedule.choose().map(|c| c.why.name().to_owned());
    let mut policy = RestartPolicy::new(cfg.policy.clone());
    let mut blame = Blame::new(cfg.rollback_after);
    // Snapshots stepped back past: the child's retention keeps them until a newer good one.
    let mut suspect: Vec<(u64, u64)> = Vec::new();
    let mut attempt: u32 = 0;
    let mut said_no_shim = false;
    let mut ever_connected = false;
    // Lives in a row that failed at once before reaching the shim.
    let mut failed_at_once: u32 = 0;
    // Fresh starts in a row that failed at once before their first snapshot.
    let mut fresh_failed_at_once: u32 = 0;
    loop {
        // Never a program without the lease: it may have been lost while the fetch ran or
        // while waiting to restart.
        if let Some(d) = &durable
            && let durable::LeaseState::Stop { why, .. } = d.lease_state()
        {
            return Ok(lease_lost(&why, log));
        }
        let mut argv = cfg.command.clone();
        let mut resumed_step = None;
        let from = match &files {
            Some(files) => {
                let prepared = files
                    .prepare(&skip, &suspect, files_fresh && attempt == 0)
                    .map_err(|e| {
                        anyhow::anyhow!("file mode: cannot prepare the run directory: {e}")
                    })?;
                for (seq, why) in &prepared.set_aside {
                    log.emit(&JobEvent::SnapshotSetAside {
                        seq: *seq,
                        why: why.clone(),
                    });
                }
                for found in prepared.found {
                    watch::tell_found(log, found);
                }
                let resume = prepared
                    .resumed
                    .as_ref()
                    .map(|(_, r)| (std::path::Path::new(&r.meta.checkpoint), r.meta.step));
                argv = files.spec().argv(resume);
                if let Some((seq, r)) = &prepared.resumed {
                    resumed_step = r.meta.step;
                    log.emit(&JobEvent::CheckpointResumed {
                        seq: *seq,
                        step: r.meta.step,
                        checkpoint: r.meta.checkpoint.clone(),
                        written: r.written.clone(),
                        cut: r.cut.clone(),
                    });
                }
                prepared.resumed.map(|(seq, _)| seq)
            }
            None => snaps.newest(&skip)?,
        };
        let highest_before = snaps.highest()?;
        note_snapshot(snaps, &mut state, snaps.newest(&[])?);
        if let Some(seq) = from {
            note_origin(&job, seq, cfg, log);
        }
        let env = ChildEnv {
            store: store_dir.clone(),
            job: cfg.job.clone(),
            keep: cfg.keep,
            attempt,
            restore: RestoreFrom::Latest {
                after: None,
                skip: skip.clone(),
            },
            every: Some(cfg.every.alone()),
            keep_within: cfg.keep_within,
            orphan: cfg.orphan,
            suspect: suspect.clone(),
            scrub: cfg.scrub,
            origin: Some(cfg.origin.clone()),
            capture_memory: cfg.capture_memory,
        }
        .to_env();
        // In file mode the program gets no store to write to (the supervisor is the job's one
        // writer), only what its preset asks for.
        let mut env: Vec<(String, String)> = match &files {
            Some(files) => files.spec().env.clone(),
            None => env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        };
        // Ranks join at the relay's endpoint: a launcher passes variables on, not descriptors.
        if let Some(relay) = &relay {
            env.extend(relay.env());
        }
        // A resume command other than the program itself is found in PATH.
        let run_path = if argv.first() == cfg.command.first() {
            cfg.program.run.clone()
        } else {
            std::path::PathBuf::from(argv.first().cloned().unwrap_or_default())
        };
        // The child's stderr passes through the supervisor (which keeps its last lines to
        // show if it fails at once) unless it must outlive the supervisor.
        let spawned = Child::spawn(
            &run_path,
            &argv,
            &env,
            !(cfg.orphan == OrphanMode::Continue),
            stderr_pipe.as_ref(),
            relay.is_none(),
        );
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let e = anyhow::Error::from(e)
                    .context(format!("cannot start {}", cfg.command[0].to_string_lossy()));
                // A job that never ran leaves nothing behind: not even its directory.
                if attempt == 0 && history.records.is_empty() && job.highest_seq()?.is_none() {
                    drop(server);
                    let _ = std::fs::remove_dir_all(job.dir());
                }
                return Err(e);
            }
        };
        if let Some(l) = lifeline.as_mut() {
            l.set_group(Some(child.pid()));
        }
        if let Some(files) = &files {
            files.live(true);
        }
        if relay.is_some()
            && let Some(e) = from.and_then(|n| supervise_store::epoch::read(&job, n).ok())
        {
            log.emit(&JobEvent::EpochResumed {
                epoch: e.epoch,
                step: e.step,
                ranks: e.size,
                tag: e.tag,
            });
        }
        if let (Some(relay), Some(end)) = (&relay, child.relay_end.take()) {
            relay.begin_life(
                end,
                RestoreFrom::Latest {
                    after: None,
                    skip: skip.clone(),
                },
                supervise_store::retention::Retention {
                    keep: cfg.keep,
                    within: cfg.keep_within,
                    suspect: suspect.clone(),
                },
            );
        }
        state.status.child_pid = Some(child.pid());
        log.emit(&JobEvent::Spawned {
            pid: child.pid(),
            from: From(from),
        });
        let life = Watch::new(cfg, log, &signals, from, said_no_shim, stderr_pipe.as_ref())
            .with_durable(durable.as_ref())
            .with_end_time(end_time.as_ref())
            .with_files(files.as_ref(), resumed_step)
            .run(&mut child, &server, &mut state)?;
        said_no_shim = life.said_no_shim;
        ever_connected |= life.connected;
        let reached_safe_point = life.reached_safe_point;
        let ran_for = child.started.elapsed();
        drop(child);
        if let Some(relay) = &relay {
            let killed = relay.end_life(RANK_GRACE);
            if !killed.is_empty() {
                log.emit(&JobEvent::RanksKilled { ranks: killed });
            }
        }
        state.status.child_pid = None;
        if let Some(l) = lifeline.as_mut() {
            l.set_group(None);
        }
        let progressed = snaps.highest()? > highest_before;
        let hung = matches!(life.outcome, Outcome::Hung(_));
        if let Some(why) = &life.lease_lost {
            return Ok(lease_lost(why, log));
        }
        let how = match life.outcome {
            Outcome::Stopped(Stop::Requeue(_)) => {
                let began = life.stop_began.unwrap_or_else(Instant::now);
                return requeueing.finish(&skip, durable.as_ref(), began, log);
            }
            Outcome::Stopped(Stop::Signal(sig)) => {
                let newest = snaps.newest(&skip)?;
                let began = life.stop_began.unwrap_or_else(Instant::now);
                if let Some(code) = flush_on_stop(durable.as_ref(), newest, began, sig, cfg, log) {
                    return Ok(code);
                }
                let detail = match newest {
                    Some(seq) => format!(
                        "stopped by {}; run the same command again to resume (from snapshot \
                         {seq})",
                        signal_name(sig)
                    ),
                    None if !ever_connected => format!(
                        "stopped by {}; the program does not use the supervise shim, so there \
                         is no snapshot: running the same command again starts it from the \
                         beginning",
                        signal_name(sig)
                    ),
                    None => format!(
                        "stopped by {}; the program took no snapshot yet: running the same \
                         command again starts it from the beginning",
                        signal_name(sig)
                    ),
                };
                log.emit(&end(RunOutcome::Stopped, exit::stopped_by(sig), detail));
                return Ok(exit::stopped_by(sig));
            }
            Outcome::StoppedItself(how) => {
                let newest = snaps.newest(&skip)?;
                let done = cfg
                    .files
                    .as_ref()
                    .and_then(|f| f.done_file.as_ref())
                    .map(|d| d.display().to_string())
                    .unwrap_or_default();
                let mut detail = if how == Ended::Exited(0) {
                    format!(
                        "the program ended with exit code 0 without writing {done}, its sign of \
                         having finished (a limit of its own such as mdrun -maxh, or its own \
                         stop): it is not finished, and not restarted"
                    )
                } else {
                    format!(
                        "the program stopped by itself after a checkpoint ({how}: a SIGTERM sent \
                         to it directly, as a batch system does at a time limit); it is not \
                         restarted"
                    )
                };
                if let Some(seq) = newest {
                    detail.push_str(&format!(
                        ": run the same command again to resume (from snapshot {seq})"
                    ));
                    if let Some(d) = &durable
                        && !d.flush(seq, Instant::now() + cfg.stop_timeout, log)
                    {
                        detail.push_str(&format!(
                            "; it did not reach {} within --stop-timeout",
                            d.lagging(seq).join(", ")
                        ));
                        log.emit(&end(
                            RunOutcome::Stopped,
                            exit::STOPPED_NOT_OFF_NODE,
                            detail,
                        ));
                        return Ok(exit::STOPPED_NOT_OFF_NODE);
                    }
                }
                log.emit(&end(RunOutcome::Stopped, exit::STOPPED, detail));
                return Ok(exit::STOPPED);
            }
            Outcome::Ended(Ended::Exited(0)) => {
                let mut detail = String::from("job finished (exit code 0)");
                // The newest snapshot goes off-node too (bounded): a rerun elsewhere then
                // finds the job at its end rather than before it.
                if let (Some(d), Some(seq)) = (&durable, snaps.newest(&[])?)
                    && !d.flush(seq, Instant::now() + cfg.stop_timeout, log)
                {
                    detail.push_str(&format!(
                        "; its last snapshot {seq} did not reach {} within --stop-timeout",
                        d.lagging(seq).join(", ")
                    ));
                }
                if cfg.on_success == OnSuccess::Delete {
                    let removed = job.remove_all_snapshots()?;
                    detail.push_str(&format!(
                        "; --on-success delete: removed {} snapshots, {} freed",
                        removed.removed_snapshots.len(),
                        human::bytes(removed.freed_bytes)
                    ));
                    if let Some(d) = durable.as_mut() {
                        let (objects, bytes) = d.delete_everywhere(log);
                        detail.push_str(&format!(
                            ", and {objects} objects ({}) from the durable tiers",
                            human::bytes(bytes)
                        ));
                    }
                }
                let totals = totals(&events::read(job.dir())?, now_unix_ms());
                detail.push_str(&format!(": {totals}"));
                log.emit(&JobEvent::End {
                    outcome: RunOutcome::Finished,
                    exit_code: 0,
                    detail,
                    totals: Some(totals),
                });
                return Ok(0);
            }
            Outcome::Ended(how) => {
                log.emit(&JobEvent::died(how, ran_for, life.connected));
                how
            }
            Outcome::Hung(how) => {
                log.emit(&JobEvent::died(how, ran_for, life.connected));
                how
            }
        };
        if let Some(choice) = state.schedule.note_life(ran_for, true) {
            state.interval_chosen(choice, log);
        }
        // Unless the program handled the mismatch and went on to take snapshots.
        if let Some(mismatch) = life.mismatch
            && !progressed
        {
            let detail = format!("gave up: {mismatch}");
            log.emit(&end(RunOutcome::ConfigError, exit::GAVE_UP, detail));
            return Ok(exit::GAVE_UP);
        }
        if !life.connected && !said_no_shim && files.is_none() && ran_for >= NO_SHIM_AFTER_DEATH {
            log.emit(&JobEvent::NoShim {
                after_ms: millis(ran_for),
                hang_timeout: cfg.hang_timeout.is_some(),
            });
            said_no_shim = true;
        }
        let death = Death {
            how,
            reached_safe_point,
            hung,
            progressed,
        };
        // A program that fails at once, again and again, before it reaches the shim is
        // misconfigured (wrong program, arguments, input, library): restarts cannot help.
        // Only a job none of whose lives ever got going: one that ran for hours and then fails
        // at once (a stale lock file, a port still in use) is left to the restart policy.
        if !life.connected && ran_for < AT_ONCE && !death.killed_from_outside() {
            failed_at_once += 1;
        } else {
            failed_at_once = 0;
        }
        // A fresh start that reaches the shim and fails at once before its first snapshot,
        // again and again, is misconfigured too (a script's error after `init`): no snapshot is
        // involved, and restarts only repeat it. (One that never reaches the shim is the case
        // above, where a job that ran before is left to the restart policy.)
        if from.is_none()
            && life.connected
            && !reached_safe_point
            && ran_for < AT_ONCE
            && !death.killed_from_outside()
        {
            fresh_failed_at_once += 1;
        } else {
            fresh_failed_at_once = 0;
        }
        let config_error = if failed_at_once >= CONFIG_ERROR_AFTER
            && !ever_connected
            && failed_at_once == attempt + 1
        {
            Some((
                failed_at_once,
                if files.is_some() {
                    "it wrote a checkpoint"
                } else {
                    "it reached the supervise shim"
                },
            ))
        } else if fresh_failed_at_once >= CONFIG_ERROR_AFTER {
            Some((
                fresh_failed_at_once,
                "its first snapshot, from a fresh start",
            ))
        } else {
            None
        };
        if let Some((times, before)) = config_error {
            let lines = life.stderr_tail.last_lines(10);
            let mut detail = format!(
                "gave up: the program failed at once {times} times in a row (last: {how} after \
                 {}) before {before}. That is a configuration error (the program, its \
                 arguments, its input files or libraries), not a crash that restarting can mend",
                human::duration(ran_for),
            );
            if lines.is_empty() && life.connected {
                // The shim hands the program its own stderr back: the supervisor saw none of it.
                detail.push_str("; what it wrote to stderr is above");
            } else if lines.is_empty() {
                detail.push_str("; it wrote nothing to stderr");
            } else {
                detail.push_str(". The last lines it wrote to stderr:");
                for line in lines {
                    detail.push_str("\n    | ");
                    detail.push_str(&line);
                }
            }
            log.emit(&end(RunOutcome::ConfigError, exit::GAVE_UP, detail));
            return Ok(exit::GAVE_UP);
        }
        if let Some(seq) = from {
            match blame.weigh(seq, &death) {
                Verdict::Innocent(why) if !progressed => {
                    log.detail(&format!("not held against snapshot {seq}: {why}"));
                }
                Verdict::Innocent(_) => {}
                Verdict::Pointing { count, needed } => log.detail(&format!(
                    "held against snapshot {seq}: {count} of {needed} deaths (--rollback-after)"
                )),
                Verdict::Suspect(why) => {
                    skip.push((seq, seq));
                    suspect.push((seq, seq));
                    let back = snaps.newest(&skip)?;
                    log.emit(&JobEvent::Suspect {
                        seq,
                        why,
                        rollback_after: cfg.rollback_after,
                        back_to: From(back),
                    });
                }
            }
        }
        // A program killed from outside after it was running wasted no restart on its own: it
        // does not count toward giving up (the backoff still applies).
        let failure = if progressed {
            Failure::Progressed
        } else if death.killed_from_outside() && reached_safe_point {
            Failure::Excused
        } else {
            Failure::Counted
        };
        match policy.on_failure(Instant::now(), ran_for, failure) {
            Decision::GiveUp { failures } => {
                log.emit(&end(
                    RunOutcome::GaveUp,
                    exit::GAVE_UP,
                    format!(
                        "gave up: {failures} failures without progress within {} \
                         (--max-restarts {}); last: {how}",
                        human::duration(cfg.policy.window),
                        cfg.policy.max_restarts
                    ),
                ));
                return Ok(exit::GAVE_UP);
            }
            Decision::Restart { delay } => {
                let from = snaps.newest(&skip)?;
                log.emit(&JobEvent::Restarting {
                    delay_ms: millis(delay),
                    from: From(from),
                });
                let stop = wait_to_restart(&signals, delay, cfg, end_time.as_ref(), &state);
                if let Some(Stop::Requeue(_)) = stop {
                    return requeueing.finish(&skip, durable.as_ref(), Instant::now(), log);
                }
                if let Some(Stop::Signal(sig)) = stop {
                    let newest = snaps.newest(&skip)?;
                    let began = Instant::now();
                    if let Some(code) =
                        flush_on_stop(durable.as_ref(), newest, began, sig, cfg, log)
                    {
                        return Ok(code);
                    }
                    log.emit(&end(
                        RunOutcome::Stopped,
                        exit::stopped_by(sig),
                        format!("stopped by {} while waiting to restart", signal_name(sig)),
                    ));
                    return Ok(exit::stopped_by(sig));
                }
            }
        }
        attempt += 1;
        state.status.restarts += 1;
    }
}

/// A life shorter than this that fails before reaching the shim failed "at once".
const AT_ONCE: Duration = Duration::from_secs(1);

/// Lives in a row failing at once before reaching the shim that make a configuration error.
const CONFIG_ERROR_AFTER: u32 = 3;

/// A program that has run this long without the shim is told it does not use it.
const NO_SHIM_AFTER: Duration = Duration::from_secs(10);

/// A program that died after running this long without the shim is told so too.
const NO_SHIM_AFTER_DEATH: Duration = Duration::from_secs(1);

/// An `end` event without totals.
fn end(outcome: RunOutcome, exit_code: i32, detail: String) -> JobEvent {
    JobEvent::End {
        outcome,
        exit_code,
        detail,
        totals: None,
    }
}

/// Says when the snapshot about to be restored was taken by another build of the program, or
/// another program or arguments (resuming anyway: rebuilding with a fix is normal). Snapshots
/// of older releases record no origin: nothing to compare.
fn note_origin(job: &JobStore, seq: u64, cfg: &JobConfig, log: &Log) {
    let Ok(Some(then)) = job.read_manifest(seq).map(|m| m.origin) else {
        return;
    };
    let now = &cfg.origin;
    let mut changed = Vec::new();
    if then.program != now.program {
        changed.push("program".to_owned());
    } else if let (Some(a), Some(b)) = (&then.exe_blake3, &now.exe_blake3)
        && a != b
    {
        changed.push("executable".to_owned());
    }
    if then.args != now.args {
        changed.push("arguments".to_owned());
    }
    if !changed.is_empty() {
        log.emit(&JobEvent::OriginChanged {
            seq,
            changed,
            program: now.program.clone(),
        });
    }
}

/// The job's totals from its history: from the first start after it last completed, to `now`.
fn totals(records: &[Record], now_ms: u64) -> Totals {
    let begin = records
        .iter()
        .rposition(|r| r.kind == "end" && r.completed)
        .map_or(0, |i| i + 1);
    let records = &records[begin..];
    let field = |r: &Record, name: &str| {
        r.data
            .as_ref()
            .and_then(|d| d.get(name))
            .and_then(serde_json::Value::as_u64)
    };
    let mut t = Totals::default();
    // When the work that a death or a loss would wipe out began: the last snapshot or start.
    let mut mark: Option<u64> = None;
    let mut ended = true;
    for r in records {
        match r.kind.as_str() {
            "start" => {
                if t.runs == 0 {
                    t.elapsed_ms = now_ms.saturating_sub(r.unix_ms);
                }
                if !ended && let Some(m) = mark {
                    // The supervisor before was lost: its work since the last snapshot, and
                    // the time until this one started, were lost.
                    t.lost_ms += r.unix_ms.saturating_sub(m);
                }
                t.runs += 1;
                ended = false;
            }
            "end" => ended = true,
            "spawned" => {
                t.lives += 1;
                mark = Some(r.unix_ms);
            }
            "snapshot" => mark = Some(r.unix_ms),
            "died" => {
                if let Some(m) = mark {
                    t.lost_ms += r.unix_ms.saturating_sub(m);
                }
            }
            "restarting" => {
                t.restarts += 1;
                t.lost_ms += field(r, "delay_ms").unwrap_or(0);
            }
            _ => {}
        }
    }
    t
}

/// The snapshots this run must not restore, from `--fresh`, `--from` and how the previous
/// supervisor ended; says what it decided.
fn initial_skip(
    cfg: &JobConfig,
    snaps: Numbers<'_>,
    last: LastRun,
    log: &Log,
) -> Result<Vec<(u64, u64)>> {
    let highest = snaps.highest()?;
    let seqs = snaps.all()?;
    if let Some(from) = cfg.from {
        if !seqs.contains(&from) {
            anyhow::bail!(
                "--from {from}: job {:?} has no snapshot {from} (it has: {})",
                cfg.job,
                if seqs.is_empty() {
                    "none".to_owned()
                } else {
                    seqs.iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            );
        }
        log.emit(&JobEvent::Resume {
            reason: "from".into(),
            detail: format!("--from {from}: resuming from snapshot {from} as asked"),
        });
        return Ok(match highest {
            Some(h) if h > from => vec![(from + 1, h)],
            _ => Vec::new(),
        });
    }
    let everything = || highest.map(|h| vec![(0, h)]).unwrap_or_default();
    if cfg.fresh {
        if let Some(h) = highest {
            log.emit(&JobEvent::Resume {
                reason: "fresh".into(),
                detail: format!("--fresh: ignoring snapshots up to {h}"),
            });
        }
        return Ok(everything());
    }
    match last {
        LastRun::Ended { completed: true } if highest.is_some() => {
            log.emit(&JobEvent::Resume {
                reason: "completed-before".into(),
                detail: "the job completed in an earlier run: starting it again from the \
                         beginning (--from N resumes from one of its snapshots)"
                    .into(),
            });
            Ok(everything())
        }
        LastRun::Lost { last_unix_ms } => {
            let newest = snaps.newest(&[])?;
            let ago =
                |ms: u64| human::duration(Duration::from_millis(now_unix_ms().saturating_sub(ms)));
            let lost = match newest.and_then(|s| snaps.created_unix_ms(s).map(|c| (s, c))) {
                // The program's own final snapshot, taken when it noticed the loss.
                // With --orphan continue the program ran on and took snapshots without a
                // supervisor; what it did after its last one is unknown.
                Some((seq, created))
                    if created >= last_unix_ms && (cfg.orphan == OrphanMode::Continue) =>
                {
                    format!(
                        "from snapshot {}, which the program took {} after the supervisor was \
                         last heard of ({} ago), running on without it (--orphan continue): \
                         the work it did after that snapshot, if any, is lost",
                        seq,
                        human::duration(Duration::from_millis(created - last_unix_ms)),
                        ago(last_unix_ms)
                    )
                }
                Some((seq, created)) if created >= last_unix_ms => format!(
                    "from snapshot {}, which the program took {} after the supervisor was last \
                     heard of ({} ago): no work was lost",
                    seq,
                    human::duration(Duration::from_millis(created - last_unix_ms)),
                    ago(last_unix_ms)
                ),
                Some((seq, created)) => format!(
                    "from snapshot {} taken {} ago: at least {} of work is lost (from the \
                     snapshot to when the supervisor was last heard of, {} ago; more if the \
                     program ran on after it)",
                    seq,
                    ago(created),
                    human::duration(Duration::from_millis(last_unix_ms.saturating_sub(created))),
                    ago(last_unix_ms)
                ),
                _ if cfg.files.is_some() => "with no snapshot in the store: the run \
                                               directory's checkpoint files are looked at"
                    .to_owned(),
                _ => "from the beginning: it left no snapshot".to_owned(),
            };
            log.emit(&JobEvent::Resume {
                reason: "after-loss".into(),
                detail: format!("resuming after the previous supervisor was lost, {lost}"),
            });
            Ok(Vec::new())
        }
        _ => Ok(Vec::new()),
    }
}

fn note_snapshot(snaps: Numbers<'_>, state: &mut JobState, seq: Option<u64>) {
    state.status.last_snapshot = seq;
    state.status.last_snapshot_unix_ms = seq.and_then(|s| snaps.created_unix_ms(s));
}

/// How long the ranks of a life whose launcher ended may take to end before they are killed
/// (Open MPI's mpirun gives its ranks 1 s after SIGTERM, then kills them).
const RANK_GRACE: Duration = Duration::from_secs(5);

/// The job's snapshots as the supervisor numbers them: its snapshots, or for a job of many
/// ranks its published epochs (each numbered by the epoch, see [`supervise_store::epoch`]).
#[derive(Clone, Copy)]
struct Numbers<'a> {
    job: &'a JobStore,
    epochs: bool,
}

impl Numbers<'_> {
    /// Every committed one, oldest first.
    fn all(self) -> Result<Vec<u64>> {
        Ok(if self.epochs {
            supervise_store::epoch::numbers(self.job)?
        } else {
            self.job.snapshot_seqs()?
        })
    }

    /// The highest number used.
    fn highest(self) -> Result<Option<u64>> {
        Ok(if self.epochs {
            self.all()?.last().copied()
        } else {
            self.job.highest_seq()?
        })
    }

    /// The newest outside the `skip` ranges (the choice the runtime, or the ranks' relay,
    /// makes with the same ranges, as long as it verifies).
    fn newest(self, skip: &[(u64, u64)]) -> Result<Option<u64>> {
        if self.epochs {
            let latest = RestoreFrom::Latest {
                after: None,
                skip: skip.to_vec(),
            };
            // The relay sets aside an epoch whose file or parts are damaged or missing: the
            // prediction passes over it too.
            let whole = |n: u64| {
                supervise_store::epoch::read(self.job, n)
                    .and_then(|e| supervise_store::epoch::check_parts(self.job, &e))
                    .is_ok()
            };
            return Ok(latest
                .candidates(&self.all()?)
                .into_iter()
                .find(|&n| whole(n)));
        }
        Ok(RestoreFrom::newest_outside(self.job, skip)?)
    }

    /// When snapshot (or epoch) `n` was committed.
    fn created_unix_ms(self, n: u64) -> Option<u64> {
        if self.epochs {
            supervise_store::epoch::read(self.job, n)
                .ok()
                .map(|e| e.created_unix_ms)
        } else {
            self.job.read_manifest(n).ok().map(|m| m.created_unix_ms)
        }
    }
}

/// The stops the signals ask for, the requeue signal's first: inside a Slurm job it (and a
/// SIGTERM once the job's end time has passed, Slurm's at the limit) is a stop to requeue;
/// outside, a stop like SIGTERM.
fn take_stops(
    signals: &Signals,
    cfg: &JobConfig,
    end_time: Option<&crate::slurm::EndTime>,
) -> Vec<Stop> {
    let mut stops = Vec::new();
    if signals.take_requeue() {
        let sig = cfg.requeue_signal as i32;
        stops.push(match cfg.slurm {
            Some(_) => Stop::Requeue(EndNear::Signal(sig)),
            None => Stop::Signal(sig),
        });
    }
    if let Some(sig) = signals.take_stop() {
        // Slurm's SIGTERM at the limit; or its SIGTERM together with the requeue signal (a
        // preemption's grace time), which that already says.
        if sig == libc::SIGTERM && !stops.is_empty() && cfg.slurm.is_some() {
            return stops;
        }
        let at_limit = sig == libc::SIGTERM && end_time.is_some_and(|e| e.past());
        stops.push(if at_limit {
            Stop::Requeue(EndNear::Signal(sig))
        } else {
            Stop::Signal(sig)
        });
    }
    stops
}

/// Waits `delay` to restart, returning early with a stop if one is asked for: a signal, or
/// inside a Slurm job its end time within the final snapshot's lead.
fn wait_to_restart(
    signals: &Signals,
    delay: Duration,
    cfg: &JobConfig,
    end_time: Option<&crate::slurm::EndTime>,
    state: &JobState,
) -> Option<Stop> {
    let until = Instant::now() + delay;
    loop {
        if let Some(stop) = take_stops(signals, cfg, end_time).into_iter().next() {
            return Some(stop);
        }
        if let (Some(end_time), Some(slurm)) = (end_time, &cfg.slurm)
            && let Some(left) = end_time.near(slurm.margin, &state.recent_snapshot_ms)
        {
            return Some(Stop::Requeue(EndNear::EndTime {
                left_ms: millis(left),
            }));
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let mut fds = [PollFd::new(signals.fd(), PollFlags::POLLIN)];
        // Wakes at least every second to look at the end time.
        let _ = poll(&mut fds, poll_timeout(left.min(Duration::from_secs(1))));
        signals.drain();
        child::reap_orphans();
    }
}

/// Waits `delay`, returning early with the signal if told to stop.
fn sleep_unless_stopped(signals: &Signals, delay: Duration) -> Option<i32> {
    let until = Instant::now() + delay;
    loop {
        if let Some(sig) = signals.take_stop() {
            return Some(sig);
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let mut fds = [PollFd::new(signals.fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, poll_timeout(left));
        signals.drain();
        child::reap_orphans();
    }
}

/// A poll timeout for `d` (rounded up, at most a minute).
fn poll_timeout(d: Duration) -> PollTimeout {
    PollTimeout::try_from(d.as_millis().min(60_000) as u32 + 1).unwrap_or(PollTimeout::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(
        unix_ms: u64,
        kind: &str,
        completed: bool,
        data: Option<serde_json::Value>,
    ) -> Record {
        Record {
            unix_ms,
            pid: 1,
            kind: kind.into(),
            message: String::new(),
            completed,
            data,
        }
    }

    #[test]
    fn totals_count_from_the_last_completion_and_charge_deaths_and_losses() {
        let delay = |ms: u64| Some(serde_json::json!({ "delay_ms": ms }));
        let records = [
            // An earlier completed run: not counted.
            record(0, "start", false, None),
            record(10, "spawned", false, None),
            record(20, "end", true, None),
            // This job: a run that lost 300 ms to a crash and waited 1000 ms...
            record(1_000, "start", false, None),
            record(1_100, "spawned", false, None),
            record(1_500, "snapshot", false, None),
            record(1_800, "died", false, None),
            record(1_800, "restarting", false, delay(1_000)),
            record(2_800, "spawned", false, None),
            record(3_000, "snapshot", false, None),
            // ...and was lost 500 ms after its last snapshot (a rerun 2 s later),
            record(3_500, "event", false, None),
            record(5_000, "start", false, None),
            record(5_100, "spawned", false, None),
        ];
        let t = totals(&records, 9_000);
        assert_eq!(
            t,
            Totals {
                elapsed_ms: 8_000,
                lives: 3,
                restarts: 1,
                runs: 2,
                lost_ms: 300 + 1_000 + 2_000,
            }
        );
        assert!(t.to_string().contains("2 runs, 1 restart"), "{t}");
    }
}
