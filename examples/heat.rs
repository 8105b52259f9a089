//! A 2-D heat-equation solver on an N x N grid of f64, made restartable with the supervise shim.
//!
//! ```text
//! cargo build --release --example heat
//! supervise --every 5s -- ./target/release/examples/heat --n 2048 --steps 5400
//! ```
//!
//! Explicit finite differences (Jacobi, 5-point stencil), fixed boundaries: the top edge is held
//! at 100 degrees, the others at 0. Deterministic: a run resumed from any snapshot prints the
//! same last line, `checksum <hex>` (blake3 of the final grid's bytes), as an uninterrupted run.

use serde::{Deserialize, Serialize};
use std::process::ExitCode;

use supervise_shim::{Next, Shim, Start};

/// The program's small state, saved as a typed entry.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Params {
    n: usize,
    steps: u64,
    step: u64,
    alpha: f64,
}

/// Prints one line to stderr with a single write, so it is never interleaved with the
/// supervisor's lines on the stderr they share.
fn say(msg: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("heat: {msg}\n").as_bytes());
}

/// Shows the shim's warnings (it prints nothing itself; it reports through the `log` facade
/// and to the supervisor) as `supervise-shim: ...` lines on stderr.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) && record.target().starts_with("supervise_shim") {
            use std::io::Write;
            let line = format!("supervise-shim: {}\n", record.args());
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

/// The command line.
struct Args {
    n: usize,
    steps: u64,
    crash_on_resume: bool,
    /// Sleep this long after each step: a longer step at no CPU cost, for tests that need a
    /// run of minutes (a batch job's time limit).
    step_ms: u64,
}

const USAGE: &str = "usage: heat [--n N] [--steps S] [--step-ms MS]";

fn parse_args() -> Result<Args, String> {
    let (mut n, mut steps, mut crash_on_resume) = (2048usize, 5400u64, false);
    let mut step_ms = 0u64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            // Fault injection for tests: behave like a program whose snapshots hold a state
            // that makes it crash right after restoring.
            "--crash-on-resume" => crash_on_resume = true,
            "--n" => n = value("--n")?.parse().map_err(|e| format!("--n: {e}"))?,
            "--steps" => {
                steps = value("--steps")?
                    .parse()
                    .map_err(|e| format!("--steps: {e}"))?
            }
            "--step-ms" => {
                step_ms = value("--step-ms")?
                    .parse()
                    .map_err(|e| format!("--step-ms: {e}"))?
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}; {USAGE}")),
        }
    }
    if n < 3 {
        return Err("--n must be at least 3".into());
    }
    Ok(Args {
        n,
        steps,
        crash_on_resume,
        step_ms,
    })
}

/// The initial grid: 0 everywhere, the top row at 100.
fn initial_grid(n: usize) -> Vec<f64> {
    let mut grid = vec![0.0; n * n];
    grid[..n].fill(100.0);
    grid
}

/// Computes the interior rows in `band` (starting at grid row `first`) from `cur`.
fn rows(cur: &[f64], band: &mut [f64], first: usize, n: usize, alpha: f64) {
    for (r, row) in band.chunks_mut(n).enumerate() {
        let i = first + r;
        let (up, mid, down) = (
            &cur[(i - 1) * n..i * n],
            &cur[i * n..(i + 1) * n],
            &cur[(i + 1) * n..(i + 2) * n],
        );
        row[0] = mid[0];
        row[n - 1] = mid[n - 1];
        for j in 1..n - 1 {
            row[j] = mid[j] + alpha * (up[j] + down[j] + mid[j - 1] + mid[j + 1] - 4.0 * mid[j]);
        }
    }
}

/// One step: `next` interior from `cur`, rows split across threads (each cell is computed
/// independently, so the result does not depend on the split).
fn step(cur: &[f64], next: &mut [f64], n: usize, alpha: f64, threads: usize) {
    let interior = &mut next[n..n * (n - 1)];
    if threads <= 1 {
        return rows(cur, interior, 1, n, alpha);
    }
    let rows_per = (n - 2).div_ceil(threads);
    std::thread::scope(|scope| {
        for (t, band) in interior.chunks_mut(rows_per * n).enumerate() {
            scope.spawn(move || rows(cur, band, 1 + t * rows_per, n, alpha));
        }
    });
}

fn main() -> ExitCode {
    if log::set_logger(&StderrLog).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    let args = match parse_args() {
        Ok(v) => v,
        Err(e) => {
            say(&e);
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            say(&format!("error: {e}"));
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let &Args {
        n,
        steps,
        crash_on_resume,
        step_ms,
    } = args;
    // Threads pay off only when a step is long compared to spawning them.
    let threads = if n < 512 {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |t| t.get())
    };

    // 1. Start the shim: under supervise this restores the newest complete snapshot.
    let mut shim = Shim::init("heat")?;
    let mut params = Params {
        n,
        steps,
        step: 0,
        alpha: 0.2,
    };
    let mut grid = initial_grid(n);
    if let Some(saved) = shim.load::<Params>("params")? {
        if saved.n != n {
            return Err(format!("snapshot is for --n {}, not --n {n}", saved.n).into());
        }
        params.step = saved.step;
        shim.load_slice("grid", &mut grid)?;
    }
    if let Start::Resumed { seq, .. } = shim.start() {
        say(&format!(
            "resumed from snapshot {seq} at step {}",
            params.step
        ));
        if crash_on_resume {
            say("--crash-on-resume: aborting");
            std::process::abort();
        }
    }

    let mut next = grid.clone();
    while params.step < params.steps {
        step(&grid, &mut next, n, params.alpha, threads);
        std::mem::swap(&mut grid, &mut next);
        params.step += 1;
        if step_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(step_ms));
        }
        // 2. At a safe point: one atomic load unless a snapshot is due.
        if shim.due() {
            let tag = format!("step {}", params.step);
            let taken = shim.snapshot(Some(&tag), |s| {
                s.value("params", &params)?;
                s.slice("grid", &grid)
            });
            match taken {
                Ok(Next::Continue(_)) => {}
                // The supervisor asked the program to stop: its final snapshot is taken.
                Ok(Next::Stop) => return Ok(shim.stopped()),
                Err(e) => say(&format!("snapshot failed, continuing: {e}")),
            }
        }
    }
    shim.finish()?;
    println!(
        "checksum {}",
        blake3::hash(bytemuck::cast_slice(&grid)).to_hex()
    );
    Ok(ExitCode::SUCCESS)
}
