//! End-to-end tests of the operator's commands through the real binary, human and `--json`
//! output, and `verify` finding every kind of damage a test can inject.

use std::path::Path;
use std::time::Duration;

use crate::support::*;
use nix::sys::signal::Signal;
use serde_json::Value;

#[test]
fn status_snapshot_and_log_talk_to_the_running_job() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let run = Run::start(
        &store,
        &["--every", "1h", "-v"],
        &heat(&["--n", "256", "--steps", "100000000"]),
        &[],
    );
    run.wait_for("shim connected", LONG);
    let job = only_job(&store);
    let name = job.name().to_owned();

    let status = json(&store, &["status"]);
    let row = &status[0];
    assert_eq!(row["job"], name.as_str());
    assert_eq!(row["supervisor_pid"], run.pid());
    assert!(row["child_pid"].as_u64().is_some(), "{status}");
    assert_eq!(row["restarts"], 0);
    let (_, human, _) = cmd(&store, &["status"]);
    assert!(human.starts_with("JOB"), "{human}");
    assert!(human.contains(&name), "{human}");

    // `snapshot` asks the running job, waits until it is durable, prints its number.
    let (code, out, err) = cmd(&store, &["snapshot", &name]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "1");
    let taken = json(&store, &["snapshot", &name]);
    assert_eq!(taken["snapshot"], 2);
    let status = json(&store, &["status"]);
    assert_eq!(status[0]["last_snapshot"], 2);

    let log = json(&store, &["log", &name]);
    let records = log.as_array().unwrap();
    assert_eq!(records[0]["kind"], "start", "{log}");
    assert_eq!(records[0]["data"]["supervisor_pid"], run.pid(), "{log}");
    let snapshot = |seq: u64| {
        records
            .iter()
            .find(|r| r["kind"] == "snapshot" && r["data"]["seq"] == seq)
            .unwrap_or_else(|| panic!("no snapshot {seq}: {log}"))
    };
    snapshot(2);
    // The human log prints each record's message on its line.
    let (_, human, _) = cmd(&store, &["log", &name]);
    let first = snapshot(1)["message"].as_str().unwrap();
    assert!(human.contains(first), "{human}");
    assert_eq!(human.lines().count(), records.len(), "{human}");

    run.signal(Signal::SIGTERM);
    assert_eq!(run.wait(LONG).code, Some(143));
    // Not running any more.
    assert_eq!(json(&store, &["status"]), Value::Array(vec![]));
    let (code, _, err) = cmd(&store, &["snapshot", &name]);
    assert_eq!(code, 1);
    assert!(err.contains(&name) && err.contains("not running"), "{err}");
}

#[test]
fn ls_show_restore_and_gc_read_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let job = stopped_job_with_snapshots(&store, &["--n", "256", "--steps", "100000000"]);
    let seqs = job.snapshot_seqs().unwrap();
    let newest = *seqs.last().unwrap();

    let jobs = json(&store, &["ls"]);
    assert_eq!(jobs[0]["job"], job.name());
    assert_eq!(jobs[0]["snapshots"], seqs.len());
    assert_eq!(jobs[0]["running"], false);
    let snaps = json(&store, &["ls", "--job", job.name()]);
    assert_eq!(snaps.as_array().unwrap().len(), seqs.len());
    assert_eq!(snaps[seqs.len() - 1]["snapshot"], newest);
    assert!(snaps[0]["tag"].as_str().unwrap().starts_with("step "));
    let (_, human, _) = cmd(&store, &["ls", "--job", job.name()]);
    assert!(
        human.contains("SNAPSHOT") && human.contains("ok"),
        "{human}"
    );

    let shown = json(&store, &["show", "latest"]);
    assert_eq!(shown["snapshot"], newest);
    let entries = shown["entries"].as_array().unwrap();
    let grid = entries.iter().find(|e| e["name"] == "grid").unwrap();
    assert_eq!(grid["bytes"], 256 * 256 * 8);
    assert_eq!(grid["chunks"], 8);
    assert!(shown["dedup_ratio"].as_f64().unwrap() > 1.0, "{shown}");
    let (code, _, err) = cmd(&store, &["show", "999"]);
    assert_eq!(code, 1);
    assert!(err.contains("999"), "names the snapshot: {err}");

    // restore --to: raw slices as raw bytes, values as JSON, an index.
    let out = dir.path().join("out");
    let restored = json(
        &store,
        &[
            "restore",
            &newest.to_string(),
            "--to",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(restored["snapshot"], newest);
    let raw = std::fs::read(out.join("grid.f64")).unwrap();
    assert_eq!(raw.len(), 256 * 256 * 8);
    let top = f64::from_le_bytes(raw[..8].try_into().unwrap());
    assert_eq!(top, 100.0, "the top row is held at 100 degrees");
    let params: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("params.json")).unwrap()).unwrap();
    assert_eq!(params["n"], 256);
    assert!(out.join("snapshot.json").exists());
    let (code, _, err) = cmd(
        &store,
        &["restore", "latest", "--to", out.to_str().unwrap()],
    );
    assert_eq!(code, 1, "refuses to overwrite what it wrote");
    // It names the first file that is there already.
    assert!(
        err.contains(out.join("params.json").to_str().unwrap()),
        "{err}"
    );

    // gc: an orphan pack (as a writer killed after publishing packs leaves) is removed.
    let stray = job.pack_path("0000000000-stray-0");
    std::fs::write(&stray, vec![0u8; 4096]).unwrap();
    let collected = json(&store, &["gc"]);
    assert_eq!(collected["removed_packs"][0], "0000000000-stray-0");
    assert!(collected["freed_bytes"].as_u64().unwrap() >= 4096);
    assert!(!stray.exists());
    assert_eq!(
        json(&store, &["verify"]).as_array().unwrap().len(),
        seqs.len()
    );
}

