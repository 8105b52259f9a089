//! File mode with the real codes (Debian's GROMACS 2022.5 and LAMMPS 20220106, installed by
//! scripts/test): their own checkpoint files captured, put back and resumed from. Deterministic
//! runs (`mdrun -reprod -nt 1`, LAMMPS without atom sorting) resumed from a checkpoint give the
//! uninterrupted run's bytes; every test also checks that the resume happened, from a step > 0.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::*;

const LONG: Duration = Duration::from_secs(240);

/// A built input and the output of an uninterrupted run, made once per test binary.
struct Reference {
    /// Where the input is.
    dir: PathBuf,
    /// The uninterrupted run's result file.
    result: Vec<u8>,
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "files-{name}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn need(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{tool} is not installed: scripts/test installs it (apt-get install gromacs lammps)"
    );
}

/// mdrun's arguments, deterministic and on one thread; `extra` appended.
fn mdrun(extra: &[&str]) -> Vec<OsString> {
    let mut argv: Vec<&str> = vec![
        "gmx", "-quiet", "mdrun", "-s", "run.tpr", "-deffnm", "md", "-reprod", "-nt", "1",
        "-ntmpi", "1", "-pin", "off",
    ];
    argv.extend(extra);
    argv.into_iter().map(OsString::from).collect()
}

/// The water box's run input and the md.trr of an uninterrupted run.
fn gromacs() -> &'static Reference {
    static REF: OnceLock<Reference> = OnceLock::new();
    REF.get_or_init(|| {
        need("gmx");
        let dir = scratch("gromacs-ref");
        let build = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gromacs/build.sh");
        let ok = Command::new("bash")
            .arg(&build)
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "{} failed; see {}/build.log",
            build.display(),
            dir.display()
        );
        std::fs::rename(dir.join("md.tpr"), dir.join("run.tpr")).unwrap();
        run_alone(dir, &mdrun(&[]), "md.trr")
    })
}

/// Runs `argv` in `dir` without a supervisor: the reference, its `result` file.
fn run_alone(dir: PathBuf, argv: &[OsString], result: &str) -> Reference {
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .current_dir(&dir)
        .env("OMPI_MCA_ess_singleton_isolated", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Reference {
        result: std::fs::read(dir.join(result)).unwrap(),
        dir,
    }
}

/// A run directory holding the GROMACS input, and a store beside it.
fn gromacs_run_dir(name: &str) -> (PathBuf, PathBuf) {
    let fx = gromacs();
    let base = scratch(name);
    let dir = base.join("run");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(fx.dir.join("run.tpr"), dir.join("run.tpr")).unwrap();
    (dir, base.join("store"))
}

/// The LAMMPS input and the final.dump of an uninterrupted run.
fn lammps() -> &'static Reference {
    static REF: OnceLock<Reference> = OnceLock::new();
    REF.get_or_init(|| {
        need("lmp");
        let dir = scratch("lammps-ref");
        std::fs::copy(lammps_input(), dir.join("in.melt")).unwrap();
        run_alone(dir, &lmp(), "final.dump")
    })
}

fn lammps_input() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lammps/in.melt")
}

/// 4000 steps (about 7 s here), restart files every 500.
fn lmp() -> Vec<OsString> {
    [
        "lmp", "-in", "in.melt", "-nocite", "-log", "none", "-var", "nsteps", "4000",
    ]
    .map(OsString::from)
    .to_vec()
}

fn lammps_run_dir(name: &str) -> (PathBuf, PathBuf) {
    let _ = lammps();
    let base = scratch(name);
    let dir = base.join("run");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(lammps_input(), dir.join("in.melt")).unwrap();
    (dir, base.join("store"))
}

/// `supervise --store STORE OPTIONS -- COMMAND` in the run directory `dir`.
fn run_in(dir: &Path, store: &Path, options: &[&str], command: &[OsString]) -> Run {
    let mut cmd = Command::new(supervise_bin());
    cmd.current_dir(dir)
        .arg("--store")
        .arg(store)
        .args(options)
        .arg("--")
        .args(command);
    Run::spawn(cmd)
}

/// The steps of the `checkpoint-resumed` events of the store's job, in order.
fn resumed_steps(store: &Path) -> Vec<u64> {
    events_of(store, "checkpoint-resumed")
        .iter()
        .map(|e| e["step"].as_u64().expect("a step"))
        .collect()
}

fn assert_same_bytes(got: &Path, want: &[u8], stderr: &str) {
    let got_bytes = std::fs::read(got).unwrap_or_default();
    assert!(
        got_bytes == want,
        "{} ({} bytes) differs from the uninterrupted run's ({} bytes); stderr:\n{stderr}",
        got.display(),
        got_bytes.len(),
        want.len()
    );
}

