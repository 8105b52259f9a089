//! Event lines on stderr: one readable line per event, with time and job.

use std::io::Write;
use std::time::SystemTime;

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

/// The event log of one job.
#[derive(Clone, Debug)]
pub struct Log {
    level: Level,
    job: String,
}

impl Log {
    /// A log for `job` at `level`.
    pub fn new(level: Level, job: &str) -> Self {
        Self {
            level,
            job: job.to_owned(),
        }
    }

    fn line(&self, msg: &str) {
        let now = humantime::format_rfc3339_seconds(SystemTime::now());
        // One write per line: the child shares stderr, and a line must not be cut by its output.
        let line = format!("supervise {now} [{}] {msg}\n", self.job);
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    /// An event (shown unless `-q`).
    pub fn event(&self, msg: &str) {
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
        self.line(msg);
    }
}
