//! `supervise bench --ranks`: epochs of a job of many ranks, for 1, 2 and 4 ranks holding the
//! same total state, side by side in one run. Each run is a real `supervise` (found beside this
//! program) whose command starts the ranks (this program again, `--rank-launch`), each rank a
//! program that links the shim (`--rank-worker`): it changes a share of its region every step,
//! with random bytes (nothing for compression to win), and takes its part when due.
//!
//! Figures per rank count: the pause of each rank at its safe point (its capture, plus the
//! wait for every rank's report), the time from the request to the published epoch (from the
//! `snapshot` events), and the bytes the epoch wrote against the sum of the ranks' changed
//! bytes since the epoch before. The first epoch (a whole copy) is left out.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use supervise_shim::{Next, Shim};

/// 64 KiB: the chunk of the store, and what the worker changes at a time.
const CHUNK: usize = 64 << 10;

/// What one rank reports at its end (one JSON line on stdout).
#[derive(Serialize, Deserialize, Debug)]
pub struct RankReport {
    /// Its rank.
    pub rank: u32,
    /// Each part's pause, microseconds, in order.
    pub pauses_us: Vec<u64>,
    /// Bytes it changed before each part (since the one before), in order.
    pub changed: Vec<u64>,
}

/// One rank: `bytes` of state, `share` of its chunks changed per step, `steps` of `step_ms`.
pub fn worker(bytes: usize, share: f64, steps: u64, step_ms: u64) -> Result<()> {
    let mut shim = Shim::init("bench-ranks")?;
    let mut region = shim.region::<u64>("state", bytes / 8)?;
    let chunks = bytes.div_ceil(CHUNK);
    // A share of the chunks per step, fractions carried over: the same bytes change in all
    // whatever the number of ranks.
    let per_step = chunks as f64 * share;
    let mut owed = 0.0;
    let mut rng = fastrand::Rng::with_seed(u64::from(std::process::id()));
    let mut dirty = std::collections::HashSet::new();
    let (mut pauses_us, mut changed) = (Vec::new(), Vec::new());
    // The first part copies everything: fill it all first.
    for (i, v) in region.iter_mut().enumerate() {
        *v = rng.u64(..) ^ i as u64;
    }
    let words = CHUNK / 8;
    for _ in 0..steps {
        owed += per_step;
        while owed >= 1.0 {
            owed -= 1.0;
            let c = rng.usize(0..chunks);
            let start = c * words;
            let end = (start + words).min(region.len());
            for v in &mut region[start..end] {
                *v = rng.u64(..);
            }
            dirty.insert(c);
        }
        std::thread::sleep(Duration::from_millis(step_ms));
        // The pause is the wait at the safe point (for every rank's report) and the capture.
        let at = Instant::now();
        if shim.due() {
            let waited = at.elapsed();
            match shim.snapshot(None, |_| Ok(()))? {
                Next::Continue(Some(c)) => {
                    pauses_us.push((waited + c.pause).as_micros() as u64);
                    changed.push((dirty.len() * CHUNK) as u64);
                    dirty.clear();
                }
                Next::Continue(None) => {}
                Next::Stop => break,
            }
        }
    }
    shim.finish()?;
    let rank = supervise_store::config::rank_from(|n| std::env::var(n).ok()).map_or(0, |r| r.0);
    let report = RankReport {
        rank,
        pauses_us,
        changed,
    };
    crate::outln!("{}", serde_json::to_string(&report)?)?;
    Ok(())
}

/// Starts `ranks` workers (this program with `worker_args`), each told its rank, and passes
/// their report lines on.
pub fn launch(ranks: u32, worker_args: &[String]) -> Result<()> {
    let me = std::env::current_exe()?;
    let mut children = Vec::new();
    for r in 0..ranks {
        children.push(
            Command::new(&me)
                .args(worker_args)
                .env(supervise_store::config::ENV_RANK, format!("{r}/{ranks}"))
                .stdout(Stdio::piped())
                .spawn()?,
        );
    }
    let mut failed = false;
    for mut child in children {
        let out = child.stdout.take().context("worker stdout")?;
        for line in BufReader::new(out).lines() {
            crate::outln!("{}", line?)?;
        }
        failed |= !child.wait()?.success();
    }
    std::io::stdout().flush()?;
    if failed {
        bail!("a rank failed");
    }
    Ok(())
}

