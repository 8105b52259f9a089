//! End-to-end tests: the real `supervise` binary running the real heat example, killed in
//! every way we can think of. The final checksum must always equal an uninterrupted run's.

use std::fs;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use crate::support::*;
use nix::sys::signal::Signal;

#[test]
fn survives_kill9_of_the_child_at_random_moments() {
    let args = ["--n", "512", "--steps", "12000"];
    let reference = reference_checksum(&args);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let opts = [
        "--every",
        "150ms",
        "--backoff",
        "20ms",
        "--max-restarts",
        "50",
        "--keep",
        "2",
    ];
    let run = Run::start(&store, &opts, &heat(&args), &[]);
    let mut rng = fastrand::Rng::new();
    eprintln!("random seed {}", rng.get_seed());
    // Up to five kills, each a random moment into a life of the child; a kill that finds the
    // job already finished (a fast machine) is not made.
    let mut kills = 0;
    for k in 1..=5 {
        let pid = run.nth_child_pid(k);
        std::thread::sleep(Duration::from_millis(rng.u64(100..900)));
        if run.ended() || !alive(pid) {
            break;
        }
        sigkill(pid);
        kills += 1;
    }
    assert!(kills >= 3, "only {kills} kills landed: make the job longer");
    let fin = run.wait(LONG);
    fin.assert_completed(&reference);
    assert_eq!(sigkill_deaths(&store), kills, "{}", fin.stderr);
    let from = spawned_from(&store);
    assert_eq!(from.len(), kills + 1, "{}", fin.stderr);
    assert!(from.iter().any(Option::is_some), "a life resumed: {from:?}");
    let job = only_job(&store);
    assert_eq!(job.snapshot_seqs().unwrap().len(), 2, "--keep 2");
    assert_store_clean(&job);
}

#[test]
fn a_crash_at_each_step_of_the_commit_protocol_loses_nothing() {
    let args = ["--n", "256", "--steps", "6000"];
    let reference = reference_checksum(&args);
    // The second snapshot is killed at each instant of its commit; the restart must resume
    // from the newest snapshot that was published.
    for (point, resumes_from) in [
        ("packs-synced", 1),
        ("packs-renamed", 1),
        ("manifest-synced", 1),
        ("manifest-renamed", 2),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let failpoint = format!("{point}@2");
        let run = Run::start(
            &store,
            &["--every", "100ms", "--backoff", "10ms"],
            &heat(&args),
            &[("SUPERVISE_FAILPOINT", &failpoint)],
        );
        let fin = run.wait(LONG);
        fin.assert_completed(&reference);
        assert_eq!(sigkill_deaths(&store), 1, "{point}: {}", fin.stderr);
        let restarting = events_of(&store, "restarting");
        assert!(
            restarting
                .iter()
                .any(|e| e["delay_ms"] == 10 && e["from"] == resumes_from),
            "{point}: {restarting:?}"
        );
        let instead = events_of(&store, "resumed-instead");
        assert!(instead.is_empty(), "{point}: {instead:?}");
        assert_store_clean(&only_job(&store));
    }
}

#[test]
fn a_kill_at_every_file_system_operation_of_the_first_snapshots_loses_nothing() {
    // `fsop@K` kills the program at the K-th durability step of the store's file-system layer
    // (opening the job, then each snapshot's creates, writes, fsyncs, renames and directory
    // fsyncs, and retention's removals from the third snapshot on: about 44 operations). At
    // each: the restart resumes, the result is the uninterrupted one, and the store ends clean.
    // Long enough for a dozen snapshots on a fast machine (0.1 s per 1,500 steps here, idle),
    // so that every kill point is reached however fast it runs.
    let args = ["--n", "256", "--steps", "6000"];
    let reference = reference_checksum(&args);
    let mut killed = 0;
    for k in 1..=44 {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let failpoint = format!("fsop@{k}");
        let run = Run::start(
            &store,
            &["--every", "30ms", "--keep", "2", "--backoff", "10ms"],
            &heat(&args),
            &[("SUPERVISE_FAILPOINT", &failpoint)],
        );
        let fin = run.wait(LONG);
        fin.assert_completed(&reference);
        // The fail point kills the program with SIGKILL; no other death is expected.
        if events_of(&store, "died").is_empty() {
            continue;
        }
        killed += 1;
        assert_eq!(sigkill_deaths(&store), 1, "{failpoint}: {}", fin.stderr);
        let job = only_job(&store);
        for kind in ["snapshot-set-aside", "records-damaged"] {
            let damage = events_of(&store, kind);
            assert!(damage.is_empty(), "{failpoint}: {damage:?}");
        }
        assert_eq!(
            job.damaged_seqs().unwrap(),
            Vec::<u64>::new(),
            "{failpoint}"
        );
        assert_store_clean(&job);
    }
    assert!(killed >= 40, "only {killed} of 44 kill points reached");
}

