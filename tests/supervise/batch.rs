//! Batch systems and service managers. A real single-node Slurm (munge, slurmctld and slurmd
//! from Debian, started here as root on free ports) runs heat under `supervise` as batch jobs
//! that need more than their one-minute time limit: each is requeued after a final snapshot
//! (at `--signal`'s signal, at the job's end time read from squeue, or at a preemption-style
//! `scancel --signal`) and completes with the checksum of an uninterrupted run, every run
//! resuming at the step of the snapshot taken before the requeue. And systemd's notify
//! protocol, received by a listener on a datagram socket.
//!
//! The Slurm scenarios run at once, in one test (about 90 s, mostly waiting on the limit), so
//! that the daemons are stopped when it ends; the module's name sorts first, so that the
//! waiting overlaps the other tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// heat's grid and length: 650 steps of 100 ms, 65 s of work (more than the time limit).
const HEAT: [&str; 6] = ["--n", "64", "--steps", "650", "--step-ms", "100"];

/// Where a Slurm program is: on PATH, else in /usr/sbin (daemons, for a user whose PATH
/// lacks it).
fn program(name: &str) -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    on_path.unwrap_or_else(|| Path::new("/usr/sbin").join(name))
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A single-node Slurm cluster in a temporary directory; stopped (jobs cancelled, daemons
/// shut down) when dropped.
struct Slurm {
    dir: tempfile::TempDir,
    conf: PathBuf,
    munge_socket: PathBuf,
    daemons: Vec<Child>,
}

impl Slurm {
    /// Starts munged, slurmctld and slurmd, and waits for the node to be idle.
    fn start() -> Slurm {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let munge = d.join("munge");
        std::fs::create_dir(&munge).expect("munge dir");
        // munged checks that its socket's directory is not writable by others.
        std::fs::set_permissions(&munge, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let key = munge.join("munge.key");
        let status = Command::new(program("mungekey"))
            .arg("--create")
            .arg(format!("--keyfile={}", key.display()))
            .status()
            .expect("mungekey is needed (scripts/test installs munge)");
        assert!(status.success(), "mungekey failed");
        let munge_socket = munge.join("munge.sock");
        let mut daemons = Vec::new();
        daemons.push(
            Command::new(program("munged"))
                .arg("--foreground")
                .arg(format!("--socket={}", munge_socket.display()))
                .arg(format!("--key-file={}", key.display()))
                .arg(format!("--log-file={}", munge.join("munged.log").display()))
                .arg(format!("--pid-file={}", munge.join("munged.pid").display()))
                .arg(format!(
                    "--seed-file={}",
                    munge.join("munged.seed").display()
                ))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("munged is needed (scripts/test installs munge)"),
        );
        assert!(
            wait_until(Duration::from_secs(10), || munge_socket.exists()),
            "munged did not start: {}",
            std::fs::read_to_string(munge.join("munged.log")).unwrap_or_default()
        );
        let host = nix::unistd::gethostname()
            .expect("hostname")
            .to_string_lossy()
            .into_owned();
        let host = host.split('.').next().unwrap_or(&host).to_owned();
        let conf = d.join("slurm.conf");
        let p = |name: &str| d.join(name).display().to_string();
        for sub in ["state", "spool"] {
            std::fs::create_dir(d.join(sub)).expect("dir");
        }
        // One setting a line; a node of 8 CPUs (more than this machine has, which
        // config_overrides allows) so that the scenarios run at once.
        let settings = [
            "ClusterName=supervise-test".to_owned(),
            format!("SlurmctldHost={host}(127.0.0.1)"),
            format!("SlurmctldPort={}", free_port()),
            format!("SlurmdPort={}", free_port()),
            "SlurmUser=root".into(),
            "SlurmdUser=root".into(),
            "AuthType=auth/munge".into(),
            "CredType=cred/munge".into(),
            // Credentials expire after 5 s: a requeued job starts again about 6 s later
            // (120 s by default).
            format!("AuthInfo=socket={},cred_expire=5", munge_socket.display()),
            format!("StateSaveLocation={}", p("state")),
            format!("SlurmdSpoolDir={}", p("spool")),
            format!("SlurmctldPidFile={}", p("slurmctld.pid")),
            format!("SlurmdPidFile={}", p("slurmd.pid")),
            format!("SlurmctldLogFile={}", p("slurmctld.log")),
            format!("SlurmdLogFile={}", p("slurmd.log")),
            "ProctrackType=proctrack/linuxproc".into(),
            "TaskPlugin=task/none".into(),
            "JobAcctGatherType=jobacct_gather/none".into(),
            "AccountingStorageType=accounting_storage/none".into(),
            "SelectType=select/cons_tres".into(),
            "SelectTypeParameters=CR_Core".into(),
            "SchedulerType=sched/backfill".into(),
            "SchedulerParameters=sched_interval=1,bf_interval=1".into(),
            "SlurmdParameters=config_overrides".into(),
            "ReturnToService=2".into(),
            "MpiDefault=none".into(),
            "JobRequeue=1".into(),
            "MinJobAge=300".into(),
            "KillWait=5".into(),
            "OverTimeLimit=0".into(),
            "InactiveLimit=0".into(),
            "MailProg=/bin/true".into(),
            format!("NodeName={host} NodeAddr=127.0.0.1 CPUs=8 RealMemory=4000 State=UNKNOWN"),
            format!("PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP"),
        ];
        std::fs::write(&conf, settings.join("\n") + "\n").expect("slurm.conf");
        let mut slurm = Slurm {
            dir,
            conf,
            munge_socket,
            daemons,
        };
        for daemon in ["slurmctld", "slurmd"] {
            let child = Command::new(program(daemon))
                .arg("-D")
                .env("SLURM_CONF", &slurm.conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("{daemon} is needed (scripts/test installs it): {e}"));
            slurm.daemons.push(child);
        }
        let idle = wait_until(Duration::from_secs(60), || {
            slurm
                .output("sinfo", &["-h", "-o", "%T"])
                .is_some_and(|s| s.trim() == "idle")
        });
        assert!(
            idle,
            "the Slurm node did not come up: slurmctld.log:\n{}\nslurmd.log:\n{}",
            slurm.log("slurmctld.log"),
            slurm.log("slurmd.log")
        );
        slurm
    }

    /// The last lines of one of its logs.
    fn log(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// A Slurm command for this cluster.
    fn command(&self, name: &str) -> Command {
        let mut cmd = Command::new(program(name));
        cmd.env("SLURM_CONF", &self.conf);
        cmd
    }

    /// A Slurm command's output, if it succeeded.
    fn output(&self, name: &str, args: &[&str]) -> Option<String> {
        let out = self.command(name).args(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Submits `script` with `options`; its job id.
    fn sbatch(&self, options: &[&str], script: &Path) -> String {
        let out = self
            .command("sbatch")
            .arg("--parsable")
            .args(options)
            .arg(script)
            .output()
            .expect("sbatch");
        assert!(
            out.status.success(),
            "sbatch failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim().split(';').next().unwrap_or_default().to_owned()
    }

    /// A field of `scontrol show job` (JobState, RestartCnt, ...).
    fn job_field(&self, id: &str, field: &str) -> Option<String> {
        let text = self.output("scontrol", &["show", "job", "-o", id])?;
        let prefix = format!("{field}=");
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(prefix.as_str()).map(str::to_owned))
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        let _ = self.command("scancel").arg("--user=root").status();
        let _ = self.command("scontrol").arg("shutdown").status();
        let _ = Command::new(program("munged"))
            .arg("--stop")
            .arg(format!("--socket={}", self.munge_socket.display()))
            .stderr(Stdio::null())
            .status();
        for daemon in &mut self.daemons {
            let stopped = wait_until(Duration::from_secs(5), || {
                matches!(daemon.try_wait(), Ok(Some(_)))
            });
            if !stopped {
                let _ = daemon.kill();
                let _ = daemon.wait();
            }
        }
    }
}

/// What a batch job runs under supervise, and how its checks read it.
struct Program {
    /// The script's lines before `exec supervise` (variables).
    setup: String,
    /// The command after `supervise ... --`, quoted for bash.
    command: String,
    /// The checksum of an uninterrupted run.
    reference: String,
    /// What it says when it resumes at `step` from snapshot (or epoch) `seq`.
    resumed: fn(u64, u64) -> String,
}

impl Program {
    /// heat, 650 steps of 100 ms.
    fn heat() -> Program {
        Program {
            setup: String::new(),
            command: format!("'{}' {}", example_bin("heat").display(), HEAT.join(" ")),
            reference: reference_checksum(&HEAT[..4]),
            resumed: |seq, step| format!("resumed from snapshot {seq} at step {step}"),
        }
    }
}

/// One batch job under supervise, in its own directory and store.
struct Job {
    name: &'static str,
    dir: PathBuf,
    id: String,
    program: Program,
}

impl Job {
    /// Writes the batch script (the two lines a user adds: `--requeue`, and `exec supervise
    /// ... --` before the command) and submits it with `sbatch_options`.
    fn submit(
        slurm: &Slurm,
        name: &'static str,
        program: Program,
        sbatch_options: &[&str],
        supervise_options: &[&str],
    ) -> Job {
        let dir = slurm.dir.path().join(name);
        std::fs::create_dir(&dir).expect("job dir");
        let script = format!(
            "#!/bin/bash\n{}exec '{}' --store '{}' --every 3s {} -- {}\n",
            program.setup,
            supervise_bin().display(),
            dir.join("store").display(),
            supervise_options.join(" "),
            program.command,
        );
        let path = dir.join("job.sh");
        std::fs::write(&path, script).expect("job script");
        let out = dir.join("out.txt");
        let mut options = vec![
            format!("--job-name={name}"),
            format!("--chdir={}", dir.display()),
            format!("--output={}", out.display()),
            // A requeued run appends to the output instead of truncating it.
            "--open-mode=append".into(),
            "--requeue".into(),
        ];
        options.extend(sbatch_options.iter().map(|s| s.to_string()));
        let options: Vec<&str> = options.iter().map(String::as_str).collect();
        let id = slurm.sbatch(&options, &path);
        Job {
            name,
            dir,
            id,
            program,
        }
    }

    fn store(&self) -> PathBuf {
        self.dir.join("store")
    }

    fn output(&self) -> String {
        std::fs::read_to_string(self.dir.join("out.txt")).unwrap_or_default()
    }

    /// Waits for the job to complete (its history's last run finished); fails with what is
    /// known when it ends otherwise or takes too long.
    fn wait_completed(&self, slurm: &Slurm) {
        let start = Instant::now();
        loop {
            let ends = events_of(&self.store(), "end");
            if ends.last().is_some_and(|e| e["outcome"] == "finished") {
                return;
            }
            let state = slurm.job_field(&self.id, "JobState").unwrap_or_default();
            let failed = matches!(
                state.as_str(),
                "FAILED" | "CANCELLED" | "TIMEOUT" | "NODE_FAIL" | "OUT_OF_MEMORY" | "BOOT_FAIL"
            ) || (state == "COMPLETED" && start.elapsed() > Duration::from_secs(5));
            if failed || start.elapsed() > Duration::from_secs(300) {
                panic!(
                    "{}: job {} is {state} after {:?} without finishing.\nevents: {:#?}\n\
                     output:\n{}\nslurmctld.log:\n{}",
                    self.name,
                    self.id,
                    start.elapsed(),
                    job_events(&self.store()),
                    self.output(),
                    slurm.log("slurmctld.log")
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The checks every scenario shares: requeued at least once (Slurm's count too), every
    /// run but the last ended requeued after a final snapshot asked for by `trigger`, each
    /// next run resumed from exactly that snapshot at its step (> 0: nothing after it was
    /// lost, and the resume happened), and the last one completed with the reference
    /// checksum.
    fn assert_requeued_and_completed(&self, slurm: &Slurm, trigger: &str) {
        let events = job_events(&self.store());
        let ctx = || format!("{}: {events:#?}\n{}", self.name, self.output());
        let requeued: Vec<&serde_json::Value> =
            events.iter().filter(|e| e["kind"] == "requeued").collect();
        assert!(!requeued.is_empty(), "never requeued: {}", ctx());
        let restarts: u64 = slurm
            .job_field(&self.id, "Restarts")
            .or_else(|| slurm.job_field(&self.id, "RestartCnt"))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(restarts >= 1, "Slurm counts {restarts} restarts: {}", ctx());
        // Each run's Slurm event carries SLURM_RESTART_COUNT: 0, 1, 2, ...
        let counts: Vec<u64> = events
            .iter()
            .filter(|e| e["kind"] == "slurm")
            .map(|e| e["restart_count"].as_u64().unwrap_or(u64::MAX))
            .collect();
        let expected: Vec<u64> = (0..=requeued.len() as u64).collect();
        assert_eq!(counts, expected, "{}", ctx());
        let ends: Vec<&str> = events
            .iter()
            .filter(|e| e["kind"] == "end")
            .map(|e| e["outcome"].as_str().unwrap_or_default())
            .collect();
        let mut want = vec!["requeued"; requeued.len()];
        want.push("finished");
        assert_eq!(ends, want, "{}", ctx());
        let stops: Vec<&serde_json::Value> =
            events.iter().filter(|e| e["kind"] == "stopping").collect();
        // Every stop was a requeue, and `trigger` asked for the first. (Slurm may send
        // --signal's signal up to 60 s early, or, for a run that starts just after its check,
        // not before the end time's own trigger: later runs may stop on either.)
        assert!(
            stops.iter().all(|s| s["requeue"] == true)
                && stops.first().is_some_and(|s| s["signal"] == trigger)
                && stops
                    .iter()
                    .all(|s| s["signal"] == trigger || s["signal"] == "end-time"),
            "every stop was a requeue, the first on {trigger}: {}",
            ctx()
        );
        // Every requeue resumes from the snapshot taken just before it, at its step.
        let output = self.output();
        for (i, r) in events
            .iter()
            .enumerate()
            .filter(|(_, e)| e["kind"] == "requeued")
        {
            let last = events[..i]
                .iter()
                .rev()
                .find(|e| e["kind"] == "snapshot")
                .unwrap_or_else(|| panic!("no snapshot before the requeue: {}", ctx()));
            let seq = last["seq"].as_u64().expect("seq");
            let step: u64 = last["tag"]
                .as_str()
                .and_then(|t| t.strip_prefix("step "))
                .and_then(|n| n.parse().ok())
                .expect("heat tags its snapshots with their step");
            assert!(step > 0);
            assert_eq!(r["from"], seq, "{}", ctx());
            let next_spawn = events[i..]
                .iter()
                .find(|e| e["kind"] == "spawned")
                .unwrap_or_else(|| panic!("no run after the requeue: {}", ctx()));
            assert_eq!(next_spawn["from"], seq, "{}", ctx());
            let said = (self.program.resumed)(seq, step);
            assert!(output.contains(&said), "it did not say {said:?}: {}", ctx());
        }
        let reference = self.program.reference.clone();
        assert_eq!(checksum_of(&output), Some(reference), "{}", ctx());
    }
}

#[test]
fn slurm_jobs_past_their_time_limit_are_requeued_and_resume_from_their_final_snapshot() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: the test Slurm runs its daemons as root");
        return;
    }
    let slurm = Slurm::start();
    // 1. Slurm signals the batch shell (supervise, exec'd) 25 s before the limit.
    let signalled = Job::submit(
        &slurm,
        "signal",
        Program::heat(),
        &["--time=1", "--signal=B:USR2@25"],
        &["--requeue-margin", "5s"],
    );
    // 2. No --signal: supervise reads the end time and stops 25 s before it.
    let end_time = Job::submit(
        &slurm,
        "end-time",
        Program::heat(),
        &["--time=1"],
        &["--requeue-margin", "25s"],
    );
    // 3. A preemption-style signal from scancel, after the first snapshot; its limit is far.
    let preempted = Job::submit(&slurm, "preempted", Program::heat(), &["--time=10"], &[]);
    // 4. The same for a job of two MPI ranks (its snapshots are epochs).
    let mpi = Job::submit(
        &slurm,
        "mpi",
        mpi_heat(slurm.dir.path()),
        &["--time=10"],
        &[],
    );
    for job in [&preempted, &mpi] {
        let first = wait_until(Duration::from_secs(60), || {
            !events_of(&job.store(), "snapshot").is_empty()
        });
        assert!(first, "{}: no snapshot: {}", job.name, job.output());
        let status = slurm
            .command("scancel")
            .args(["--batch", "--signal=USR2", &job.id])
            .status()
            .expect("scancel");
        assert!(status.success());
    }

    for job in [&preempted, &mpi, &signalled, &end_time] {
        job.wait_completed(&slurm);
    }
    preempted.assert_requeued_and_completed(&slurm, "SIGUSR2");
    mpi.assert_requeued_and_completed(&slurm, "SIGUSR2");
    let resumed = events_of(&mpi.store(), "epoch-resumed");
    assert!(
        !resumed.is_empty() && resumed.iter().all(|r| r["ranks"] == 2),
        "{resumed:?}"
    );
    signalled.assert_requeued_and_completed(&slurm, "SIGUSR2");
    end_time.assert_requeued_and_completed(&slurm, "end-time");
    // The end-time job was told its end and lead when each run started.
    let slurm_events = events_of(&end_time.store(), "slurm");
    assert!(
        slurm_events
            .iter()
            .all(|e| e["ends_in_ms"].as_u64().is_some_and(|ms| ms <= 60_000)),
        "{slurm_events:#?}"
    );
}

/// heat_mpi under `mpirun -n 2`: 300 steps of 100 ms.
fn mpi_heat(dir: &Path) -> Program {
    const ARGS: [&str; 6] = ["--n", "96", "--steps", "300", "--sleep-ms", "100"];
    let build = dir.join("heat-mpi-build");
    std::fs::create_dir_all(&build).expect("build dir");
    let binary = crate::mpi::build(&build);
    let setup: String = crate::mpi::MPI_ENV
        .iter()
        .map(|(k, v)| format!("export {k}={v}\n"))
        .collect();
    Program {
        setup,
        command: format!("mpirun -n 2 '{}' {}", binary.display(), ARGS.join(" ")),
        // heat_mpi's checksum is heat's for the same grid and steps (the MPI tests check it).
        reference: reference_checksum(&ARGS[..4]),
        resumed: |_, step| format!("rank 0 resumed at step {step}"),
    }
}

/// Datagrams received on a notify socket, by a thread, each with when it came.
struct NotifyListener {
    messages: std::sync::Arc<std::sync::Mutex<Vec<(Instant, String)>>>,
}

impl NotifyListener {
    fn bind(path: &Path) -> NotifyListener {
        let socket = std::os::unix::net::UnixDatagram::bind(path).expect("bind notify socket");
        let messages = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&messages);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.lock().unwrap().push((Instant::now(), text));
            }
        });
        NotifyListener { messages }
    }

    fn all(&self) -> Vec<(Instant, String)> {
        self.messages.lock().unwrap().clone()
    }

    /// The messages with this line (`READY=1`, `WATCHDOG=1`, `STATUS=...` by prefix).
    fn with(&self, line: &str) -> Vec<(Instant, String)> {
        self.all()
            .into_iter()
            .filter(|(_, m)| m.lines().any(|l| l.starts_with(line)))
            .collect()
    }
}

#[test]
fn systemd_hears_ready_watchdog_while_the_program_makes_progress_and_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("notify.sock");
    let listener = NotifyListener::bind(&socket);
    let store = dir.path().join("store");
    // 150 steps of 40 ms: about 6 s; the shim beats every second, the watchdog is 2 s.
    let args = ["--n", "64", "--steps", "150", "--step-ms", "40"];
    let mut cmd = Command::new(supervise_bin());
    cmd.arg("--store")
        .arg(&store)
        .args(["--every", "1s", "--"])
        .args(heat(&args))
        .env("NOTIFY_SOCKET", &socket)
        .env("WATCHDOG_USEC", "2000000");
    let run = Run::spawn(cmd);
    assert!(
        wait_until(Duration::from_secs(20), || !listener
            .with("WATCHDOG=1")
            .is_empty()),
        "no watchdog ping: {:?}",
        listener.all()
    );
    // A program stopped between safe points makes no progress: the pings stop within the
    // period, and come back when it goes on.
    let program = run.nth_child_pid(1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(program as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("SIGSTOP");
    let stopped_at = Instant::now();
    std::thread::sleep(Duration::from_millis(4500));
    let quiet_from = stopped_at + Duration::from_millis(3000);
    let late: Vec<_> = listener
        .with("WATCHDOG=1")
        .into_iter()
        .filter(|(t, _)| *t > quiet_from)
        .collect();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(program as i32),
        nix::sys::signal::Signal::SIGCONT,
    )
    .expect("SIGCONT");
    assert!(
        late.is_empty(),
        "pings while the program was stopped: {late:?}"
    );
    let resumed_at = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || listener
            .with("WATCHDOG=1")
            .iter()
            .any(|(t, _)| *t > resumed_at)),
        "no ping after the program went on"
    );
    let done = run.wait(LONG);
    done.assert_completed(&reference_checksum(&args[..4]));
    let all = listener.all();
    // READY=1 once, first, with the program's status; then a snapshot in a STATUS; the last
    // STATUS is how the job ended.
    let ready = listener.with("READY=1");
    assert_eq!(ready.len(), 1, "{all:?}");
    assert!(
        all[0].1.contains("READY=1") && all[0].1.contains("STATUS=running (pid "),
        "{all:?}"
    );
    let statuses: Vec<String> = listener
        .with("STATUS=")
        .into_iter()
        .map(|(_, m)| m)
        .collect();
    assert!(
        statuses
            .iter()
            .any(|s| s.contains("STATUS=running; snapshot ")),
        "{statuses:?}"
    );
    assert!(
        statuses
            .last()
            .is_some_and(|s| s.contains("STATUS=job finished (exit code 0)")),
        "{statuses:?}"
    );
    assert!(listener.with("STOPPING=1").is_empty(), "{all:?}");

    // A stop (systemctl stop sends SIGTERM): STOPPING=1, then how it ended.
    let socket = dir.path().join("notify-stop.sock");
    let listener = NotifyListener::bind(&socket);
    let mut cmd = Command::new(supervise_bin());
    cmd.arg("--store")
        .arg(dir.path().join("store-stop"))
        .arg("--")
        .args(heat(&["--n", "64", "--steps", "100000", "--step-ms", "10"]))
        .env("NOTIFY_SOCKET", &socket);
    let run = Run::spawn(cmd);
    assert!(wait_until(Duration::from_secs(20), || !listener
        .with("READY=1")
        .is_empty()));
    run.signal(nix::sys::signal::Signal::SIGTERM);
    let done = run.wait(LONG);
    assert_eq!(done.code, Some(143), "{}", done.stderr);
    let all = listener.all();
    let stopping = all
        .iter()
        .position(|(_, m)| m.contains("STOPPING=1"))
        .unwrap_or_else(|| panic!("no STOPPING=1: {all:?}"));
    assert!(
        all[stopping + 1..]
            .iter()
            .any(|(_, m)| m.contains("STATUS=stopped by SIGTERM")),
        "{all:?}"
    );
    // Without WATCHDOG_USEC, no pings.
    assert!(listener.with("WATCHDOG=1").is_empty(), "{all:?}");
}

/// A batch job's environment for a supervisor that no Slurm controller knows of: squeue and
/// scontrol fail (at once, on an empty configuration file; on a missing one they retry for a
/// minute).
fn fake_job(restart_count: &str, conf: &Path) -> Vec<(String, String)> {
    vec![
        ("SLURM_JOB_ID".into(), "999999".into()),
        ("SLURM_RESTART_COUNT".into(), restart_count.into()),
        ("SLURM_CONF".into(), conf.display().to_string()),
    ]
}

/// Runs `command` under supervise in a fake batch job (`env`), sends the requeue signal once
/// `ready` holds, and returns the exit code and the `not-requeued` record's reason.
fn refused_requeue(
    store: &Path,
    options: &[&str],
    command: &[std::ffi::OsString],
    env: &[(String, String)],
    ready: impl Fn(&Path) -> bool,
    reason: &str,
) -> (Option<i32>, String) {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let run = Run::start(store, options, command, &env);
    assert!(
        wait_until(Duration::from_secs(30), || ready(store)),
        "{}",
        run.stderr()
    );
    run.signal(nix::sys::signal::Signal::SIGUSR2);
    let done = run.wait(LONG);
    let stops = events_of(store, "stopping");
    assert!(
        stops.len() == 1 && stops[0]["requeue"] == true && stops[0]["signal"] == "SIGUSR2",
        "{stops:?}"
    );
    assert_eq!(last_end(store)["outcome"], "stopped");
    assert!(events_of(store, "requeued").is_empty());
    let refused = events_of(store, "not-requeued");
    assert_eq!(refused.len(), 1, "{}", done.stderr);
    assert_eq!(refused[0]["job_id"], "999999");
    assert_eq!(refused[0]["reason"], reason, "{refused:?}");
    (
        done.code,
        refused[0]["why"].as_str().unwrap_or_default().to_owned(),
    )
}

#[test]
fn a_requeue_is_refused_past_max_requeues_after_a_run_without_snapshot_and_when_scontrol_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("empty-slurm.conf");
    std::fs::write(&conf, "").expect("conf");
    let long_heat = heat(&["--n", "64", "--steps", "1000000", "--step-ms", "5"]);
    let has_snapshot = |store: &Path| !events_of(store, "snapshot").is_empty();

    // Requeued twice already, at most twice: stopped, not requeued.
    let store = dir.path().join("max");
    let (code, why) = refused_requeue(
        &store,
        &["--every", "1s", "--max-requeues", "2"],
        &long_heat,
        &fake_job("2", &conf),
        has_snapshot,
        "max-requeues",
    );
    assert_eq!(code, Some(75));
    assert!(why.contains("--max-requeues 2"), "{why}");
    let slurm = events_of(&store, "slurm");
    assert_eq!(slurm.len(), 1);
    assert_eq!(slurm[0]["restart_count"], 2);
    assert!(slurm[0]["unknown"].is_string(), "{slurm:?}");

    // A run that took no snapshot (a program without the shim) would loop.
    let store = dir.path().join("no-snapshot");
    let sleep = vec![std::ffi::OsString::from("sleep"), "60".into()];
    let spawned = |store: &Path| !events_of(store, "spawned").is_empty();
    let (code, why) = refused_requeue(
        &store,
        &[],
        &sleep,
        &fake_job("0", &conf),
        spawned,
        "no-snapshot",
    );
    assert_eq!(code, Some(75));
    assert!(why.contains("took no snapshot"), "{why}");

    // scontrol cannot requeue a job its controller does not know: said, with its error.
    let store = dir.path().join("scontrol");
    let (code, why) = refused_requeue(
        &store,
        &["--every", "1s"],
        &long_heat,
        &fake_job("0", &conf),
        has_snapshot,
        "scontrol-failed",
    );
    assert_eq!(code, Some(75));
    // scontrol's own words are passed on.
    assert!(
        why.contains("Unable to process configuration file"),
        "{why}"
    );

    // Outside a batch job the requeue signal is a stop like SIGTERM.
    let store = dir.path().join("outside");
    let mut cmd = Command::new(supervise_bin());
    cmd.arg("--store")
        .arg(&store)
        .args(["--every", "1s", "--"])
        .args(&long_heat)
        .env_remove("SLURM_JOB_ID");
    let run = Run::spawn(cmd);
    run.wait_for_snapshot(1);
    run.signal(nix::sys::signal::Signal::SIGUSR2);
    let done = run.wait(LONG);
    assert_eq!(done.code, Some(128 + libc::SIGUSR2), "{}", done.stderr);
    let stops = events_of(&store, "stopping");
    assert_eq!(stops[0]["requeue"], false, "{stops:?}");
    assert!(events_of(&store, "slurm").is_empty());
}
