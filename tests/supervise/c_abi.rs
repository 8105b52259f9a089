//! End-to-end tests of the C ABI: `examples/heat.c` (built with `cc`) and `examples/heat.f90`
//! (built with `gfortran` and the `supervise` module) against the shim's static library agree
//! with the Rust heat, survive kill -9 under supervise, and report bad use (a restore into a
//! region of another size) as an error instead of crashing; `examples/lines.c` writes through
//! `sv_output` the same file as `lines.rs`, and killed with kill -9, still the same file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Compiles `sources` (paths in the repository) with `compiler` and `flags` against the
/// shim's static library into `dir/out`; returns the program's path.
pub(crate) fn compile(
    dir: &Path,
    compiler: &str,
    flags: &[&str],
    sources: &[&str],
    out: &str,
) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // `cargo test` builds the shim's static library next to the test binaries.
    let lib = supervise_bin()
        .parent()
        .expect("bin dir")
        .join("deps")
        .join("libsupervise.a");
    assert!(lib.exists(), "{} is missing", lib.display());
    let program = dir.join(out);
    let status = Command::new(compiler)
        .args(flags)
        .args(sources.iter().map(|s| root.join(s)))
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&program)
        .status()
        .unwrap_or_else(|e| panic!("{compiler} is needed (scripts/test installs it): {e}"));
    assert!(status.success(), "{compiler} failed");
    program
}

/// Compiles examples/heat.c into `dir`.
fn build_heat_c(dir: &Path) -> PathBuf {
    let include = format!("-I{}/shim/capi/include", env!("CARGO_MANIFEST_DIR"));
    let flags = ["-O2", "-Wall", "-Wextra", "-Werror", include.as_str()];
    compile(dir, "cc", &flags, &["examples/heat.c"], "heat-c")
}

/// Compiles the Fortran module and examples/heat.f90 into `dir` (module files there too).
fn build_heat_f90(dir: &Path) -> PathBuf {
    let modules = format!("-J{}", dir.display());
    let flags = ["-O2", "-Wall", "-Werror", modules.as_str()];
    let sources = ["shim/capi/include/supervise.f90", "examples/heat.f90"];
    compile(dir, "gfortran", &flags, &sources, "heat-f")
}

/// Runs `program` (a heat) alone and under supervise with three kill -9s: both must end with
/// the Rust heat's checksum.
fn agrees_and_survives_kill9(program: &Path, resumed_line: &str) {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--n", "256", "--steps", "20000"];
    let reference = reference_checksum(&args);
    let alone = Command::new(program)
        .args(args)
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(
        checksum_of(&String::from_utf8_lossy(&alone.stdout)).as_deref(),
        Some(reference.as_str()),
        "{} and the Rust heat disagree",
        program.display()
    );
    let store = dir.path().join("store");
    let mut command = vec![program.as_os_str().to_owned()];
    command.extend(args.iter().map(Into::into));
    let run = Run::start(
        &store,
        &["--every", "100ms", "--backoff", "10ms"],
        &command,
        &[],
    );
    fastrand::seed(11);
    for kill_no in 1..=3 {
        let child = run.nth_child_pid(kill_no);
        run.wait_for_event("snapshot", kill_no, |_| true);
        std::thread::sleep(Duration::from_millis(fastrand::u64(0..200)));
        let _ = kill(Pid::from_raw(child as i32), Signal::SIGKILL);
    }
    let fin = run.wait(LONG);
    fin.assert_completed(&reference);
    fin.assert_said(resumed_line);
}

#[test]
fn heat_f90_agrees_with_heat_rs_and_survives_kill9_under_supervise() {
    let dir = tempfile::tempdir().unwrap();
    agrees_and_survives_kill9(&build_heat_f90(dir.path()), "heat.f90: resumed at step ");
}

#[test]
fn heat_c_agrees_with_heat_rs_and_survives_kill9_under_supervise() {
    let dir = tempfile::tempdir().unwrap();
    agrees_and_survives_kill9(&build_heat_c(dir.path()), "heat.c: resumed at step ");
}

#[test]
fn a_restore_into_a_region_of_another_size_is_an_error_naming_both_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let heat_c = build_heat_c(dir.path());
    let store = dir.path().join("store");
    // A snapshot of the 64 x 64 grid: the final one, on SIGTERM.
    let command = vec![
        heat_c.clone().into_os_string(),
        "--n".into(),
        "64".into(),
        "--steps".into(),
        "100000000".into(),
    ];
    let run = Run::start(&store, &["--every", "1h", "-v"], &command, &[]);
    run.wait_for("shim connected", LONG);
    run.signal(Signal::SIGTERM);
    assert_eq!(run.wait(LONG).code, Some(143));
    let job = only_job(&store);
    // The same job resumed (locally) with a 65 x 65 grid.
    let second = Command::new(&heat_c)
        .args(["--n", "65", "--steps", "10"])
        .env("SUPERVISE_STORE", &store)
        .env("SUPERVISE_JOB", job.name())
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("sv_restore")
            && err.contains("\"grid\": snapshot 1 holds 32768")
            && err.contains("33800"),
        "{err}"
    );
}

