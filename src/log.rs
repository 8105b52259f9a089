//! Event lines on stderr: one readable line per event, with time and job; the one place that
//! prints the supervisor's events and records them in the job's history, and (with
//! `--events`) writes them as JSON lines for machines, one history record per line.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::event::{JobEvent, Outcome};
use crate::events::{EventLog, Record};

/// Where `--events` writes: a file or standard output.
pub type EventSink = Arc<Mutex<Box<dyn Write + Send>>>;

/// How much to say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Errors and the job's end only (`-q`).
    Quiet,
    /// Every event (default).
    Normal,
    /// Also requests and liveness (`-v`).
    Verbose,
}

/// The event log of one job: lines on stderr, and (once the job is held) its history in
/// the store.
#[derive(Clone)]
pub struct Log {
    level: Level,
    job: String,
    history: Option<Arc<EventLog>>,
    /// `--events`: each event as a JSON line (the schema of `supervise log --json`).
    sink: Option<EventSink>,
    /// Under a service manager: what it is told.
    notifier: Option<Arc<crate::notify::Notifier>>,
}

impl Log {
    /// A log for `job` at `level`.
    pub fn new(level: Level, job: &str) -> Self {
        Self {
            level,
            job: job.to_owned(),
            history: None,
            sink: None,
            notifier: None,
        }
    }

    /// From now on, the service manager is told what the events change (`READY=1`,
    /// `STATUS=`, ...; see [`crate::notify`]).
    pub fn notify_to(&mut self, notifier: crate::notify::Notifier) {
        self.notifier = Some(Arc::new(notifier));
    }

    /// The program made progress (a safe point), for the service manager's watchdog.
    pub fn progress(&self) {
        if let Some(n) = &self.notifier {
            n.progress();
        }
    }

    /// From now on, each event is also written to `sink` as a JSON line, as it happens.
    pub fn events_to(&mut self, sink: Box<dyn Write + Send>) {
        self.sink = Some(Arc::new(Mutex::new(sink)));
    }

    /// From now on, events are also appended to the job's history.
    pub fn keep_history(&mut self, history: EventLog) {
        self.history = Some(Arc::new(history));
    }

    /// Says `event` (unless `-q` and it is not always shown) and appends it to the history.
    pub fn emit(&self, event: &JobEvent) {
        let msg = event.to_string();
        if self.history.is_some() || self.sink.is_some() {
            let record = Record {
                unix_ms: supervise_store::clock::now_unix_ms(),
                pid: std::process::id(),
                kind: event.kind(),
                message: msg.clone(),
                completed: matches!(
                    event,
                    JobEvent::End {
                        outcome: Outcome::Finished | Outcome::AlreadyDone,
                        ..
                    }
                ),
                data: serde_json::to_value(event).ok(),
            };
            if let Some(h) = &self.history {
                h.append_record(&record);
            }
            if let Some(sink) = &self.sink
                && let Ok(mut line) = serde_json::to_string(&record)
                && let Ok(mut out) = sink.lock()
            {
                line.push('\n');
                // A reader that went away loses the lines, not the job.
                let _ = out.write_all(line.as_bytes()).and_then(|()| out.flush());
            }
        }
        if event.always_shown() || self.level >= Level::Normal {
            self.line(&msg);
        }
        if let Some(n) = &self.notifier {
            n.on_event(event);
        }
    }

    fn line(&self, msg: &str) {
        let now = humantime::format_rfc3339_seconds(SystemTime::now());
        // One write per line: the child shares stderr, and a line must not be cut by its output.
        let line = format!("supervise {now} [{}] {msg}\n", self.job);
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    /// A detail (shown with `-v`).
    pub fn detail(&self, msg: &str) {
        if self.level >= Level::Verbose {
            self.line(msg);
        }
    }
}
