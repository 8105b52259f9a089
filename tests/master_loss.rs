//! End-to-end tests of one job, one owner: the supervisor killed at random moments and run
//! again (never two copies at once), `--wait`, `--orphan continue`, `--from`, hang detection
//! and the roll back past a snapshot that makes every restore crash.

mod support;

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use support::*;

const LONG: Duration = Duration::from_secs(120);

/// heat, wrapped so that each copy takes an exclusive `flock` on `mark` for its whole life
/// (the descriptor survives the `exec` into heat): a copy that finds it taken writes `two`.
fn exclusive_heat(mark: &Path, two: &Path, args: &[&str]) -> Vec<OsString> {
    let script = format!(
        "exec 9>>'{}'; flock -n 9 || {{ echo two copies >> '{}'; exit 99; }}; exec \"$0\" \"$@\"",
        mark.display(),
        two.display()
    );
    let mut cmd: Vec<OsString> = vec!["/bin/sh".into(), "-c".into(), script.into()];
    cmd.extend(heat(args));
    cmd
}

#[test]
fn supervisor_killed_at_random_moments_and_rerun_completes_and_never_runs_two_copies() {
    let args = ["--n", "256", "--steps", "40000"];
    let reference = reference_checksum(&args);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let (mark, two) = (dir.path().join("mark"), dir.path().join("two"));
    let command = exclusive_heat(&mark, &two, &args);
    let options = ["--every", "150ms", "--wait"];
    fastrand::seed(7);
    let mut lost = 0;
    let mut killed: Vec<Run> = Vec::new();
    for round in 0..6 {
        // Once, the orphaned program runs on (--orphan continue) instead of stopping at
        // once: the next supervisor must wait for it all that time.
        let orphan = if round == 2 { "continue" } else { "stop" };
        let mut with_orphan = options.to_vec();
        with_orphan.extend(["--orphan", orphan]);
        let run = Run::start(&store, &with_orphan, &command, &[]);
        std::thread::sleep(Duration::from_millis(fastrand::u64(50..1500)));
        if run.count("job finished") > 0 {
            break;
        }
        run.signal(Signal::SIGKILL);
        lost += 1;
        // No pause: the next supervisor starts while the orphaned program still runs (taking
        // its final snapshot, or on to the end) and must wait for it. Collecting the killed
        // run's output waits for its pipes, which an orphan holds: do it at the end.
        killed.push(run);
    }
    let fin = Run::start(&store, &options, &command, &[]).wait(LONG);
    for run in killed {
        let pid = run.pid();
        let gone = run.wait(LONG);
        assert_ne!(gone.code, Some(0), "{}", gone.stderr);
        assert!(!alive(pid));
    }
    fin.assert_completed(&reference);
    assert!(
        !two.exists(),
        "two copies of the job ran at once: {}",
        std::fs::read_to_string(&two).unwrap_or_default()
    );
    assert!(lost > 0);
    // The history in the store tells every run, and the resumes after a lost supervisor.
    let job = only_job(&store);
    let log = Command::new(supervise_bin())
        .args(["log", "--json", "--store"])
        .arg(&store)
        .arg(job.name())
        .output()
        .unwrap();
    let records: Vec<serde_json::Value> = serde_json::from_slice(&log.stdout).unwrap();
    let starts = records.iter().filter(|r| r["kind"] == "start").count();
    // (A supervisor killed while it waited for the job never started it.)
    assert!(starts >= 2, "{records:?}");
    assert!(
        records.iter().any(|r| r["message"]
            .as_str()
            .unwrap()
            .starts_with("resuming after the previous supervisor was lost, from snapshot")),
        "{records:?}"
    );
    assert_eq!(records.last().unwrap()["kind"], "end");
}