#[test]
fn heat_c_runs_clean_under_valgrind_snapshotting_and_restoring() {
    let dir = tempfile::tempdir().unwrap();
    let heat_c = build_heat_c(dir.path());
    let store = dir.path().join("store");
    // Local snapshots every 500 ms (each one is slow under valgrind), then a longer run that
    // resumes from them: both under valgrind, which fails the run on any invalid access or
    // definite leak. Its default scheduler can starve the shim's threads behind the program's
    // loop (no snapshot in 2 runs of 5 here); --fair-sched takes them in turn.
    for steps in ["20000", "30000"] {
        let out = Command::new("valgrind")
            .args([
                "--error-exitcode=99",
                "--fair-sched=yes",
                "--leak-check=full",
                "--errors-for-leak-kinds=definite",
                "--show-leak-kinds=definite",
            ])
            .arg(&heat_c)
            .args(["--n", "32", "--steps", steps])
            .env("SUPERVISE_STORE", &store)
            .env("SUPERVISE_JOB", "valgrind")
            .env("SUPERVISE_EVERY", "500ms")
            .output()
            .expect("valgrind is needed (scripts/test installs it)");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{err}");
        assert!(err.contains("ERROR SUMMARY: 0 errors"), "{err}");
        assert!(err.contains("definitely lost: 0 bytes"), "{err}");
        if steps == "20000" {
            let snapshots = std::fs::read_dir(store.join("valgrind").join("snapshots"))
                .map(|d| d.count())
                .unwrap_or(0);
            assert!(snapshots > 0, "no snapshot in the first run: {err}");
        } else {
            assert!(err.contains("heat.c: resumed at step "), "{err}");
        }
    }
}

#[test]
fn installed_with_pkg_config_a_c_program_builds_with_one_command() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let prefix = dir.path().join("prefix");
    let deps = supervise_bin().parent().expect("bin dir").join("deps");
    let status = Command::new(root.join("scripts/install-shim.sh"))
        .arg("--prefix")
        .arg(&prefix)
        .arg("--from")
        .arg(&deps)
        .status()
        .unwrap();
    assert!(status.success());
    let pc_path = prefix.join("lib/pkgconfig");
    let flags = Command::new("pkg-config")
        .args(["--cflags", "--libs", "supervise-shim"])
        .env("PKG_CONFIG_PATH", &pc_path)
        .output()
        .expect("pkg-config is needed (scripts/test installs it)");
    assert!(flags.status.success());
    let flags = String::from_utf8_lossy(&flags.stdout).trim().to_owned();
    let program = dir.path().join("heat-pc");
    let built = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cc -O2 '{}' {flags} -o '{}'",
            root.join("examples/heat.c").display(),
            program.display()
        ))
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "cc with pkg-config flags {flags}: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let out = Command::new(&program)
        .args(["--n", "64", "--steps", "100"])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(
        checksum_of(&String::from_utf8_lossy(&out.stdout)),
        Some(reference_checksum(&["--n", "64", "--steps", "100"]))
    );
}

/// Compiles examples/lines.c into `dir`.
fn build_lines_c(dir: &Path) -> PathBuf {
    let include = format!("-I{}/shim/capi/include", env!("CARGO_MANIFEST_DIR"));
    let flags = ["-O2", "-Wall", "-Wextra", "-Werror", include.as_str()];
    compile(dir, "cc", &flags, &["examples/lines.c"], "lines-c")
}

#[test]
fn sv_output_agrees_with_lines_rs_and_survives_kill9_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let lines_c = build_lines_c(dir.path());
    let args = [
        "--n",
        "8192",
        "--steps",
        "60000",
        "--out",
        "out.txt",
        "--flush-every",
        "100",
    ];
    let (reference, checksum) = run_alone_in(&example_bin("lines"), &dir.path().join("rs"), &args);
    let alone = run_alone_in(&lines_c, &dir.path().join("c"), &args);
    assert_eq!(alone.1, checksum, "lines.c and lines.rs disagree");
    assert!(
        alone.0 == reference,
        "lines.c's output file differs from lines.rs's"
    );

    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let mut cmd = Command::new(supervise_bin());
    cmd.arg("--store")
        .arg(dir.path().join("store"))
        .args(["--every", "50ms", "--backoff", "10ms"])
        .arg("--")
        .arg(&lines_c)
        .args(args)
        .current_dir(&work);
    let run = Run::spawn(cmd);
    let kills = kill_lives_after_a_snapshot(&run, 3, 300);
    let fin = run.wait(LONG);
    fin.assert_completed(&checksum);
    let resumed: Vec<u64> = fin
        .stderr
        .lines()
        .filter_map(|l| l.split_once("lines.c: resumed at step ").map(|(_, s)| s))
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    assert_eq!(resumed.len(), kills, "{}", fin.stderr);
    assert!(resumed.iter().all(|&s| s > 0), "{resumed:?}");
    let got = std::fs::read(work.join("out.txt")).unwrap();
    assert_eq!(got.len(), reference.len(), "output file length");
    assert!(
        got == reference,
        "the output file differs from an uninterrupted run's"
    );
}
