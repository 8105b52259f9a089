//! `supervise bench --every`: what the snapshot interval costs a program whose state changes
//! entirely between snapshots (the case where snapshots are dearest), side by side in one run:
//! the program alone, under `supervise --every 1s`, and under `supervise --every auto`. The
//! program is this one again (`--every-worker`): it writes every page of its region each
//! round, computes for a while, and takes a snapshot when one is due.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use supervise_shim::{Next, Shim};

/// One way of running the program, measured.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// "alone", "--every 1s", "--every auto".
    pub run: String,
    /// Wall time of the whole run, seconds.
    pub wall_s: f64,
    /// Against the program alone.
    pub overhead: f64,
    /// Snapshots taken.
    pub snapshots: u64,
    /// The interval `--every auto` chose last, seconds (and why), if it chose one.
    pub interval: Option<(f64, String)>,
}

/// The program: `bytes` of state, all of it written each of `rounds` rounds, then `round_ms`
/// of computing; a snapshot when one is due.
pub fn worker(bytes: usize, rounds: u64, round_ms: u64) -> Result<()> {
    let mut shim = Shim::init("bench-every")?;
    let mut region = shim.region::<u64>("state", bytes / 8)?;
    let mut round: u64 = shim.load("round")?.unwrap_or(0);
    while round < rounds {
        // A word in every 4 KiB page: every chunk changes.
        for (i, v) in region.iter_mut().step_by(512).enumerate() {
            *v = v.wrapping_add(round ^ i as u64);
        }
        std::thread::sleep(Duration::from_millis(round_ms));
        round += 1;
        if shim.due() {
            match shim.snapshot(None, |s| s.value("round", &round))? {
                Next::Continue(_) => {}
                // A stop (the supervisor was asked for one): the final snapshot is durable.
                Next::Stop => {
                    let _ = shim.stopped();
                    std::process::exit(supervise_store::exit::STOPPED);
                }
            }
        }
    }
    shim.finish()?;
    Ok(())
}

/// Runs the program alone and under both schedules: `bytes` of state, `rounds` rounds of
/// `round_ms` computing.
pub fn run(
    store: &Path,
    bytes: u64,
    rounds: u64,
    round_ms: u64,
    say: &dyn Fn(&str),
) -> Result<Vec<Row>> {
    let me = std::env::current_exe()?;
    let supervise = crate::supervise_beside(&me);
    let worker_args = [
        "--every-worker".to_owned(),
        "--worker-bytes".to_owned(),
        bytes.to_string(),
        "--worker-rounds".to_owned(),
        rounds.to_string(),
        "--worker-round-ms".to_owned(),
        round_ms.to_string(),
    ];
    say(&format!(
        "a program of {} writing all of it every {round_ms} ms, {rounds} rounds: alone",
        bytesize::ByteSize(bytes).display().iec()
    ));
    let started = Instant::now();
    let mut alone_run = Command::new(&me);
    // Alone: no store, no supervisor, no job of many ranks, whatever this bench runs under.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("SUPERVISE_") {
            alone_run.env_remove(name);
        }
    }
    let status = alone_run
        .args(&worker_args)
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("cannot run {}", me.display()))?;
    if !status.success() {
        bail!("the program alone ended with {status}");
    }
    let alone = started.elapsed().as_secs_f64();
    let mut rows = vec![Row {
        run: "alone".into(),
        wall_s: alone,
        overhead: 0.0,
        snapshots: 0,
        interval: None,
    }];
    for every in ["1s", "auto"] {
        say(&format!("the same under supervise --every {every}"));
        let job = format!("bench-every-{every}");
        let events = store.join(format!("{job}.events"));
        let _ = std::fs::remove_file(&events);
        let started = Instant::now();
        let status = Command::new(&supervise)
            .arg("--store")
            .arg(store)
            .args(["--job", &job, "--every", every, "--fresh", "--quiet"])
            .arg("--events")
            .arg(&events)
            .args(["--on-success", "delete", "--"])
            .arg(&me)
            .args(&worker_args)
            .stdout(Stdio::null())
            .status()
            .with_context(|| format!("cannot run {}", supervise.display()))?;
        let wall = started.elapsed().as_secs_f64();
        let history = std::fs::read_to_string(&events).unwrap_or_default();
        let _ = std::fs::remove_file(&events);
        if !status.success() {
            // `--on-success delete` removed nothing: the job's snapshots are the bench's own.
            let _ = std::fs::remove_dir_all(store.join(&job));
            bail!("supervise --every {every} ended with {status}");
        }
        let (mut snapshots, mut interval) = (0, None);
        for line in history.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            match v["kind"].as_str() {
                Some("snapshot") => snapshots += 1,
                Some("interval") => {
                    let data = &v["data"];
                    interval = Some((
                        data["every_ms"].as_f64().unwrap_or(0.0) / 1000.0,
                        data["why"].as_str().unwrap_or("").to_owned(),
                    ));
                }
                _ => {}
            }
        }
        rows.push(Row {
            run: format!("--every {every}"),
            wall_s: wall,
            overhead: wall / alone - 1.0,
            snapshots,
            interval,
        });
    }
    Ok(rows)
}

/// The rows as a table.
pub fn print(bytes: u64, rounds: u64, round_ms: u64, rows: &[Row]) -> Result<()> {
    crate::outln!(
        "a program of {} that writes all of it every round ({rounds} rounds of {round_ms} ms)",
        bytesize::ByteSize(bytes).display().iec()
    )?;
    crate::outln!()?;
    crate::outln!(
        "{:<14} {:>8} {:>9} {:>10}  interval chosen",
        "run",
        "wall",
        "overhead",
        "snapshots"
    )?;
    for r in rows {
        let interval = r
            .interval
            .as_ref()
            .map_or("-".to_owned(), |(s, why)| format!("{s:.1} s ({why})"));
        crate::outln!(
            "{:<14} {:>6.1} s {:>8.1}% {:>10}  {interval}",
            r.run,
            r.wall_s,
            r.overhead * 100.0,
            r.snapshots
        )?;
    }
    Ok(())
}

/// Where a bench's store directory is, made if missing.
pub fn store_dir(store: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(store).with_context(|| format!("cannot create {}", store.display()))?;
    Ok(store.to_owned())
}
