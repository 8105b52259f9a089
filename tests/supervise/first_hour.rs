//! What a newcomer meets in the first hour: a program that fails at once, one that never uses
//! the shim, a job spelled two ways, waiting for a job that completes, and the job's totals.
//! Assertions are on the typed events of the job's history.

use std::ffi::OsString;
use std::time::Duration;

use crate::support::*;
use nix::sys::signal::Signal;

fn sh(script: &str) -> Vec<OsString> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

#[test]
fn a_program_that_fails_at_once_is_a_configuration_error_shown_with_its_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let run = Run::start(
        &store,
        &[],
        &sh("echo 'error: cannot open case.toml' >&2; exit 2"),
        &[],
    );
    // The default backoff (1 s, 2 s): three tries, not 13 minutes of them.
    let fin = run.wait(Duration::from_secs(30));
    assert_eq!(fin.code, Some(3), "{}", fin.stderr);
    assert_eq!(events_of(&store, "spawned").len(), 3);
    let end = last_end(&store);
    assert_eq!(end["outcome"], "config-error", "{end}");
    assert_eq!(end["exit_code"], 3);
    let detail = end["detail"].as_str().unwrap();
    assert!(
        detail.contains("| error: cannot open case.toml"),
        "{detail}"
    );
    // Its stderr also reached ours as it was written, once per life (and the start line
    // and the end line quote it).
    assert_eq!(
        fin.stderr.matches("error: cannot open case.toml").count(),
        3 + 2,
        "{}",
        fin.stderr
    );
}

#[test]
fn a_program_without_the_shim_is_told_so_and_a_stop_promises_no_resume() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    // It runs a while, so it is not a configuration error, and dies without the shim.
    let run = Run::start(
        &store,
        &["--max-restarts", "0", "--hang-timeout", "5s"],
        &sh("sleep 1.2; exit 3"),
        &[],
    );
    let fin = run.wait(LONG);
    assert_eq!(fin.code, Some(3), "{}", fin.stderr);
    let died = events_of(&store, "died");
    assert_eq!(died[0]["shim"], false, "{died:?}");
    let no_shim = events_of(&store, "no-shim");
    assert_eq!(no_shim.len(), 1, "said once: {no_shim:?}");
    assert_eq!(no_shim[0]["hang_timeout"], true);
    assert_eq!(last_end(&store)["outcome"], "gave-up");

    // Stopped, it has nothing to resume from, and says so rather than "run it again to resume".
    let store = dir.path().join("store2");
    let run = Run::start(&store, &[], &sh("sleep 60"), &[]);
    run.wait_for_event("spawned", 1, |_| true);
    // `status` says "no shim" rather than a ratio of nothing.
    let (code, out, err) = cmd(&store, &["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status[0]["shim_connected"], false, "{status}");
    let (_, table, _) = cmd(&store, &["status"]);
    assert!(table.contains("no shim"), "{table}");
    run.signal(Signal::SIGTERM);
    let fin = run.wait(LONG);
    assert_eq!(fin.code, Some(143), "{}", fin.stderr);
    let end = last_end(&store);
    assert_eq!(end["outcome"], "stopped", "{end}");
    let detail = end["detail"].as_str().unwrap();
    assert!(
        detail.contains("does not use the supervise shim") && !detail.contains("to resume"),
        "{detail}"
    );
    let stopping = events_of(&store, "stopping");
    assert_eq!(stopping[0]["shim"], false, "{stopping:?}");
}

#[test]
fn a_program_with_the_shim_writes_to_the_supervisors_stderr_directly() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let run = Run::start(
        &store,
        &["--every", "200ms"],
        &heat(&["--n", "256", "--steps", "100000000"]),
        &[],
    );
    let child = run.nth_child_pid(1);
    run.wait_for_snapshot(1);
    let fd2 = |pid: u32| std::fs::read_link(format!("/proc/{pid}/fd/2")).unwrap();
    // Before the shim started, its stderr was a pipe through the supervisor (to keep its last
    // lines); the shim took the supervisor's own stderr back.
    assert_eq!(fd2(child), fd2(run.pid()));
    run.signal(Signal::SIGTERM);
    let fin = run.wait(LONG);
    assert_eq!(fin.code, Some(143), "{}", fin.stderr);
    let end = last_end(&store);
    assert_eq!(end["outcome"], "stopped", "{end}");
    // The sentence promises a resume, from the snapshot the stop took.
    let seq = events_of(&store, "snapshot").last().unwrap()["seq"].clone();
    let detail = end["detail"].as_str().unwrap();
    assert!(detail.contains(&format!("from snapshot {seq}")), "{detail}");
}

