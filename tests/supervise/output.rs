//! End-to-end tests of output files (`Shim::output`, examples/lines.rs) under the real
//! `supervise` binary, and of stores written by older releases (tests/fixtures/store-v1, store-v2).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use crate::support::*;

/// The steps at which the lines of `stderr` say a run resumed ("resumed from snapshot S at
/// step N").
fn resumed_steps(stderr: &str) -> Vec<u64> {
    stderr
        .lines()
        .filter_map(|l| l.split_once("resumed from snapshot ").map(|(_, r)| r))
        .filter_map(|r| r.split_once(" at step ").map(|(_, s)| s))
        .filter_map(|s| s.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn an_output_file_killed_at_random_moments_equals_an_uninterrupted_runs() {
    // Flushed every 100 lines: when a kill lands, the file holds lines written after the last
    // snapshot, which the resumed run must cut off.
    let args = [
        "--n",
        "8192",
        "--steps",
        "100000",
        "--out",
        "out.txt",
        "--flush-every",
        "100",
    ];
    let dir = tempfile::tempdir().unwrap();
    let (reference, checksum) =
        run_alone_in(&example_bin("lines"), &dir.path().join("alone"), &args);
    let work = dir.path().join("work");
    fs::create_dir(&work).unwrap();
    // Something in the way: a fresh start under a supervisor begins with an empty file.
    fs::write(work.join("out.txt"), "stale bytes from an earlier run\n").unwrap();
    let store = dir.path().join("store");
    let mut cmd = Command::new(supervise_bin());
    cmd.arg("--store")
        .arg(&store)
        .args([
            "--every",
            "50ms",
            "--backoff",
            "20ms",
            "--max-restarts",
            "50",
        ])
        .arg("--")
        .arg(example_bin("lines"))
        .args(args)
        .current_dir(&work);
    let run = Run::spawn(cmd);
    let kills = kill_lives_after_a_snapshot(&run, 3, 400);
    let fin = run.wait(LONG);
    fin.assert_completed(&checksum);
    let resumed = resumed_steps(&fin.stderr);
    assert_eq!(resumed.len(), kills, "{}", fin.stderr);
    assert!(resumed.iter().all(|&s| s > 0), "{resumed:?}");
    let got = fs::read(work.join("out.txt")).unwrap();
    assert_eq!(got.len(), reference.len(), "output file length");
    assert!(
        got == reference,
        "the output file differs from the uninterrupted run's"
    );
    // The newest snapshot recorded the file by its absolute path.
    let job = only_job(&store);
    let newest = *job.snapshot_seqs().unwrap().last().unwrap();
    let marks = job.read_manifest(newest).unwrap().outputs;
    let abs = fs::canonicalize(&work).unwrap().join("out.txt");
    assert_eq!(marks.len(), 1);
    assert_eq!(Path::new(&marks[0].path), abs);
    assert!(marks[0].len > 0 && marks[0].len <= reference.len() as u64);
}

/// The fixture store of format `version` (tests/fixtures/store-v<version>) copied to
/// `dir/store`, with the modes a store must have.
fn fixture_store(dir: &Path, version: u16) -> std::path::PathBuf {
    fn copy(from: &Path, to: &Path) {
        fs::create_dir(to).unwrap();
        fs::set_permissions(to, fs::Permissions::from_mode(0o700)).unwrap();
        for e in fs::read_dir(from).unwrap().flatten() {
            let target = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy(&e.path(), &target);
            } else {
                fs::copy(e.path(), &target).unwrap();
                fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).unwrap();
            }
        }
    }
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/store-v{version}"));
    let store = dir.join("store");
    copy(&fixture, &store);
    store
}

/// The format version in a store file's header.
fn version_of(path: &Path) -> u16 {
    let bytes = fs::read(path).unwrap();
    u16::from_le_bytes([bytes[6], bytes[7]])
}

const HEAT_ARGS: [&str; 4] = ["--n", "64", "--steps", "20000"];

/// What the fixture store of each old version holds: its two snapshots and their steps.
const FIXTURES: [(u16, [u64; 2], [u64; 2]); 2] =
    [(1, [1, 2], [2206, 4360]), (2, [2, 3], [7769, 11469])];

