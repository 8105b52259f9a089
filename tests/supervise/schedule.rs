//! `--every auto`: the interval follows what snapshots cost the program, and the history and
//! `status` say what it is and why.

use std::ffi::OsString;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::support::{Run, example_bin, json};

#[test]
fn every_auto_lengthens_the_interval_when_snapshots_grow_costly_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    // One 64 KiB block of 128 MiB (zeros at first: a cheap first snapshot) changes a round
    // (50 ms) until round 120, then about all of it: snapshots that cost the program
    // milliseconds, then hundreds.
    let args = "--mib 128 --percent 0.05 --percent-from 120:100 --rounds 100000 --sleep-ms 50 \
                --when-due --start-zero";
    let mut command: Vec<OsString> = vec![example_bin("sparse").into()];
    command.extend(args.split_whitespace().map(OsString::from));
    // A short prior MTBF, so that cheap snapshots come about every second.
    let run = Run::start(&store, &["--every", "auto", "--mtbf", "10s"], &command, &[]);
    // The cheapest choice so far, and a later one that costs five times as much or more. (How
    // cheap the cheap phase is depends on the machine: on a loaded one, even a one-chunk delta
    // may cost enough for the overhead budget, not the 1 s floor, to set the interval.)
    let cost_of = |e: &serde_json::Value| e["cost_us"].as_u64().unwrap();
    let until = Instant::now() + Duration::from_secs(120);
    let (cheap, costly) = loop {
        let events = run.events_of("interval");
        let cheapest = events
            .iter()
            .enumerate()
            .min_by_key(|(_, e)| cost_of(e))
            .map(|(at, e)| (at, e.clone()));
        if let Some((at, cheap)) = cheapest
            && let Some(costly) = events[at + 1..]
                .iter()
                .find(|e| cost_of(e) >= 5 * cost_of(&cheap))
        {
            break (cheap, costly.clone());
        }
        assert!(
            Instant::now() < until,
            "no costly interval choice: {events:?}\n{}",
            run.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let cheap_every = cheap["every_ms"].as_u64().unwrap();
    assert_eq!(cheap["mtbf_s"], 10);
    // Costly ones: the interval grows to what the 2% budget allows.
    let every = costly["every_ms"].as_u64().unwrap();
    let cost = costly["cost_us"].as_u64().unwrap();
    assert_eq!(costly["why"], "overhead-budget", "{cheap}\n{costly}");
    // every = cost / 2%, in ms from us.
    assert!(every.abs_diff(cost / 20) <= 1, "{costly}");
    // The cost is the mean of the last three, so the first costly choice may mix in cheap
    // ones: it is longer than the cheap interval, by how much depends on the machine.
    assert!(every > cheap_every, "{cheap}\n{costly}");
    let status = json(&store, &["status"]);
    assert_eq!(status[0]["every_why"], "overhead-budget", "{status}");
    assert!(status[0]["every_ms"].as_u64().unwrap() >= every, "{status}");
    run.signal(Signal::SIGTERM);
    let done = run.wait(Duration::from_secs(60));
    assert_eq!(done.code, Some(143), "{}", done.stderr);
}

#[test]
fn every_auto_is_refused_in_file_mode_and_bad_percentages_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let (code, _, err) = crate::support::bare(&[
        "--store",
        store.to_str().unwrap(),
        "--every",
        "auto",
        "--checkpoint",
        "state.cpt",
        "--",
        "true",
    ]);
    // As every file-mode option that does not fit: an error (1) naming it.
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("--every auto") && err.contains("file mode"),
        "{err}"
    );
    for bad in ["0", "100%", "x"] {
        let (code, _, err) = crate::support::bare(&["--max-overhead", bad, "--", "true"]);
        assert_eq!(code, 2, "{bad}: {err}");
        assert!(err.contains("--max-overhead"), "{bad}: {err}");
    }
}