#[test]
fn sigterm_takes_a_final_snapshot_and_the_same_command_resumes() {
    let args = ["--n", "256", "--steps", "30000"];
    let reference = reference_checksum(&args);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    // No scheduled snapshot within the test: the only one is the final one.
    let run = Run::start(&store, &["--every", "1h", "-v"], &heat(&args), &[]);
    run.wait_for("shim connected", LONG);
    std::thread::sleep(Duration::from_millis(300));
    run.signal(Signal::SIGTERM);
    let fin = run.wait(LONG);
    assert_eq!(fin.code, Some(143), "{}", fin.stderr);
    let stopping = events_of(&store, "stopping");
    assert_eq!(stopping[0]["signal"], "SIGTERM", "{stopping:?}");
    assert_eq!(
        stopping[0]["shim"], true,
        "asks for a final snapshot: {stopping:?}"
    );
    let snapshots = events_of(&store, "snapshot");
    assert_eq!(snapshots.len(), 1, "{snapshots:?}");
    assert_eq!(snapshots[0]["seq"], 1);
    assert!(
        snapshots[0]["tag"].as_str().unwrap().starts_with("step "),
        "{snapshots:?}"
    );
    let end = last_end(&store);
    assert_eq!(end["outcome"], "stopped", "{end}");
    assert_eq!(end["exit_code"], 143, "{end}");
    assert!(
        checksum_of(&fin.stdout).is_none(),
        "it stopped before finishing"
    );

    let again = Run::start(&store, &["--every", "1h"], &heat(&args), &[]).wait(LONG);
    again.assert_completed(&reference);
    assert_eq!(spawned_from(&store).last(), Some(&Some(1)));
}

#[test]
fn sigusr1_asks_for_a_snapshot_now_and_sigint_stops() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let run = Run::start(
        &store,
        &["--every", "1h", "-v"],
        &heat(&["--n", "256", "--steps", "100000000"]),
        &[],
    );
    run.wait_for("shim connected", LONG);
    run.signal(Signal::SIGUSR1);
    run.wait_for_snapshot(1);
    run.signal(Signal::SIGINT);
    let fin = run.wait(LONG);
    assert_eq!(fin.code, Some(130), "{}", fin.stderr);
    // The final one, on SIGINT.
    let seqs: Vec<_> = events_of(&store, "snapshot")
        .iter()
        .map(|e| e["seq"].clone())
        .collect();
    assert!(seqs.contains(&2.into()), "{seqs:?}");
}

#[test]
fn kill9_of_the_supervisor_leaves_no_process_behind_and_the_rerun_resumes() {
    let args = ["--n", "256", "--steps", "20000"];
    let reference = reference_checksum(&args);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    // A grandchild in the job's process group, as a job script might start.
    let mut command = vec![
        "/bin/sh".into(),
        "-c".into(),
        "sleep 600 & exec \"$0\" \"$@\"".into(),
    ];
    command.extend(heat(&args));
    let run = Run::start(&store, &["--every", "200ms"], &command, &[]);
    let child = run.nth_child_pid(1);
    run.wait_for_snapshot(1);
    let grandchildren = children_of(child);
    assert_eq!(grandchildren.len(), 1, "the sleep");
    run.signal(Signal::SIGKILL);
    let _ = run.wait(LONG);
    let gone = wait_until(Duration::from_secs(30), || {
        !alive(child) && !grandchildren.iter().any(|p| alive(*p))
    });
    assert!(
        gone,
        "child {child} or grandchild {grandchildren:?} survived the supervisor"
    );

    // The shim saw its supervisor go and took a final snapshot beyond the scheduled ones.
    let job = only_job(&store);
    let newest = *job.snapshot_seqs().unwrap().last().unwrap();
    let again = Run::start(&store, &["--every", "200ms"], &command, &[]).wait(LONG);
    again.assert_completed(&reference);
    assert_eq!(spawned_from(&store).last(), Some(&Some(newest)));
}

