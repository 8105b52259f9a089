//! Watching one life of the child: the control channel, operators, signals, the schedule and
//! the child's stderr, feeding what happens to the child's state machine ([`super::state`])
//! and carrying out its actions.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use nix::poll::{PollFd, PollFlags, poll};
use supervise_store::control::{Event, Request};

use super::durable::{Durable, LeaseState};
use super::state::{
    Action, ChildState, Context, EndNear, Input, Outcome, Request as SnapshotRequest,
    SnapshotReason, Snapshots, Stop,
};
use super::{JobConfig, JobState, NO_SHIM_AFTER, poll_timeout};
use crate::child::{Child, Ended, StderrPipe, StderrTail};
use crate::event::{From, JobEvent};
use crate::files::{Files, Found};
use crate::log::Log;
use crate::operator;
use crate::signals::Signals;
use std::time::SystemTime;
use supervise_store::clock::{millis, now_unix_ms};

/// The state of watching one life of the child.
pub(super) struct Watch<'a> {
    cfg: &'a JobConfig,
    log: &'a Log,
    signals: &'a Signals,
    expected_from: Option<u64>,
    inbox: Vec<u8>,
    /// The program initialised the shim.
    connected: bool,
    /// The control channel is open (it closes when the program ends or closes it).
    control_open: bool,
    next_snapshot: Instant,
    /// Where the child stands: running, hung, or being stopped.
    state: ChildState,
    /// The snapshot requests: one running or not, and a follow-up owed.
    snapshots: Snapshots,
    /// This life told that a snapshot cannot be taken without the shim.
    warned_no_shim: bool,
    last_alive_line: Option<Instant>,
    /// Operator clients connected, and those waiting for the snapshot in flight or the next.
    clients: Vec<operator::Client>,
    waiting_now: Vec<operator::Client>,
    waiting_next: Vec<operator::Client>,
    /// When the program last showed progress (a safe point reached).
    last_progress: Instant,
    /// Snapshots durable since the last look: (number, ms from the request to durable).
    done: Vec<(u64, u64)>,
    /// What each of those snapshots cost the program, for the schedule, and whether it was
    /// the life's first (which stores whole what a fresh start has: an upper bound).
    costs: Vec<(Duration, bool)>,
    /// Snapshots this life has taken.
    taken: u64,
    /// When the last scheduled snapshot was asked for (or the life began).
    last_scheduled: Instant,
    /// When the snapshot in flight was asked for, if this supervisor asked.
    asked_at: Option<Instant>,
    /// With durable tiers: snapshots not yet on every tier, and when each was asked for.
    not_off_node: Vec<(u64, Instant)>,
    /// Inside a Slurm batch job: its end time, watched.
    end_time: Option<&'a crate::slurm::EndTime>,
    /// The program reached a safe point (a beat or a snapshot) since it started.
    reached_safe_point: bool,
    /// This supervisor told that the program does not use the shim.
    said_no_shim: bool,
    /// The pipe its stderr goes through, and the last lines of it.
    stderr_pipe: Option<&'a StderrPipe>,
    stderr_tail: StderrTail,
    /// The shim said the program's entries do not fit the snapshot: its `RestoreMismatch`.
    mismatch: Option<JobEvent>,
    /// The durable tiers, if any.
    durable: Option<&'a Durable>,
    /// When a stop began (a signal, or the lease).
    stop_began: Option<Instant>,
    /// The lease was lost, why, and by when the program must have ended.
    lease_lost: Option<(String, Instant)>,
    /// File mode: the capture of the code's own checkpoint files.
    files: Option<&'a Files>,
    /// When this life started, on the clock files are stamped with.
    started_at: SystemTime,
    /// File mode: when the newest checkpoint stored in this life was written (ms since the
    /// epoch).
    last_checkpoint_unix_ms: Option<u64>,
    /// File mode: this life told that the code cannot be asked for a checkpoint.
    told_no_ask: bool,
    /// File mode: the code wrote that it got a stop signal (its `stop_said`).
    stop_said: bool,
    /// File mode: the step this life was resumed from, until its first checkpoint is checked.
    resumed_step: Option<u64>,
}

