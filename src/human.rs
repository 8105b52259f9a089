//! Human-readable sizes and durations for log lines, and standard output for the operator
//! commands' results.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Set once standard output's reader has gone away.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Standard output for a command's results. When its reader has gone away (a pipe closed
/// early, as `supervise log | head -1` leaves it), what is written is dropped without an
/// error: the reader took what it wanted, and the command goes on to its own exit code
/// (0, or what it found, such as 5 for damage from `verify`), quietly. Other errors (a full
/// disk under a redirection) are errors.
pub struct Out(io::StdoutLock<'static>);

/// Standard output for results (see [`Out`]).
pub fn out() -> Out {
    Out(io::stdout().lock())
}

/// Whether standard output's reader has gone away (writes to [`Out`] were dropped).
pub fn stdout_closed() -> bool {
    STDOUT_CLOSED.load(Ordering::Relaxed)
}

impl Out {
    fn quietly(result: io::Result<usize>, len: usize) -> io::Result<usize> {
        match result {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                STDOUT_CLOSED.store(true, Ordering::Relaxed);
                Ok(len)
            }
            other => other,
        }
    }
}

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if stdout_closed() {
            return Ok(buf.len());
        }
        Self::quietly(self.0.write(buf), buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if stdout_closed() {
            return Ok(());
        }
        Self::quietly(self.0.flush().map(|()| 0), 0).map(|_| ())
    }
}

/// `println!` to [`out`]: evaluates to `io::Result<()>`, an error only when standard output
/// fails otherwise than by its reader going away.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!($crate::human::out(), $($arg)*)
    }};
}
pub(crate) use outln;

/// `1536` -> `1.5 KiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A duration rounded for people: `850ms`, `12.3s`, `4m 5s`, `2h 3m`.
pub fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", d.as_secs_f64()),
        60_000..3_600_000 => format!("{}m {}s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{}h {}m", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

/// Prints rows under headers in aligned columns (the last column is not padded) to [`out`].
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> io::Result<()> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = out();
    let mut line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<w$}  "));
            }
        }
        writeln!(out, "{}", text.trim_end())
    };
    line(headers.to_vec())?;
    for row in rows {
        line(row.iter().map(String::as_str).collect())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(duration(Duration::from_millis(850)), "850ms");
        assert_eq!(duration(Duration::from_millis(12_345)), "12.3s");
        assert_eq!(duration(Duration::from_secs(245)), "4m 5s");
        assert_eq!(duration(Duration::from_secs(7380)), "2h 3m");
    }
}

/// Re-indents a valid JSON text (two spaces a level, as `serde_json::to_vec_pretty`) without
/// parsing it: numbers stay as written (a 128-bit integer is not rounded through an `f64`) and
/// keys stay in their order. Check that the text is JSON first; other bytes pass through.
pub fn pretty_json(text: &[u8]) -> Vec<u8> {
    fn newline(out: &mut Vec<u8>, depth: usize) {
        out.push(b'\n');
        out.extend(std::iter::repeat_n(b' ', 2 * depth));
    }
    let mut out = Vec::with_capacity(text.len() * 2);
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let mut bytes = text.iter().copied().peekable();
    while let Some(c) = bytes.next() {
        if in_string {
            out.push(c);
            match c {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => {
                in_string = true;
                out.push(c);
            }
            b'{' | b'[' => {
                out.push(c);
                while bytes.next_if(u8::is_ascii_whitespace).is_some() {}
                match bytes.peek() {
                    Some(b'}' | b']') => {}
                    _ => {
                        depth += 1;
                        newline(&mut out, depth);
                    }
                }
            }
            b'}' | b']' => {
                if !matches!(out.last(), Some(b'{' | b'[')) {
                    depth = depth.saturating_sub(1);
                    newline(&mut out, depth);
                }
                out.push(c);
            }
            b',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            b':' => out.extend_from_slice(b": "),
            c if c.is_ascii_whitespace() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod pretty_tests {
    use super::pretty_json;

    #[test]
    fn json_is_indented_as_serde_does_with_numbers_and_order_kept() {
        let text = br#"{"z": 1, "state": {"state": 208745520555909116978795849195383758904, "inc": 3}, "e": {}, "l": [ ], "s": "a, \"b\": [c]", "v": [1.5e300, -0.0, true, null]}"#;
        let pretty = String::from_utf8(pretty_json(text)).unwrap();
        assert!(
            pretty.contains("208745520555909116978795849195383758904"),
            "{pretty}"
        );
        let v: serde_json::Value = serde_json::from_str(&pretty).unwrap();
        let original: serde_json::Value = serde_json::from_slice(text).unwrap();
        assert_eq!(v, original);
        // Outside the long number, serde's own layout (which sorts keys; ours keeps them).
        let small = br#"{"a":[1,{"b":null}],"c":{},"d":[]}"#;
        let ours = String::from_utf8(pretty_json(small)).unwrap();
        let serde = serde_json::to_string_pretty(
            &serde_json::from_slice::<serde_json::Value>(small).unwrap(),
        )
        .unwrap();
        assert_eq!(ours, serde);
        assert!(
            pretty.starts_with("{\n  \"z\": 1,\n  \"state\": {\n    \"state\": "),
            "{pretty}"
        );
    }
}