#[test]
fn verify_finds_every_injected_corruption() {
    type Damage = fn(&supervise_store::JobStore, u64);
    let cases: [(&str, Damage, &str); 4] = [
        (
            "flipped byte in a pack",
            |job, seq| {
                let m = job.read_manifest(seq).unwrap();
                let c = &m.entries.iter().find(|e| e.name == "grid").unwrap().chunks[0];
                let path = job.pack_path(&m.packs[c.pack as usize]);
                let mut bytes = std::fs::read(&path).unwrap();
                let at = (c.offset + 44 + 10) as usize;
                bytes[at] ^= 0x40;
                std::fs::write(&path, bytes).unwrap();
            },
            "damaged",
        ),
        (
            "truncated pack",
            |job, seq| {
                let m = job.read_manifest(seq).unwrap();
                let path = job.pack_path(&m.packs[0]);
                let len = std::fs::metadata(&path).unwrap().len();
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .unwrap()
                    .set_len(len / 2)
                    .unwrap();
            },
            "truncated",
        ),
        (
            "missing pack",
            |job, seq| {
                let m = job.read_manifest(seq).unwrap();
                std::fs::remove_file(job.pack_path(&m.packs[0])).unwrap();
            },
            "missing",
        ),
        (
            "truncated manifest",
            |job, seq| {
                let path = job.manifest_path(seq);
                let len = std::fs::metadata(&path).unwrap().len();
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .unwrap()
                    .set_len(len - 7)
                    .unwrap();
            },
            "damaged",
        ),
    ];
    for (what, damage, says) in cases {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let job = stopped_job_with_snapshots(&store, &["--n", "256", "--steps", "100000000"]);
        let (code, _, err) = cmd(&store, &["verify"]);
        assert_eq!(code, 0, "{what}: clean store: {err}");
        let newest = *job.snapshot_seqs().unwrap().last().unwrap();
        damage(&job, newest);
        let (code, out, err) = cmd(&store, &["verify", "--json"]);
        assert_eq!(code, 5, "{what}: {out} {err}");
        let verdicts: Value = serde_json::from_str(&out).unwrap();
        let bad: Vec<&Value> = verdicts
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["ok"] == false)
            .collect();
        assert!(
            bad.iter().any(|v| v["snapshot"] == newest),
            "{what}: {verdicts}"
        );
        let error = bad[bad.len() - 1]["error"].as_str().unwrap();
        assert!(error.contains(says), "{what}: {error}");
        assert!(err.contains("are damaged"), "{what}: {err}");
        let (code, human, _) = cmd(&store, &["verify", &newest.to_string()]);
        assert_eq!(code, 5);
        assert!(
            human.contains(&format!("snapshot {newest}: DAMAGED")),
            "{what}: {human}"
        );
    }
}

