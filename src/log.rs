//! Event lines on stderr: one readable line per event, with time and job.

use std::io::Write;
use std::sync::Arc;
use std::time::SystemTime;

use crate::events::EventLog;

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
#[derive(Clone, Debug)]
pub struct Log {
    level: Level,
    job: String,
    history: Option<Arc<EventLog>>,
}

impl Log {
    /// A log for `job` at `level`.
    pub fn new(level: Level, job: &str) -> Self {
        Self {
            level,
            job: job.to_owned(),
            history: None,
        }
    }

    /// From now on, events are also appended to the job's history.
    pub fn keep_history(&mut self, history: EventLog) {
        self.history = Some(Arc::new(history));
    }

    fn record(&self, kind: &str, msg: &str, completed: bool) {
        if let Some(h) = &self.history {
            h.append(kind, msg, completed);
        }
    }

    /// A record that marks the start or end of a supervisor's run (always shown).
    pub fn mark(&self, kind: &str, msg: &str, completed: bool) {
        self.record(kind, msg, completed);
        self.line(msg);
    }

    fn line(&self, msg: &str) {
        let now = humantime::format_rfc3339_seconds(SystemTime::now());
        // One write per line: the child shares stderr, and a line must not be cut by its output.
        let line = format!("supervise {now} [{}] {msg}\n", self.job);
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    /// An event (shown unless `-q`).
    pub fn event(&self, msg: &str) {
        self.record("event", msg, false);
        if self.level >= Level::Normal {
            self.line(msg);
        }
    }

    /// A detail (shown with `-v`).
    pub fn detail(&self, msg: &str) {
        if self.level >= Level::Verbose {
            self.line(msg);
        }
    }

    /// An event always shown (errors, the job's end).
    pub fn always(&self, msg: &str) {
        self.record("event", msg, false);
        self.line(msg);
    }
}