#[test]
fn a_second_supervisor_of_a_running_job_says_who_holds_it_and_exits_4() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let command = heat(&["--n", "128", "--steps", "100000000"]);
    let first = Run::start(&store, &["--every", "1h", "-v"], &command, &[]);
    first.wait_for("shim connected", LONG);
    let second = Run::start(&store, &["--every", "1h"], &command, &[]).wait(LONG);
    assert_eq!(second.code, Some(4), "{}", second.stderr);
    second.assert_said(&format!(
        "is already running: supervisor pid {} on",
        first.pid()
    ));
    second.assert_said("wait for it with --wait");
    // With --wait it starts once the first one is gone.
    let waiting = Run::start(&store, &["--every", "1h", "--wait", "-v"], &command, &[]);
    waiting.wait_for("--wait: job held by supervisor pid", LONG);
    first.signal(Signal::SIGTERM);
    assert_eq!(first.wait(LONG).code, Some(143));
    waiting.wait_for("shim connected", LONG);
    waiting.wait_for("(from snapshot 1", LONG);
    waiting.signal(Signal::SIGTERM);
    assert_eq!(waiting.wait(LONG).code, Some(143));
}

#[test]
fn with_orphan_continue_the_program_finishes_alone_and_keeps_snapshotting() {
    let args = ["--n", "256", "--steps", "12000"];
    let reference = reference_checksum(&args);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let run = Run::start(
        &store,
        &["--every", "200ms", "--orphan", "continue"],
        &heat(&args),
        &[],
    );
    let child = run.nth_child_pid(1, LONG);
    run.wait_for("snapshot 1 done", LONG);
    run.signal(Signal::SIGKILL);
    let job = only_job(&store);
    let before = job.highest_seq().unwrap().unwrap();
    // The supervisor is gone; the program runs on and prints its checksum.
    let fin = run.wait(LONG);
    assert!(!alive(child));
    assert_eq!(
        checksum_of(&fin.stdout).as_deref(),
        Some(reference.as_str()),
        "{}",
        fin.stderr
    );
    fin.assert_said("supervisor gone; running on unsupervised");
    assert!(job.highest_seq().unwrap().unwrap() > before);
    assert!(
        supervise_store::lock::JobLock::holder(job.dir())
            .unwrap()
            .is_none()
    );
}

#[test]
fn from_resumes_a_chosen_older_snapshot_and_skips_the_newer_ones() {
    let args = ["--n", "256", "--steps", "20000"];
    let reference = reference_checksum(&args);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let run = Run::start(&store, &["--every", "100ms"], &heat(&args), &[]);
    run.wait_for("snapshot 3 done", LONG);
    run.signal(Signal::SIGTERM);
    assert_eq!(run.wait(LONG).code, Some(143));
    let job = only_job(&store);
    let oldest = job.snapshot_seqs().unwrap()[0];
    let bad = Run::start(&store, &["--from", "999"], &heat(&args), &[]).wait(LONG);
    assert_eq!(bad.code, Some(1));
    bad.assert_said("--from 999: job");
    bad.assert_said("has no snapshot 999 (it has: ");
    let fin = Run::start(
        &store,
        &["--every", "1h", "--from", &oldest.to_string()],
        &heat(&args),
        &[],
    )
    .wait(LONG);
    fin.assert_completed(&reference);
    fin.assert_said(&format!("--from {oldest}: resuming from snapshot {oldest}"));
    fin.assert_said("spawned pid");
    fin.assert_said(&format!("(from snapshot {oldest})"));
}

#[test]
fn a_hung_program_is_asked_for_a_snapshot_then_stopped_and_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    // A round of "computation" that never reaches a safe point.
    let command = vec![
        example_bin("sparse").into_os_string(),
        "--mib".into(),
        "1".into(),
        "--sleep-ms".into(),
        "600000".into(),
    ];
    let fin = Run::start(
        &store,
        &[
            "--hang-timeout",
            "2s",
            "--stop-timeout",
            "1s",
            "--max-restarts",
            "1",
            "--backoff",
            "10ms",
        ],
        &command,
        &[],
    )
    .wait(LONG);
    assert_eq!(fin.code, Some(3), "{}", fin.stderr);
    fin.assert_said("reached no safe point for 2.0s (--hang-timeout): asking for a snapshot");
    fin.assert_said("hung program: sending SIGTERM");
    fin.assert_said("hung program did not stop: sending SIGKILL");
    fin.assert_said("restarting in 10ms");
    assert_eq!(
        fin.stderr.matches("hung program: sending SIGTERM").count(),
        2
    );
}