#[test]
fn verify_repair_mends_from_good_copies_and_refuses_while_the_job_runs() {
    use supervise_store::{SnapshotWriter, Store};
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let job = Store::open(&store).unwrap().job("j").unwrap();
    let grid: Vec<f64> = (0..100_000).map(|i| (i as f64 * 1e-3).sin()).collect();
    let mut writer = SnapshotWriter::open(job.clone(), 0).unwrap();
    for _ in 0..2 {
        let mut b = writer.begin(None);
        b.slice("grid", &grid).unwrap();
        b.commit().unwrap();
    }
    let m = job.read_manifest(1).unwrap();
    let chunk = m.entries[0].chunks[1];
    let path = job.pack_path(&m.packs[0]);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[chunk.offset as usize + 44 + 7] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    writer
        .distrust(&[(m.packs[0].clone(), chunk.offset, chunk.hash)])
        .unwrap();
    let mut b = writer.begin(None);
    b.slice("grid", &grid).unwrap();
    b.commit().unwrap();
    drop(writer);

    // While someone holds the job, repair refuses with 4 and changes nothing.
    let holder = supervise_store::lock::JobLock::try_take(
        job.dir(),
        &supervise_store::lock::Owner::this_process("test"),
    )
    .unwrap();
    let (code, _, err) = cmd(&store, &["verify", "--repair", "--job", "j"]);
    assert_eq!(code, 4, "{err}");
    assert_eq!(job.snapshot_seqs().unwrap(), vec![3]);
    drop(holder);

    let done = json(&store, &["verify", "--repair", "--job", "j"]);
    assert_eq!(done["repaired"], serde_json::json!([1, 2]), "{done}");
    assert_eq!(done["unrepairable"], serde_json::json!([]), "{done}");
    let verdicts = json(&store, &["verify", "--job", "j"]);
    let ok: Vec<bool> = verdicts
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["ok"].as_bool().unwrap())
        .collect();
    assert_eq!(ok, vec![true, true, true], "{verdicts}");
}

