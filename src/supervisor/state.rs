//! The states of one life of the child and their transitions, in one place: a pure function
//! from a state and an input to the next state and the actions to take. [`super::watch`] feeds
//! it what happens (a stop signal, the clock) and carries out the actions.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::event::JobEvent;
use crate::human;
use supervise_store::clock::millis;

/// Where one life of the child stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildState {
    /// Running normally.
    Running,
    /// It reached no safe point for `--hang-timeout`: being escalated.
    Hung(Hang),
    /// The supervisor was told to stop (why: `stop`) and is stopping the child.
    Stopping {
        /// Why.
        stop: Stop,
        /// When the child is killed if it has not stopped (`--stop-timeout`).
        deadline: Instant,
        /// SIGKILL was sent already.
        killed: bool,
    },
}

/// How far a hang was escalated: a snapshot request, then SIGTERM, then SIGKILL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hang {
    /// A snapshot was asked for; SIGTERM follows at `until`.
    Asked {
        /// When to send SIGTERM.
        until: Instant,
    },
    /// SIGTERM was sent; SIGKILL follows at `until`.
    Terminated {
        /// When to send SIGKILL.
        until: Instant,
    },
    /// SIGKILL was sent.
    Killed,
}

/// Why the supervisor stops the child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// It got this signal (SIGINT, SIGTERM, SIGHUP): it stops after a final snapshot, and the
    /// job resumes when the command runs again.
    Signal(i32),
    /// The batch job it runs in is about to end: it stops after a final snapshot, then
    /// requeues the job, which resumes from that snapshot.
    Requeue(EndNear),
}

/// How the supervisor learnt that its batch job is about to end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndNear {
    /// The batch system's signal (`--requeue-signal`, or SIGTERM at the time limit).
    Signal(i32),
    /// The job's end time is this close: no nearer than a final snapshot needs.
    EndTime {
        /// Time left then, in ms.
        left_ms: u64,
    },
}

impl Stop {
    /// What stops the child, as the `stopping` event names it: a signal's name, or
    /// `end-time`.
    pub fn name(self) -> &'static str {
        match self {
            Stop::Signal(sig) | Stop::Requeue(EndNear::Signal(sig)) => signal_name(sig),
            Stop::Requeue(EndNear::EndTime { .. }) => "end-time",
        }
    }
}

/// What happens to a life.
#[derive(Clone, Copy, Debug)]
pub enum Input {
    /// The supervisor must stop the child (a signal, or its batch job's end near).
    Stop(Stop),
    /// Time passed: it is `now`, and the program last showed progress `since_progress` ago.
    Tick {
        /// Now.
        now: Instant,
        /// Since the last safe point, snapshot or hello.
        since_progress: Duration,
    },
}

/// What the watcher knows that the transitions depend on.
#[derive(Clone, Copy, Debug)]
pub struct Context {
    /// The program initialised the shim.
    pub connected: bool,
    /// `--stop-timeout`.
    pub stop_timeout: Duration,
    /// `--hang-timeout`.
    pub hang_timeout: Option<Duration>,
}

/// What the watcher must do, in order.
#[derive(Debug)]
pub enum Action {
    /// Say (and record) this event.
    Emit(JobEvent),
    /// Ask the shim to take a final snapshot and stop.
    SendStop,
    /// Ask the shim for a snapshot, unless one is in flight.
    AskSnapshot,
    /// Send this signal to the child's process group.
    Kill(Signal),
}

/// How one life ended, from the state it was in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It ended by itself (or was killed by someone else): how.
    Ended(crate::child::Ended),
    /// It stopped reaching safe points and was stopped: how it ended.
    Hung(crate::child::Ended),
    /// The supervisor was told to stop (why) and stopped it.
    Stopped(Stop),
    /// File mode: nobody asked, but the code stopped cleanly after a checkpoint (how): a
    /// SIGTERM sent to it directly (a batch system's), or a limit of its own (`mdrun -maxh`).
    StoppedItself(crate::child::Ended),
}

/// A signal's name (`SIGTERM`), or "a signal".
pub fn signal_name(sig: i32) -> &'static str {
    Signal::try_from(sig).map_or("a signal", Signal::as_str)
}

fn signalled(signal: Signal, why: String) -> Action {
    Action::Emit(JobEvent::Signalled {
        signal: signal.as_str().into(),
        why,
    })
}

