//! Jobs of many ranks with the real Open MPI: `examples/heat_mpi.c` under `mpirun -n 4`, its
//! ranks killed at random moments (and during a snapshot), the supervisor killed, a part
//! damaged, and strangers at the ranks' endpoint. Every resume is checked to come from an
//! epoch past step 0, and every run to end with the checksum of an uninterrupted run (which
//! is also the single-process C heat's).

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::c_abi::compile;
use crate::support::*;
use nix::sys::signal::Signal;
use supervise_store::epoch;

/// Open MPI as root in a container, four ranks on two cores.
pub const MPI_ENV: [(&str, &str); 3] = [
    ("OMPI_ALLOW_RUN_AS_ROOT", "1"),
    ("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1"),
    ("OMPI_MCA_rmaps_base_oversubscribe", "1"),
];

/// The grid and length of the runs: about 3 s uninterrupted.
const ARGS: [&str; 6] = ["--n", "96", "--steps", "500", "--sleep-ms", "6"];

pub fn build(dir: &Path) -> PathBuf {
    let include = format!("-I{}/shim/capi/include", env!("CARGO_MANIFEST_DIR"));
    let flags = ["-O2", "-Wall", "-Wextra", "-Werror", include.as_str()];
    compile(dir, "mpicc", &flags, &["examples/heat_mpi.c"], "heat-mpi")
}

fn mpirun(program: &Path, ranks: u32) -> Vec<OsString> {
    let mut cmd: Vec<OsString> = vec!["mpirun".into(), "-n".into(), ranks.to_string().into()];
    cmd.push(program.into());
    cmd.extend(ARGS.iter().map(OsString::from));
    cmd
}

/// The checksum of an uninterrupted run, without a supervisor; checked equal to the Rust
/// heat's for the same grid and steps.
fn reference(program: &Path) -> String {
    let mut cmd = Command::new("mpirun");
    cmd.args(["-n", "4"]).arg(program).args(ARGS);
    for (k, v) in MPI_ENV {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .expect("mpirun is needed (scripts/test installs it)");
    let sum = checksum_of(&String::from_utf8_lossy(&out.stdout)).expect("a checksum");
    assert_eq!(
        sum,
        reference_checksum(&ARGS[..4]),
        "heat_mpi and heat disagree"
    );
    sum
}

/// Every heat_mpi process of this test (by its program path).
fn ranks_running(program: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == program)
            && alive(pid)
        {
            pids.push(pid);
        }
    }
    pids
}

fn start(store: &Path, options: &[&str], program: &Path) -> Run {
    let mut opts = vec!["--job", "heat-mpi", "--backoff", "10ms"];
    opts.extend_from_slice(options);
    Run::start(store, &opts, &mpirun(program, 4), &MPI_ENV)
}

/// The job with the fail point `point` armed in rank `rank` only.
fn start_failing(store: &Path, program: &Path, point: &str, rank: &str) -> Run {
    let mut env = MPI_ENV.to_vec();
    env.push(("SUPERVISE_FAILPOINT", point));
    env.push(("SUPERVISE_FAILPOINT_RANK", rank));
    let options = ["--job", "heat-mpi", "--backoff", "10ms", "--every", "200ms"];
    let mut command = mpirun(program, 4);
    command.extend(["--table-kib".into(), TABLE_KIB.to_string().into()]);
    Run::start(store, &options, &command, &env)
}

/// Each published epoch names a part of every rank, and each part is there.
fn assert_epochs_whole(store: &Path) {
    let job = supervise_store::Store::open(store)
        .unwrap()
        .existing_job("heat-mpi")
        .unwrap();
    let numbers = epoch::numbers(&job).unwrap();
    assert!(!numbers.is_empty());
    for n in numbers {
        let e = epoch::read(&job, n).unwrap();
        assert_eq!(e.size, 4);
        epoch::check_parts(&job, &e).unwrap();
    }
}