#[test]
fn a_program_without_dashes_is_told_where_they_go() {
    let (code, _, err) = bare(&["./sim", "--n", "4"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("put it after `--`: supervise -- ./sim --n 4"),
        "{err}"
    );
    // Options before the program stay before `--`; odd words are quoted to copy.
    let (code, _, err) = bare(&["--every", "1s", "-q", "./sim", "a b"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("supervise --every 1s -q -- ./sim 'a b'"),
        "{err}"
    );
    // No program at all.
    let (code, _, err) = bare(&["--every", "1m"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no program to run"), "{err}");
    assert!(err.contains("supervise --every 1m -- <PROGRAM>"), "{err}");
    // A mistyped subcommand gets a suggestion too.
    let (code, _, err) = bare(&["stauts"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("did you mean `supervise status`?"), "{err}");
    assert!(!bare(&["./sim"]).2.contains("did you mean"));
    // The usage shows both forms.
    let (code, out, _) = bare(&["--help"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("supervise [OPTIONS] -- <PROGRAM> [ARGS]...")
            && out.contains("supervise <SUBCOMMAND>"),
        "{out}"
    );
}

#[test]
fn a_store_that_is_a_file_is_not_a_directory_for_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("store");
    std::fs::write(&file, b"a file").unwrap();
    let to = dir.path().join("out");
    let to = to.to_str().unwrap();
    let want = format!("{} is not a directory", file.display());
    let commands: [&[&str]; 11] = [
        &["--", "true"],
        &["ls"],
        &["ls", "--allow-foreign-store"],
        &["show", "latest"],
        &["verify"],
        &["verify", "--repair"],
        &["gc"],
        &["restore", "latest", "--to", to],
        &["snapshot"],
        &["status"],
        &["log"],
    ];
    for args in commands {
        // The run command takes its options before `--`.
        let (code, _, err) = if args[0] == "--" {
            let store = file.to_str().unwrap();
            bare(&["--store", store, "--", "true"])
        } else {
            cmd(&file, args)
        };
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains(&want), "{args:?}: {err}");
        assert_eq!(err.matches("(os error").count(), 0, "{args:?}: {err}");
    }
    // A store below a file names the file.
    let below = file.join("sub");
    for args in [&["ls"][..], &["status"]] {
        let (code, _, err) = cmd(&below, args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains(&want), "{args:?}: {err}");
    }
    let (code, _, err) = bare(&["--store", below.to_str().unwrap(), "--", "true"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&want), "{err}");
    // A missing store is said once, plainly.
    let (code, _, err) = cmd(&dir.path().join("none"), &["ls"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no store at") && err.contains("does not exist"),
        "{err}"
    );
}

/// A store with job `j` whose history is `records` (kind, seconds ago, message), oldest first.
fn store_with_history(store: &Path, records: &[(&str, u64, &str)]) {
    let job = supervise_store::Store::open(store)
        .unwrap()
        .job("j")
        .unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut text = String::new();
    for (kind, ago, message) in records {
        let record = serde_json::json!({
            "unix_ms": now_ms - ago * 1000,
            "pid": 42,
            "kind": kind,
            "message": message,
        });
        text.push_str(&format!("{record}\n"));
    }
    std::fs::write(job.dir().join("events.log"), text).unwrap();
}

fn messages(log: &Value) -> Vec<&str> {
    log.as_array()
        .unwrap()
        .iter()
        .map(|r| r["message"].as_str().unwrap())
        .collect()
}

#[test]
fn log_filters_by_count_time_and_kind() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    store_with_history(
        &store,
        &[
            ("start", 7200, "supervisor started"),
            ("spawned", 7100, "spawned pid 1"),
            ("snapshot", 3600, "snapshot 1 done"),
            ("died", 300, "child died"),
            ("restart", 290, "restarting"),
            ("spawned", 280, "spawned pid 2"),
            ("snapshot", 60, "snapshot 2 done"),
        ],
    );
    let all = json(&store, &["log"]);
    assert_eq!(all.as_array().unwrap().len(), 7);
    assert_eq!(
        messages(&json(&store, &["log", "-n", "2"])),
        ["spawned pid 2", "snapshot 2 done"]
    );
    assert_eq!(
        messages(&json(&store, &["log", "--since", "10m"])),
        [
            "child died",
            "restarting",
            "spawned pid 2",
            "snapshot 2 done"
        ]
    );
    let at = all[2]["unix_ms"].as_u64().unwrap();
    let rfc3339 =
        humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(at))
            .to_string();
    assert_eq!(
        json(&store, &["log", "--since", &rfc3339])
            .as_array()
            .unwrap()
            .len(),
        5,
        "{rfc3339}"
    );
    assert_eq!(
        messages(&json(
            &store,
            &["log", "--kind", "spawned", "--kind", "died"]
        )),
        ["spawned pid 1", "child died", "spawned pid 2"]
    );
    // Combined: the last one of a kind since a time.
    assert_eq!(
        messages(&json(
            &store,
            &["log", "--kind", "snapshot", "--since", "2h", "-n", "1"]
        )),
        ["snapshot 2 done"]
    );
    // Human output too.
    let (code, out, _) = cmd(&store, &["log", "--kind", "died"]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains("child died"), "{out}");
    // A kind that matches nothing: nothing printed, the kinds there are listed.
    let (code, out, err) = cmd(&store, &["log", "--kind", "gave-up", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap(),
        Value::Array(vec![])
    );
    assert!(err.contains("no record of kind gave-up"), "{err}");
    assert!(
        err.contains("start (1), spawned (2), snapshot (2), died (1), restart (1)"),
        "{err}"
    );
    let (code, _, err) = cmd(&store, &["log", "--since", "yesterday"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("RFC 3339"), "{err}");
}

#[test]
fn a_reader_that_closes_the_pipe_early_ends_every_command_quietly() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    // Far more output than a pipe holds, so that the writer meets the closed pipe.
    let many: Vec<(&str, u64, &str)> = (0..3000)
        .map(|_| ("event", 1, "something happened"))
        .collect();
    store_with_history(&store, &many);
    for json in [true, false] {
        let mut command = std::process::Command::new(supervise_bin());
        command.args(["log", "--store"]).arg(&store);
        if json {
            command.arg("--json");
        }
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(!first.is_empty());
        // The reader is gone (as `| head -1` leaves it).
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "json {json}: {err}");
        assert_eq!(err, "", "json {json}");
    }
}

/// A stand-in for a running supervisor of `job`: holds its lock and answers every request on
/// its socket with `reply`.
fn fake_supervisor(
    job: &supervise_store::JobStore,
    reply: Value,
) -> supervise_store::lock::TryLock {
    use std::io::{BufRead, BufReader, Write};
    let lock = supervise_store::lock::JobLock::try_take(
        job.dir(),
        &supervise_store::lock::Owner::this_process("test"),
    )
    .unwrap();
    let listener =
        std::os::unix::net::UnixListener::bind(job.dir().join("supervisor.sock")).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { break };
            let mut line = String::new();
            let _ = BufReader::new(&stream).read_line(&mut line);
            let _ = (&stream).write_all(format!("{reply}\n").as_bytes());
        }
    });
    lock
}