impl ChildState {
    /// The next state after `input`, and the actions to take.
    pub fn step(self, input: Input, cx: &Context) -> (ChildState, Vec<Action>) {
        match (self, input) {
            // The batch system's signals never cut a stop short: its requeue signal during
            // any stop, its SIGTERM at the time limit (which arrives as a requeue), and any
            // SIGTERM after its requeue signal (a preemption's grace time sends both).
            // SIGKILL follows after its own grace; the final snapshot goes on.
            (ChildState::Stopping { .. }, Input::Stop(Stop::Requeue(_)))
            | (
                ChildState::Stopping {
                    stop: Stop::Requeue(EndNear::Signal(_)),
                    ..
                },
                Input::Stop(Stop::Signal(libc::SIGTERM)),
            ) => (self, Vec::new()),
            // A SIGTERM during a stop the end time began is a cancel (scancel): the stop goes
            // on, and the job is not requeued.
            (
                ChildState::Stopping {
                    stop: Stop::Requeue(EndNear::EndTime { .. }),
                    deadline,
                    killed,
                },
                Input::Stop(cancel @ Stop::Signal(libc::SIGTERM)),
            ) => (
                ChildState::Stopping {
                    stop: cancel,
                    deadline,
                    killed,
                },
                Vec::new(),
            ),
            (ChildState::Stopping { stop, deadline, .. }, Input::Stop(again)) => (
                ChildState::Stopping {
                    stop,
                    deadline,
                    killed: true,
                },
                vec![
                    signalled(Signal::SIGKILL, format!("{} again", again.name())),
                    Action::Kill(Signal::SIGKILL),
                ],
            ),
            (ChildState::Running | ChildState::Hung(_), Input::Stop(stop)) => {
                let stopping = ChildState::Stopping {
                    stop,
                    deadline: Instant::now() + cx.stop_timeout,
                    killed: self == ChildState::Hung(Hang::Killed),
                };
                let said = Action::Emit(JobEvent::Stopping {
                    signal: stop.name().into(),
                    requeue: matches!(stop, Stop::Requeue(_)),
                    shim: cx.connected,
                    timeout_ms: millis(cx.stop_timeout),
                });
                let stop = if cx.connected {
                    Action::SendStop
                } else {
                    Action::Kill(Signal::SIGTERM)
                };
                (stopping, vec![said, stop])
            }
            (
                ChildState::Stopping {
                    stop,
                    deadline,
                    killed: false,
                },
                Input::Tick { now, .. },
            ) if now >= deadline => (
                ChildState::Stopping {
                    stop,
                    deadline,
                    killed: true,
                },
                vec![
                    signalled(
                        Signal::SIGKILL,
                        format!(
                            "the program did not stop within {} (--stop-timeout)",
                            human::duration(cx.stop_timeout)
                        ),
                    ),
                    Action::Kill(Signal::SIGKILL),
                ],
            ),
            (ChildState::Stopping { .. }, Input::Tick { .. }) => (self, Vec::new()),
            (
                ChildState::Running | ChildState::Hung(_),
                Input::Tick {
                    now,
                    since_progress,
                },
            ) => {
                let Some(limit) = cx.hang_timeout.filter(|_| cx.connected) else {
                    return (self, Vec::new());
                };
                let grace = cx.stop_timeout.min(limit);
                match self {
                    ChildState::Running if since_progress >= limit => (
                        ChildState::Hung(Hang::Asked { until: now + grace }),
                        vec![
                            Action::Emit(JobEvent::Hung {
                                timeout_ms: millis(limit),
                            }),
                            Action::AskSnapshot,
                        ],
                    ),
                    ChildState::Hung(Hang::Asked { until }) if now >= until => (
                        ChildState::Hung(Hang::Terminated { until: now + grace }),
                        vec![
                            signalled(Signal::SIGTERM, "hung program".into()),
                            Action::Kill(Signal::SIGTERM),
                        ],
                    ),
                    ChildState::Hung(Hang::Terminated { until }) if now >= until => (
                        ChildState::Hung(Hang::Killed),
                        vec![
                            signalled(Signal::SIGKILL, "hung program did not stop".into()),
                            Action::Kill(Signal::SIGKILL),
                        ],
                    ),
                    _ => (self, Vec::new()),
                }
            }
        }
    }