#[test]
fn two_spellings_of_one_program_are_one_job() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let heat_bin = example_bin("heat");
    let args = ["--n", "256", "--steps", "100000000"];
    let run = Run::start(&store, &["--every", "200ms"], &heat(&args), &[]);
    run.wait_for_snapshot(2);
    run.signal(Signal::SIGTERM);
    assert_eq!(run.wait(LONG).code, Some(143));
    // The same program as ./heat from its directory resumes the same job.
    let mut cmd = std::process::Command::new(supervise_bin());
    cmd.current_dir(heat_bin.parent().unwrap())
        .arg("--store")
        .arg(&store)
        .args(["--every", "200ms", "--", "./heat"])
        .args(args);
    let run = Run::spawn(cmd);
    run.wait_for_event("spawned", 1, |_| true);
    run.signal(Signal::SIGTERM);
    assert_eq!(run.wait(LONG).code, Some(143));
    let spawned = events_of(&store, "spawned");
    assert_eq!(spawned.len(), 2);
    assert!(spawned[1]["from"].as_u64().unwrap() >= 2, "{spawned:?}");
}

#[test]
fn a_job_that_completes_while_another_supervisor_waits_is_done_for_both() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let args = ["--n", "256", "--steps", "30000"];
    let first = Run::start(&store, &["--every", "200ms"], &heat(&args), &[]);
    first.wait_for_event("spawned", 1, |_| true);
    let second = Run::start(&store, &["--every", "200ms", "--wait"], &heat(&args), &[]);
    second.wait_for("--wait: job held by", LONG);
    assert_eq!(first.wait(LONG).code, Some(0));
    let fin = second.wait(LONG);
    assert_eq!(fin.code, Some(0), "{}", fin.stderr);
    assert_eq!(events_of(&store, "spawned").len(), 1, "run once");
    assert_eq!(last_end(&store)["outcome"], "already-done");
}

#[test]
fn the_end_of_a_job_gives_its_totals_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let args = ["--n", "256", "--steps", "60000"];
    let reference = reference_checksum(&args);
    let run = Run::start(
        &store,
        &["--every", "300ms", "--backoff", "100ms"],
        &heat(&args),
        &[],
    );
    let pid = run.nth_child_pid(1);
    run.wait_for_snapshot(1);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let fin = run.wait(LONG);
    fin.assert_completed(&reference);
    let spawned = events_of(&store, "spawned");
    assert!(spawned[1]["from"].as_u64().unwrap() >= 1, "{spawned:?}");
    let end = last_end(&store);
    assert_eq!(end["outcome"], "finished");
    let totals = &end["totals"];
    assert_eq!(totals["runs"], 1, "{end}");
    assert_eq!(totals["lives"], 2, "{end}");
    assert_eq!(totals["restarts"], 1, "{end}");
    // The restart cost at least its 100 ms wait.
    assert!(totals["lost_ms"].as_u64().unwrap() >= 100, "{end}");
    assert!(totals["elapsed_ms"].as_u64().unwrap() >= totals["lost_ms"].as_u64().unwrap());
}