/// How one life of the child went.
pub(super) struct Life {
    /// How it ended.
    pub outcome: Outcome,
    /// It reached a safe point (a beat or a snapshot).
    pub reached_safe_point: bool,
    /// It initialised the shim.
    pub connected: bool,
    /// This supervisor has told that the program does not use the shim.
    pub said_no_shim: bool,
    /// The last lines of its stderr.
    pub stderr_tail: StderrTail,
    /// The shim said the program's entries do not fit the snapshot: its `RestoreMismatch`.
    pub mismatch: Option<JobEvent>,
    /// When a stop began, if one did.
    pub stop_began: Option<Instant>,
    /// Why the job's lease was lost, if it was (the program was stopped for it).
    pub lease_lost: Option<String>,
}

impl<'a> Watch<'a> {
    /// Starts watching a life restored from `expected_from`.
    pub(super) fn new(
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
            // Set from the job's schedule when the life's watch begins.
            next_snapshot: Instant::now(),
            last_scheduled: Instant::now(),
            costs: Vec::new(),
            taken: 0,
            state: ChildState::Running,
            snapshots: Snapshots::Idle { owed: false },
            warned_no_shim: false,
            last_alive_line: None,
            clients: Vec::new(),
            waiting_now: Vec::new(),
            waiting_next: Vec::new(),
            last_progress: Instant::now(),
            done: Vec::new(),
            not_off_node: Vec::new(),
            asked_at: None,
            end_time: None,
            reached_safe_point: false,
            said_no_shim,
            stderr_pipe,
            stderr_tail: StderrTail::default(),
            mismatch: None,
            durable: None,
            stop_began: None,
            lease_lost: None,
            files: None,
            started_at: SystemTime::now(),
            last_checkpoint_unix_ms: None,
            told_no_ask: false,
            stop_said: false,
            resumed_step: None,
        }
    }

    /// File mode: takes the checkpoints the code writes as its snapshots, and asks it for
    /// stops (and checkpoints) its way.
    pub(super) fn with_files(
        mut self,
        files: Option<&'a Files>,
        resumed_step: Option<u64>,
    ) -> Self {
        self.files = files;
        self.resumed_step = resumed_step;
        self
    }

    /// What the capture thread found: stored checkpoints count as snapshots.
    fn take_found(&mut self, child: &Child, found: Vec<Found>) {
        for f in found {
            match f {
                Found::Captured(c) => {
                    self.last_checkpoint_unix_ms = Some(c.modified_unix_ms);
                    self.handle_event(child, Event::SnapshotDone(c.report));
                    if let Some(why) = &c.retention_failed {
                        self.log.emit(&retention_failed(why));
                    }
                    if let (Some(resumed_step), Some(step)) = (self.resumed_step.take(), c.step)
                        && step <= resumed_step
                    {
                        self.log
                            .emit(&JobEvent::ResumeIgnored { resumed_step, step });
                    }
                }
                other => tell_found(self.log, other),
            }
        }
    }

    /// File mode: whether a life that ended `how` while nobody asked it to stop stopped by
    /// itself after a checkpoint: an exit 0 without the code's done file, or one of its clean
    /// exit codes right after a checkpoint it wrote (within 10 s of the exit).
    fn stopped_itself(&self, how: Ended, finished: bool) -> bool {
        let Some(files) = self.files else {
            return false;
        };
        let recent = self.last_checkpoint_unix_ms.is_some_and(|ms| {
            now_unix_ms().saturating_sub(ms) <= STOPPED_ITSELF_WITHIN.as_millis() as u64
        });
        let said = files.spec().stop_said.is_none() || self.stop_said;
        match how {
            Ended::Exited(0) => !finished,
            Ended::Exited(code) => files.spec().clean_exits.contains(&code) && recent && said,
            Ended::Signaled(_) => false,
        }
    }

    /// Inside a Slurm batch job: stops the program after a final snapshot, to requeue the
    /// job, when its end time comes within what that snapshot needs.
    pub(super) fn with_end_time(mut self, end_time: Option<&'a crate::slurm::EndTime>) -> Self {
        self.end_time = end_time;
        self
    }

    /// Stops the program to requeue the job when its end is within the final snapshot's lead
    /// (the margin and twice the slowest recent snapshot); tells when the end cannot be read.
    fn watch_end_time(&mut self, child: &Child, state: &JobState) {
        let (Some(end_time), Some(slurm)) = (self.end_time, &self.cfg.slurm) else {
            return;
        };
        if let Some(error) = end_time.take_error() {
            self.log.emit(&JobEvent::SlurmEndUnknown { error });
        }
        if !self.state.takes_snapshots() {
            return;
        }
        if let Some(left) = end_time.near(slurm.margin, &state.recent_snapshot_ms) {
            self.stop_began.get_or_insert_with(Instant::now);
            let left_ms = millis(left);
            self.step(
                child,
                Input::Stop(Stop::Requeue(EndNear::EndTime { left_ms })),
            );
        }
    }

    /// Watches the durable tiers too: reports their uploads, nudges them after each snapshot,
    /// and stops the program when the lease is lost.
    pub(super) fn with_durable(mut self, durable: Option<&'a Durable>) -> Self {
        self.durable = durable;
        self
    }

    /// Tells the uploads' reports; stops the program when the lease is lost or about to
    /// expire, and kills it if it is still running when the lease may expire.
    fn watch_durable(&mut self, child: &Child) {
        let Some(durable) = self.durable else { return };
        durable.report(self.log);
        if let Some((_, deadline)) = &self.lease_lost {
            if Instant::now() >= *deadline {
                child.kill_group(nix::sys::signal::Signal::SIGKILL);
            }
            return;
        }
        if let LeaseState::Stop { why, deadline } = durable.lease_state() {
            self.log.emit(&JobEvent::LeaseLost {
                tier: durable.lease_tier().to_owned(),
                why: why.clone(),
            });
            // Ended a little before the lease can expire: a margin for the kill and the reap.
            let margin = Duration::from_millis(500);
            self.lease_lost = Some((why, deadline.checked_sub(margin).unwrap_or(deadline)));
            self.stop_began.get_or_insert_with(Instant::now);
            self.step(child, Input::Stop(Stop::Signal(libc::SIGTERM)));
        }
    }

    /// Passes on what the program wrote to its stderr, keeping the last lines.
    fn pass_stderr(&mut self) {
        if let Some(pipe) = self.stderr_pipe {
            pipe.pass(&mut self.stderr_tail);
        }
        if let Some(said) = self.files.and_then(|f| f.spec().stop_said.as_deref())
            && !self.stop_said
            && self.stderr_tail.contains(said)
        {
            self.stop_said = true;
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
                    if !self.connected && self.files.is_none() {
                        client.reply(&operator::Reply::error(
                            "the program has not initialised the shim (yet)",
                        ));
                    } else if !self.state.takes_operator_snapshots() {
                        client.reply(&operator::Reply::error("the program is being stopped"));
                    } else if self.snapshots.in_flight() {
                        // The one in flight was captured before the request: wait for the next.
                        self.snapshots = self.snapshots.request(SnapshotReason::Operator).0;
                        self.waiting_next.push(client);
                    } else {
                        self.request_snapshot(child, SnapshotReason::Operator);
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

    /// Feeds `input` to the child's state machine and carries out its actions.
    fn step(&mut self, child: &Child, input: Input) {
        // When the lease is lost, the program must have ended before it can expire.
        let stop_timeout = match &self.lease_lost {
            Some((_, by)) => self
                .cfg
                .stop_timeout
                .min(by.saturating_duration_since(Instant::now()) / 2),
            None => self.cfg.stop_timeout,
        };
        let cx = Context {
            // A file-mode code is asked for stops its own way, and shows progress by writing
            // checkpoints.
            connected: self.connected || self.files.is_some(),
            stop_timeout,
            hang_timeout: self.cfg.hang_timeout,
        };
        let (next, actions) = self.state.step(input, &cx);
        self.state = next;
        for action in actions {
            match action {
                Action::Emit(event) => self.log.emit(&event),
                Action::SendStop => match self.files {
                    Some(files) => {
                        if !files.ask(&files.spec().ask_stop, child) {
                            child.kill_group(nix::sys::signal::Signal::SIGTERM);
                        }
                    }
                    None => self.send(child, &Request::Stop),
                },
                Action::AskSnapshot if self.files.is_some() => {
                    if let Some(files) = self.files {
                        files.ask(&files.spec().ask_checkpoint, child);
                    }
                }
                Action::AskSnapshot => {
                    if !self.snapshots.in_flight() {
                        self.send(child, &Request::Snapshot);
                        self.asked_at = Some(Instant::now());
                        self.snapshots = self.snapshots.sent();
                    }
                }
                Action::Kill(signal) => child.kill_group(signal),
            }
        }
    }

    /// Watches the life to its end.
    pub(super) fn run(
        mut self,
        child: &mut Child,
        server: &operator::Server,
        state: &mut JobState,
    ) -> Result<Life> {
        self.last_scheduled = Instant::now();
        self.next_snapshot = self.last_scheduled + state.schedule.every();
        loop {
            // Signals first: when a batch system signals the supervisor and the child at once,
            // the child's exit must be read as the stop it is, not as a crash.
            self.handle_signals(child);
            if let Some(how) = child.try_wait().context("cannot wait for the child")? {
                self.pass_stderr();
                self.read_control(child);
                // Every checkpoint the code left is stored before what to restore is chosen.
                if let Some(files) = self.files {
                    let found = files.settle();
                    self.take_found(child, found);
                }
                self.record_done(state);
                let finished = match (how, self.files) {
                    (Ended::Exited(0), Some(files)) => files.finished(self.started_at),
                    _ => true,
                };
                let mut outcome = self.state.outcome(how, finished);
                if matches!(outcome, Outcome::Ended(_)) && self.stopped_itself(how, finished) {
                    outcome = Outcome::StoppedItself(how);
                }
                let gone = operator::Reply::error(format!("the program ended ({how})"));
                // Those waiting for this snapshot and those waiting for the next one.
                for mut client in self
                    .waiting_now
                    .drain(..)
                    .chain(self.waiting_next.drain(..))
                {
                    client.reply(&gone);
                }
                return Ok(Life {
                    outcome,
                    reached_safe_point: self.reached_safe_point,
                    connected: self.connected,
                    said_no_shim: self.said_no_shim,
                    stderr_tail: self.stderr_tail,
                    mismatch: self.mismatch,
                    stop_began: self.stop_began,
                    lease_lost: self.lease_lost.map(|(why, _)| why),
                });
            }
            let now = Instant::now();
            let mut deadline = self.next_snapshot;
            if let Some(stop_by) = self.state.deadline() {
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
            if let Some(files) = self.files {
                let found = files.found();
                self.take_found(child, found);
            }
            self.record_done(state);
            self.watch_durable(child);
            self.watch_end_time(child, state);
            if let Some(durable) = self.durable {
                state.status.last_off_node = durable.safe_everywhere();
            }
            self.serve_operators(child, server, state);
            let now = Instant::now();
            // Without the shim (or in file mode) there is no safe point to see: running is
            // progress, for the service manager's watchdog.
            if !self.connected {
                self.log.progress();
            }
            let since_progress = now.saturating_duration_since(self.last_progress);
            self.step(
                child,
                Input::Tick {
                    now,
                    since_progress,
                },
            );
            if !self.connected
                && self.files.is_none()
                && !self.said_no_shim
                && child.started.elapsed() >= NO_SHIM_AFTER
            {
                self.log.emit(&JobEvent::NoShim {
                    after_ms: millis(child.started.elapsed()),
                    hang_timeout: self.cfg.hang_timeout.is_some(),
                });
                self.said_no_shim = true;
            }
            if now >= self.next_snapshot {
                self.last_scheduled = now;
                self.next_snapshot = now + state.schedule.every();
                if self.state.takes_snapshots() {
                    self.request_snapshot(child, SnapshotReason::Schedule);
                }
            }
        }
    }

    /// Notes the snapshots that completed for `status`, and how long each took to be safe:
    /// durable, and with durable tiers on every one of them.
    fn record_done(&mut self, state: &mut JobState) {
        for (cost, first) in self.costs.drain(..) {
            let choice = match first {
                true => state.schedule.note_first_cost(cost),
                false => state.schedule.note_cost(cost),
            };
            if let Some(choice) = choice {
                state.interval_chosen(choice, self.log);
                // The next scheduled snapshot moves with the interval.
                self.next_snapshot = self.last_scheduled + Duration::from_millis(choice.every_ms);
            }
        }
        let now = Instant::now();
        if let Some(&(seq, _)) = self.done.iter().max() {
            state.status.last_snapshot = Some(seq);
            state.status.last_snapshot_unix_ms = Some(now_unix_ms());
        }
        for (seq, ms) in self.done.drain(..) {
            match self.durable {
                Some(_) => {
                    let asked = now.checked_sub(Duration::from_millis(ms)).unwrap_or(now);
                    self.not_off_node.push((seq, asked));
                }
                None => state.note_snapshot_time(ms),
            }
        }
        if let Some(everywhere) = self.durable.and_then(|d| d.safe_everywhere()) {
            let mut safe = Vec::new();
            // Only the snapshot that reached them counts: older ones were passed over.
            self.not_off_node.retain(|&(seq, asked)| {
                if seq == everywhere {
                    safe.push(millis(now.saturating_duration_since(asked)));
                }
                seq > everywhere
            });
            for ms in safe {
                state.note_snapshot_time(ms);
            }
        }
    }

    fn handle_signals(&mut self, child: &Child) {
        // The requeue signal first: a batch system that sends it and SIGTERM together (a
        // preemption with a grace time) means a requeue.
        for stop in super::take_stops(self.signals, self.cfg, self.end_time) {
            self.stop_began.get_or_insert_with(Instant::now);
            self.step(child, Input::Stop(stop));
        }
        if self.signals.take_snapshot() {
            self.request_snapshot(child, SnapshotReason::Signal);
        }
    }

    fn request_snapshot(&mut self, child: &Child, reason: SnapshotReason) {
        if let Some(files) = self.files {
            // The code checkpoints when asked its way, or on its own schedule; what it writes
            // is stored as it appears.
            if files.ask(&files.spec().ask_checkpoint, child) {
                self.log
                    .detail(&format!("asked the program for a checkpoint ({reason})"));
            } else if !self.told_no_ask {
                self.told_no_ask = true;
                let schedule = files
                    .spec()
                    .schedule
                    .map(|d| format!(" (every {})", crate::human::duration(d)))
                    .unwrap_or_default();
                self.log.detail(&format!(
                    "a checkpoint was asked for ({reason}), but this code cannot be asked for \
                     one: it writes them on its own schedule{schedule}"
                ));
            }
            return;
        }
        if !self.connected {
            if !self.warned_no_shim && !self.said_no_shim {
                self.log.emit(&JobEvent::NoSnapshotWithoutShim);
                self.warned_no_shim = true;
            }
            return;
        }
        let (next, request) = self.snapshots.request(reason);
        self.snapshots = next;
        match request {
            SnapshotRequest::Coalesced => self.log.detail(&format!(
                "snapshot requested ({reason}) while one is running: coalesced"
            )),
            SnapshotRequest::Send => {
                self.log
                    .detail(&format!("requesting a snapshot ({reason})"));
                self.send(child, &Request::Snapshot);
                self.asked_at = Some(Instant::now());
            }
        }
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
                self.log.progress();
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
                self.log.progress();
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
            Event::SnapshotDone(mut r) => {
                self.reached_safe_point = true;
                let (next, follow_up) = self.snapshots.done();
                self.snapshots = next;
                self.last_progress = Instant::now();
                // From the request (the wait for a safe point included), when one was sent.
                let asked = self.asked_at.take().map_or(0, |t| millis(t.elapsed()));
                self.done.push((r.seq, r.duration_ms.max(asked)));
                self.costs
                    .push((crate::interval::cost_of(&r), self.taken == 0));
                self.taken += 1;
                if let Some(durable) = self.durable {
                    durable.nudge();
                }
                self.answer_waiting(&operator::Reply {
                    ok: true,
                    error: None,
                    status: None,
                    snapshot: Some(r.seq),
                });
                let removed = std::mem::take(&mut r.removed);
                self.log.emit(&snapshot_event(r));
                if !removed.is_empty() {
                    self.log
                        .detail(&format!("retention removed snapshots {removed:?}"));
                }
                if follow_up && self.state.takes_snapshots() {
                    self.request_snapshot(child, SnapshotReason::FollowUp);
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
                detail,
            } => {
                let mismatch = JobEvent::RestoreMismatch {
                    seq,
                    entry,
                    stored_bytes,
                    wanted_bytes,
                    detail,
                };
                self.log.emit(&mismatch);
                self.mismatch = Some(mismatch);
            }
            Event::SnapshotFailed { error } => {
                self.snapshots = self.snapshots.failed();
                self.answer_waiting(&operator::Reply::error(format!("snapshot failed: {error}")));
                self.log.emit(&JobEvent::SnapshotFailed { error });
            }
            Event::Warning { kind, message } => {
                self.log.emit(&JobEvent::ShimWarning {
                    warning: kind,
                    message,
                });
            }
            // Damage found while the program restored (after the start-time check): the shim
            // has set the snapshot aside and the program ends; it restarts like a crash.
            Event::RestoreDamaged { seq, why } => {
                self.log.emit(&JobEvent::SnapshotSetAside { seq, why });
            }
            // The ranks' own protocol: the relay (`crate::ranks`) answers it, never the program.
            Event::Join { .. }
            | Event::EpochAt { .. }
            | Event::PartSkipped { .. }
            | Event::ChunkClaims { .. }
            | Event::ChunksStored { .. } => {}
        }
    }
}

/// A clean exit code within this long of the code's last checkpoint is a stop, not a crash.
const STOPPED_ITSELF_WITHIN: Duration = Duration::from_secs(10);

/// Tells what the capture of a file-mode code found (outside a life's watch: before a start).
pub(super) fn tell_found(log: &Log, found: Found) {
    match found {
        Found::Captured(c) => {
            log.emit(&snapshot_event(c.report));
            if let Some(why) = &c.retention_failed {
                log.emit(&retention_failed(why));
            }
        }
        Found::Refused { path, why } => log.emit(&JobEvent::CheckpointRefused { path, why }),
        Found::Failed { error } => log.emit(&JobEvent::SnapshotFailed { error }),
    }
}

/// File mode: retention failed after a durable snapshot, as the shim would say it.
fn retention_failed(why: &str) -> JobEvent {
    JobEvent::ShimWarning {
        warning: supervise_store::control::WarningKind::RetentionFailed,
        message: format!("the snapshot is durable, but retention after it failed: {why}"),
    }
}

/// The event of a durable snapshot.
fn snapshot_event(r: supervise_store::writer::SnapshotReport) -> JobEvent {
    JobEvent::Snapshot {
        seq: r.seq,
        tag: r.tag,
        bytes_total: r.bytes_total,
        bytes_new: r.bytes_new,
        bytes_written: r.bytes_written,
        bytes_compacted: r.bytes_compacted,
        duration_ms: r.duration_ms,
        pause_us: r.pause_us,
        writer_cpu_us: r.writer_cpu_us,
    }
}