/// Takes a few snapshots of heat, damages the newest with `damage(job, newest, previous)`,
/// runs the same command again, and checks it completes as an uninterrupted run would.
/// Returns the second run, the previous and the newest snapshot numbers.
fn resume_after_damaging_newest(
    store: &std::path::Path,
    damage: impl FnOnce(&supervise_store::JobStore, u64, u64),
) -> (Finished, supervise_store::JobStore, u64, u64) {
    let args = ["--n", "256", "--steps", "40000"];
    let reference = reference_checksum(&args);
    let job = stopped_job_with_snapshots(store, &args);
    let seqs = job.snapshot_seqs().unwrap();
    let (prev, newest) = (seqs[seqs.len() - 2], seqs[seqs.len() - 1]);
    damage(&job, newest, prev);
    let fin = Run::start(store, &["--every", "100ms"], &heat(&args), &[]).wait(LONG);
    fin.assert_completed(&reference);
    let instead = events_of(store, "resumed-instead");
    assert!(
        instead.iter().any(|e| e["from"] == prev),
        "{instead:?}\n{}",
        fin.stderr
    );
    (fin, job, prev, newest)
}

#[test]
fn a_flipped_byte_in_the_newest_snapshot_falls_back_to_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let (fin, _, _, newest) = resume_after_damaging_newest(&store, |job, newest, prev| {
        let older = job.read_manifest(prev).unwrap();
        let known: Vec<_> = older
            .entries
            .iter()
            .flat_map(|e| e.chunks.iter().map(|c| c.hash))
            .collect();
        let m = job.read_manifest(newest).unwrap();
        let grid = m.entry("grid").unwrap();
        let chunk = grid
            .chunks
            .iter()
            .find(|c| !known.contains(&c.hash))
            .expect("a chunk only the newest has");
        let pack = job.pack_path(&m.packs[chunk.pack as usize]);
        let mut bytes = fs::read(&pack).unwrap();
        bytes[chunk.offset as usize + 44 + chunk.stored_len as usize / 2] ^= 0x10;
        fs::write(&pack, bytes).unwrap();
    });
    // Found at start, when the shim verifies the whole snapshot before the program sees any
    // of it: set aside and reported to the supervisor, which records it.
    assert_set_aside(&store, newest, &fin.stderr);
}

#[test]
fn a_truncated_newest_manifest_falls_back_to_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let (fin, _, _, newest) = resume_after_damaging_newest(&store, |job, newest, _| {
        let path = job.manifest_path(newest);
        let len = fs::metadata(&path).unwrap().len();
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
    });
    // Found at start: reported to the supervisor.
    assert_set_aside(&store, newest, &fin.stderr);
}

/// The job's history records that snapshot `seq` was set aside as damaged.
fn assert_set_aside(store: &std::path::Path, seq: u64, stderr: &str) {
    let set_aside = events_of(store, "snapshot-set-aside");
    assert!(
        set_aside.iter().any(|e| e["seq"] == seq),
        "{set_aside:?}\n{stderr}"
    );
}