#[test]
fn a_program_that_cannot_start_leaves_no_job_behind() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "not a program\n").unwrap();
    // Executable, but its interpreter does not exist: exec itself fails.
    let script = dir.path().join("script");
    std::fs::write(&script, "#!/nonexistent/interpreter\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    for (program, says) in [
        (text.to_str().unwrap(), "not executable"),
        (script.to_str().unwrap(), "cannot start"),
        ("no-such-program-xyz", "no such program in PATH"),
    ] {
        let out = std::process::Command::new(supervise_bin())
            .arg("--store")
            .arg(&store)
            .args(["--", program])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{program}: {err}");
        assert!(err.contains(says), "{program}: {err}");
        let jobs: Vec<_> = std::fs::read_dir(&store)
            .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(jobs.is_empty(), "{program}: left {jobs:?}");
    }
}

#[test]
fn changed_parameters_are_a_configuration_error_not_a_suspect_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let sparse = |mib: &str| -> Vec<OsString> {
        let mut c = vec![example_bin("sparse").into_os_string()];
        c.extend(
            ["--mib", mib, "--rounds", "100000", "--sleep-ms", "50"]
                .iter()
                .map(OsString::from),
        );
        c
    };
    let run = Run::start(&store, &["--job", "sim"], &sparse("1"), &[]);
    run.wait_for_snapshot(2);
    run.signal(Signal::SIGTERM);
    assert_eq!(run.wait(LONG).code, Some(143));
    let seq = events_of(&store, "snapshot").last().unwrap()["seq"]
        .as_u64()
        .unwrap();
    // Twice the state: the region does not fit the snapshot.
    let run = Run::start(&store, &["--job", "sim"], &sparse("2"), &[]);
    let fin = run.wait(LONG);
    assert_eq!(fin.code, Some(3), "{}", fin.stderr);
    let mismatch = events_of(&store, "restore-mismatch");
    assert_eq!(mismatch.len(), 1, "{}", fin.stderr);
    assert_eq!(mismatch[0]["entry"], "state");
    assert_eq!(mismatch[0]["seq"].as_u64(), Some(seq));
    assert_eq!(mismatch[0]["stored_bytes"], 1 << 20);
    assert_eq!(mismatch[0]["wanted_bytes"], 2 << 20);
    assert_eq!(last_end(&store)["outcome"], "config-error");
    assert!(events_of(&store, "suspect").is_empty(), "{}", fin.stderr);
    assert_eq!(
        events_of(&store, "spawned").len(),
        2,
        "one try, no rollback"
    );
}

#[test]
fn a_rebuilt_program_resumes_and_says_so() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let exe = dir.path().join("heat");
    std::fs::copy(example_bin("heat"), &exe).unwrap();
    let command = vec![
        exe.clone().into_os_string(),
        "--n".into(),
        "256".into(),
        "--steps".into(),
        "100000000".into(),
    ];
    let run = Run::start(&store, &["--every", "200ms"], &command, &[]);
    run.wait_for_snapshot(1);
    run.signal(Signal::SIGTERM);
    assert_eq!(run.wait(LONG).code, Some(143));
    assert!(events_of(&store, "origin-changed").is_empty());
    // "Rebuilt": other bytes at the same path (a trailing byte does not stop an ELF running).
    std::fs::OpenOptions::new()
        .append(true)
        .open(&exe)
        .unwrap()
        .write_all(b"\0")
        .unwrap();
    let run = Run::start(&store, &["--every", "200ms"], &command, &[]);
    // (Its first snapshot is not number 2: the stop took a final one.)
    run.wait_for_event("snapshot", 1, |_| true);
    run.signal(Signal::SIGTERM);
    assert_eq!(run.wait(LONG).code, Some(143));
    let changed = events_of(&store, "origin-changed");
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert_eq!(changed[0]["changed"], serde_json::json!(["executable"]));
    let spawned = events_of(&store, "spawned");
    assert!(
        spawned[1]["from"].as_u64().unwrap() >= 1,
        "resumed: {spawned:?}"
    );
}

