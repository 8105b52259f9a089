//! End-to-end tests of one job, one owner: the supervisor killed at random moments and run
//! again (never two copies at once), `--wait`, `--orphan continue`, `--from`, hang detection
//! and the roll back past a snapshot that makes every restore crash.

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::*;
use nix::sys::signal::Signal;

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
        if run.ended() {
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
        records
            .iter()
            .any(|r| r["kind"] == "resume" && r["data"]["reason"] == "after-loss"),
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
    // Said before the job is held, so on stderr only: the holder's pid, and the option.
    second.assert_said(&format!("supervisor pid {} on", first.pid()));
    second.assert_said("--wait");
    // With --wait it starts once the first one is gone.
    let waiting = Run::start(&store, &["--every", "1h", "--wait", "-v"], &command, &[]);
    waiting.wait_for("--wait: job held by supervisor pid", LONG);
    first.signal(Signal::SIGTERM);
    assert_eq!(first.wait(LONG).code, Some(143));
    waiting.wait_for("shim connected", LONG);
    let spawned = waiting.wait_for_event("spawned", 1, |_| true);
    assert_eq!(spawned["from"], 1, "{spawned}");
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
    let child = run.nth_child_pid(1);
    run.wait_for_snapshot(1);
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
    run.wait_for_snapshot(3);
    run.signal(Signal::SIGTERM);
    assert_eq!(run.wait(LONG).code, Some(143));
    let job = only_job(&store);
    let oldest = job.snapshot_seqs().unwrap()[0];
    let bad = Run::start(&store, &["--from", "999"], &heat(&args), &[]).wait(LONG);
    assert_eq!(bad.code, Some(1));
    // A user-facing error: it names the option and the snapshots there are.
    bad.assert_said("--from 999");
    bad.assert_said(&format!("{oldest}"));
    let fin = Run::start(
        &store,
        &["--every", "1h", "--from", &oldest.to_string()],
        &heat(&args),
        &[],
    )
    .wait(LONG);
    fin.assert_completed(&reference);
    let resume = events_of(&store, "resume");
    assert_eq!(resume.last().unwrap()["reason"], "from", "{resume:?}");
    let from = spawned_from(&store);
    assert_eq!(from.last(), Some(&Some(oldest)), "{from:?}");
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
    let hung = events_of(&store, "hung");
    assert!(
        !hung.is_empty() && hung.iter().all(|e| e["timeout_ms"] == 2000),
        "{hung:?}"
    );
    let signalled = events_of(&store, "signalled");
    let sent = |signal: &str| signalled.iter().filter(|e| e["signal"] == signal).count();
    assert_eq!(sent("SIGTERM"), 2, "{signalled:?}");
    assert!(sent("SIGKILL") >= 1, "it did not stop: {signalled:?}");
    let restarting = events_of(&store, "restarting");
    assert!(
        restarting.iter().any(|e| e["delay_ms"] == 10),
        "{restarting:?}"
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
    let child = run.nth_child_pid(1);
    run.wait_for_snapshot(2);
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child as i32), Signal::SIGKILL);
    let fin = run.wait(LONG);
    // Every snapshot is poisoned: after 3 crashes on each, back past all of them to a fresh
    // start, which then runs to the end.
    fin.assert_completed(&reference);
    let suspects = events_of(&store, "suspect");
    let seqs: Vec<u64> = suspects
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert!(!seqs.is_empty(), "{}", fin.stderr);
    assert!(
        seqs.windows(2).all(|w| w[1] < w[0]),
        "newest first: {seqs:?}"
    );
    assert!(
        suspects.iter().all(|e| e["why"]
            .as_str()
            .unwrap()
            .contains("before reaching its first safe point, 3 times in a row")),
        "{suspects:?}"
    );
    assert_eq!(
        suspects.last().unwrap()["back_to"],
        serde_json::Value::Null,
        "back to a fresh start: {suspects:?}"
    );
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
    let taken = events_of(&store, "snapshot").len();
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
    assert_eq!(again.code, Some(0), "{}", again.stderr);
    let resume = events_of(&store, "resume");
    assert_eq!(
        resume.last().unwrap()["reason"],
        "completed-before",
        "{resume:?}"
    );
    let end = last_end(&store);
    assert_eq!(end["outcome"], "finished", "{end}");
    // Only the end's sentence says what --on-success removed.
    let detail = end["detail"].as_str().unwrap();
    assert!(detail.contains("--on-success delete"), "{detail}");
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
    let orphan = first.nth_child_pid(1);
    first.wait_for_snapshot(1);
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
    second.wait_for_event("spawned", 1, |_| true);
    assert!(
        !alive(orphan),
        "a second copy started while the orphan {orphan} still ran"
    );
    let fin = second.wait(LONG);
    fin.assert_completed(&reference);
    let _ = first.wait(LONG);
}

#[test]
fn a_kill_of_the_supervisors_whole_group_still_ends_a_program_that_reaches_no_safe_point() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    // One round, then a sleep that never reaches a safe point: only the lifeline can end it.
    let mut supervisor = std::process::Command::new(supervise_bin())
        .args(["--store"])
        .arg(&store)
        .args(["--stop-timeout", "1s", "--"])
        .arg(example_bin("sparse"))
        .args(["--mib", "1", "--sleep-ms", "600000"])
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut child = None;
    assert!(
        wait_until(LONG, || {
            child = events_of(&store, "spawned")
                .first()
                .and_then(|e| e["pid"].as_u64());
            child.is_some()
        }),
        "the program was never spawned"
    );
    let child = child.unwrap() as u32;
    let group = nix::unistd::Pid::from_raw(supervisor.id() as i32);
    nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL).unwrap();
    let _ = supervisor.wait();
    assert!(
        wait_until(Duration::from_secs(30), || !alive(child)),
        "the program outlived its supervisor's group"
    );
    // And the job is free again: nothing of it holds the lock.
    let job = only_job(&store);
    assert!(
        wait_until(Duration::from_secs(10), || {
            supervise_store::lock::JobLock::holder(job.dir())
                .unwrap()
                .is_none()
        }),
        "the job is still held"
    );
}
