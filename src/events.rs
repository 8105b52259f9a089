//! The job's event history, kept in the store (`<store>/<job>/events.log`): one JSON object
//! per line, appended by the supervisor that holds the job, read by `supervise log` and by the
//! next supervisor (a history that does not end with an `end` record means the supervisor
//! before was lost).

use std::fs::File;
use std::io::{BufReader, ErrorKind, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
pub use supervise_store::history::{History, MAX_LINE_LEN, Record};

/// Histories longer than this are cut to their newer half when a supervisor starts.
const MAX_LOG_BYTES: u64 = 1 << 20;

/// The history file of one job, open for appending.
#[derive(Debug)]
pub struct EventLog {
    file: File,
}

/// The path of a job's history.
pub fn path_in(job_dir: &Path) -> PathBuf {
    job_dir.join(LOG_NAME)
}

/// The history's file name in the job directory.
const LOG_NAME: &str = "events.log";

impl EventLog {
    /// Opens the history for appending (only the job's lock holder does), first cutting it to
    /// its newer half if it grew past 1 MiB. The job directory and the file are opened without
    /// following links and must be this user's (a planted link is refused, never written
    /// through).
    pub fn open(job_dir: &Path) -> Result<Self> {
        let path = path_in(job_dir);
        let dir = supervise_store::fsops::Dir::open_owned(job_dir)?;
        let file = dir.open_private(LOG_NAME, true)?;
        if file.metadata().is_ok_and(|m| m.len() > MAX_LOG_BYTES) {
            let records = read(job_dir)?;
            let keep = &records[records.len() / 2..];
            let mut text = String::new();
            for r in keep {
                text.push_str(&serde_json::to_string(r)?);
                text.push('\n');
            }
            dir.write_atomic(LOG_NAME, text.as_bytes())
                .with_context(|| format!("cannot rewrite {}", path.display()))?;
            let file = dir.open_private(LOG_NAME, true)?;
            return Ok(Self { file });
        }
        // A supervisor killed mid-write leaves a torn last line: end it, so that the next
        // record starts a line of its own (the torn one is skipped when read).
        let len = file.metadata().map_or(0, |m| m.len());
        let mut last = [0u8; 1];
        if len > 0
            && std::os::unix::fs::FileExt::read_exact_at(&file, &mut last, len - 1).is_ok()
            && last[0] != b'\n'
        {
            (&file)
                .write_all(b"\n")
                .with_context(|| format!("cannot append to {}", path.display()))?;
        }
        Ok(Self { file })
    }

    /// Appends a record made of these parts, stamped now (for tests).
    #[cfg(test)]
    pub fn append(
        &self,
        kind: &str,
        message: &str,
        completed: bool,
        data: Option<serde_json::Value>,
    ) {
        self.append_record(&Record {
            unix_ms: supervise_store::clock::now_unix_ms(),
            pid: std::process::id(),
            kind: kind.to_owned(),
            message: message.to_owned(),
            completed,
            data,
        });
    }

    /// Appends `record` (one write, so concurrent readers see whole lines).
    pub fn append_record(&self, record: &Record) {
        if let Ok(mut line) = serde_json::to_string(record) {
            line.push('\n');
            let _ = (&self.file).write_all(line.as_bytes());
        }
    }
}

/// Reads a job's history, oldest first (damaged lines are skipped, see [`history`]).
pub fn read(job_dir: &Path) -> Result<Vec<Record>> {
    Ok(history(job_dir)?.records)
}

/// Reads a job's history, oldest first, with the number of damaged lines skipped: not UTF-8,
/// not a record (such as one cut by a crash mid-write), or longer than [`MAX_LINE_LEN`]. The
/// history is a log, not state: only an I/O error is an error. A job without history has an
/// empty one.
pub fn history(job_dir: &Path) -> Result<History> {
    let path = path_in(job_dir);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(History::default()),
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
    };
    supervise_store::history::read_history(BufReader::new(file))
        .with_context(|| format!("cannot read {}", path.display()))
}

/// What to tell the user about the damaged lines a read skipped, if any.
pub fn skipped_note(job_dir: &Path, history: &History) -> Option<String> {
    (history.skipped > 0).then(|| {
        format!(
            "{}: skipped {} damaged lines (not UTF-8, not a record, or longer than {} bytes)",
            path_in(job_dir).display(),
            history.skipped,
            MAX_LINE_LEN
        )
    })
}

/// How the previous supervisor of a job ended, from its history.
#[derive(Debug, PartialEq, Eq)]
pub enum LastRun {
    /// No supervisor ran the job before.
    None,
    /// It ended normally; `completed` when the command finished with exit code 0.
    Ended {
        /// The command finished.
        completed: bool,
    },
    /// It was lost (killed, crashed, node lost) while running the job; its last record.
    Lost {
        /// When the lost supervisor wrote its last record (ms since the epoch).
        last_unix_ms: u64,
    },
}

/// Reads how the previous supervisor ended.
pub fn last_run(records: &[Record]) -> LastRun {
    match records.last() {
        None => LastRun::None,
        Some(r) if r.kind == "end" => LastRun::Ended {
            completed: r.completed,
        },
        Some(r) => LastRun::Lost {
            last_unix_ms: r.unix_ms,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_round_trips_and_tells_a_lost_supervisor() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(last_run(&read(dir.path()).unwrap()), LastRun::None);
        let log = EventLog::open(dir.path()).unwrap();
        log.append("start", "started", false, None);
        log.append("snapshot", "snapshot 1 done", false, None);
        assert!(matches!(
            last_run(&read(dir.path()).unwrap()),
            LastRun::Lost { .. }
        ));
        log.append("end", "finished", true, None);
        let records = read(dir.path()).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(records[1].message, "snapshot 1 done");
        assert_eq!(last_run(&records), LastRun::Ended { completed: true });
        // A torn last line (crash mid-write) is skipped, not an error.
        std::fs::OpenOptions::new()
            .append(true)
            .open(path_in(dir.path()))
            .unwrap()
            .write_all(b"{\"unix_ms\":1,\"pi")
            .unwrap();
        assert_eq!(read(dir.path()).unwrap().len(), 3);
    }
}