#[test]
fn bad_job_name_missing_command_and_unknown_program_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let out = Command::new(supervise_bin())
        .args(["--store"])
        .arg(&store)
        .args(["--job", "a/b", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    // The error names the bad name and the character.
    assert!(err.contains("\"a/b\"") && err.contains("'/'"), "{err}");

    let out = Command::new(supervise_bin())
        .args(["--every", "1m"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("-- <PROGRAM>"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = Command::new(supervise_bin())
        .args(["--every", "soon", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--every"));

    let out = Command::new(supervise_bin())
        .arg("--store")
        .arg(&store)
        .args(["--", "/nonexistent/program"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/program"), "{err}");
}

#[test]
fn gives_up_after_the_restart_limit_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let run = Run::start(
        &dir.path().join("store"),
        &["--max-restarts", "2", "--backoff", "10ms"],
        // It runs a while first: a program that fails at once is a configuration error.
        &["/bin/sh".into(), "-c".into(), "sleep 1.1; exit 7".into()],
        &[],
    );
    let store = dir.path().join("store");
    let fin = run.wait(LONG);
    assert_eq!(fin.code, Some(3), "{}", fin.stderr);
    let died = events_of(&store, "died");
    assert_eq!(died.len(), 3, "{died:?}");
    assert!(died.iter().all(|e| e["how"] == "exit code 7"), "{died:?}");
    let end = last_end(&store);
    assert_eq!(end["outcome"], "gave-up", "{end}");
    assert_eq!(end["exit_code"], 3, "{end}");
    let delays: Vec<_> = events_of(&store, "restarting")
        .iter()
        .map(|e| e["delay_ms"].as_u64())
        .collect();
    assert_eq!(delays, [Some(10), Some(20)], "backoff doubles");
}

#[test]
fn the_child_gets_default_signals_an_empty_mask_and_our_stdio() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(supervise_bin());
    cmd.arg("--store").arg(dir.path().join("store"));
    cmd.args([
        "--",
        "/bin/sh",
        "-c",
        "grep -E '^Sig(Ign|Blk)' /proc/self/status; read line; echo \"got $line\"",
    ]);
    cmd.stdin(std::process::Stdio::piped());
    // As if started with `&` from a script: SIGINT ignored; and SIGUSR2 blocked.
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR2);
            libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("SigBlk:\t0000000000000000"), "{stdout}");
    assert!(stdout.contains("SigIgn:\t0000000000000000"), "{stdout}");
    assert!(
        stdout.contains("got hello"),
        "stdin reaches the child: {stdout}"
    );
}

#[test]
fn changing_one_percent_of_a_large_array_writes_about_one_percent() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = {
        let mut c = vec![example_bin("sparse").into_os_string()];
        c.extend(["--mib", "64", "--percent", "1", "--rounds", "3"].map(Into::into));
        c
    };
    let fin = Run::start(&dir.path().join("store"), &["--every", "1h"], &cmd, &[]).wait(LONG);
    assert_eq!(fin.code, Some(0), "{}", fin.stderr);
    let store = dir.path().join("store");
    // The supervisor's snapshot event of round 2 (the program's own line says the same).
    let snapshot = events_of(&store, "snapshot")
        .into_iter()
        .find(|e| e["seq"] == 2)
        .expect("snapshot 2");
    assert_eq!(snapshot["tag"], "round 2", "{snapshot}");
    assert_eq!(
        snapshot["bytes_total"].as_u64().unwrap() >> 20,
        64,
        "{snapshot}"
    );
    let (new, written) = (
        snapshot["bytes_new"].as_u64().unwrap(),
        snapshot["bytes_written"].as_u64().unwrap(),
    );
    // 1% of 64 MiB in 64 KiB blocks is 10 blocks (two may coincide); plus the tiny "round".
    let one_percent: u64 = 10 * 65536;
    assert!(
        new <= one_percent + 64 && new >= one_percent - 2 * 65536,
        "new {new}, 1% is {one_percent}"
    );
    assert!(
        written <= one_percent * 11 / 10,
        "written {written} for {one_percent} changed"
    );
}

#[test]
fn without_a_supervisor_the_program_takes_local_snapshots_when_asked() {
    let args = ["--n", "256", "--steps", "30000"];
    let reference = reference_checksum(&args);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("local");
    let start = || {
        let mut cmd = Command::new(example_bin("heat"));
        cmd.args(args)
            .env("SUPERVISE_STORE", &store)
            .env("SUPERVISE_EVERY", "100ms");
        Run::spawn(cmd)
    };
    let first = start();
    let job_dir = store.join("heat").join("snapshots");
    assert!(
        wait_until(LONG, || fs::read_dir(&job_dir)
            .map(|d| d.count() >= 2)
            .unwrap_or(false)),
        "local snapshots appear"
    );
    sigkill(first.pid());
    let _ = first.wait(LONG);
    let second = start().wait(LONG);
    second.assert_completed(&reference);
    second.assert_said("heat: resumed from snapshot ");
}

#[test]
fn fresh_ignores_earlier_snapshots_and_restarts_resume_from_its_own() {
    let args = ["--n", "256", "--steps", "20000"];
    let reference = reference_checksum(&args);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let job = stopped_job_with_snapshots(&store, &args);
    let old_newest = *job.snapshot_seqs().unwrap().last().unwrap();

    let run = Run::start(
        &store,
        &["--fresh", "--every", "100ms", "--backoff", "10ms"],
        &heat(&args),
        &[],
    );
    let resume = run.wait_for_event("resume", 1, |_| true);
    assert_eq!(resume["reason"], "fresh", "{resume}");
    assert_eq!(
        run.wait_for_event("spawned", 1, |_| true)["from"],
        serde_json::Value::Null
    );
    // A crash after its own first snapshot resumes from that one, not from an old one.
    run.wait_for_snapshot(old_newest + 1);
    sigkill(run.nth_child_pid(1));
    let fin = run.wait(LONG);
    fin.assert_completed(&reference);
    let restart = events_of(&store, "restarting");
    let from = restart.first().expect("a restart")["from"].as_u64();
    assert!(
        from.is_some_and(|from| from > old_newest),
        "resumed from {from:?}, an old snapshot: {restart:?}"
    );
}

#[test]
fn a_full_disk_fails_the_snapshot_cleanly_and_keeps_the_earlier_ones() {
    let args = ["--n", "512", "--steps", "16000"];
    let reference = reference_checksum(&args);
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = Tmpfs::mount(&dir.path().join("disk"), "16m") else {
        // Mounting needs root (as in CI); CI must not skip this test.
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must be able to mount a tmpfs for this test"
        );
        eprintln!("skipped: cannot mount a tmpfs (not root)");
        return;
    };
    let store = disk.0.join("store");
    // Leave room for about two snapshots of the 2 MiB grid, not for the --keep 3 it wants.
    let ballast = disk.0.join("ballast");
    fs::write(&ballast, vec![1u8; 11 << 20]).unwrap();
    let run = Run::start(
        &store,
        &["--every", "150ms", "--keep", "3"],
        &heat(&args),
        &[],
    );
    // The supervisor's event (the program's own message may come first, and that is fine).
    let failed = run.wait_for_event("snapshot-failed", 1, |_| true);
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("No space left on device"), "{failed}");
    // Every snapshot the store shows is complete and verifies, and nothing half-written stays.
    let job = only_job(&store);
    let seqs = job.snapshot_seqs().unwrap();
    assert!(!seqs.is_empty());
    for seq in seqs {
        supervise_store::SnapshotReader::open(&job, seq)
            .unwrap()
            .verify()
            .unwrap();
    }
    // Space comes back: snapshots succeed again and the job ends right.
    fs::remove_file(&ballast).unwrap();
    let failures = run.events_of("snapshot-failed").len();
    let done = run.events_of("snapshot").len();
    run.wait_for_event("snapshot", done + 1, |_| true);
    let fin = run.wait(LONG);
    fin.assert_completed(&reference);
    assert!(failures >= 1);
    assert_store_clean(&job);
}

#[test]
fn a_stale_control_fd_in_the_environment_is_a_clear_error() {
    for (fd, why) in [("77", "not an open file descriptor"), ("0", "not a socket")] {
        let out = Command::new(example_bin("heat"))
            .args(["--n", "64", "--steps", "10"])
            .env("SUPERVISE_CONTROL_FD", fd)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("SUPERVISE_CONTROL_FD=\"{fd}\": {why}")),
            "{err}"
        );
    }
}

