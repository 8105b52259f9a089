//! The supervisor's main loop: spawn the child, request snapshots on schedule and on SIGUSR1,
//! watch it over the control channel, and when it dies, restart it from the newest complete
//! snapshot under the restart policy. SIGINT/SIGTERM: final snapshot, stop, exit.

use std::ffi::OsString;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::Signal;
use supervise_store::config;
use supervise_store::control::{Event, Request};
use supervise_store::lock::{JobLock, Owner, TryLock};
use supervise_store::{JobStore, Store};

use crate::blame::{Blame, Death, Verdict};
use crate::child::{self, Child, Ended, StderrPipe, StderrTail};
use crate::event::{From, JobEvent, Outcome as RunOutcome, Totals, millis};
use crate::events::{self, EventLog, LastRun, Record};
use crate::human;
use crate::identity::{Origin, Program};
use crate::lifeline::Lifeline;
use crate::log::Log;
use crate::operator::{self, Status};
use crate::policy::{Decision, Failure, PolicyConfig, RestartPolicy};
use crate::signals::Signals;

/// Exit code when the restart limit was reached.
pub const EXIT_GAVE_UP: i32 = 3;

/// Exit code when another supervisor (or the program an earlier one left running) holds the
/// job, without `--wait`.
pub const EXIT_HELD: i32 = 4;

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
    /// Snapshot schedule.
    pub every: Duration,
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
    /// Delete the job's snapshots when the command finishes with exit code 0.
    pub delete_on_success: bool,
    /// The child runs on (and snapshots by itself) if the supervisor dies.
    pub orphan_continue: bool,
    /// The scrub's period (`None`: off).
    pub scrub: Option<Duration>,
}

/// How one life of the child ended.
enum Outcome {
    /// It ended by itself (or was killed by someone else).
    Ended(Ended),
    /// It stopped reaching safe points and was stopped (how it ended).
    Hung(Ended),
    /// The supervisor was told to stop (by this signal) and stopped it.
    Stopped(i32),
}

/// Whether a failed life ended by itself or was stopped as hung.
enum OutcomeKind {
    Ended,
    Hung,
}