    /// Whether snapshots are still asked for (on schedule and as follow-ups): not once the
    /// child is being stopped.
    pub fn takes_snapshots(self) -> bool {
        !matches!(self, ChildState::Stopping { .. })
    }

    /// Whether an operator may ask for a snapshot: not while the child is hung or stopping.
    pub fn takes_operator_snapshots(self) -> bool {
        self == ChildState::Running
    }

    /// The next time the state changes by itself (a stop's deadline), if any.
    pub fn deadline(self) -> Option<Instant> {
        match self {
            ChildState::Stopping { deadline, .. } => Some(deadline),
            _ => None,
        }
    }

    /// How the life ended, given how the child ended in this state: a clean exit is the end
    /// when `finished` (in file mode, the code's done file was written; else always);
    /// otherwise a stop or a hang explains it.
    pub fn outcome(self, how: crate::child::Ended, finished: bool) -> Outcome {
        match (self, how) {
            (_, crate::child::Ended::Exited(0)) if finished => Outcome::Ended(how),
            (ChildState::Stopping { stop, .. }, _) => Outcome::Stopped(stop),
            (ChildState::Hung(_), _) => Outcome::Hung(how),
            (ChildState::Running, _) => Outcome::Ended(how),
        }
    }
}

/// Why a snapshot is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotReason {
    /// `--every`.
    Schedule,
    /// SIGUSR1 to the supervisor.
    Signal,
    /// `supervise snapshot`.
    Operator,
    /// A request that arrived while another snapshot was running.
    FollowUp,
}

impl SnapshotReason {
    /// Whether a request for this reason that arrives while a snapshot runs is owed a new
    /// one afterwards (the running one captured the state before it was asked for). A
    /// scheduled one is not: the schedule comes round again.
    fn follows_up(self) -> bool {
        matches!(self, SnapshotReason::Signal | SnapshotReason::Operator)
    }
}

impl std::fmt::Display for SnapshotReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SnapshotReason::Schedule => "schedule",
            SnapshotReason::Signal => "SIGUSR1",
            SnapshotReason::Operator => "operator",
            SnapshotReason::FollowUp => "coalesced request",
        })
    }
}

/// The snapshot requests of one life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Snapshots {
    /// None running. `owed`: a request came in during one that failed, and is made good when
    /// the next one completes.
    Idle {
        /// A follow-up is owed.
        owed: bool,
    },
    /// One was asked for and has not completed or failed.
    InFlight {
        /// Another is asked for when it completes.
        follow_up: bool,
    },
}

/// What to do with a snapshot request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Ask the shim now.
    Send,
    /// One is running: the request was folded into it (or into its follow-up).
    Coalesced,
}

impl Snapshots {
    /// A request for `reason`: send it, or fold it into the one running.
    pub fn request(self, reason: SnapshotReason) -> (Snapshots, Request) {
        match self {
            Snapshots::Idle { owed } => (Snapshots::InFlight { follow_up: owed }, Request::Send),
            Snapshots::InFlight { follow_up } => (
                Snapshots::InFlight {
                    follow_up: follow_up || reason.follows_up(),
                },
                Request::Coalesced,
            ),
        }
    }

    /// A request already sent (a hang's), so that a reply is not asked for twice.
    pub fn sent(self) -> Snapshots {
        match self {
            Snapshots::Idle { owed } => Snapshots::InFlight { follow_up: owed },
            running => running,
        }
    }

    /// One completed: whether a follow-up is owed now.
    pub fn done(self) -> (Snapshots, bool) {
        match self {
            Snapshots::Idle { owed } | Snapshots::InFlight { follow_up: owed } => {
                (Snapshots::Idle { owed: false }, owed)
            }
        }
    }

    /// One failed: a follow-up owed waits for the next to complete.
    pub fn failed(self) -> Snapshots {
        match self {
            Snapshots::Idle { owed } | Snapshots::InFlight { follow_up: owed } => {
                Snapshots::Idle { owed }
            }
        }
    }