/// One row of the figures.
#[derive(Serialize, Debug)]
pub struct Row {
    /// Ranks.
    pub ranks: u32,
    /// State per rank.
    pub bytes_per_rank: u64,
    /// Epochs measured (after the first).
    pub epochs: usize,
    /// Median and largest pause of a rank, microseconds.
    pub pause_p50_us: u64,
    /// The largest.
    pub pause_max_us: u64,
    /// Median time from the request to the published epoch, milliseconds.
    pub epoch_p50_ms: u64,
    /// Median bytes an epoch wrote.
    pub written_p50: u64,
    /// Median of the ranks' changed bytes summed, per epoch.
    pub changed_p50: u64,
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// Runs the job for 1, 2 and 4 ranks of `total` bytes together; returns the rows.
pub fn run(store: &Path, total: u64, say: &dyn Fn(&str)) -> Result<Vec<Row>> {
    let me = std::env::current_exe()?;
    let supervise = crate::supervise_beside(&me);
    let mut rows = Vec::new();
    for ranks in [1u32, 2, 4] {
        let per_rank = (total / u64::from(ranks)) as usize;
        let job = format!("bench-ranks-{ranks}");
        let events = store.join(format!("{job}.events"));
        let _ = std::fs::remove_file(&events);
        say(&format!(
            "{ranks} ranks of {} each",
            bytesize::ByteSize(per_rank as u64)
        ));
        let started = Instant::now();
        let out = Command::new(&supervise)
            .arg("--store")
            .arg(store)
            .args([
                "--job", &job, "--mpi", "--every", "500ms", "--fresh", "--quiet",
            ])
            .arg("--events")
            .arg(&events)
            .args(["--on-success", "delete", "--"])
            .arg(&me)
            .args(["--rank-launch", &ranks.to_string(), "--"])
            .args([
                "--rank-worker",
                "--rank-bytes",
                &per_rank.to_string(),
                "--rank-share",
                "0.001",
                "--rank-steps",
                "160",
                "--rank-step-ms",
                "25",
            ])
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("cannot run {}", supervise.display()))?;
        if !out.status.success() {
            bail!("supervise ended with {} ({ranks} ranks)", out.status);
        }
        say(&format!("  took {:.1} s", started.elapsed().as_secs_f64()));
        let reports: Vec<RankReport> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if reports.len() != ranks as usize {
            bail!("{} of {ranks} ranks reported", reports.len());
        }
        let mut durations = Vec::new();
        let mut written = Vec::new();
        for line in std::fs::read_to_string(&events)?.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if v["kind"] == "snapshot" {
                let data = &v["data"];
                durations.push(data["duration_ms"].as_u64().unwrap_or(0));
                written.push(data["bytes_written"].as_u64().unwrap_or(0));
            }
        }
        let _ = std::fs::remove_file(&events);
        let epochs = reports.iter().map(|r| r.changed.len()).min().unwrap_or(0);
        let skip = 1.min(epochs);
        let changed: Vec<u64> = (skip..epochs)
            .map(|k| reports.iter().map(|r| r.changed[k]).sum())
            .collect();
        let pauses: Vec<u64> = reports
            .iter()
            .flat_map(|r| r.pauses_us.iter().skip(skip).copied())
            .collect();
        rows.push(Row {
            ranks,
            bytes_per_rank: per_rank as u64,
            epochs: epochs.saturating_sub(skip),
            pause_p50_us: median(pauses.clone()),
            pause_max_us: pauses.iter().copied().max().unwrap_or(0),
            epoch_p50_ms: median(durations.iter().skip(skip).copied().collect()),
            written_p50: median(written.iter().skip(skip).copied().collect()),
            changed_p50: median(changed),
        });
    }
    Ok(rows)
}

/// The rows as a table.
pub fn print(total: u64, rows: &[Row]) -> Result<()> {
    crate::outln!(
        "epochs of {} of state in all, split over 1, 2 and 4 ranks (0.1% of the chunks \
         changed every 25 ms step, an epoch every 500 ms; the first, a whole copy, left out)",
        bytesize::ByteSize(total)
    )?;
    crate::outln!(
        "{:>5}  {:>10}  {:>6}  {:>11}  {:>11}  {:>12}  {:>12}  {:>12}  {:>8}",
        "RANKS",
        "PER RANK",
        "EPOCHS",
        "PAUSE p50",
        "PAUSE max",
        "EPOCH p50",
        "WRITTEN p50",
        "CHANGED p50",
        "W/C"
    )?;
    for r in rows {
        crate::outln!(
            "{:>5}  {:>10}  {:>6}  {:>9.2}ms  {:>9.2}ms  {:>10}ms  {:>12}  {:>12}  {:>8.2}",
            r.ranks,
            bytesize::ByteSize(r.bytes_per_rank).to_string(),
            r.epochs,
            r.pause_p50_us as f64 / 1000.0,
            r.pause_max_us as f64 / 1000.0,
            r.epoch_p50_ms,
            bytesize::ByteSize(r.written_p50).to_string(),
            bytesize::ByteSize(r.changed_p50).to_string(),
            if r.changed_p50 == 0 {
                0.0
            } else {
                r.written_p50 as f64 / r.changed_p50 as f64
            }
        )?;
    }
    Ok(())
}
