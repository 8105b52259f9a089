//! The format of a job's event history (`<store>/<job>/events.log`, written by `supervise`):
//! one JSON [`Record`] per line. The history is a log, not state: a damaged line (not UTF-8,
//! not a record, longer than [`MAX_LINE_LEN`]) is skipped and counted, never an error, and no
//! line is held in memory beyond that bound.

use std::io::{self, BufRead};

use serde::{Deserialize, Serialize};

/// Longest line of the history that is read (records are a few hundred bytes); a longer line
/// is skipped as damaged without being held in memory.
pub const MAX_LINE_LEN: usize = 64 * 1024;

/// One record of the history.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    /// When (milliseconds since the Unix epoch).
    pub unix_ms: u64,
    /// The supervisor that wrote it.
    pub pid: u32,
    /// What kind of record: `start` and `end` mark a supervisor's run; between them the
    /// event's kind (`spawned`, `died`, `snapshot`, ...; `event` in older histories).
    pub kind: String,
    /// The event, as the supervisor said it.
    pub message: String,
    /// For `end` records: true when the command finished with exit code 0.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub completed: bool,
    /// The event's fields (with its `kind`), for programs; absent in older histories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

/// A history as read: its records, oldest first, and how many damaged lines were skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    /// The records that parsed.
    pub records: Vec<Record>,
    /// Lines skipped: not UTF-8, not a record (e.g. cut by a crash mid-write), or too long.
    pub skipped: usize,
}

/// Parses one line (without its newline): `None` if it is not a record.
pub fn parse_line(line: &[u8]) -> Option<Record> {
    if line.len() > MAX_LINE_LEN {
        return None;
    }
    let text = std::str::from_utf8(line).ok()?;
    serde_json::from_str(text).ok()
}

/// Reads a history from `input` to its end, line by line, skipping (and counting) damaged
/// lines; blank lines are ignored. Only I/O errors are errors.
pub fn read_history(mut input: impl BufRead) -> io::Result<History> {
    fn finish(line: &mut Vec<u8>, too_long: &mut bool, history: &mut History) {
        if *too_long {
            history.skipped += 1;
        } else if !line.iter().all(u8::is_ascii_whitespace) {
            match parse_line(line) {
                Some(r) => history.records.push(r),
                None => history.skipped += 1,
            }
        }
        line.clear();
        *too_long = false;
    }
    let mut history = History::default();
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let buf = match input.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            if !line.is_empty() || too_long {
                finish(&mut line, &mut too_long, &mut history);
            }
            return Ok(history);
        }
        let (piece, used, ends_line) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], i + 1, true),
            None => (buf, buf.len(), false),
        };
        if !too_long {
            if line.len() + piece.len() > MAX_LINE_LEN {
                too_long = true;
                line.clear();
            } else {
                line.extend_from_slice(piece);
            }
        }
        input.consume(used);
        if ends_line {
            finish(&mut line, &mut too_long, &mut history);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(message: &str) -> String {
        let r = Record {
            unix_ms: 1,
            pid: 2,
            kind: "event".into(),
            message: message.into(),
            completed: false,
            data: None,
        };
        serde_json::to_string(&r).unwrap() + "\n"
    }

    #[test]
    fn damaged_lines_are_skipped_and_counted() {
        let mut bytes = line("one").into_bytes();
        bytes.extend_from_slice(b"\xff\xfe\x00binary\x80\n");
        bytes.extend_from_slice(b"{\"not\":\"a record\"}\n\n");
        bytes.extend(std::iter::repeat_n(b'{', MAX_LINE_LEN + 1));
        bytes.extend_from_slice(b"\n");
        bytes.extend_from_slice(line("two").as_bytes());
        bytes.extend_from_slice(b"{\"unix_ms\":1,\"pi");
        // A small buffer, so lines span several reads.
        let history = read_history(io::BufReader::with_capacity(7, &bytes[..])).unwrap();
        let messages: Vec<&str> = history.records.iter().map(|r| r.message.as_str()).collect();
        assert_eq!(messages, ["one", "two"]);
        assert_eq!(history.skipped, 4);
    }

    #[test]
    fn a_line_of_exactly_the_bound_is_read() {
        let mut l = line("x");
        let pad = MAX_LINE_LEN - l.len() + 1;
        l.insert_str(l.len() - 2, &" ".repeat(pad));
        assert_eq!(l.len(), MAX_LINE_LEN + 1);
        let history = read_history(l.as_bytes()).unwrap();
        assert_eq!((history.records.len(), history.skipped), (1, 0));
    }
}