/// The table every rank holds alike (heat_mpi's --table-kib), rewritten every 20 steps.
const TABLE_KIB: u64 = 512;

#[test]
fn ranks_killed_at_random_moments_resume_from_whole_epochs() {
    ranks_killed_at_random_moments(&[]);
}

/// The same with ranks that agree on each epoch's iteration themselves (supervise_mpi.h).
#[test]
fn ranks_agreeing_through_mpi_killed_at_random_moments_resume_from_whole_epochs() {
    ranks_killed_at_random_moments(&["--agree", "3"]);
}

/// Each rank also holds the same table (`--table-kib`): it is stored once an epoch, not once
/// a rank, and a resumed rank checks that its table is the one of its step.
fn ranks_killed_at_random_moments(extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let program = build(dir.path());
    let reference = reference(&program);
    let store = dir.path().join("store");
    let mut command = mpirun(&program, 4);
    command.extend(extra.iter().map(OsString::from));
    command.extend(["--table-kib".into(), TABLE_KIB.to_string().into()]);
    let run = Run::start(
        &store,
        &["--job", "heat-mpi", "--backoff", "10ms", "--every", "150ms"],
        &command,
        &MPI_ENV,
    );
    let mut rng = fastrand::Rng::new();
    eprintln!("random seed {}", rng.get_seed());
    let mut kills = 0;
    for life in 1..=3 {
        run.nth_child_pid(life);
        after_a_snapshot_of_this_life(&run);
        // Up to 300 ms after a snapshot: with one every 150 ms, many kills land in one.
        std::thread::sleep(Duration::from_millis(rng.u64(0..300)));
        let ranks = ranks_running(&program);
        if run.ended() || ranks.len() != 4 {
            break;
        }
        sigkill(ranks[rng.usize(0..ranks.len())]);
        kills += 1;
        run.wait_for_event("died", life, |_| true);
    }
    assert!(kills >= 2, "only {kills} kills landed: make the job longer");
    let finished = run.wait(LONG);
    finished.assert_completed(&reference);
    let resumed = events_of(&store, "epoch-resumed");
    assert_eq!(resumed.len(), kills, "{resumed:?}");
    // The program's own step (its tag), past 0 and growing from one resume to the next.
    let mut last = 0;
    for r in &resumed {
        let tag = r["tag"].as_str().unwrap();
        let step: u64 = tag.strip_prefix("step ").unwrap().parse().unwrap();
        assert!(step > last, "resumed at step {step} after {last}");
        assert!(r["epoch"].as_u64().unwrap() > 0);
        assert_eq!(r["ranks"], 4);
        if extra.is_empty() {
            // Counted safe points are the program's steps here (one per step).
            assert_eq!(r["step"].as_u64(), Some(step));
        }
        last = step;
    }
    // Each life after a kill started from the epoch it said.
    let from: Vec<Option<u64>> = spawned_from(&store);
    assert_eq!(from[0], None);
    for (r, f) in resumed.iter().zip(&from[1..]) {
        assert_eq!(r["epoch"].as_u64(), *f);
    }
    assert_epochs_whole(&store);
    assert!(ranks_running(&program).is_empty(), "ranks left behind");
    assert_table_stored_once_an_epoch(&store);
}

/// The ranks' new bytes in each epoch: at most the grid and one copy of the table (four
/// copies, one a rank, without claims on shared chunks), and at least one epoch wrote it.
fn assert_table_stored_once_an_epoch(store: &Path) {
    let job = supervise_store::Store::open(store)
        .unwrap()
        .existing_job("heat-mpi")
        .unwrap();
    let grid = 94 * 96 * 8u64;
    let table = TABLE_KIB << 10;
    let mut wrote_table = 0;
    for n in epoch::numbers(&job).unwrap() {
        let e = epoch::read(&job, n).unwrap();
        let new: u64 = e.parts.iter().map(|p| p.bytes_new).sum();
        assert!(
            new <= grid + table + (16 << 10),
            "epoch {n} stored {new} new bytes: the table ({table}) more than once? {e:?}"
        );
        if new >= table {
            wrote_table += 1;
        }
    }
    assert!(wrote_table >= 1, "no epoch stored the table");
}