#[test]
fn a_snapshot_that_makes_every_restore_crash_is_rolled_back_past() {
    let args = ["--n", "256", "--steps", "20000"];
    let reference = reference_checksum(&args);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let mut poisoned = heat(&args);
    poisoned.push("--crash-on-resume".into());
    let run = Run::start(
        &store,
        &[
            "--every",
            "100ms",
            "--backoff",
            "10ms",
            "--max-restarts",
            "20",
        ],
        &poisoned,
        &[],
    );
    let child = run.nth_child_pid(1, LONG);
    run.wait_for("snapshot 2 done", LONG);
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child as i32), Signal::SIGKILL);
    let fin = run.wait(LONG);
    // Every snapshot is poisoned: after 3 crashes on each, back past all of them to a fresh
    // start, which then runs to the end.
    fin.assert_completed(&reference);
    let seqs: Vec<u64> = {
        let mut v = Vec::new();
        for line in fin.stderr.lines() {
            if let Some(rest) = line.split("snapshot ").nth(1)
                && line.contains("is suspect")
            {
                v.push(rest.split(' ').next().unwrap().parse().unwrap());
            }
        }
        v
    };
    assert!(!seqs.is_empty(), "{}", fin.stderr);
    assert!(
        seqs.windows(2).all(|w| w[1] < w[0]),
        "newest first: {seqs:?}"
    );
    fin.assert_said("before reaching its first safe point, 3 times in a row");
    fin.assert_said("going back to a fresh start (no older snapshot)");
    assert_eq!(
        fin.stderr.matches("--crash-on-resume: aborting").count(),
        3 * seqs.len(),
        "{}",
        fin.stderr
    );
}

#[test]
fn keep_within_and_on_success_delete() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let args = ["--n", "128", "--steps", "60000"];
    let fin = Run::start(
        &store,
        &["--every", "50ms", "--keep", "1", "--keep-within", "1h"],
        &heat(&args),
        &[],
    )
    .wait(LONG);
    fin.assert_completed(&reference_checksum(&args));
    let job = only_job(&store);
    let kept = job.snapshot_seqs().unwrap().len();
    let taken = fin.stderr.matches(" done [step ").count();
    assert!(taken >= 2, "{}", fin.stderr);
    assert_eq!(kept, taken, "--keep-within 1h keeps all of them");
    // Run again with delete: it starts over (the job completed) and removes its snapshots.
    let again = Run::start(
        &store,
        &["--every", "50ms", "--on-success", "delete"],
        &heat(&args),
        &[],
    )
    .wait(LONG);
    again.assert_said("the job completed in an earlier run: starting it again");
    again.assert_said("--on-success delete: removed");
    assert!(job.snapshot_seqs().unwrap().is_empty());
    assert!(job.pack_names().unwrap().is_empty());
}

#[test]
fn the_program_a_lost_supervisor_left_running_holds_the_job_until_it_ends() {
    let args = ["--n", "256", "--steps", "12000"];
    let reference = reference_checksum(&args);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let first = Run::start(
        &store,
        &["--every", "200ms", "--orphan", "continue"],
        &heat(&args),
        &[],
    );
    let orphan = first.nth_child_pid(1, LONG);
    first.wait_for("snapshot 1 done", LONG);
    let lost = first.pid();
    first.signal(Signal::SIGKILL);
    let second = Run::start(
        &store,
        &["--every", "200ms", "--wait", "-v"],
        &heat(&args),
        &[],
    );
    second.wait_for(
        &format!("--wait: job held by supervisor pid {lost} on "),
        LONG,
    );
    second.wait_for("spawned pid", LONG);
    assert!(
        !alive(orphan),
        "a second copy started while the orphan {orphan} still ran"
    );
    let fin = second.wait(LONG);
    fin.assert_completed(&reference);
    let _ = first.wait(LONG);
}