/// What a running supervisor knows about its job, for operators.
struct JobState {
    status: Status,
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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
                    return Ok(Err(EXIT_HELD));
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
                        128 + sig,
                        format!("stopped by {} while waiting", signal_name(sig)),
                    ));
                    return Ok(Err(128 + sig));
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
    let stderr_pipe = if cfg.orphan_continue {
        None
    } else {
        Some(StderrPipe::new().context("cannot make the program's stderr pipe")?)
    };
    let mut lifeline = if cfg.orphan_continue {
        None
    } else {
        Some(
            Lifeline::start(cfg.stop_timeout, stderr_pipe.as_ref())
                .context("cannot start the lifeline process")?,
        )
    };
    let signals = Signals::install().context("cannot install signal handlers")?;
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
    log.emit(&JobEvent::Start {
        supervisor_pid: std::process::id(),
        command: command_line.clone(),
    });
    let server = operator::Server::bind(job.dir())?;
    let mut skip = initial_skip(cfg, &job, last, log)?;
    let mut state = JobState {
        status: Status {
            supervisor_pid: std::process::id(),
            started_unix_ms: now_unix_ms(),
            command: command_line.clone(),
            ..Status::default()
        },
    };
    let mut policy = RestartPolicy::new(cfg.policy.clone());
    let mut blame = Blame::new(cfg.rollback_after);
    // Snapshots stepped back past: the child's retention keeps them until a newer good one.
    let mut suspect: Vec<(u64, u64)> = Vec::new();
    let mut attempt: u32 = 0;
    let mut said_no_shim = false;
    let mut ever_connected = false;
    // Lives in a row that failed at once before reaching the shim.
    let mut failed_at_once: u32 = 0;
    let origin = serde_json::to_string(&cfg.origin)?;
    loop {
        let from = newest_snapshot(&job, &skip)?;
        let highest_before = job.highest_seq()?;
        note_snapshot(&job, &mut state, newest_snapshot(&job, &[])?);
        if let Some(seq) = from {
            note_origin(&job, seq, cfg, log);
        }
        let mut env = vec![
            (
                config::ENV_STORE.to_owned(),
                store_dir.to_string_lossy().into_owned(),
            ),
            (config::ENV_JOB.to_owned(), cfg.job.clone()),
            (config::ENV_KEEP.to_owned(), cfg.keep.to_string()),
            (config::ENV_ATTEMPT.to_owned(), attempt.to_string()),
            (config::ENV_RESTORE.to_owned(), "latest".to_owned()),
            (
                config::ENV_EVERY.to_owned(),
                humantime::format_duration(cfg.every).to_string(),
            ),
            (
                config::ENV_ORPHAN.to_owned(),
                if cfg.orphan_continue {
                    "continue"
                } else {
                    "stop"
                }
                .to_owned(),
            ),
            (config::ENV_ORIGIN.to_owned(), origin.clone()),
        ];
        if !skip.is_empty() {
            env.push((
                config::ENV_RESTORE_SKIP.to_owned(),
                config::format_ranges(&skip),
            ));
        }
        env.push((
            config::ENV_SCRUB.to_owned(),
            cfg.scrub.map_or_else(
                || "off".to_owned(),
                |d| humantime::format_duration(d).to_string(),
            ),
        ));
        if !suspect.is_empty() {
            env.push((
                config::ENV_SUSPECT.to_owned(),
                config::format_ranges(&suspect),
            ));
        }
        if let Some(within) = cfg.keep_within {
            env.push((
                config::ENV_KEEP_WITHIN.to_owned(),
                humantime::format_duration(within).to_string(),
            ));
        }
        // The child's stderr passes through the supervisor (which keeps its last lines to
        // show if it fails at once) unless it must outlive the supervisor.
        let spawned = Child::spawn(
            &cfg.program.run,
            &cfg.command,
            &env,
            !cfg.orphan_continue,
            stderr_pipe.as_ref(),
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
        state.status.child_pid = Some(child.pid());
        log.emit(&JobEvent::Spawned {
            pid: child.pid(),
            from: From(from),
        });
        let life = Watch::new(cfg, log, &signals, from, said_no_shim, stderr_pipe.as_ref())
            .run(&mut child, &server, &mut state)?;
        said_no_shim = life.said_no_shim;
        ever_connected |= life.connected;
        let reached_safe_point = life.reached_safe_point;
        let ran_for = child.started.elapsed();
        drop(child);
        state.status.child_pid = None;
        if let Some(l) = lifeline.as_mut() {
            l.set_group(None);
        }
        let progressed = job.highest_seq()? > highest_before;
        let mut outcome_kind = OutcomeKind::Ended;
        let how = match life.outcome {
            Outcome::Stopped(sig) => {
                let newest = newest_snapshot(&job, &skip)?;
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
                log.emit(&end(RunOutcome::Stopped, 128 + sig, detail));
                return Ok(128 + sig);
            }
            Outcome::Ended(Ended::Exited(0)) => {
                let mut detail = String::from("job finished (exit code 0)");
                if cfg.delete_on_success {
                    let removed = job.remove_all_snapshots()?;
                    detail.push_str(&format!(
                        "; --on-success delete: removed {} snapshots, {} freed",
                        removed.removed_snapshots.len(),
                        human::bytes(removed.freed_bytes)
                    ));
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
                outcome_kind = OutcomeKind::Hung;
                how
            }
        };
        // Unless the program handled the mismatch and went on to take snapshots.
        if let Some(mismatch) = life.mismatch
            && !progressed
        {
            let detail = format!(
                "gave up: {}",
                JobEvent::RestoreMismatch {
                    seq: mismatch.0,
                    entry: mismatch.1.clone(),
                    stored_bytes: mismatch.2,
                    wanted_bytes: mismatch.3,
                }
            );
            log.emit(&end(RunOutcome::ConfigError, EXIT_GAVE_UP, detail));
            return Ok(EXIT_GAVE_UP);
        }
        if !life.connected && !said_no_shim && ran_for >= NO_SHIM_AFTER_DEATH {
            log.emit(&JobEvent::NoShim {
                after_ms: millis(ran_for),
                hang_timeout: cfg.hang_timeout.is_some(),
            });
            said_no_shim = true;
        }
        let death = Death {
            how,
            reached_safe_point,
            hung: matches!(outcome_kind, OutcomeKind::Hung),
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
        if failed_at_once >= CONFIG_ERROR_AFTER && !ever_connected && failed_at_once == attempt + 1
        {
            let lines = life.stderr_tail.last_lines(10);
            let mut detail = format!(
                "gave up: the program failed at once {failed_at_once} times in a row (last: \
                 {how} after {}) before it reached the supervise shim. That is a configuration \
                 error (the program, its arguments, its input files or libraries), not a crash \
                 that restarting can mend",
                human::duration(ran_for)
            );
            if lines.is_empty() {
                detail.push_str("; it wrote nothing to stderr");
            } else {
                detail.push_str(". The last lines it wrote to stderr:");
                for line in lines {
                    detail.push_str("\n    | ");
                    detail.push_str(&line);
                }
            }
            log.emit(&end(RunOutcome::ConfigError, EXIT_GAVE_UP, detail));
            return Ok(EXIT_GAVE_UP);
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
                    let back = newest_snapshot(&job, &skip)?;
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
                    EXIT_GAVE_UP,
                    format!(
                        "gave up: {failures} failures without progress within {} \
                         (--max-restarts {}); last: {how}",
                        human::duration(cfg.policy.window),
                        cfg.policy.max_restarts
                    ),
                ));
                return Ok(EXIT_GAVE_UP);
            }
            Decision::Restart { delay } => {
                let from = newest_snapshot(&job, &skip)?;
                log.emit(&JobEvent::Restarting {
                    delay_ms: millis(delay),
                    from: From(from),
                });
                if let Some(sig) = sleep_unless_stopped(&signals, delay) {
                    log.emit(&end(
                        RunOutcome::Stopped,
                        128 + sig,
                        format!("stopped by {} while waiting to restart", signal_name(sig)),
                    ));
                    return Ok(128 + sig);
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
    job: &JobStore,
    last: LastRun,
    log: &Log,
) -> Result<Vec<(u64, u64)>> {
    let highest = job.highest_seq()?;
    let seqs = job.snapshot_seqs()?;
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
            let newest = newest_snapshot(job, &[])?;
            let ago =
                |ms: u64| human::duration(Duration::from_millis(now_unix_ms().saturating_sub(ms)));
            let lost = match newest.map(|s| job.read_manifest(s)) {
                // The program's own final snapshot, taken when it noticed the loss.
                // With --orphan continue the program ran on and took snapshots without a
                // supervisor; what it did after its last one is unknown.
                Some(Ok(m)) if m.created_unix_ms >= last_unix_ms && cfg.orphan_continue => {
                    format!(
                        "from snapshot {}, which the program took {} after the supervisor was \
                         last heard of ({} ago), running on without it (--orphan continue): \
                         the work it did after that snapshot, if any, is lost",
                        m.seq,
                        human::duration(Duration::from_millis(m.created_unix_ms - last_unix_ms)),
                        ago(last_unix_ms)
                    )
                }
                Some(Ok(m)) if m.created_unix_ms >= last_unix_ms => format!(
                    "from snapshot {}, which the program took {} after the supervisor was last \
                     heard of ({} ago): no work was lost",
                    m.seq,
                    human::duration(Duration::from_millis(m.created_unix_ms - last_unix_ms)),
                    ago(last_unix_ms)
                ),
                Some(Ok(m)) => format!(
                    "from snapshot {} taken {} ago: at least {} of work is lost (from the \
                     snapshot to when the supervisor was last heard of, {} ago; more if the \
                     program ran on after it)",
                    m.seq,
                    ago(m.created_unix_ms),
                    human::duration(Duration::from_millis(
                        last_unix_ms.saturating_sub(m.created_unix_ms)
                    )),
                    ago(last_unix_ms)
                ),
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

fn note_snapshot(job: &JobStore, state: &mut JobState, seq: Option<u64>) {
    state.status.last_snapshot = seq;
    state.status.last_snapshot_unix_ms = seq
        .and_then(|s| job.read_manifest(s).ok())
        .map(|m| m.created_unix_ms);
}

/// The newest committed snapshot outside the `skip` ranges.
fn newest_snapshot(job: &JobStore, skip: &[(u64, u64)]) -> Result<Option<u64>> {
    Ok(job
        .snapshot_seqs()?
        .into_iter()
        .rev()
        .find(|s| !skip.iter().any(|(a, b)| (a..=b).contains(&s))))
}

fn signal_name(sig: i32) -> &'static str {
    Signal::try_from(sig).map_or("a signal", Signal::as_str)
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

fn poll_timeout(d: Duration) -> PollTimeout {
    PollTimeout::try_from(d.as_millis().min(60_000) as u32 + 1).unwrap_or(PollTimeout::MAX)
}

/// The state of watching one life of the child.
struct Watch<'a> {
    cfg: &'a JobConfig,
    log: &'a Log,
    signals: &'a Signals,
    expected_from: Option<u64>,
    inbox: Vec<u8>,
    connected: bool,
    control_open: bool,
    next_snapshot: Instant,
    in_flight: Option<Instant>,
    follow_up: bool,
    stopping: Option<(i32, Instant)>,
    killed: bool,
    warned_no_shim: bool,
    last_alive_line: Option<Instant>,
    /// Operator clients connected, and those waiting for the snapshot in flight or the next.
    clients: Vec<operator::Client>,
    waiting_now: Vec<operator::Client>,
    waiting_next: Vec<operator::Client>,
    /// When the program last showed progress (a safe point reached).
    last_progress: Instant,
    /// A hang was detected: when to escalate next, and whether SIGTERM was sent.
    hang: Option<(Instant, bool)>,
    done: Vec<u64>,
    /// The program reached a safe point (a beat or a snapshot) since it started.
    reached_safe_point: bool,
    /// This supervisor told that the program does not use the shim.
    said_no_shim: bool,
    /// The pipe its stderr goes through, and the last lines of it.
    stderr_pipe: Option<&'a StderrPipe>,
    stderr_tail: StderrTail,
    /// The shim said the program's entries do not fit the snapshot: (seq, entry, stored, wanted).
    mismatch: Option<(u64, String, u64, u64)>,
}

/// How one life of the child went.
struct Life {
    outcome: Outcome,
    reached_safe_point: bool,
    /// It initialised the shim.
    connected: bool,
    said_no_shim: bool,
    stderr_tail: StderrTail,
    mismatch: Option<(u64, String, u64, u64)>,
}

impl<'a> Watch<'a> {
    fn new(
        cfg: &'a JobConfig,
        log: &'a Log,
        signals: &'a Signals,
        expected_from: Option<u64>,
        said_no_shim: bool,
        stderr_pipe: Option<&'a StderrPipe>,
    ) -> Self {
        Self {
            cfg,
            log,
            signals,
            expected_from,
            inbox: Vec::new(),
            connected: false,
            control_open: true,
            next_snapshot: Instant::now() + cfg.every,
            in_flight: None,
            follow_up: false,
            stopping: None,
            killed: false,
            warned_no_shim: false,
            last_alive_line: None,
            clients: Vec::new(),
            waiting_now: Vec::new(),
            waiting_next: Vec::new(),
            last_progress: Instant::now(),
            hang: None,
            done: Vec::new(),
            reached_safe_point: false,
            said_no_shim,
            stderr_pipe,
            stderr_tail: StderrTail::default(),
            mismatch: None,
        }
    }

    /// Passes on what the program wrote to its stderr, keeping the last lines.
    fn pass_stderr(&mut self) {
        if let Some(pipe) = self.stderr_pipe {
            pipe.pass(&mut self.stderr_tail);
        }
    }

    /// Accepts operator clients and answers the requests that arrived.
    fn serve_operators(&mut self, child: &Child, server: &operator::Server, state: &JobState) {
        self.clients.extend(server.accept());
        let mut keep = Vec::new();
        for mut client in std::mem::take(&mut self.clients) {
            match client.read_request() {
                Ok(None) => keep.push(client),
                Err(()) => {}
                Ok(Some(operator::Request::Status)) => client.reply(&operator::Reply {
                    ok: true,
                    error: None,
                    status: Some(operator::Status {
                        shim_connected: Some(self.connected),
                        ..state.status.clone()
                    }),
                    snapshot: None,
                }),
                Ok(Some(operator::Request::Snapshot)) => {
                    if !self.connected {
                        client.reply(&operator::Reply::error(
                            "the program has not initialised the shim (yet)",
                        ));
                    } else if self.stopping.is_some() || self.hang.is_some() {
                        client.reply(&operator::Reply::error("the program is being stopped"));
                    } else if self.in_flight.is_some() {
                        // The one in flight was captured before the request: wait for the next.
                        self.follow_up = true;
                        self.waiting_next.push(client);
                    } else {
                        self.request_snapshot(child, "operator");
                        self.waiting_now.push(client);
                    }
                }
            }
        }
        self.clients = keep;
    }

    /// Answers the operators waiting for the snapshot that just ended.
    fn answer_waiting(&mut self, reply: &operator::Reply) {
        for mut client in self.waiting_now.drain(..) {
            client.reply(reply);
        }
        self.waiting_now = std::mem::take(&mut self.waiting_next);
    }

    /// Escalates a hang: a snapshot request first, then SIGTERM, then SIGKILL.
    fn check_hang(&mut self, child: &Child, now: Instant) {
        let Some(limit) = self.cfg.hang_timeout else {
            return;
        };
        if !self.connected || self.stopping.is_some() {
            return;
        }
        let grace = self.cfg.stop_timeout.min(limit);
        match self.hang {
            None if now.duration_since(self.last_progress) >= limit => {
                self.log.emit(&JobEvent::Hung {
                    timeout_ms: millis(limit),
                });
                if self.in_flight.is_none() {
                    self.send(child, &Request::Snapshot);
                    self.in_flight = Some(now);
                }
                self.hang = Some((now + grace, false));
            }
            Some((at, false)) if now >= at => {
                self.log.emit(&JobEvent::Signalled {
                    signal: "SIGTERM".into(),
                    why: "hung program".into(),
                });
                child.kill_group(Signal::SIGTERM);
                self.hang = Some((now + grace, true));
            }
            Some((at, true)) if now >= at && !self.killed => {
                self.log.emit(&JobEvent::Signalled {
                    signal: "SIGKILL".into(),
                    why: "hung program did not stop".into(),
                });
                child.kill_group(Signal::SIGKILL);
                self.killed = true;
            }
            _ => {}
        }
    }

    fn run(
        mut self,
        child: &mut Child,
        server: &operator::Server,
        state: &mut JobState,
    ) -> Result<Life> {
        loop {
            // Signals first: when a batch system signals the supervisor and the child at once,
            // the child's exit must be read as the stop it is, not as a crash.
            self.handle_signals(child);
            if let Some(how) = child.try_wait().context("cannot wait for the child")? {
                self.pass_stderr();
                self.read_control(child);
                self.record_done(state);
                let gone = operator::Reply::error(format!("the program ended ({how})"));
                // Those waiting for this snapshot and those waiting for the next one.
                for mut client in self
                    .waiting_now
                    .drain(..)
                    .chain(self.waiting_next.drain(..))
                {
                    client.reply(&gone);
                }
                let outcome = match (self.stopping, how) {
                    (_, Ended::Exited(0)) => Outcome::Ended(how),
                    (None, _) if self.hang.is_some() => Outcome::Hung(how),
                    (None, _) => Outcome::Ended(how),
                    (Some((sig, _)), _) => Outcome::Stopped(sig),
                };
                return Ok(Life {
                    outcome,
                    reached_safe_point: self.reached_safe_point,
                    connected: self.connected,
                    said_no_shim: self.said_no_shim,
                    stderr_tail: self.stderr_tail,
                    mismatch: self.mismatch,
                });
            }
            let now = Instant::now();
            let mut deadline = self.next_snapshot;
            if let Some((_, stop_by)) = self.stopping {
                deadline = deadline.min(stop_by);
            }
            // Wake at least every 200 ms to check the child even if a SIGCHLD was coalesced.
            let timeout = deadline
                .saturating_duration_since(now)
                .min(Duration::from_millis(200));
            {
                let control = child.control.as_fd();
                let mut fds = vec![
                    PollFd::new(self.signals.fd(), PollFlags::POLLIN),
                    PollFd::new(server.fd(), PollFlags::POLLIN),
                ];
                if self.control_open {
                    fds.push(PollFd::new(control, PollFlags::POLLIN));
                }
                if let Some(pipe) = self.stderr_pipe {
                    fds.push(PollFd::new(pipe.read_fd(), PollFlags::POLLIN));
                }
                for client in &self.clients {
                    fds.push(PollFd::new(client.fd(), PollFlags::POLLIN));
                }
                match poll(&mut fds, poll_timeout(timeout)) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(e).context("poll failed"),
                }
            }
            self.signals.drain();
            self.pass_stderr();
            self.read_control(child);
            self.record_done(state);
            self.serve_operators(child, server, state);
            let now = Instant::now();
            self.check_hang(child, now);
            if !self.connected && !self.said_no_shim && child.started.elapsed() >= NO_SHIM_AFTER {
                self.log.emit(&JobEvent::NoShim {
                    after_ms: millis(child.started.elapsed()),
                    hang_timeout: self.cfg.hang_timeout.is_some(),
                });
                self.said_no_shim = true;
            }
            if now >= self.next_snapshot {
                self.next_snapshot = now + self.cfg.every;
                if self.stopping.is_none() {
                    self.request_snapshot(child, "schedule");
                }
            }
            if let Some((_, stop_by)) = self.stopping
                && now >= stop_by
                && !self.killed
            {
                self.log.emit(&JobEvent::Signalled {
                    signal: "SIGKILL".into(),
                    why: format!(
                        "the program did not stop within {} (--stop-timeout)",
                        human::duration(self.cfg.stop_timeout)
                    ),
                });
                child.kill_group(Signal::SIGKILL);
                self.killed = true;
            }
        }
    }

    /// Notes the snapshots that completed for `status`.
    fn record_done(&mut self, state: &mut JobState) {
        if let Some(seq) = self.done.drain(..).max() {
            state.status.last_snapshot = Some(seq);
            state.status.last_snapshot_unix_ms = Some(now_unix_ms());
        }
    }

    fn handle_signals(&mut self, child: &Child) {
        if let Some(sig) = self.signals.take_stop() {
            if self.stopping.is_some() {
                self.log.emit(&JobEvent::Signalled {
                    signal: "SIGKILL".into(),
                    why: format!("{} again", signal_name(sig)),
                });
                child.kill_group(Signal::SIGKILL);
                self.killed = true;
            } else if self.connected {
                self.log.emit(&JobEvent::Stopping {
                    signal: signal_name(sig).into(),
                    shim: true,
                    timeout_ms: millis(self.cfg.stop_timeout),
                });
                self.send(child, &Request::Stop);
                self.stopping = Some((sig, Instant::now() + self.cfg.stop_timeout));
            } else {
                self.log.emit(&JobEvent::Stopping {
                    signal: signal_name(sig).into(),
                    shim: false,
                    timeout_ms: millis(self.cfg.stop_timeout),
                });
                child.kill_group(Signal::SIGTERM);
                self.stopping = Some((sig, Instant::now() + self.cfg.stop_timeout));
            }
        }
        if self.signals.take_snapshot() {
            self.request_snapshot(child, "SIGUSR1");
        }
    }

    fn request_snapshot(&mut self, child: &Child, why: &str) {
        if !self.connected {
            if !self.warned_no_shim && !self.said_no_shim {
                self.log.emit(&JobEvent::NoSnapshotWithoutShim);
                self.warned_no_shim = true;
            }
            return;
        }
        if self.in_flight.is_some() {
            self.follow_up |= why == "SIGUSR1";
            self.log.detail(&format!(
                "snapshot requested ({why}) while one is running: coalesced"
            ));
            return;
        }
        self.log.detail(&format!("requesting a snapshot ({why})"));
        self.send(child, &Request::Snapshot);
        self.in_flight = Some(Instant::now());
    }

    fn send(&mut self, child: &Child, request: &Request) {
        if let Err(e) = (&child.control).write_all(request.to_line().as_bytes()) {
            self.log
                .detail(&format!("control channel write failed: {e}"));
        }
    }

    fn read_control(&mut self, child: &Child) {
        let mut buf = [0u8; 4096];
        while self.control_open {
            match (&child.control).read(&mut buf) {
                Ok(0) => self.control_open = false,
                Ok(n) => self.inbox.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => self.control_open = false,
            }
        }
        while let Some(end) = self.inbox.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.inbox.drain(..=end).collect();
            match serde_json::from_slice::<Event>(&line) {
                Ok(event) => self.handle_event(child, event),
                Err(e) => self
                    .log
                    .detail(&format!("ignoring bad control message: {e}")),
            }
        }
    }

    fn handle_event(&mut self, child: &Child, event: Event) {
        match event {
            Event::Hello {
                pid,
                resumed_from,
                tag,
                damaged,
                capture,
            } => {
                self.connected = true;
                self.last_progress = Instant::now();
                for d in &damaged {
                    self.log.emit(&JobEvent::SnapshotSetAside {
                        seq: d.seq,
                        why: d.why.clone(),
                    });
                }
                if resumed_from != self.expected_from {
                    self.log.emit(&JobEvent::ResumedInstead {
                        from: From(resumed_from),
                    });
                    self.expected_from = resumed_from;
                }
                let tag = tag.map(|t| format!(", tag {t:?}")).unwrap_or_default();
                self.log.detail(&format!(
                    "shim connected in pid {pid} ({}{tag}, capture: {capture})",
                    From(resumed_from)
                ));
            }
            Event::Progress { count } => {
                self.last_progress = Instant::now();
                self.reached_safe_point |= count > 0;
                // Beats come every second; say so once a minute.
                if self
                    .last_alive_line
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
                {
                    self.last_alive_line = Some(Instant::now());
                    self.log
                        .detail(&format!("alive: {count} safe points reached"));
                }
            }
            Event::SnapshotDone(r) => {
                self.reached_safe_point = true;
                self.in_flight = None;
                self.last_progress = Instant::now();
                self.done.push(r.seq);
                self.answer_waiting(&operator::Reply {
                    ok: true,
                    error: None,
                    status: None,
                    snapshot: Some(r.seq),
                });
                self.log.emit(&JobEvent::Snapshot {
                    seq: r.seq,
                    tag: r.tag,
                    bytes_total: r.bytes_total,
                    bytes_new: r.bytes_new,
                    bytes_written: r.bytes_written,
                    bytes_compacted: r.bytes_compacted,
                    duration_ms: r.duration_ms,
                });
                if !r.removed.is_empty() {
                    self.log
                        .detail(&format!("retention removed snapshots {:?}", r.removed));
                }
                if std::mem::take(&mut self.follow_up) && self.stopping.is_none() {
                    self.request_snapshot(child, "coalesced request");
                }
            }
            Event::RecordsDamaged {
                packs,
                why,
                set_aside,
            } => {
                let found = packs
                    .iter()
                    .map(|p| {
                        format!(
                            "{} in pack {} (first at offset {})",
                            p.records, p.pack, p.first_offset
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                self.log.emit(&JobEvent::RecordsDamaged {
                    found,
                    why,
                    set_aside,
                });
            }
            Event::RestoreMismatch {
                seq,
                entry,
                stored_bytes,
                wanted_bytes,
            } => {
                let mismatch = JobEvent::RestoreMismatch {
                    seq,
                    entry: entry.clone(),
                    stored_bytes,
                    wanted_bytes,
                };
                self.log.emit(&mismatch);
                self.mismatch = Some((seq, entry, stored_bytes, wanted_bytes));
            }
            Event::SnapshotFailed { error } => {
                self.in_flight = None;
                self.answer_waiting(&operator::Reply::error(format!("snapshot failed: {error}")));
                self.log.emit(&JobEvent::SnapshotFailed { error });
            }
            // Shown as detail lines until the supervisor gives them events of their own.
            Event::Warning { kind, message } => {
                self.log
                    .detail(&format!("shim warning ({kind:?}): {message}"));
            }
            Event::RestoreDamaged { seq, why } => {
                self.log.detail(&format!(
                    "snapshot {seq} turned out damaged during the restore ({why}); set aside"
                ));
            }
        }
    }
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
