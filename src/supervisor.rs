//! The supervisor's main loop: spawn the child, request snapshots on schedule and on SIGUSR1,
//! watch it over the control channel, and when it dies, restart it from the newest complete
//! snapshot under the restart policy. SIGINT/SIGTERM: final snapshot, stop, exit.

use std::ffi::OsString;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::Signal;
use supervise_shim::config;
use supervise_shim::control::{Event, Request};
use supervise_shim::{JobStore, Store};

use crate::child::{self, Child, Ended};
use crate::human;
use crate::lifeline::Lifeline;
use crate::log::Log;
use crate::policy::{Decision, PolicyConfig, RestartPolicy};
use crate::signals::Signals;

/// Exit code when the restart limit was reached.
pub const EXIT_GAVE_UP: i32 = 3;

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
    /// Restart policy.
    pub policy: PolicyConfig,
    /// How long to wait for the final snapshot and exit when stopping.
    pub stop_timeout: Duration,
    /// Ignore snapshots taken before this run.
    pub fresh: bool,
}

/// How one life of the child ended.
enum Outcome {
    /// It ended by itself (or was killed by someone else).
    Ended(Ended),
    /// The supervisor was told to stop (by this signal) and stopped it.
    Stopped(i32),
}

/// Runs the job to its end; returns the supervisor's exit code.
pub fn run(cfg: &JobConfig, log: &Log) -> Result<i32> {
    let store = Store::open(&cfg.store)
        .with_context(|| format!("cannot open store {}", cfg.store.display()))?;
    let job = store.job(&cfg.job)?;
    let store_dir =
        std::path::absolute(store.root()).context("cannot resolve the store directory")?;
    child::become_subreaper().context("cannot become a child subreaper")?;
    let mut lifeline =
        Lifeline::start(cfg.stop_timeout).context("cannot start the lifeline process")?;
    let signals = Signals::install().context("cannot install signal handlers")?;
    let restore_after = if cfg.fresh { job.highest_seq()? } else { None };
    if let Some(after) = restore_after {
        log.event(&format!("--fresh: ignoring snapshots up to {after}"));
    }
    let mut policy = RestartPolicy::new(cfg.policy.clone());
    let mut attempt: u32 = 0;
    loop {
        let from = newest_snapshot(&job, restore_after)?;
        let mut env = vec![
            (
                config::ENV_STORE.to_owned(),
                store_dir.to_string_lossy().into_owned(),
            ),
            (config::ENV_JOB.to_owned(), cfg.job.clone()),
            (config::ENV_KEEP.to_owned(), cfg.keep.to_string()),
            (config::ENV_ATTEMPT.to_owned(), attempt.to_string()),
            (config::ENV_RESTORE.to_owned(), "latest".to_owned()),
        ];
        if let Some(after) = restore_after {
            env.push((config::ENV_RESTORE_AFTER.to_owned(), after.to_string()));
        }
        let mut child = Child::spawn(&cfg.command, &env, config::ENV_CONTROL_FD)
            .with_context(|| format!("cannot start {}", cfg.command[0].to_string_lossy()))?;
        lifeline.set_group(Some(child.pid()));
        log.event(&format!(
            "spawned pid {} ({})",
            child.pid(),
            describe_start(from)
        ));
        let outcome = Watch::new(cfg, log, &signals, from).run(&mut child)?;
        let ran_for = child.started.elapsed();
        drop(child);
        lifeline.set_group(None);
        match outcome {
            Outcome::Stopped(sig) => {
                let newest = newest_snapshot(&job, restore_after)?;
                log.always(&format!(
                    "stopped by {}; run the same command again to resume ({})",
                    signal_name(sig),
                    describe_start(newest)
                ));
                return Ok(128 + sig);
            }
            Outcome::Ended(Ended::Exited(0)) => {
                log.always(&format!(
                    "job finished (exit code 0) after {}",
                    human::duration(ran_for)
                ));
                return Ok(0);
            }
            Outcome::Ended(how) => {
                log.event(&format!(
                    "child died: {how} after {}",
                    human::duration(ran_for)
                ));
                match policy.on_failure(Instant::now(), ran_for) {
                    Decision::GiveUp { failures } => {
                        log.always(&format!(
                            "gave up: {failures} failures within {} (--max-restarts {}); last: {how}",
                            human::duration(cfg.policy.window),
                            cfg.policy.max_restarts
                        ));
                        return Ok(EXIT_GAVE_UP);
                    }
                    Decision::Restart { delay } => {
                        let from = newest_snapshot(&job, restore_after)?;
                        log.event(&format!(
                            "restarting in {} ({})",
                            human::duration(delay),
                            describe_start(from)
                        ));
                        if let Some(sig) = sleep_unless_stopped(&signals, delay) {
                            log.always(&format!(
                                "stopped by {} while waiting to restart",
                                signal_name(sig)
                            ));
                            return Ok(128 + sig);
                        }
                    }
                }
            }
        }
        attempt += 1;
    }
}

fn newest_snapshot(job: &JobStore, after: Option<u64>) -> Result<Option<u64>> {
    let newest = job.snapshot_seqs()?.last().copied();
    Ok(newest.filter(|s| after.is_none_or(|a| *s > a)))
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
        }
    }

    fn run(mut self, child: &mut Child) -> Result<Outcome> {
        loop {
            // Signals first: when a batch system signals the supervisor and the child at once,
            // the child's exit must be read as the stop it is, not as a crash.
            self.handle_signals(child);
            if let Some(how) = child.try_wait().context("cannot wait for the child")? {
                self.read_control(child);
                return Ok(match (self.stopping, how) {
                    (_, Ended::Exited(0)) | (None, _) => Outcome::Ended(how),
                    (Some((sig, _)), _) => Outcome::Stopped(sig),
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
                let mut fds = vec![PollFd::new(self.signals.fd(), PollFlags::POLLIN)];
                if self.control_open {
                    fds.push(PollFd::new(control, PollFlags::POLLIN));
                }
                match poll(&mut fds, poll_timeout(timeout)) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(e).context("poll failed"),
                }
            }
            self.signals.drain();
            self.read_control(child);
            let now = Instant::now();
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
                self.in_flight = None;
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
                if std::mem::take(&mut self.follow_up) {
                    self.request_snapshot(child, "coalesced SIGUSR1");
                }
            }
            Event::SnapshotFailed { error } => {
                self.in_flight = None;
                self.log.event(&format!(
                    "snapshot failed: {error} (earlier snapshots are intact)"
                ));
            }
        }
    }
}
