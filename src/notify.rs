//! Telling a service manager how the job goes, through systemd's notify socket protocol
//! (`Type=notify`; `$NOTIFY_SOCKET`): `READY=1` once the program runs, `STATUS=` with what the
//! job does and its newest snapshot, `STOPPING=1` when the supervisor stops it, and (when the
//! unit sets `WatchdogSec=`, `$WATCHDOG_USEC`) `WATCHDOG=1` every half period while the
//! program makes progress: it reaches safe points (or, without the shim, it runs), or the
//! supervisor is restarting it. A program stuck between safe points stops the pings, and the
//! service manager acts on its watchdog.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use crate::event::JobEvent;
use crate::human;

/// The service manager's variables: the supervisor's alone, never passed to the program.
pub const SUPERVISOR_ONLY_ENV: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// The notifier of a supervisor run under a service manager.
pub struct Notifier {
    shared: Arc<Shared>,
}

/// What the watchdog thread reads.
struct Shared {
    /// `READY=1` was sent.
    ready: AtomicBool,
    /// Until when the job counts as making progress.
    alive_until: Mutex<Instant>,
    /// The watchdog's period, if the unit has one.
    watchdog: Option<Duration>,
}

impl Notifier {
    /// A notifier when the supervisor runs under a service manager (`$NOTIFY_SOCKET` is
    /// set); with a watchdog when `$WATCHDOG_USEC` is set (for this process).
    pub fn from_env() -> Option<Self> {
        std::env::var_os("NOTIFY_SOCKET")?;
        let watchdog = sd_notify::watchdog_enabled().filter(|d| !d.is_zero());
        let shared = Arc::new(Shared {
            ready: AtomicBool::new(false),
            alive_until: Mutex::new(Instant::now() + watchdog.unwrap_or_default()),
            watchdog,
        });
        if let Some(period) = watchdog {
            let weak = Arc::downgrade(&shared);
            let _ = std::thread::Builder::new()
                .name("watchdog".into())
                .spawn(move || ping(&weak, period));
        }
        Some(Self { shared })
    }

    /// The job made progress now: it counts as alive for one watchdog period.
    pub fn progress(&self) {
        self.alive_for(Duration::ZERO);
    }

    /// The job counts as alive for `extra` beyond one watchdog period (a restart's delay).
    fn alive_for(&self, extra: Duration) {
        let Some(period) = self.shared.watchdog else {
            return;
        };
        if let Ok(mut until) = self.shared.alive_until.lock() {
            *until = (*until).max(Instant::now() + period + extra);
        }
    }

    /// Tells the service manager what `event` changes.
    pub fn on_event(&self, event: &JobEvent) {
        let status = match event {
            JobEvent::Spawned { pid, from } => {
                self.progress();
                let status = format!("running (pid {pid}, {from})");
                if !self.shared.ready.swap(true, Ordering::SeqCst) {
                    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
                    return;
                }
                status
            }
            JobEvent::Snapshot {
                seq,
                tag,
                duration_ms,
                ..
            } => {
                self.progress();
                let tag = tag.as_ref().map(|t| format!(" [{t}]")).unwrap_or_default();
                format!(
                    "running; snapshot {seq}{tag} durable (took {})",
                    human::duration(Duration::from_millis(*duration_ms))
                )
            }
            JobEvent::Died { how, .. } => format!("the program died ({how})"),
            JobEvent::Restarting { delay_ms, from } => {
                self.alive_for(Duration::from_millis(*delay_ms));
                format!(
                    "restarting in {} {from}",
                    human::duration(Duration::from_millis(*delay_ms))
                )
            }
            JobEvent::Stopping { .. } => {
                send(&[
                    NotifyState::Stopping,
                    NotifyState::Status("stopping: taking a final snapshot"),
                ]);
                return;
            }
            JobEvent::End { detail, .. } => detail.clone(),
            _ => return,
        };
        send(&[NotifyState::Status(&status)]);
    }
}

/// Sends `states`; a service manager that went away loses the message, not the job.
fn send(states: &[NotifyState]) {
    let _ = sd_notify::notify(states);
}

/// The watchdog thread: `WATCHDOG=1` every half period while the job is alive, until the
/// notifier is dropped.
fn ping(shared: &Weak<Shared>, period: Duration) {
    let half = (period / 2).max(Duration::from_millis(10));
    loop {
        std::thread::sleep(half);
        let Some(shared) = shared.upgrade() else {
            return;
        };
        // Not before READY=1: a ping first would tell systemd the service is up.
        let alive = shared.ready.load(Ordering::SeqCst)
            && shared
                .alive_until
                .lock()
                .is_ok_and(|until| Instant::now() < *until);
        if alive {
            send(&[NotifyState::Watchdog]);
        }
    }
}
