//! `supervise --events FILE|-`: the job's events as JSON lines while it runs, in the schema of
//! `supervise log --json`.

use std::process::Command;

use crate::support::*;

/// The records of `supervise log --json` for the store's only job.
fn logged(store: &std::path::Path) -> Vec<serde_json::Value> {
    let job = only_job(store);
    let name = job
        .dir()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let (code, out, err) = cmd(store, &["log", &name, "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn events_are_written_as_json_lines_in_the_schema_of_log_json() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let events = dir.path().join("events.jsonl");
    let out = Command::new(supervise_bin())
        .arg("--store")
        .arg(&store)
        .arg("--events")
        .arg(&events)
        .args(["--every", "100ms", "--"])
        .args(heat(&["--n", "256", "--steps", "20000"]))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&events).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let kinds: Vec<&str> = lines.iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"start"), "{kinds:?}");
    assert!(
        kinds.contains(&"spawned") && kinds.contains(&"snapshot"),
        "{kinds:?}"
    );
    let end = lines.last().unwrap();
    assert_eq!(end["kind"], "end");
    assert_eq!(end["completed"], true);
    assert_eq!(end["data"]["outcome"], "finished");
    assert_eq!(end["data"]["exit_code"], 0);
    // The same records as the job's history, field for field.
    assert_eq!(lines, logged(&store));
}

#[test]
fn events_go_to_standard_output_with_a_dash() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let out = Command::new(supervise_bin())
        .arg("--store")
        .arg(&store)
        .args(["--events", "-", "--"])
        .args(heat(&["--n", "64", "--steps", "100"]))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The program's own output shares standard output; the events are the JSON lines.
    let records: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("kind").is_some())
        .collect();
    let kinds: Vec<&str> = records
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"start"), "{stdout}");
    assert_eq!(kinds.last(), Some(&"end"), "{stdout}");
    assert_eq!(records, logged(&store));
}