#[test]
fn gromacs_killed_twice_resumes_from_its_checkpoints_bit_identically() {
    let (dir, store) = gromacs_run_dir("gmx-kill");
    // Checkpoints every 600 ms and kills within 400 ms of one: both kills land well before
    // mdrun's 1600 steps end, however fast the machine (at 1200/800 ms, a quiet machine
    // finished the second life first).
    let run = run_in(
        &dir,
        &store,
        &["--preset", "gromacs", "--every", "600ms"],
        &mdrun(&[]),
    );
    let kills = kill_lives_after_a_snapshot(&run, 2, 400);
    let fin = run.wait(LONG);
    assert_eq!(fin.code, Some(0), "{}", fin.stderr);
    let steps = resumed_steps(&store);
    assert_eq!(steps.len(), kills, "one resume per kill: {steps:?}");
    assert!(steps.iter().all(|s| *s > 0), "{steps:?}");
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
    // Each stored checkpoint is tagged with its step.
    let tags: Vec<String> = events_of(&store, "snapshot")
        .iter()
        .map(|e| e["tag"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(tags.iter().all(|t| t.starts_with("step ")), "{tags:?}");
    assert_eq!(last_end(&store)["outcome"], "finished");
    assert_same_bytes(&dir.join("md.trr"), &gromacs().result, &fin.stderr);
}

#[test]
fn gromacs_stopped_gets_one_sigterm_and_resumes_even_with_its_files_deleted() {
    let (dir, store) = gromacs_run_dir("gmx-term");
    let run = run_in(
        &dir,
        &store,
        &["--preset", "gromacs", "--every", "1200ms"],
        &mdrun(&[]),
    );
    run.wait_for_snapshot(1);
    run.signal(Signal::SIGTERM);
    let fin = run.wait(LONG);
    assert_eq!(fin.code, Some(143), "{}", fin.stderr);
    assert_eq!(last_end(&store)["outcome"], "stopped");
    let terms = fin.stderr.matches("Received the").count();
    assert_eq!(terms, 1, "mdrun must get exactly one TERM:\n{}", fin.stderr);
    assert!(!fin.stderr.contains("second"), "{}", fin.stderr);
    // Its final checkpoint was stored: the stop lost nothing.
    let newest_step = events_of(&store, "snapshot")
        .last()
        .and_then(|e| e["tag"].as_str().map(str::to_owned))
        .unwrap();

    // The operator gets the checkpoint back under its own name.
    let out = dir.parent().unwrap().join("restored");
    let (code, _, err) = cmd(
        &store,
        &["restore", "latest", "--to", out.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read(out.join("md.cpt")).unwrap(),
        std::fs::read(dir.join("md.cpt")).unwrap()
    );
    let shown = json(&store, &["show", "latest"]);
    assert_eq!(shown["entries"][0]["file"], "md.cpt", "{shown}");
    // Every md.* file goes: the store has them.
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("md") {
            std::fs::remove_file(entry.path()).unwrap();
        }
    }
    let again = run_in(
        &dir,
        &store,
        &["--preset", "gromacs", "--every", "1200ms"],
        &mdrun(&[]),
    );
    let fin = again.wait(LONG);
    assert_eq!(fin.code, Some(0), "{}", fin.stderr);
    let resumed = events_of(&store, "checkpoint-resumed");
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    assert_eq!(format!("step {}", resumed[0]["step"]), newest_step);
    let mut written: Vec<&str> = resumed[0]["written"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    written.sort_unstable();
    assert_eq!(written, ["md.cpt", "md.edr", "md.log", "md.trr"]);
    assert_same_bytes(&dir.join("md.trr"), &gromacs().result, &fin.stderr);
}

#[test]
fn gromacs_checkpoints_outlive_the_node_through_a_replica() {
    let (dir, local) = gromacs_run_dir("gmx-replica");
    let replica = local.parent().unwrap().join("replica");
    std::fs::create_dir(&replica).unwrap();
    let options = [
        "--store",
        replica.to_str().unwrap(),
        "--preset",
        "gromacs",
        "--every",
        "1200ms",
    ];
    let run = run_in(&dir, &local, &options, &mdrun(&[]));
    run.wait_for_snapshot(2);
    run.signal(Signal::SIGTERM);
    let fin = run.wait(LONG);
    // 143: the final checkpoint reached the replica too (6 if it had not).
    assert_eq!(fin.code, Some(143), "{}", fin.stderr);
    let step = events_of(&local, "snapshot")
        .last()
        .and_then(|e| e["tag"].as_str().map(str::to_owned))
        .unwrap();
    // The node is lost: its store and the run directory's files with it.
    std::fs::remove_dir_all(&local).unwrap();
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        if entry.file_name().to_string_lossy().starts_with("md") {
            std::fs::remove_file(entry.path()).unwrap();
        }
    }
    let fin = run_in(&dir, &local, &options, &mdrun(&[])).wait(LONG);
    assert_eq!(fin.code, Some(0), "{}", fin.stderr);
    assert_eq!(events_of(&local, "fetched").len(), 1, "{}", fin.stderr);
    let resumed = events_of(&local, "checkpoint-resumed");
    assert_eq!(resumed.len(), 1, "{}", fin.stderr);
    assert_eq!(format!("step {}", resumed[0]["step"]), step);
    assert_same_bytes(&dir.join("md.trr"), &gromacs().result, &fin.stderr);
}

#[test]
fn gromacs_stopping_by_itself_is_a_stop_not_a_crash_or_the_end() {
    let (dir, store) = gromacs_run_dir("gmx-maxh");
    // One job for both commands below.
    let options = [
        "--preset",
        "gromacs",
        "--every",
        "1200ms",
        "--job",
        "gmx-own-stops",
    ];
    // First, a SIGTERM straight to mdrun (as a batch system sends it to every process): a
    // checkpoint and exit 1, which is a stop, not a crash to restart.
    let run = run_in(&dir, &store, &options, &mdrun(&[]));
    let mdrun_pid = run.nth_child_pid(1);
    run.wait_for_snapshot(1);
    kill(Pid::from_raw(mdrun_pid as i32), Signal::SIGTERM).unwrap();
    let fin = run.wait(LONG);
    assert_eq!(fin.code, Some(75), "{}", fin.stderr);
    assert!(events_of(&store, "restarting").is_empty(), "{}", fin.stderr);
    assert_eq!(last_end(&store)["outcome"], "stopped");
    // Then -maxh 0.0002 ends each run with a checkpoint and exit 0 after about 0.7 s (less
    // than what is left of the run, about 1.5 s here), not finished; running the same command
    // again goes on from there until mdrun finishes (its md.gro written).
    let command = mdrun(&["-maxh", "0.0002"]);
    let mut stopped = 0;
    let stderr = loop {
        let fin = run_in(&dir, &store, &options, &command).wait(LONG);
        match fin.code {
            Some(75) => stopped += 1,
            Some(0) => break fin.stderr,
            other => panic!("exit {other:?}:\n{}", fin.stderr),
        }
        assert!(stopped < 30, "no end after {stopped} runs:\n{}", fin.stderr);
    };
    assert!(stopped >= 1, "-maxh never stopped a run:\n{stderr}");
    assert!(events_of(&store, "restarting").is_empty(), "{stderr}");
    let steps = resumed_steps(&store);
    assert_eq!(steps.len(), stopped + 1, "{steps:?}");
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
    assert!(steps[0] > 0);
    assert_eq!(last_end(&store)["outcome"], "finished");
    assert_same_bytes(&dir.join("md.trr"), &gromacs().result, &stderr);
}

#[test]
fn gromacs_writing_no_checkpoint_for_the_hang_timeout_is_restarted_from_its_last() {
    let (dir, store) = gromacs_run_dir("gmx-hang");
    let run = run_in(
        &dir,
        &store,
        &[
            "--preset",
            "gromacs",
            "--every",
            "1200ms",
            "--hang-timeout",
            "4s",
            "--stop-timeout",
            "1s",
        ],
        &mdrun(&[]),
    );
    let pid = run.nth_child_pid(1);
    run.wait_for_snapshot(1);
    // Frozen: it writes no checkpoint, and cannot act on the SIGTERM either.
    kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).unwrap();
    let fin = run.wait(LONG);
    assert_eq!(fin.code, Some(0), "{}", fin.stderr);
    assert_eq!(events_of(&store, "hung").len(), 1, "{}", fin.stderr);
    let steps = resumed_steps(&store);
    assert_eq!(steps.len(), 1, "{steps:?}");
    assert!(steps[0] > 0);
    assert_same_bytes(&dir.join("md.trr"), &gromacs().result, &fin.stderr);
}

#[test]
fn gromacs_without_a_preset_is_told_about_it() {
    let (dir, store) = gromacs_run_dir("gmx-plain");
    let fin = run_in(&dir, &store, &[], &mdrun(&["-nsteps", "20"])).wait(LONG);
    assert_eq!(fin.code, Some(0), "{}", fin.stderr);
    let hints = events_of(&store, "preset-hint");
    assert_eq!(hints.len(), 1, "{}", fin.stderr);
    assert_eq!(hints[0]["preset"], "gromacs");
    assert!(events_of(&store, "snapshot").is_empty());
}

#[test]
fn lammps_killed_and_stopped_resumes_identically_and_refuses_a_truncated_restart_file() {
    let (dir, store) = lammps_run_dir("lmp");
    let run = run_in(&dir, &store, &["--preset", "lammps"], &lmp());
    kill_lives_after_a_snapshot(&run, 2, 600);
    // The third life is stopped the LAMMPS way: a STOP file its input watches.
    run.nth_child_pid(3);
    after_a_snapshot_of_this_life(&run);
    run.signal(Signal::SIGTERM);
    let fin = run.wait(LONG);
    assert_eq!(fin.code, Some(143), "{}", fin.stderr);
    assert_eq!(last_end(&store)["outcome"], "stopped");
    // LAMMPS wrote a restart file where it halted, and that is the newest snapshot.
    let stop_step: u64 = fin
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("sv: stopped at step ")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no stop line in stdout:\n{}", fin.stdout));
    let newest = events_of(&store, "snapshot")
        .last()
        .and_then(|e| e["tag"].as_str().map(str::to_owned));
    assert_eq!(newest, Some(format!("step {stop_step}")), "{}", fin.stderr);
    // A restart file cut short, as a kill in the middle of writing leaves it, newer than any
    // stored one: refused, and the stored one is resumed from.
    let whole = std::fs::read(dir.join(format!("restart.{stop_step}"))).unwrap();
    std::fs::write(dir.join("restart.3900"), &whole[..whole.len() - 100]).unwrap();
    let fin = run_in(&dir, &store, &["--preset", "lammps"], &lmp()).wait(LONG);
    assert_eq!(fin.code, Some(0), "{}", fin.stderr);
    let refused = events_of(&store, "checkpoint-refused");
    assert!(
        refused.iter().any(|e| e["path"] == "restart.3900"),
        "{refused:?}\n{}",
        fin.stderr
    );
    let steps = resumed_steps(&store);
    assert_eq!(steps.len(), 3, "{steps:?}");
    assert!(steps.iter().all(|s| *s > 0), "{steps:?}");
    assert_eq!(steps[2], stop_step);
    assert_same_bytes(&dir.join("final.dump"), &lammps().result, &fin.stderr);
}

#[test]
fn a_code_described_by_options_alone_is_captured_and_resumed() {
    // The LAMMPS preset spelled out as generic options, the environment given by hand.
    let (dir, store) = lammps_run_dir("generic");
    let mut cmd = Command::new(supervise_bin());
    cmd.current_dir(&dir)
        .env("OMPI_MCA_ess_singleton_isolated", "1")
        .arg("--store")
        .arg(&store)
        .args([
            "--checkpoint",
            "restart.*",
            "--complete",
            "closed",
            "--complete",
            "magic=LammpS RestartT\\0",
            "--step-from",
            "name",
            "--ask-stop",
            "touch=STOP",
            "--resume-args",
            "-var sv_restart {checkpoint}",
            "--done-file",
            "done.txt",
            "--",
        ])
        .args(lmp());
    let run = Run::spawn(cmd);
    let pid = run.nth_child_pid(1);
    after_a_snapshot_of_this_life(&run);
    sigkill(pid);
    let fin = run.wait(LONG);
    assert_eq!(fin.code, Some(0), "{}", fin.stderr);
    let steps = resumed_steps(&store);
    assert_eq!(steps.len(), 1, "{steps:?}");
    assert!(steps[0] >= 500, "{steps:?}");
    assert_same_bytes(&dir.join("final.dump"), &lammps().result, &fin.stderr);
}

#[test]
fn a_code_that_ignores_its_checkpoint_is_said_to_have_started_over() {
    // Counts from 1 whatever is in its directory, one checkpoint (renamed into place) a step.
    let base = scratch("ignores");
    let dir = base.join("run");
    std::fs::create_dir(&dir).unwrap();
    let script =
        "i=1; while true; do echo $i > .t; mv .t state-$i.chk; i=$((i+1)); sleep 0.2; done";
    let command: Vec<OsString> = ["sh", "-c", script].map(OsString::from).to_vec();
    let store = base.join("store");
    let run = run_in(
        &dir,
        &store,
        &[
            "--checkpoint",
            "state-*.chk",
            "--complete",
            "renamed",
            "--step-from",
            "name",
        ],
        &command,
    );
    let pid = run.nth_child_pid(1);
    run.wait_for_event("snapshot", 3, |_| true);
    sigkill(pid);
    let ignored = run.wait_for_event("resume-ignored", 1, |_| true);
    assert!(ignored["resumed_step"].as_u64().unwrap() >= 3, "{ignored}");
    assert_eq!(ignored["step"], 1, "{ignored}");
    // The start said it could happen.
    let said = run.events_of("file-mode");
    assert!(
        said[0]["advice"][0]
            .as_str()
            .is_some_and(|a| a.contains("--resume-args")),
        "{said:?}"
    );
    run.signal(Signal::SIGTERM);
    assert_eq!(run.wait(LONG).code, Some(143));
}