#[test]
fn regions_with_dirty_tracking_and_fork_capture_survive_random_kills() {
    let args = [
        "--mib",
        "16",
        "--percent",
        "5",
        "--rounds",
        "60",
        "--sleep-ms",
        "25",
    ];
    let sparse = |extra: &[&str]| {
        let mut c = vec![example_bin("sparse").into_os_string()];
        c.extend(args.iter().chain(extra).map(Into::into));
        c
    };
    let reference = example_checksum("sparse", &args);
    let mut rng = fastrand::Rng::new();
    eprintln!("random seed {}", rng.get_seed());
    for capture in ["dirty", "fork"] {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let env = [("SUPERVISE_CAPTURE", capture)];
        let run = Run::start(
            &store,
            &["--every", "1h", "--backoff", "10ms", "-v"],
            &sparse(&[]),
            &env,
        );
        let mut kills = 0;
        for k in 1..=4 {
            let pid = run.nth_child_pid(k);
            run.wait_for_nth("shim connected", k, LONG);
            std::thread::sleep(Duration::from_millis(rng.u64(150..600)));
            if run.ended() || !alive(pid) {
                break;
            }
            sigkill(pid);
            kills += 1;
        }
        assert!(kills >= 2, "{capture}: only {kills} kills landed");
        let fin = run.wait(LONG);
        fin.assert_completed(&reference);
        fin.assert_said(&format!("capture: {capture}"));
        assert_eq!(sigkill_deaths(&store), kills, "{}", fin.stderr);
        assert_store_clean(&only_job(&store));
    }
}
