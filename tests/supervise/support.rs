//! Helpers for end-to-end tests: run the real `supervise` binary and the example programs,
//! follow their output as it comes, and look at processes and the store.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long a test waits for something that should come in seconds, before it fails.
pub const LONG: Duration = Duration::from_secs(120);

/// The `supervise` binary under test.
pub fn supervise_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_supervise"))
}

/// An example program built beside it (`cargo test` builds the examples).
pub fn example_bin(name: &str) -> PathBuf {
    let path = supervise_bin()
        .parent()
        .expect("bin dir")
        .join("examples")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test` (it builds the examples)",
        path.display()
    );
    path
}

/// The heat example's command line with `args`.
pub fn heat(args: &[&str]) -> Vec<OsString> {
    let mut cmd = vec![example_bin("heat").into_os_string()];
    cmd.extend(args.iter().map(OsString::from));
    cmd
}

/// What a batch system or a service manager sets, removed from the supervisors the tests
/// start (unless a test sets them itself).
pub const OUTSIDE_ENV: [&str; 5] = [
    "SLURM_JOB_ID",
    "SLURM_RESTART_COUNT",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// Runs `supervise <args> --store <store>` to its end: (exit code, stdout, stderr).
pub fn cmd(store: &Path, args: &[&str]) -> (i32, String, String) {
    let mut command = Command::new(supervise_bin());
    for var in OUTSIDE_ENV {
        command.env_remove(var);
    }
    let out = command
        .args(args)
        .arg("--store")
        .arg(store)
        .output()
        .expect("run supervise");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The checksum printed by an uninterrupted run of the example `name` with `args`.
pub fn example_checksum(name: &str, args: &[&str]) -> String {
    let out = Command::new(example_bin(name))
        .args(args)
        .env_clear()
        .output()
        .expect("run the example");
    assert!(
        out.status.success(),
        "{name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    checksum_of(&String::from_utf8_lossy(&out.stdout)).expect("the example prints a checksum")
}

/// The checksum of an uninterrupted run of the heat example (no supervisor), computed once
/// per argument list.
pub fn reference_checksum(args: &[&str]) -> String {
    static CACHE: OnceLock<Mutex<HashMap<Vec<String>, String>>> = OnceLock::new();
    let key: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(sum) = cache.lock().unwrap().get(&key) {
        return sum.clone();
    }
    let out = Command::new(example_bin("heat"))
        .args(args)
        .env_clear()
        .output()
        .expect("run heat");
    assert!(
        out.status.success(),
        "heat failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sum = checksum_of(&String::from_utf8_lossy(&out.stdout)).expect("heat prints a checksum");
    cache.lock().unwrap().insert(key, sum.clone());
    sum
}

/// The hex of the last `checksum <hex>` line.
pub fn checksum_of(stdout: &str) -> Option<String> {
    stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("checksum ").map(str::to_owned))
}

/// A running `supervise`, with its stderr lines collected as they come.
pub struct Run {
    child: Child,
    /// The store named by `--store`, where the job's history is.
    store: Option<PathBuf>,
    lines: Arc<Mutex<Vec<String>>>,
    stdout: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

/// How a run ended.
#[derive(Debug)]
pub struct Finished {
    /// Exit code (None if killed by a signal).
    pub code: Option<i32>,
    /// All of stderr.
    pub stderr: String,
    /// All of stdout.
    pub stdout: String,
}

impl Finished {
    /// Asserts that the job completed (exit code 0) with the checksum of an uninterrupted run.
    pub fn assert_completed(&self, reference: &str) {
        assert_eq!(self.code, Some(0), "stderr:\n{}", self.stderr);
        assert_eq!(
            checksum_of(&self.stdout).as_deref(),
            Some(reference),
            "stderr:\n{}",
            self.stderr
        );
    }

    /// Asserts that stderr contains `text`.
    pub fn assert_said(&self, text: &str) {
        assert!(
            self.stderr.contains(text),
            "expected {text:?} in stderr:\n{}",
            self.stderr
        );
    }
}

impl Run {
    /// Starts `supervise --store <store> <options> -- <command>`, with `env` added.
    pub fn start(
        store: &Path,
        options: &[&str],
        command: &[OsString],
        env: &[(&str, &str)],
    ) -> Run {
        let mut cmd = Command::new(supervise_bin());
        cmd.arg("--store")
            .arg(store)
            .args(options)
            .arg("--")
            .args(command);
        // Tests that run inside a batch job or a service see neither.
        for var in OUTSIDE_ENV {
            cmd.env_remove(var);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn(cmd)
    }

    /// Starts a prepared command with piped output.
    pub fn spawn(mut cmd: Command) -> Run {
        let store = cmd
            .get_args()
            .skip_while(|a| *a != "--store")
            .nth(1)
            .map(PathBuf::from);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn supervise");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().expect("stderr");
        let out = child.stdout.take().expect("stdout");
        let l = Arc::clone(&lines);
        let o = Arc::clone(&stdout);
        let readers = vec![
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    l.lock().unwrap().push(line);
                }
            }),
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = BufReader::new(out).read_to_string(&mut s);
                o.lock().unwrap().push_str(&s);
            }),
        ];
        Run {
            child,
            store,
            lines,
            stdout,
            readers,
        }
    }

    /// The supervisor's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stderr so far.
    pub fn stderr(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits until the `n`-th stderr line containing `pat` appears and returns it.
    pub fn wait_for_nth(&self, pat: &str, n: usize, timeout: Duration) -> String {
        let until = Instant::now() + timeout;
        loop {
            if let Some(line) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains(pat))
                .nth(n - 1)
            {
                return line.clone();
            }
            assert!(
                Instant::now() < until,
                "timed out waiting for {pat:?} #{n}; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the first stderr line containing `pat`.
    pub fn wait_for(&self, pat: &str, timeout: Duration) -> String {
        self.wait_for_nth(pat, 1, timeout)
    }

    /// The typed events this supervisor recorded in its job's history so far (the records
    /// whose `pid` is its own), oldest first.
    pub fn events(&self) -> Vec<serde_json::Value> {
        let store = self.store.as_deref().expect("a run with --store");
        history(store)
            .into_iter()
            .filter(|r| r["pid"] == self.pid())
            .map(record_data)
            .collect()
    }

    /// This supervisor's events of one kind so far.
    pub fn events_of(&self, kind: &str) -> Vec<serde_json::Value> {
        self.events()
            .into_iter()
            .filter(|e| e["kind"] == kind)
            .collect()
    }

    /// Waits until this supervisor has recorded `n` events of `kind` that satisfy `pred`, and
    /// returns the `n`-th.
    pub fn wait_for_event(
        &self,
        kind: &str,
        n: usize,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let until = Instant::now() + LONG;
        loop {
            if let Some(e) = self
                .events_of(kind)
                .into_iter()
                .filter(|e| pred(e))
                .nth(n - 1)
            {
                return e;
            }
            assert!(
                Instant::now() < until,
                "timed out waiting for {kind} event #{n}; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until snapshot `seq` is durable (its `snapshot` event).
    pub fn wait_for_snapshot(&self, seq: u64) -> serde_json::Value {
        self.wait_for_event("snapshot", 1, |e| e["seq"] == seq)
    }

    /// The pid of the child spawned `n`-th (from the `spawned` events).
    pub fn nth_child_pid(&self, n: usize) -> u32 {
        let spawned = self.wait_for_event("spawned", n, |_| true);
        spawned["pid"].as_u64().expect("pid") as u32
    }

    /// This supervisor's run of the job ended (its `end` event is recorded).
    pub fn ended(&self) -> bool {
        !self.events_of("end").is_empty()
    }

    /// Sends `signal` to the supervisor.
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid() as i32), signal).expect("signal supervise");
    }

    /// Waits for the supervisor to exit (killing it after `timeout`).
    pub fn wait(mut self, timeout: Duration) -> Finished {
        let until = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                panic!(
                    "supervise did not finish in {timeout:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Finished {
            code: status.code(),
            stderr: self.stderr(),
            stdout: self.stdout.lock().unwrap().clone(),
        }
    }
}

/// A test that fails (panics) while a supervisor runs must not leave it and its program
/// running: SIGKILL the supervisor; its lifeline then stops the program.
impl Drop for Run {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Pids whose parent is `ppid`.
pub fn children_of(ppid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            && let Some((_, rest)) = stat.rsplit_once(')')
            && rest
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u32>().ok())
                == Some(ppid)
        {
            out.push(pid);
        }
    }
    out
}

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    cond()
}

/// The only job in a store (tests use one job per store).
pub fn only_job(store: &Path) -> supervise_store::JobStore {
    let names: Vec<String> = std::fs::read_dir(store)
        .expect("store exists")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 1, "jobs in store: {names:?}");
    supervise_store::Store::open(store)
        .unwrap()
        .job(&names[0])
        .unwrap()
}

/// Checks the store's invariants: no temporary files, and exactly the packs the committed
/// snapshots reference.
pub fn assert_store_clean(job: &supervise_store::JobStore) {
    for sub in ["snapshots", "packs"] {
        for e in std::fs::read_dir(job.dir().join(sub)).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(
                !name.starts_with(".tmp-"),
                "leftover temporary file {sub}/{name}"
            );
        }
    }
    let present: std::collections::BTreeSet<String> =
        job.pack_names().unwrap().into_iter().collect();
    assert_eq!(
        present,
        job.referenced_packs().unwrap(),
        "packs on disk vs packs referenced"
    );
}

/// The records of the history of the store's only job (its `events.log`), oldest first;
/// nothing while there is no job, or its history is not a regular file.
pub fn history(store: &Path) -> Vec<serde_json::Value> {
    let jobs: Vec<PathBuf> = std::fs::read_dir(store)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    let [job] = jobs.as_slice() else {
        return Vec::new();
    };
    let path = job.join("events.log");
    if !std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
        return Vec::new();
    }
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .collect()
}

/// A history record's typed event: its `data` (its `kind` and fields), or for an older
/// record without data, just its `kind`.
fn record_data(r: serde_json::Value) -> serde_json::Value {
    match r.get("data") {
        Some(d) if !d.is_null() => d.clone(),
        _ => serde_json::json!({ "kind": r["kind"] }),
    }
}

/// The typed events of the store's only job, oldest first, every supervisor's.
pub fn job_events(store: &Path) -> Vec<serde_json::Value> {
    history(store).into_iter().map(record_data).collect()
}

/// The events of one kind.
pub fn events_of(store: &Path, kind: &str) -> Vec<serde_json::Value> {
    job_events(store)
        .into_iter()
        .filter(|e| e["kind"] == kind)
        .collect()
}

/// How many `died` events of the store's job say the program was killed by SIGKILL.
pub fn sigkill_deaths(store: &Path) -> usize {
    events_of(store, "died")
        .iter()
        .filter(|e| e["how"] == "signal SIGKILL (9)")
        .count()
}

/// Where the lives of the store's job started, in order: the `spawned` events' `from`
/// (a snapshot number, or None for a fresh start).
pub fn spawned_from(store: &Path) -> Vec<Option<u64>> {
    events_of(store, "spawned")
        .iter()
        .map(|e| e["from"].as_u64())
        .collect()
}

/// The `end` event of the store's job's latest run.
pub fn last_end(store: &Path) -> serde_json::Value {
    events_of(store, "end").pop().expect("an end event")
}

/// heat with `args` under supervise until snapshot 3 is durable, then stopped with SIGTERM.
pub fn stopped_job_with_snapshots(store: &Path, args: &[&str]) -> supervise_store::JobStore {
    let run = Run::start(store, &["--every", "100ms"], &heat(args), &[]);
    run.wait_for_snapshot(3);
    run.signal(Signal::SIGTERM);
    assert_eq!(run.wait(LONG).code, Some(143));
    only_job(store)
}

/// Runs `supervise <args>` (no `--store` added): (exit code, stdout, stderr).
pub fn bare(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(supervise_bin())
        .args(args)
        .output()
        .expect("run supervise");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `supervise <args> --json --store <store>`, which must succeed, and parses its output.
pub fn json(store: &Path, args: &[&str]) -> serde_json::Value {
    let mut with = args.to_vec();
    with.push("--json");
    let (code, out, err) = cmd(store, &with);
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// Waits until the child spawned last took a snapshot (or the job finished): a snapshot
/// event after the latest `spawned` event.
pub fn after_a_snapshot_of_this_life(run: &Run) {
    let ok = wait_until(Duration::from_secs(120), || {
        let events = run.events();
        let life = events
            .iter()
            .rposition(|e| e["kind"] == "spawned")
            .map_or(&events[..0], |i| &events[i..]);
        life.iter().any(|e| e["kind"] == "snapshot") || run.ended()
    });
    assert!(ok, "no snapshot in this life; stderr:\n{}", run.stderr());
}

/// Kills the first `lives` lives of the child with SIGKILL, each at a random moment up to
/// `max_ms` after its first snapshot, so that each kill loses work done since a snapshot and
/// the next life resumes past step 0. Returns the kills that landed (a job that finished is
/// not killed); asserts at least 2.
pub fn kill_lives_after_a_snapshot(run: &Run, lives: usize, max_ms: u64) -> usize {
    let mut rng = fastrand::Rng::new();
    eprintln!("random seed {}", rng.get_seed());
    let mut kills = 0;
    for k in 1..=lives {
        let pid = run.nth_child_pid(k);
        after_a_snapshot_of_this_life(run);
        std::thread::sleep(Duration::from_millis(rng.u64(0..max_ms)));
        if run.ended() || !alive(pid) {
            break;
        }
        sigkill(pid);
        kills += 1;
    }
    assert!(kills >= 2, "only {kills} kills landed: make the job longer");
    kills
}

/// A small tmpfs mounted for one test (root only), private (0700); unmounted when dropped.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`16m`) at `path` (created); None if mounting fails (not
    /// root).
    pub fn mount(path: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(path.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Sends SIGKILL to `pid` (gone already is fine).
pub fn sigkill(pid: u32) {
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
}

/// Runs `program` with `args` alone (no supervisor, empty environment) in `dir` (created): the
/// `out.txt` it wrote there and the checksum it printed.
pub fn run_alone_in(program: &Path, dir: &Path, args: &[&str]) -> (Vec<u8>, String) {
    std::fs::create_dir_all(dir).unwrap();
    let out = Command::new(program)
        .args(args)
        .env_clear()
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sum = checksum_of(&String::from_utf8_lossy(&out.stdout)).expect("a checksum");
    (std::fs::read(dir.join("out.txt")).unwrap(), sum)
}