#[test]
fn a_rank_dying_in_its_commit_never_lets_that_epoch_be_restored() {
    let dir = tempfile::tempdir().unwrap();
    let program = build(dir.path());
    let reference = reference(&program);
    let store = dir.path().join("store");
    // Rank 2 dies when its third part's manifest is visible, before the epoch is published:
    // the other ranks' parts of that epoch are durable too, and must never be restored.
    let run = start_failing(&store, &program, "manifest-renamed@3", "2");
    let finished = run.wait(LONG);
    finished.assert_completed(&reference);
    let resumed = events_of(&store, "epoch-resumed");
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    assert_eq!(resumed[0]["epoch"], 2, "{resumed:?}");
    assert!(resumed[0]["step"].as_u64().unwrap() > 0);
    let failed = events_of(&store, "snapshot-failed");
    assert!(
        failed
            .iter()
            .any(|e| e["error"].as_str().unwrap_or("").contains("epoch 3")),
        "{failed:?}"
    );
    // Epoch 3 was never published, and its parts were removed.
    let job = supervise_store::Store::open(&store)
        .unwrap()
        .existing_job("heat-mpi")
        .unwrap();
    for seq in job.snapshot_seqs().unwrap() {
        let (e, _) = epoch::part_of(seq).unwrap();
        assert!(
            epoch::numbers(&job).unwrap().contains(&e),
            "part {seq} of no epoch"
        );
    }
    assert_epochs_whole(&store);
}

#[test]
fn the_supervisor_killed_leaves_no_rank_and_a_rerun_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let program = build(dir.path());
    let reference = reference(&program);
    let store = dir.path().join("store");
    let run = start(&store, &["--every", "150ms"], &program);
    run.wait_for_snapshot(2);
    assert_eq!(ranks_running(&program).len(), 4);
    run.signal(Signal::SIGKILL);
    drop(run.wait(LONG));
    assert!(
        wait_until(Duration::from_secs(15), || ranks_running(&program)
            .is_empty()),
        "ranks outlived their supervisor: {:?}",
        ranks_running(&program)
    );
    let rerun = start(&store, &["--every", "150ms"], &program);
    let finished = rerun.wait(LONG);
    finished.assert_completed(&reference);
    let resumed = events_of(&store, "epoch-resumed");
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    assert!(resumed[0]["epoch"].as_u64().unwrap() >= 2);
    assert!(resumed[0]["step"].as_u64().unwrap() > 0);
}