#[test]
fn a_job_named_by_an_earlier_release_keeps_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let command = heat(&["--n", "256", "--steps", "100000000"]);
    // Releases before named a job from the command line as typed.
    let mut hasher = blake3::Hasher::new();
    for part in &command {
        hasher.update(part.as_encoded_bytes());
        hasher.update(&[0]);
    }
    let legacy = format!("heat-{}", &hasher.finalize().to_hex()[..8]);
    let run = Run::start(
        &store,
        &["--every", "200ms", "--job", &legacy],
        &command,
        &[],
    );
    run.wait_for_snapshot(1);
    run.signal(Signal::SIGTERM);
    assert_eq!(run.wait(LONG).code, Some(143));
    let run = Run::start(&store, &["--every", "200ms"], &command, &[]);
    run.wait_for_event("spawned", 1, |_| true);
    run.signal(Signal::SIGTERM);
    assert_eq!(run.wait(LONG).code, Some(143));
    let spawned = events_of(&store, "spawned");
    assert_eq!(spawned.len(), 2, "one job: {spawned:?}");
    assert!(spawned[1]["from"].as_u64().unwrap() >= 1, "{spawned:?}");
}

#[test]
fn a_program_that_sent_its_stderr_elsewhere_keeps_it_there() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let err_file = dir.path().join("sim.err");
    let script = format!(
        "exec {} --n 256 --steps 100000000 2>{}",
        example_bin("heat").display(),
        err_file.display()
    );
    let run = Run::start(&store, &["--every", "200ms"], &sh(&script), &[]);
    let child = run.nth_child_pid(1);
    run.wait_for_snapshot(1);
    let fd2 = std::fs::read_link(format!("/proc/{child}/fd/2")).unwrap();
    assert_eq!(
        fd2, err_file,
        "the shim must not take back a redirected stderr"
    );
    run.signal(Signal::SIGTERM);
    assert_eq!(run.wait(LONG).code, Some(143));
}

#[test]
fn a_program_writing_to_stderr_after_the_supervisor_died_is_not_killed_by_sigpipe() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let marker = dir.path().join("finished");
    // It ignores SIGTERM (the lifeline's and the kernel's), and writes to stderr after the
    // supervisor is gone.
    let script = format!(
        "trap '' TERM; echo up-$((2+3)) >&2; sleep 1.5; echo still-$((1+1)) >&2; echo ok > {}",
        marker.display()
    );
    let run = Run::start(&store, &["--stop-timeout", "10s"], &sh(&script), &[]);
    // (What it prints is computed, so that the supervisor's start line, which quotes the
    // command, cannot be mistaken for it.)
    run.wait_for("up-5", LONG);
    run.signal(Signal::SIGKILL);
    assert!(
        wait_until(Duration::from_secs(20), || marker.exists()),
        "the program died writing to its stderr"
    );
    // And what it wrote was passed on (by the lifeline helper).
    assert!(
        wait_until(Duration::from_secs(20), || run.stderr().contains("still-2")),
        "{}",
        run.stderr()
    );
}

#[test]
fn a_program_that_ran_before_and_now_fails_at_once_is_left_to_the_restart_policy() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let ran = dir.path().join("ran");
    // The first life runs a while, the next ones fail at once (a stale lock file, say).
    let script = format!(
        "if [ -f {0} ]; then exit 2; fi; touch {0}; sleep 1.2; exit 3",
        ran.display()
    );
    let run = Run::start(
        &store,
        &["--max-restarts", "4", "--backoff", "10ms"],
        &sh(&script),
        &[],
    );
    let fin = run.wait(LONG);
    assert_eq!(fin.code, Some(3), "{}", fin.stderr);
    assert_eq!(last_end(&store)["outcome"], "gave-up", "{}", fin.stderr);
    assert_eq!(events_of(&store, "spawned").len(), 5);
}
