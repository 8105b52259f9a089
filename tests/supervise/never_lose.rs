//! Work that reached a complete snapshot is never lost: the restart policy under kill storms,
//! and damage to old snapshots, through the real binary.

use std::time::Duration;

use crate::support::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// `(snapshot, step)` of every "resumed from snapshot S at step N" line the heat example said.
fn resumes(stderr: &str) -> Vec<(u64, u64)> {
    stderr
        .lines()
        .filter_map(|l| {
            let rest = l.split("resumed from snapshot ").nth(1)?;
            let mut words = rest.split(' ');
            let seq = words.next()?.parse().ok()?;
            let step = rest.split("at step ").nth(1)?.trim().parse().ok()?;
            Some((seq, step))
        })
        .collect()
}

/// How many steps of `heat --n 256` this machine computes per second now.
fn heat_steps_per_second() -> f64 {
    let started = std::time::Instant::now();
    let out = std::process::Command::new(example_bin("heat"))
        .args(["--n", "256", "--steps", "3000"])
        .env_clear()
        .output()
        .unwrap();
    assert!(out.status.success());
    3000.0 / started.elapsed().as_secs_f64()
}

/// The step recorded in a snapshot's tag (`step N`).
fn step_of(job: &supervise_store::JobStore, seq: u64) -> u64 {
    let tag = job.read_manifest(seq).unwrap().tag.unwrap();
    tag.strip_prefix("step ").unwrap().parse().unwrap()
}

#[test]
fn an_external_kill_storm_steps_back_past_nothing_and_loses_no_step() {
    // Long enough that no life of the storm can finish the job in its 0.3 s, on a fast
    // machine or a slow one: about 8 s of computing at this machine's present speed (the first
    // three snapshots take 3 s, and every life of the storm starts again from the third).
    let steps = (heat_steps_per_second() * 8.0).clamp(20_000.0, 400_000.0) as u64;
    let steps = steps.to_string();
    let args = ["--n", "256", "--steps", steps.as_str()];
    let reference = reference_checksum(&args);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let run = Run::start(
        &store,
        &[
            "--every",
            "1s",
            "--keep",
            "3",
            "--backoff",
            "100ms",
            "--backoff-max",
            "200ms",
            "-v",
        ],
        &heat(&args),
        &[],
    );
    let first = run.nth_child_pid(1);
    run.wait_for_snapshot(3);
    kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    // Each new life is killed 0.3 s after it starts: shorter than --every, so no life takes a
    // snapshot. More lives than --max-restarts (10) are killed.
    const STORM: usize = 14;
    for n in 2..=STORM + 1 {
        let pid = run.nth_child_pid(n);
        std::thread::sleep(Duration::from_millis(300));
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    let job = only_job(&store);
    let before_storm = *job.snapshot_seqs().unwrap().last().unwrap();
    let its_step = step_of(&job, before_storm);
    let fin = run.wait(LONG);
    fin.assert_completed(&reference);
    let resumes = resumes(&fin.stderr);
    assert!(resumes.len() > STORM, "{resumes:?}\n{}", fin.stderr);
    // Every life of the storm, and the one that finished, resumed from the newest snapshot:
    // nothing was stepped back past, and no step beyond it was lost.
    let storm: Vec<_> = resumes.iter().skip(1).take(STORM).collect();
    assert!(
        storm
            .iter()
            .all(|(seq, step)| *seq == before_storm && *step == its_step && *step > 0),
        "resumes {resumes:?}, newest before the storm {before_storm}\n{}",
        fin.stderr
    );
    let suspects = events_of(&store, "suspect");
    assert!(suspects.is_empty(), "{suspects:?}");
}

#[test]
fn a_missing_pack_of_the_oldest_snapshot_does_not_stop_the_resume() {
    // About 4 s of computing here, whatever the machine's speed: 4 snapshots come first.
    let steps = ((heat_steps_per_second() * 4.0).clamp(20_000.0, 200_000.0) as u64).to_string();
    let args = ["--n", "256", "--steps", steps.as_str()];
    let reference = reference_checksum(&args);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let options = ["--every", "200ms", "--keep", "3"];
    let run = Run::start(&store, &options, &heat(&args), &[]);
    run.wait_for_snapshot(4);
    run.signal(Signal::SIGTERM);
    let fin = run.wait(LONG);
    assert_eq!(fin.code, Some(128 + 15), "{}", fin.stderr);
    let job = only_job(&store);
    let seqs = job.snapshot_seqs().unwrap();
    assert_eq!(seqs.len(), 3, "{seqs:?}");
    let (oldest, newest) = (seqs[0], seqs[2]);
    // Delete a pack only the oldest snapshot uses.
    let others: std::collections::BTreeSet<String> = seqs[1..]
        .iter()
        .flat_map(|s| job.read_manifest(*s).unwrap().packs)
        .collect();
    let only_oldest = job
        .read_manifest(oldest)
        .unwrap()
        .packs
        .into_iter()
        .find(|p| !others.contains(p))
        .expect("the oldest snapshot has a pack of its own");
    std::fs::remove_file(job.pack_path(&only_oldest)).unwrap();
    let newest_step = step_of(&job, newest);

    let fin = Run::start(&store, &options, &heat(&args), &[]).wait(LONG);
    fin.assert_completed(&reference);
    assert_eq!(
        resumes(&fin.stderr).first(),
        Some(&(newest, newest_step)),
        "{}",
        fin.stderr
    );
    assert!(newest_step > 0);
    // Set aside (and later removed by retention as older than the oldest kept), and said.
    assert!(!job.snapshot_seqs().unwrap().contains(&oldest));
    let set_aside = events_of(&store, "snapshot-set-aside");
    assert!(
        set_aside.iter().any(|e| e["seq"] == oldest),
        "{set_aside:?}"
    );
    let suspects = events_of(&store, "suspect");
    assert!(suspects.is_empty(), "{suspects:?}");
}

/// Flips the last stored byte of every record of a pack; returns how many it flipped.
fn rot_every_record(path: &std::path::Path) -> usize {
    let mut bytes = std::fs::read(path).unwrap();
    let (mut at, mut n) = (8usize, 0);
    while at + 44 <= bytes.len() {
        let stored = u32::from_le_bytes(bytes[at + 36..at + 40].try_into().unwrap()) as usize;
        let end = at + 44 + stored;
        bytes[end - 1] ^= 0x5a;
        n += 1;
        at = end;
    }
    std::fs::write(path, bytes).unwrap();
    n
}

fn sparse(args: &[&str]) -> Vec<std::ffi::OsString> {
    let mut cmd = vec![example_bin("sparse").into_os_string()];
    cmd.extend(args.iter().map(std::ffi::OsString::from));
    cmd
}

#[test]
fn a_rotten_shared_chunk_is_found_by_the_scrub_and_no_later_snapshot_uses_it() {
    let args = [
        "--mib",
        "8",
        "--percent",
        "2",
        "--rounds",
        "14",
        "--sleep-ms",
        "250",
    ];
    let reference = example_checksum("sparse", &args);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let run = Run::start(
        &store,
        &["--every", "1h", "--keep", "20", "--scrub-every", "1s"],
        &sparse(&args),
        &[],
    );
    run.wait_for_snapshot(3);
    let job = only_job(&store);
    // The first snapshot's pack holds most chunks every later snapshot references.
    let first_pack = job.read_manifest(1).unwrap().packs[0].clone();
    let rotted = rot_every_record(&job.pack_path(&first_pack));
    assert!(rotted > 100, "{rotted} records");
    let fin = run.wait(LONG);
    assert_eq!(fin.code, Some(0), "{}", fin.stderr);
    assert_eq!(
        checksum_of(&fin.stdout).as_deref(),
        Some(reference.as_str())
    );
    // Every snapshot still committed verifies: none of them was built on a rotten record, and
    // those that used one were set aside.
    let kept = job.snapshot_seqs().unwrap();
    assert!(
        kept.iter().any(|s| *s > 5),
        "later snapshots exist: {kept:?}\n{}",
        fin.stderr
    );
    for seq in &kept {
        supervise_store::SnapshotReader::open(&job, *seq)
            .and_then(|r| r.verify())
            .unwrap_or_else(|e| panic!("snapshot {seq}: {e}\n{}", fin.stderr));
    }
    assert!(!kept.contains(&1), "{kept:?}");
    let damaged = events_of(&store, "records-damaged");
    assert!(!damaged.is_empty(), "{}", fin.stderr);
}

#[test]
fn a_full_disk_fails_snapshots_but_never_the_program() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = Tmpfs::mount(&dir.path().join("disk"), "3m") else {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    };
    let store = disk.0.join("store");
    let args = ["--mib", "4", "--percent", "10", "--rounds", "12"];
    let reference = example_checksum("sparse", &args);
    let fin = Run::start(
        &store,
        &["--keep", "50", "--every", "1h"],
        &sparse(&args),
        &[],
    )
    .wait(LONG);
    assert_eq!(fin.code, Some(0), "{}", fin.stderr);
    assert_eq!(
        checksum_of(&fin.stdout).as_deref(),
        Some(reference.as_str())
    );
    let failed = events_of(&store, "snapshot-failed");
    assert!(
        failed.iter().any(|e| e["error"]
            .as_str()
            .unwrap()
            .contains("No space left on device")),
        "{failed:?}"
    );
    assert_eq!(events_of(&store, "spawned").len(), 1, "{}", fin.stderr);
    // The snapshots that made it are intact.
    let job = only_job(&store);
    let kept = job.snapshot_seqs().unwrap();
    assert!(!kept.is_empty());
    for seq in kept {
        supervise_store::SnapshotReader::open(&job, seq)
            .and_then(|r| r.verify())
            .unwrap_or_else(|e| panic!("snapshot {seq}: {e}"));
    }
}