#[test]
fn stores_of_every_older_version_verify_list_and_restore_with_restore_to() {
    for (version, seqs, steps) in FIXTURES {
        let dir = tempfile::tempdir().unwrap();
        let store = fixture_store(dir.path(), version);
        let job = only_job(&store);
        for seq in seqs {
            assert_eq!(version_of(&job.manifest_path(seq)), version);
        }
        let (code, out, err) = cmd(&store, &["verify"]);
        assert_eq!(code, 0, "v{version}: {out}{err}");
        let (code, out, err) = cmd(&store, &["ls"]);
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains("heat") && out.contains(" 2 "),
            "v{version}: {out}"
        );
        let newest = seqs[1].to_string();
        let (code, out, err) = cmd(&store, &["show", &newest]);
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains(&format!("step {}", steps[1])),
            "v{version}: {out}"
        );
        let to = dir.path().join("restored");
        let (code, out, err) = cmd(&store, &["restore", &newest, "--to", to.to_str().unwrap()]);
        assert_eq!(code, 0, "v{version}: {out}{err}");
        assert_eq!(
            fs::metadata(to.join("grid.f64")).unwrap().len(),
            64 * 64 * 8
        );
        let params: serde_json::Value =
            serde_json::from_slice(&fs::read(to.join("params.json")).unwrap()).unwrap();
        assert_eq!(params["step"], steps[1], "v{version}: {params}");
        let m = job.read_manifest(seqs[1]).unwrap();
        assert!(m.arrays.is_empty());
        match version {
            1 => assert_eq!((m.origin, m.outputs.len()), (None, 0)),
            _ => assert_eq!(m.origin.unwrap().program, "/usr/local/bin/heat"),
        }
    }
}

#[test]
fn heat_resumes_from_stores_of_every_older_version_and_takes_new_snapshots_on_top() {
    for (version, seqs, steps) in FIXTURES {
        heat_resumes_from_an_old_store(version, seqs, steps);
    }
}

fn heat_resumes_from_an_old_store(version: u16, old: [u64; 2], steps: [u64; 2]) {
    let dir = tempfile::tempdir().unwrap();
    let store = fixture_store(dir.path(), version);
    let reference = reference_checksum(&HEAT_ARGS);
    assert_eq!(
        reference, "22dbb48585ef17f84b44b9acbcbba83bd07d4e0f22e1b1aacb893996bb94b360",
        "the fixtures' README records this checksum"
    );
    let origin = r#"{"program":"/usr/local/bin/heat","exe_blake3":null,"args":["--n","64"]}"#;
    let out = Command::new(example_bin("heat"))
        .args(HEAT_ARGS)
        .env_clear()
        .env("SUPERVISE_STORE", &store)
        .env("SUPERVISE_JOB", "heat")
        .env("SUPERVISE_EVERY", "20ms")
        .env("SUPERVISE_KEEP", "100000")
        .env("SUPERVISE_ORIGIN", origin)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // It resumed from the old store's newest snapshot, and ended as an uninterrupted run does.
    assert!(
        err.contains(&format!(
            "heat: resumed from snapshot {} at step {}",
            old[1], steps[1]
        )),
        "v{version}: {err}"
    );
    assert_eq!(
        checksum_of(&String::from_utf8_lossy(&out.stdout)).as_deref(),
        Some(reference.as_str())
    );
    let job = only_job(&store);
    let seqs = job.snapshot_seqs().unwrap();
    assert_eq!(&seqs[..2], &old, "the old snapshots stay");
    assert!(seqs.len() > 2, "no new snapshot on top: {seqs:?}");
    for &seq in &seqs[2..] {
        // heat gives no array shapes: its manifests keep the version 2 layout, which the
        // release before version 3 reads.
        assert_eq!(version_of(&job.manifest_path(seq)), 2, "snapshot {seq}");
        let m = job.read_manifest(seq).unwrap();
        assert_eq!(m.origin.unwrap().program, "/usr/local/bin/heat");
    }
    assert_eq!(version_of(&job.manifest_path(old[0])), version);
    let (code, out, err) = cmd(&store, &["verify"]);
    assert_eq!(code, 0, "{out}{err}");
    // The newest snapshot restores too: the same job again, resumed from it.
    let newest = *seqs.last().unwrap();
    let again = Command::new(example_bin("heat"))
        .args(HEAT_ARGS)
        .env_clear()
        .env("SUPERVISE_STORE", &store)
        .env("SUPERVISE_JOB", "heat")
        .env("SUPERVISE_RESTORE", newest.to_string())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains(&format!("heat: resumed from snapshot {newest} at step ")),
        "{err}"
    );
    assert_eq!(
        checksum_of(&String::from_utf8_lossy(&again.stdout)).as_deref(),
        Some(reference.as_str())
    );
}
