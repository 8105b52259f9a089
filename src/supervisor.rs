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
use supervise_shim::config;
use supervise_shim::control::{Event, Request};
use supervise_shim::lock::{JobLock, Owner, TryLock};
use supervise_shim::{JobStore, Store};

use crate::blame::{Blame, Death, Verdict};
use crate::child::{self, Child, Ended};
use crate::events::{self, EventLog, LastRun};
use crate::human;
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

/// Takes the job's lock: at once, or (with `wait`) when its holder lets go. `Ok(Err(code))`:
/// the supervisor must exit with that code instead.
fn take_lock(
    job: &JobStore,
    command_line: &str,
    cfg: &JobConfig,
    signals: &Signals,
    log: &Log,
) -> Result<std::result::Result<JobLock, i32>> {
    let me = Owner::this_process(command_line);
    let mut said_waiting = false;
    let mut misses = 0;
    loop {
        match JobLock::try_take(job.dir(), &me)? {
            TryLock::Taken(lock) => return Ok(Ok(lock)),
            // A `status` probe holds the lock for an instant: look again before believing it.
            TryLock::Held(_) if misses < 3 => {
                misses += 1;
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            TryLock::Held(owner) => {
                let who = describe_owner(owner.as_ref());
                if !cfg.wait {
                    log.always(&format!(
                        "job {:?} is already running: {who}. Two copies of one job must never \
                         run; wait for it with --wait, or stop it first",
                        cfg.job
                    ));
                    return Ok(Err(EXIT_HELD));
                }
                if !said_waiting {
                    log.always(&format!("--wait: job held by {who}; waiting for it to end"));
                    said_waiting = true;
                }
                if let Some(sig) = sleep_unless_stopped(signals, Duration::from_millis(500)) {
                    log.always(&format!("stopped by {} while waiting", signal_name(sig)));
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
    let store = Store::open(&cfg.store)
        .with_context(|| format!("cannot open store {}", cfg.store.display()))?;
    let job = store.job(&cfg.job)?;
    let store_dir =
        std::path::absolute(store.root()).context("cannot resolve the store directory")?;
    child::become_subreaper().context("cannot become a child subreaper")?;
    // Forked before the lock is taken, so that it does not hold the lock after we exit.
    let mut lifeline = if cfg.orphan_continue {
        None
    } else {
        Some(Lifeline::start(cfg.stop_timeout).context("cannot start the lifeline process")?)
    };
    let signals = Signals::install().context("cannot install signal handlers")?;
    let command_line = cfg
        .command
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let lock = match take_lock(&job, &command_line, cfg, &signals, log)? {
        Ok(lock) => lock,
        Err(code) => return Ok(code),
    };
    // The child inherits the locked descriptor: the job stays held while it runs, even if
    // this supervisor dies.
    lock.inheritable()?;
    let history = events::history(job.dir())?;
    if let Some(note) = events::skipped_note(job.dir(), &history) {
        log.event(&note);
    }
    log.keep_history(EventLog::open(job.dir())?);
    log.mark(
        "start",
        &format!(
            "supervisor pid {} started: {command_line}",
            std::process::id()
        ),
        false,
    );
    let server = operator::Server::bind(job.dir())?;
    let mut skip = initial_skip(cfg, &job, events::last_run(&history.records), log)?;
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
    loop {
        let from = newest_snapshot(&job, &skip)?;
        let highest_before = job.highest_seq()?;
        note_snapshot(&job, &mut state, newest_snapshot(&job, &[])?);
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
        let mut child = Child::spawn(
            &cfg.command,
            &env,
            config::ENV_CONTROL_FD,
            !cfg.orphan_continue,
        )
        .with_context(|| format!("cannot start {}", cfg.command[0].to_string_lossy()))?;
        if let Some(l) = lifeline.as_mut() {
            l.set_group(Some(child.pid()));
        }
        state.status.child_pid = Some(child.pid());
        log.event(&format!(
            "spawned pid {} ({})",
            child.pid(),
            describe_start(from)
        ));
        let (outcome, reached_safe_point) =
            Watch::new(cfg, log, &signals, from).run(&mut child, &server, &mut state)?;
        let ran_for = child.started.elapsed();
        drop(child);
        state.status.child_pid = None;
        if let Some(l) = lifeline.as_mut() {
            l.set_group(None);
        }
        let progressed = job.highest_seq()? > highest_before;
        let mut outcome_kind = OutcomeKind::Ended;
        let how = match outcome {
            Outcome::Stopped(sig) => {
                let newest = newest_snapshot(&job, &skip)?;
                log.mark(
                    "end",
                    &format!(
                        "stopped by {}; run the same command again to resume ({})",
                        signal_name(sig),
                        describe_start(newest)
                    ),
                    false,
                );
                return Ok(128 + sig);
            }
            Outcome::Ended(Ended::Exited(0)) => {
                let mut msg = format!(
                    "job finished (exit code 0) after {}",
                    human::duration(ran_for)
                );
                if cfg.delete_on_success {
                    let removed = job.remove_all_snapshots()?;
                    msg.push_str(&format!(
                        "; --on-success delete: removed {} snapshots, {} freed",
                        removed.removed_snapshots.len(),
                        human::bytes(removed.freed_bytes)
                    ));
                }
                log.mark("end", &msg, true);
                return Ok(0);
            }
            Outcome::Ended(how) => {
                log.event(&format!(
                    "child died: {how} after {}",
                    human::duration(ran_for)
                ));
                how
            }
            Outcome::Hung(how) => {
                outcome_kind = OutcomeKind::Hung;
                how
            }
        };
        let death = Death {
            how,
            reached_safe_point,
            hung: matches!(outcome_kind, OutcomeKind::Hung),
            progressed,
        };
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
                    log.event(&format!(
                        "snapshot {seq} is suspect: {why} (--rollback-after {}); going back to \
                         {} (retention keeps snapshot {seq} until a newer good one exists)",
                        cfg.rollback_after,
                        match back {
                            Some(b) => format!("snapshot {b}"),
                            None => "a fresh start (no older snapshot)".into(),
                        }
                    ));
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
                log.mark(
                    "end",
                    &format!(
                        "gave up: {failures} failures without progress within {} \
                         (--max-restarts {}); last: {how}",
                        human::duration(cfg.policy.window),
                        cfg.policy.max_restarts
                    ),
                    false,
                );
                return Ok(EXIT_GAVE_UP);
            }
            Decision::Restart { delay } => {
                let from = newest_snapshot(&job, &skip)?;
                log.event(&format!(
                    "restarting in {} ({})",
                    human::duration(delay),
                    describe_start(from)
                ));
                if let Some(sig) = sleep_unless_stopped(&signals, delay) {
                    log.mark(
                        "end",
                        &format!("stopped by {} while waiting to restart", signal_name(sig)),
                        false,
                    );
                    return Ok(128 + sig);
                }
            }
        }
        attempt += 1;
        state.status.restarts += 1;
    }
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
        log.event(&format!(
            "--from {from}: resuming from snapshot {from} as asked"
        ));
        return Ok(match highest {
            Some(h) if h > from => vec![(from + 1, h)],
            _ => Vec::new(),
        });
    }
    let everything = || highest.map(|h| vec![(0, h)]).unwrap_or_default();
    if cfg.fresh {
        if let Some(h) = highest {
            log.event(&format!("--fresh: ignoring snapshots up to {h}"));
        }
        return Ok(everything());
    }
    match last {
        LastRun::Ended { completed: true } if highest.is_some() => {
            log.event(
                "the job completed in an earlier run: starting it again from the beginning \
                 (--from N resumes from one of its snapshots)",
            );
            Ok(everything())
        }
        LastRun::Lost { last_unix_ms } => {
            let newest = newest_snapshot(job, &[])?;
            let lost = match newest.map(|s| job.read_manifest(s)) {
                Some(Ok(m)) => format!(
                    "from snapshot {} taken {} ago; the work since then is lost (the supervisor \
                     was last heard of {} ago)",
                    m.seq,
                    human::duration(Duration::from_millis(
                        now_unix_ms().saturating_sub(m.created_unix_ms)
                    )),
                    human::duration(Duration::from_millis(
                        now_unix_ms().saturating_sub(last_unix_ms)
                    ))
                ),
                _ => "from the beginning: it left no snapshot".to_owned(),
            };
            log.event(&format!(
                "resuming after the previous supervisor was lost, {lost}"
            ));
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

fn describe_start(from: Option<u64>) -> String {
    match from {
        Some(seq) => format!("from snapshot {seq}"),
        None => "fresh start".to_owned(),
    }
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
}

impl<'a> Watch<'a> {
    fn new(
        cfg: &'a JobConfig,
        log: &'a Log,
        signals: &'a Signals,
        expected_from: Option<u64>,
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
                    status: Some(state.status.clone()),
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
                self.log.event(&format!(
                    "the program reached no safe point for {} (--hang-timeout): asking for a snapshot, then stopping it",
                    human::duration(limit)
                ));
                if self.in_flight.is_none() {
                    self.send(child, &Request::Snapshot);
                    self.in_flight = Some(now);
                }
                self.hang = Some((now + grace, false));
            }
            Some((at, false)) if now >= at => {
                self.log.event("hung program: sending SIGTERM");
                child.kill_group(Signal::SIGTERM);
                self.hang = Some((now + grace, true));
            }
            Some((at, true)) if now >= at && !self.killed => {
                self.log.event("hung program did not stop: sending SIGKILL");
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
    ) -> Result<(Outcome, bool)> {
        loop {
            // Signals first: when a batch system signals the supervisor and the child at once,
            // the child's exit must be read as the stop it is, not as a crash.
            self.handle_signals(child);
            if let Some(how) = child.try_wait().context("cannot wait for the child")? {
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
                return Ok((outcome, self.reached_safe_point));
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
                for client in &self.clients {
                    fds.push(PollFd::new(client.fd(), PollFlags::POLLIN));
                }
                match poll(&mut fds, poll_timeout(timeout)) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(e).context("poll failed"),
                }
            }
            self.signals.drain();
            self.read_control(child);
            self.record_done(state);
            self.serve_operators(child, server, state);
            let now = Instant::now();
            self.check_hang(child, now);
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
                self.log.event(&format!(
                    "child did not stop within {} (--stop-timeout); killing it",
                    human::duration(self.cfg.stop_timeout)
                ));
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
                self.log.event(&format!(
                    "{} again: killing the child now",
                    signal_name(sig)
                ));
                child.kill_group(Signal::SIGKILL);
                self.killed = true;
            } else if self.connected {
                self.log.event(&format!(
                    "{}: asking for a final snapshot, then stopping (up to {})",
                    signal_name(sig),
                    human::duration(self.cfg.stop_timeout)
                ));
                self.send(child, &Request::Stop);
                self.stopping = Some((sig, Instant::now() + self.cfg.stop_timeout));
            } else {
                self.log.event(&format!(
                    "{}: the program has no shim connected; sending it SIGTERM",
                    signal_name(sig)
                ));
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
            if !self.warned_no_shim {
                self.log
                    .event("cannot take a snapshot: the program has not initialised the shim");
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
                    self.log.event(&format!(
                        "snapshot {} is damaged and was set aside: {}",
                        d.seq, d.why
                    ));
                }
                if resumed_from != self.expected_from {
                    self.log.event(&format!(
                        "child resumed {} instead",
                        describe_start(resumed_from)
                    ));
                    self.expected_from = resumed_from;
                }
                let tag = tag.map(|t| format!(", tag {t:?}")).unwrap_or_default();
                self.log.detail(&format!(
                    "shim connected in pid {pid} ({}{tag}, capture: {capture})",
                    describe_start(resumed_from)
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
                let tag = r.tag.map(|t| format!(" [{t}]")).unwrap_or_default();
                let compacted = match r.bytes_compacted {
                    0 => String::new(),
                    n => format!(" (+{} compacted)", human::bytes(n)),
                };
                self.log.event(&format!(
                    "snapshot {} done{tag}: {} total, {} new{compacted}, {} written, {} ms",
                    r.seq,
                    human::bytes(r.bytes_total),
                    human::bytes(r.bytes_new),
                    human::bytes(r.bytes_written),
                    r.duration_ms
                ));
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
                self.log.event(&format!(
                    "scrub: damaged records: {found} ({why}); snapshots {set_aside:?} use them \
                     and were set aside; the next snapshot stores fresh copies (supervise \
                     verify --repair mends older ones where a good copy exists)"
                ));
            }
            Event::SnapshotFailed { error } => {
                self.in_flight = None;
                self.answer_waiting(&operator::Reply::error(format!("snapshot failed: {error}")));
                self.log.event(&format!(
                    "snapshot failed: {error} (earlier snapshots are intact)"
                ));
            }
        }
    }
}
