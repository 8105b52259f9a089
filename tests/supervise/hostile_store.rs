//! The store under hostile conditions, through the real binary: what a local user planted in
//! a store before root's `supervise` ran (links at the lock and the event log, a directory
//! others may write, a store owned by someone else, a link at the operator socket) is refused
//! with an error naming the path, and nothing outside the store is touched. The operator
//! socket is private (0600).

use std::os::unix::fs::{DirBuilderExt, PermissionsExt, symlink};
use std::path::Path;

use crate::support::*;
use nix::sys::signal::Signal;
const HEAT: [&str; 4] = ["--n", "64", "--steps", "300"];

/// Creates `<store>/j/{snapshots,packs}` as an earlier release did (0700).
fn job_dirs(store: &Path) {
    for sub in ["snapshots", "packs"] {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(store.join("j").join(sub))
            .unwrap();
    }
}

/// Runs `supervise --store <store> --job j -- heat ...` to its end.
fn run_job(store: &Path) -> Finished {
    Run::start(store, &["--job", "j", "--every", "50ms"], &heat(&HEAT), &[]).wait(LONG)
}

/// Plants `<store>/j/<name> -> victim` and checks the job is refused naming the link, and the
/// victim is untouched.
fn planted_link_is_refused(name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    job_dirs(&store);
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    let link = store.join("j").join(name);
    symlink(&victim, &link).unwrap();

    let fin = run_job(&store);
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        b"precious\n",
        "{name}: victim written"
    );
    assert_eq!(fin.code, Some(1), "{name}: {}", fin.stderr);
    fin.assert_said(&format!(
        "{}: refusing to use it: it is a symbolic link",
        link.display()
    ));
    assert_eq!(
        fin.stderr.matches("spawned pid").count(),
        0,
        "{}",
        fin.stderr
    );
}

#[test]
fn a_lock_planted_as_a_link_is_refused_and_its_target_untouched() {
    planted_link_is_refused("lock");
}

#[test]
fn an_event_log_planted_as_a_link_is_refused_and_its_target_untouched() {
    planted_link_is_refused("events.log");
}

#[test]
fn an_operator_socket_path_planted_as_a_link_is_refused_and_its_target_untouched() {
    planted_link_is_refused("supervisor.sock");
}

#[test]
fn a_world_writable_job_directory_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    job_dirs(&store);
    let job_dir = store.join("j");
    std::fs::set_permissions(&job_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let fin = run_job(&store);
    assert_eq!(fin.code, Some(1), "{}", fin.stderr);
    fin.assert_said(&format!(
        "{}: refusing to use it: its mode 0777 lets the group or others write it; run chmod go-w",
        job_dir.display()
    ));
    let mode = std::fs::metadata(&job_dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o777, "left as it was");
}

#[test]
fn a_store_owned_by_another_user_is_refused_and_read_only_commands_can_look() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let fin = run_job(&store);
    assert_eq!(fin.code, Some(0), "{}", fin.stderr);
    std::os::unix::fs::chown(&store, Some(65534), None).unwrap();

    let fin = run_job(&store);
    assert_eq!(fin.code, Some(1), "{}", fin.stderr);
    fin.assert_said("refusing to use it: it is owned by uid 65534");
    let (code, _, err) = cmd(&store, &["ls", "--json"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--allow-foreign-store"), "{err}");

    let (code, out, err) = cmd(&store, &["ls", "--json", "--allow-foreign-store"]);
    assert_eq!(code, 0, "{err}");
    let jobs: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(jobs[0]["job"], "j", "{out}");
    let (code, _, err) = cmd(&store, &["verify", "--json", "--allow-foreign-store"]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn the_operator_socket_is_0600() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let run = Run::start(
        &store,
        &["--job", "j", "--every", "1h", "-v"],
        &heat(&["--n", "64", "--steps", "100000000"]),
        &[],
    );
    // Whatever happens, the job is stopped before the test ends (it would run for hours).
    let connected = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run.wait_for("shim connected", LONG);
    }));
    let mode = std::fs::metadata(store.join("j").join("supervisor.sock"))
        .map(|m| m.permissions().mode() & 0o7777);
    run.signal(Signal::SIGTERM);
    run.wait(LONG);
    if let Err(panic) = connected {
        std::panic::resume_unwind(panic);
    }
    let mode = mode.expect("the socket exists while the job runs");
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
}

#[test]
fn a_regular_file_at_the_operator_socket_path_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    job_dirs(&store);
    let planted = store.join("j").join("supervisor.sock");
    std::fs::write(&planted, b"not a socket\n").unwrap();
    let fin = run_job(&store);
    assert_eq!(fin.code, Some(1), "{}", fin.stderr);
    fin.assert_said(&format!(
        "{}: refusing to use it: it is a regular file",
        planted.display()
    ));
    assert_eq!(std::fs::read(&planted).unwrap(), b"not a socket\n");
}
