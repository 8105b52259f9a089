//! Helpers for end-to-end tests: run the real `supervise` binary and the example programs,
//! follow their output as it comes, and look at processes and the store.

#![allow(dead_code)]

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

/// Runs `supervise <args> --store <store>` to its end: (exit code, stdout, stderr).
pub fn cmd(store: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(supervise_bin())
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
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn(cmd)
    }

    /// Starts a prepared command with piped output.
    pub fn spawn(mut cmd: Command) -> Run {
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

    /// How many stderr lines so far contain `pat`.
    pub fn count(&self, pat: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(pat))
            .count()
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

    /// The pid of the child spawned `n`-th (from the "spawned pid N" lines).
    pub fn nth_child_pid(&self, n: usize, timeout: Duration) -> u32 {
        let line = self.wait_for_nth("spawned pid ", n, timeout);
        let rest = &line[line.find("spawned pid ").expect("pattern") + 12..];
        rest.split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .expect("pid")
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

/// The typed events of the store's only job, oldest first: each history record's `data`
/// (its `kind` and fields), or for an older record without data, just its `kind`.
pub fn job_events(store: &Path) -> Vec<serde_json::Value> {
    let path = only_job(store).dir().join("events.log");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|r| match r.get("data") {
            Some(d) if !d.is_null() => d.clone(),
            _ => serde_json::json!({ "kind": r["kind"] }),
        })
        .collect()
}

/// The events of one kind.
pub fn events_of(store: &Path, kind: &str) -> Vec<serde_json::Value> {
    job_events(store)
        .into_iter()
        .filter(|e| e["kind"] == kind)
        .collect()
}

/// Waits until the child spawned last took a snapshot (or the job finished): the first
/// snapshot done after the latest "spawned pid" line.
pub fn after_a_snapshot_of_this_life(run: &Run) {
    let ok = wait_until(Duration::from_secs(120), || {
        let log = run.stderr();
        let life = log.rfind("spawned pid ").map_or("", |i| &log[i..]);
        life.contains("done [step ") || log.contains("job finished")
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
        let pid = run.nth_child_pid(k, Duration::from_secs(120));
        after_a_snapshot_of_this_life(run);
        std::thread::sleep(Duration::from_millis(rng.u64(0..max_ms)));
        if run.count("job finished") > 0 || !alive(pid) {
            break;
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        kills += 1;
    }
    assert!(kills >= 2, "only {kills} kills landed: make the job longer");
    kills
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