#[test]
fn a_damaged_part_sets_its_epoch_aside_and_the_job_resumes_from_the_one_before() {
    let dir = tempfile::tempdir().unwrap();
    let program = build(dir.path());
    let reference = reference(&program);
    let store = dir.path().join("store");
    let run = start(&store, &["--every", "150ms"], &program);
    run.wait_for_snapshot(3);
    run.signal(Signal::SIGTERM);
    let stopped = run.wait(LONG);
    assert_eq!(stopped.code, Some(143), "{}", stopped.stderr);
    let job = supervise_store::Store::open(&store)
        .unwrap()
        .existing_job("heat-mpi")
        .unwrap();
    let numbers = epoch::numbers(&job).unwrap();
    let newest = *numbers.last().unwrap();
    let before = numbers[numbers.len() - 2];
    // The operator's commands work on epochs and show the ranks.
    let ls = json(&store, &["ls", "--job", "heat-mpi"]);
    let listed: Vec<u64> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["ranks"], 4, "{r}");
            r["epoch"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(listed, numbers);
    let shown = json(&store, &["show", "latest", "--job", "heat-mpi"]);
    assert_eq!(shown["epoch"], newest);
    assert_eq!(shown["parts"].as_array().unwrap().len(), 4);
    // Every rank holds the same `step`: a chunk found in every part.
    assert!(shown["shared_chunks"].as_u64().unwrap() >= 1, "{shown}");
    let verified = json(&store, &["verify", "--job", "heat-mpi"]);
    assert!(
        verified.as_array().unwrap().iter().all(|v| v["ok"] == true),
        "{verified}"
    );
    let out = dir.path().join("restored");
    let (code, _, stderr) = cmd(
        &store,
        &[
            "restore",
            "latest",
            "--job",
            "heat-mpi",
            "--to",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    for r in 0..4 {
        assert!(out.join(format!("rank-{r}/grid.u8")).is_file());
    }
    assert!(out.join("epoch.json").is_file());
    // Rank 1's part of the newest epoch loses its manifest.
    std::fs::remove_file(job.manifest_path(epoch::part_seq(newest, 1))).unwrap();
    let rerun = start(&store, &["--every", "150ms"], &program);
    let finished = rerun.wait(LONG);
    finished.assert_completed(&reference);
    let aside = events_of(&store, "snapshot-set-aside");
    assert!(aside.iter().any(|e| e["seq"] == newest), "{aside:?}");
    let resumed = events_of(&store, "epoch-resumed");
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    assert_eq!(resumed[0]["epoch"], before, "{resumed:?}");
    assert!(events_of(&store, "resumed-instead").is_empty());
    assert!(!epoch::numbers(&job).unwrap().contains(&newest));
}

#[test]
fn strangers_at_the_tcp_endpoint_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let program = build(dir.path());
    let reference = reference(&program);
    let store = dir.path().join("store");
    let run = start(
        &store,
        &["--every", "300ms", "--rank-endpoint", "tcp:127.0.0.1:0"],
        &program,
    );
    let ranks = run.wait_for_event("ranks", 1, |_| true);
    let endpoint = ranks["endpoint"].as_str().unwrap().to_owned();
    let addr = endpoint
        .strip_prefix("tcp:")
        .expect("a TCP endpoint")
        .to_owned();
    // A raw connection that answers the challenge with a made-up proof.
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains("\"op\":\"challenge\""), "{line}");
    let join = serde_json::json!({"ev": "join", "rank": 0, "size": 4, "pid": 1, "host": "x",
        "nonce": "00", "proof": "00"});
    stream.write_all(format!("{join}\n").as_bytes()).unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert!(
        line.contains("\"op\":\"refused\"") && line.contains("wrong secret"),
        "{line}"
    );
    // A program with the shim that knows the endpoint but not the secret cannot join.
    let heat_c = {
        let include = format!("-I{}/shim/capi/include", env!("CARGO_MANIFEST_DIR"));
        compile(
            dir.path(),
            "cc",
            &["-O2", include.as_str()],
            &["examples/heat.c"],
            "heat-c",
        )
    };
    let out = Command::new(&heat_c)
        .args(["--n", "16", "--steps", "10"])
        .env("SUPERVISE_ENDPOINT", &endpoint)
        .env("SUPERVISE_SECRET", "11".repeat(32))
        .env("SUPERVISE_STORE", dir.path().join("elsewhere"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("refused: wrong secret"), "{stderr}");
    // The job itself, over TCP, is not disturbed.
    let finished = run.wait(LONG);
    finished.assert_completed(&reference);
    let refused: Vec<_> = events_of(&store, "shim-warning")
        .into_iter()
        .filter(|e| e["warning"] == "rank_refused")
        .collect();
    assert_eq!(refused.len(), 2, "{refused:?}");
}

#[test]
fn a_rank_that_hangs_is_found_and_the_launch_restarted_from_its_last_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let program = build(dir.path());
    let reference = reference(&program);
    let store = dir.path().join("store");
    let run = start(
        &store,
        &["--every", "150ms", "--hang-timeout", "2s"],
        &program,
    );
    run.wait_for_snapshot(2);
    let ranks = ranks_running(&program);
    assert_eq!(ranks.len(), 4);
    // One rank stops; the others wait for its halo: no safe point anywhere.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(ranks[1] as i32), Signal::SIGSTOP).unwrap();
    let finished = run.wait(LONG);
    finished.assert_completed(&reference);
    assert_eq!(events_of(&store, "hung").len(), 1, "{}", finished.stderr);
    let resumed = events_of(&store, "epoch-resumed");
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    assert!(resumed[0]["step"].as_u64().unwrap() > 0);
    assert!(ranks_running(&program).is_empty(), "ranks left behind");
}