/// Two snapshots of the same grid in job `j` of `store`.
fn two_snapshots(store: &Path) -> supervise_store::JobStore {
    use supervise_store::{SnapshotWriter, Store};
    let job = Store::open(store).unwrap().job("j").unwrap();
    let grid: Vec<f64> = (0..100_000).map(|i| (i as f64 * 1e-3).sin()).collect();
    let mut writer = SnapshotWriter::open(job.clone(), 0).unwrap();
    for _ in 0..2 {
        let mut b = writer.begin(None);
        b.slice("grid", &grid).unwrap();
        b.commit().unwrap();
    }
    job
}

#[test]
fn status_and_show_name_and_define_their_ratio() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let job = two_snapshots(&store);

    let shown = json(&store, &["show", "latest"]);
    let (total, stored) = (
        shown["bytes_total"].as_f64().unwrap(),
        shown["stored_bytes"].as_f64().unwrap(),
    );
    assert!((shown["dedup_ratio"].as_f64().unwrap() - total / stored).abs() < 1e-9);
    let (_, human, _) = cmd(&store, &["show", "latest"]);
    assert!(
        human.contains("state/stored") && human.contains("divided by"),
        "{human}"
    );

    // A supervisor older than `shim_connected` says nothing about the shim: the ratio shows.
    let _held = fake_supervisor(
        &job,
        serde_json::json!({"ok": true, "status": {"supervisor_pid": 1, "child_pid": 2,
            "started_unix_ms": 0, "restarts": 0, "last_snapshot": 2,
            "last_snapshot_unix_ms": 0, "command": "sim"}}),
    );
    let status = json(&store, &["status"]);
    let row = &status[0];
    assert_eq!(row["shim_connected"], Value::Null, "{status}");
    let (state, stored) = (
        row["state_bytes"].as_f64().unwrap(),
        row["stored_bytes"].as_f64().unwrap(),
    );
    assert_eq!(state, 2.0 * total, "two snapshots of the same state");
    assert!((row["dedup_ratio"].as_f64().unwrap() - state / stored).abs() < 1e-9);
    let (_, human, _) = cmd(&store, &["status"]);
    assert!(human.contains("STATE/STORED"), "{human}");
    assert!(human.contains(&format!("{:.2}", state / stored)), "{human}");
    assert!(human.contains("divided by"), "{human}");
    let (_, help, _) = cmd(&store, &["status", "--help"]);
    assert!(
        help.contains("STATE/STORED") && help.contains("divided by"),
        "{help}"
    );
    let (_, help, _) = cmd(&store, &["show", "--help"]);
    assert!(
        help.contains("state/stored") && help.contains("divided by"),
        "{help}"
    );
}

#[test]
fn status_says_no_shim_for_a_program_that_never_connected_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let job = supervise_store::Store::open(&store)
        .unwrap()
        .job("j")
        .unwrap();
    let _held = fake_supervisor(
        &job,
        serde_json::json!({"ok": true, "status": {"supervisor_pid": 1, "child_pid": 2,
            "started_unix_ms": 0, "restarts": 0, "last_snapshot": null,
            "last_snapshot_unix_ms": null, "command": "sleep 100", "shim_connected": false}}),
    );
    let status = json(&store, &["status"]);
    assert_eq!(status[0]["shim_connected"], false, "{status}");
    let (_, human, _) = cmd(&store, &["status"]);
    assert!(human.contains("no shim"), "{human}");
    assert!(!human.contains("0.00"), "{human}");
}
