//! The event history (`events.log`): one line with `history::parse_line`, and the bytes as a
//! whole file with `history::read_history`: never a panic or an error on any bytes; each line
//! is a record or counted as skipped; a record re-encodes to the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use supervise_store::history::{parse_line, read_history};

fuzz_target!(|data: &[u8]| {
    if let Some(record) = parse_line(data) {
        let line = serde_json::to_string(&record).expect("a record serializes");
        assert_eq!(parse_line(line.as_bytes()), Some(record));
    }
    let history = read_history(data).expect("reading bytes in memory cannot fail");
    let lines = data.split(|b| *b == b'\n').count();
    assert!(history.records.len() + history.skipped <= lines);
});