#[test]
fn a_part_that_fails_fails_its_epoch_only_and_the_next_ones_publish() {
    let dir = tempfile::tempdir().unwrap();
    let program = build(dir.path());
    let reference = reference(&program);
    let store = dir.path().join("store");
    // Rank 1's third part fails to publish (an I/O error, as on a full disk); rank 1 lives on.
    // Every rank holds the same table: when rank 1 claimed its chunks first, the other ranks
    // wait for where it stores them, and the epoch's end must end their wait.
    let run = start_failing(&store, &program, "packs-synced@3:error", "1");
    let finished = run.wait(LONG);
    finished.assert_completed(&reference);
    assert!(events_of(&store, "died").is_empty(), "{}", finished.stderr);
    let failed = events_of(&store, "snapshot-failed");
    assert!(
        failed.iter().any(|e| {
            let error = e["error"].as_str().unwrap_or("");
            error.contains("epoch 3") && error.contains("injected failure")
        }),
        "{failed:?}"
    );
    // Epochs after the failed one were published: the failure held nothing up.
    let published: Vec<u64> = events_of(&store, "snapshot")
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert!(published.iter().any(|&n| n > 3), "{published:?}");
    assert!(!published.contains(&3), "{published:?}");
    assert_epochs_whole(&store);
}

/// Builds examples/heat_mpi_rs (its own workspace: the `mpi` crate needs libclang, which the
/// rest does not) with the cargo running these tests, into target/heat-mpi-rs.
fn build_rust_example() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = supervise_bin()
        .ancestors()
        .nth(2)
        .expect("the target directory")
        .join("heat-mpi-rs");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--locked", "--manifest-path"])
        .arg(root.join("examples/heat_mpi_rs/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        // Its own warnings are errors (dependencies' lints are capped by cargo).
        .env("RUSTFLAGS", "-D warnings")
        .status()
        .expect("cargo runs");
    assert!(
        status.success(),
        "examples/heat_mpi_rs does not build (it needs libopenmpi-dev and libclang-dev, which scripts/test installs)"
    );
    target.join("debug/heat-mpi-rs")
}

/// The Rust MPI example (the `mpi` crate), a rank killed after a snapshot: the launch resumes
/// from a whole epoch past step 0 and ends with heat.rs's checksum.
#[test]
fn the_rust_mpi_example_killed_resumes_from_an_epoch_with_heat_s_checksum() {
    let program = build_rust_example();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let run = Run::start(
        &store,
        &["--job", "heat-mpi", "--backoff", "10ms", "--every", "150ms"],
        &mpirun(&program, 4),
        &MPI_ENV,
    );
    run.nth_child_pid(1);
    after_a_snapshot_of_this_life(&run);
    let ranks = ranks_running(&program);
    assert_eq!(ranks.len(), 4, "four ranks run");
    sigkill(ranks[2]);
    run.wait_for_event("died", 1, |_| true);
    let finished = run.wait(LONG);
    finished.assert_completed(&reference_checksum(&ARGS[..4]));
    let resumed = events_of(&store, "epoch-resumed");
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    assert!(resumed[0]["step"].as_u64().unwrap() > 0, "{resumed:?}");
    assert_eq!(resumed[0]["ranks"], 4);
    assert!(
        finished.stderr.contains("resumed from part"),
        "{}",
        finished.stderr
    );
    assert_epochs_whole(&store);
    assert!(ranks_running(&program).is_empty(), "ranks left behind");
}