    /// Whether one is running.
    pub fn in_flight(self) -> bool {
        matches!(self, Snapshots::InFlight { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx(connected: bool) -> Context {
        Context {
            connected,
            stop_timeout: Duration::from_secs(10),
            hang_timeout: Some(Duration::from_secs(4)),
        }
    }

    fn kills(actions: &[Action]) -> Vec<Signal> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Kill(s) => Some(*s),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_hang_escalates_from_a_snapshot_to_sigterm_to_sigkill() {
        let t0 = Instant::now();
        let tick = |now, since: u64| Input::Tick {
            now,
            since_progress: Duration::from_secs(since),
        };
        let (s, a) = ChildState::Running.step(tick(t0, 3), &cx(true));
        assert_eq!((s, a.len()), (ChildState::Running, 0));
        // Without the shim there is no progress to miss.
        let (s, _) = ChildState::Running.step(tick(t0, 30), &cx(false));
        assert_eq!(s, ChildState::Running);
        let (s, a) = ChildState::Running.step(tick(t0, 4), &cx(true));
        let grace = Duration::from_secs(4);
        assert_eq!(s, ChildState::Hung(Hang::Asked { until: t0 + grace }));
        assert!(a.iter().any(|x| matches!(x, Action::AskSnapshot)));
        let (same, a) = s.step(tick(t0 + Duration::from_secs(1), 5), &cx(true));
        assert_eq!((same, a.len()), (s, 0));
        let t1 = t0 + grace;
        let (s, a) = s.step(tick(t1, 8), &cx(true));
        assert_eq!(s, ChildState::Hung(Hang::Terminated { until: t1 + grace }));
        assert_eq!(kills(&a), [Signal::SIGTERM]);
        let (s, a) = s.step(tick(t1 + grace, 12), &cx(true));
        assert_eq!(s, ChildState::Hung(Hang::Killed));
        assert_eq!(kills(&a), [Signal::SIGKILL]);
        let (s, a) = s.step(tick(t1 + grace * 2, 16), &cx(true));
        assert_eq!((s, a.len()), (ChildState::Hung(Hang::Killed), 0));
        assert!(!s.takes_operator_snapshots() && s.takes_snapshots());
    }

    #[test]
    fn a_stop_asks_the_shim_or_terminates_then_kills_once() {
        let (s, a) = ChildState::Running.step(Input::Stop(Stop::Signal(15)), &cx(true));
        assert!(a.iter().any(|x| matches!(x, Action::SendStop)) && kills(&a).is_empty());
        let ChildState::Stopping {
            stop: Stop::Signal(15),
            deadline,
            killed: false,
        } = s
        else {
            panic!("{s:?}");
        };
        assert!(!s.takes_snapshots());
        let (_, a) = ChildState::Running.step(Input::Stop(Stop::Signal(2)), &cx(false));
        assert_eq!(kills(&a), [Signal::SIGTERM]);
        let late = Input::Tick {
            now: deadline,
            since_progress: Duration::ZERO,
        };
        let (s, a) = s.step(late, &cx(true));
        assert_eq!(kills(&a), [Signal::SIGKILL]);
        let (s, a) = s.step(late, &cx(true));
        assert!(a.is_empty());
        // A second stop signal kills at once, whatever was sent before; the first signal
        // stays the one the supervisor reports.
        let (s, a) = s.step(Input::Stop(Stop::Signal(2)), &cx(true));
        assert_eq!(kills(&a), [Signal::SIGKILL]);
        assert_eq!(
            s.outcome(crate::child::Ended::Signaled(9), true),
            Outcome::Stopped(Stop::Signal(15))
        );
        assert_eq!(
            s.outcome(crate::child::Ended::Exited(0), true),
            Outcome::Ended(crate::child::Ended::Exited(0))
        );
    }

    #[test]
    fn a_stop_to_requeue_is_not_cut_short_by_the_batch_systems_sigterm() {
        let near = Stop::Requeue(EndNear::EndTime { left_ms: 70_000 });
        let (s, a) = ChildState::Running.step(Input::Stop(near), &cx(true));
        assert!(a.iter().any(|x| matches!(x, Action::SendStop)));
        assert!(a.iter().any(|x| matches!(
            x,
            Action::Emit(JobEvent::Stopping { requeue: true, signal, .. }) if signal == "end-time"
        )));
        // Slurm's SIGTERM at the limit arrives as a requeue: nothing changes.
        let at_limit = Stop::Requeue(EndNear::Signal(libc::SIGTERM));
        let (s2, a) = s.step(Input::Stop(at_limit), &cx(true));
        assert!(a.is_empty() && s2 == s);
        let (s3, a) = s.step(Input::Stop(Stop::Requeue(EndNear::Signal(12))), &cx(true));
        assert!(a.is_empty() && s3 == s);
        // After the batch system's requeue signal, its SIGTERM is part of the same end.
        let signalled = Stop::Requeue(EndNear::Signal(12));
        let (by_signal, _) = ChildState::Running.step(Input::Stop(signalled), &cx(true));
        let (same, a) = by_signal.step(Input::Stop(Stop::Signal(libc::SIGTERM)), &cx(true));
        assert!(a.is_empty() && same == by_signal);
        // During a stop the end time began, a SIGTERM cancels the requeue, without a kill.
        let (cancelled, a) = s.step(Input::Stop(Stop::Signal(libc::SIGTERM)), &cx(true));
        assert!(a.is_empty());
        assert_eq!(
            cancelled.outcome(crate::child::Ended::Exited(75), true),
            Outcome::Stopped(Stop::Signal(libc::SIGTERM))
        );
        // During an ordinary stop, the requeue signal changes nothing either.
        let (plain, _) = ChildState::Running.step(Input::Stop(Stop::Signal(15)), &cx(true));
        let (same, a) = plain.step(Input::Stop(Stop::Requeue(EndNear::Signal(12))), &cx(true));
        assert!(a.is_empty() && same == plain);
        // Ctrl-C still kills.
        let (_, a) = s.step(Input::Stop(Stop::Signal(libc::SIGINT)), &cx(true));
        assert_eq!(kills(&a), [Signal::SIGKILL]);
        assert_eq!(
            s.outcome(crate::child::Ended::Exited(75), true),
            Outcome::Stopped(near)
        );
    }

    #[test]
    fn a_clean_exit_without_the_codes_done_file_is_a_stop_when_one_was_asked_for() {
        let exited = crate::child::Ended::Exited(0);
        let (stopping, _) = ChildState::Running.step(Input::Stop(Stop::Signal(15)), &cx(true));
        assert_eq!(
            stopping.outcome(exited, false),
            Outcome::Stopped(Stop::Signal(15))
        );
        assert_eq!(stopping.outcome(exited, true), Outcome::Ended(exited));
        // Unasked, the watcher tells a stop of the code's own from the end.
        assert_eq!(
            ChildState::Running.outcome(exited, false),
            Outcome::Ended(exited)
        );
    }

    #[test]
    fn a_stop_after_a_hang_was_killed_sends_no_second_sigkill_at_its_deadline() {
        let hung = ChildState::Hung(Hang::Killed);
        assert_eq!(
            hung.outcome(crate::child::Ended::Signaled(9), true),
            Outcome::Hung(crate::child::Ended::Signaled(9))
        );
        let (s, _) = hung.step(Input::Stop(Stop::Signal(15)), &cx(true));
        let Some(deadline) = s.deadline() else {
            panic!("{s:?}")
        };
        let (_, a) = s.step(
            Input::Tick {
                now: deadline,
                since_progress: Duration::ZERO,
            },
            &cx(true),
        );
        assert!(a.is_empty());
    }

    #[test]
    fn requests_during_a_snapshot_are_coalesced_and_followed_up_only_when_asked_for() {
        let idle = Snapshots::Idle { owed: false };
        let (s, r) = idle.request(SnapshotReason::Schedule);
        assert_eq!(r, Request::Send);
        let (s, r) = s.request(SnapshotReason::Schedule);
        assert_eq!(r, Request::Coalesced);
        assert_eq!(s.done(), (idle, false));
        let (s, _) = s.request(SnapshotReason::Signal);
        let (s, _) = s.done();
        assert_eq!(s, Snapshots::InFlight { follow_up: true }.done().0);
        let (s, _) = idle.request(SnapshotReason::Schedule);
        let (s, _) = s.request(SnapshotReason::Operator);
        // A failure keeps the follow-up owed until the next one completes.
        let s = s.failed();
        assert_eq!(s, Snapshots::Idle { owed: true });
        let (s, r) = s.request(SnapshotReason::Schedule);
        assert_eq!(r, Request::Send);
        assert_eq!(s.done(), (idle, true));
    }
}