#[test]
fn a_read_only_store_is_an_error_naming_the_path_and_keeps_its_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = Tmpfs::mount(&dir.path().join("disk"), "8m") else {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    };
    let store = disk.0.join("store");
    let args = ["--mib", "1", "--rounds", "2"];
    let fin = Run::start(&store, &["--every", "1h"], &sparse(&args), &[]).wait(LONG);
    assert_eq!(fin.code, Some(0), "{}", fin.stderr);
    let before = only_job(&store).snapshot_seqs().unwrap();
    let spawned_before = events_of(&store, "spawned").len();
    let remounted = std::process::Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&disk.0)
        .status()
        .unwrap();
    assert!(remounted.success());
    let fin = Run::start(&store, &["--every", "1h"], &sparse(&args), &[]).wait(LONG);
    assert_eq!(fin.code, Some(1), "{}", fin.stderr);
    // A user-facing error: it names the store and the system's reason.
    assert!(
        fin.stderr.contains(&store.display().to_string()) && fin.stderr.contains("Read-only"),
        "{}",
        fin.stderr
    );
    let spawned = events_of(&store, "spawned").len();
    assert_eq!(spawned, spawned_before, "no life started: {}", fin.stderr);
    // A read-only store records no event: only the line on stderr can tell a life started.
    assert_eq!(
        fin.stderr.matches("spawned pid").count(),
        0,
        "{}",
        fin.stderr
    );
    assert_eq!(only_job(&store).snapshot_seqs().unwrap(), before);
}
