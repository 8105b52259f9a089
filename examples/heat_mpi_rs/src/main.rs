//! `examples/heat.rs` split over MPI ranks with the `mpi` crate: the same 2-D heat equation on
//! an N x N grid of f64 (alpha 0.2, top row 100.0, fixed boundary rows and columns), its N-2
//! interior rows divided in row blocks over the ranks (uneven splits too), one halo row
//! exchanged up and down each step. Each rank saves only its own rows and its step with the
//! supervise shim, which finds the supervisor, its rank and the number of ranks in the
//! environment `supervise -- mpirun` gives it. At the end rank 0 gathers the grid and prints
//! `checksum <hex>` (blake3 of the whole grid's bytes), equal to heat.rs's and heat_mpi.c's for
//! the same --n and --steps, whatever the number of ranks.
//!
//! ```text
//! cargo build --release --manifest-path examples/heat_mpi_rs/Cargo.toml
//! supervise --every 5s -- mpirun -n 4 examples/heat_mpi_rs/target/release/heat-mpi-rs --n 2048
//! ```
//!
//! Options: --n N, --steps S, --sleep-ms K (sleep K ms a step, to slow it down for tests). Every
//! rank calls `Shim::due` exactly once a step, at the same point (right after the step): the
//! supervisor makes every rank snapshot at the same step by counting those calls.

use std::process::ExitCode;
use std::time::Duration;

use mpi::datatype::PartitionMut;
use mpi::point_to_point as p2p;
use mpi::topology::{Process, SimpleCommunicator};
use mpi::traits::*;
use serde::{Deserialize, Serialize};
use supervise_shim::{Next, Shim, Start};

/// The rank's small state, saved as a typed entry.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Params {
    n: usize,
    step: u64,
}

const ALPHA: f64 = 0.2;

/// One line to stderr in one write.
fn say(rank: i32, msg: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("heat_mpi_rs: rank {rank}: {msg}\n").as_bytes());
}

struct Args {
    n: usize,
    steps: u64,
    sleep: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        n: 2048,
        steps: 5400,
        sleep: Duration::ZERO,
    };
    let usage = "usage: heat-mpi-rs [--n N] [--steps S] [--sleep-ms K]";
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().ok_or(format!("{arg} needs a value; {usage}"))?;
        let bad = |e: std::num::ParseIntError| format!("{arg}: {e}");
        match arg.as_str() {
            "--n" => a.n = value.parse().map_err(bad)?,
            "--steps" => a.steps = value.parse().map_err(bad)?,
            "--sleep-ms" => a.sleep = Duration::from_millis(value.parse().map_err(bad)?),
            _ => return Err(format!("unknown argument {arg:?}; {usage}")),
        }
    }
    Ok(a)
}

/// Rank `r`'s block of `size`: its first interior row and its number of rows (the first
/// `extra` ranks take one row more when N-2 does not divide evenly).
fn block(n: usize, size: usize, r: usize) -> (usize, usize) {
    let (base, extra) = ((n - 2) / size, (n - 2) % size);
    let rows = base + usize::from(r < extra);
    (1 + r * base + r.min(extra), rows)
}

fn main() -> ExitCode {
    let Some(universe) = mpi::initialize() else {
        eprintln!("heat_mpi_rs: MPI was initialised already");
        return ExitCode::FAILURE;
    };
    let world = universe.world();
    let rank = world.rank();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if rank == 0 {
                eprintln!("heat_mpi_rs: {e}");
            }
            return ExitCode::from(2);
        }
    };
    if args.n < 3 || args.n - 2 < world.size() as usize {
        if rank == 0 {
            eprintln!("heat_mpi_rs: --n must be at least 3 and leave a row per rank");
        }
        return ExitCode::from(2);
    }
    match run(&world, &args) {
        Ok(code) => code,
        Err(e) => {
            say(rank, &format!("error: {e}"));
            // The other ranks would wait for this one forever.
            world.abort(1)
        }
    }
}

fn run(world: &SimpleCommunicator, a: &Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let (rank, size) = (world.rank(), world.size());
    let n = a.n;
    let (first, rows) = block(n, size as usize, rank as usize);
    // Local rows 1..=rows are this rank's; rows 0 and rows+1 are halos (for the first and the
    // last rank, the fixed boundary rows: top 100.0, bottom 0.0, never received).
    let mut grid = vec![0.0f64; (rows + 2) * n];
    if first == 1 {
        grid[..n].fill(100.0);
    }

    // 1. Start the shim: under supervise it joins the job as this rank and restores this
    //    rank's part of the newest complete epoch.
    let mut shim = Shim::init("heat-mpi-rs")?;
    let mut params = Params { n, step: 0 };
    if let Some(saved) = shim.load::<Params>("params")? {
        if saved.n != n {
            return Err(format!("snapshot is for --n {}, not --n {n}", saved.n).into());
        }
        params.step = saved.step;
        shim.load_slice("grid", &mut grid[n..(rows + 1) * n])?;
    }
    if let Start::Resumed { seq, .. } = shim.start() {
        say(
            rank,
            &format!("resumed from part {seq} at step {}", params.step),
        );
    }
    // Every rank must be at the same step, or the halo exchanges never match up.
    let (mut lo, mut hi) = (0u64, 0u64);
    world.all_reduce_into(
        &params.step,
        &mut lo,
        mpi::collective::SystemOperation::min(),
    );
    world.all_reduce_into(
        &params.step,
        &mut hi,
        mpi::collective::SystemOperation::max(),
    );
    if lo != hi {
        return Err(format!("ranks resumed at different steps ({lo}..{hi})").into());
    }

    let up = (rank > 0).then(|| world.process_at_rank(rank - 1));
    let down = (rank + 1 < size).then(|| world.process_at_rank(rank + 1));
    let mut next = grid.clone();
    while params.step < a.steps {
        exchange_halos(&mut grid, n, rows, up.as_ref(), down.as_ref());
        for i in 1..=rows {
            let (above, mid, below) = (
                &grid[(i - 1) * n..i * n],
                &grid[i * n..(i + 1) * n],
                &grid[(i + 1) * n..(i + 2) * n],
            );
            let row = &mut next[i * n..(i + 1) * n];
            row[0] = mid[0];
            row[n - 1] = mid[n - 1];
            for j in 1..n - 1 {
                row[j] =
                    mid[j] + ALPHA * (above[j] + below[j] + mid[j - 1] + mid[j + 1] - 4.0 * mid[j]);
            }
        }
        std::mem::swap(&mut grid, &mut next);
        params.step += 1;
        // 2. The safe point, once a step on every rank.
        if shim.due() {
            let tag = format!("step {}", params.step);
            let own = &grid[n..(rows + 1) * n];
            match shim.snapshot(Some(&tag), |s| {
                s.value("params", &params)?;
                s.slice("grid", own)
            }) {
                Ok(Next::Continue(_)) => {}
                // Asked to stop: this rank's part of the final epoch is durable.
                Ok(Next::Stop) => return Ok(shim.stopped()),
                Err(e) => say(rank, &format!("snapshot failed, continuing: {e}")),
            }
        }
        if !a.sleep.is_zero() {
            std::thread::sleep(a.sleep);
        }
    }
    shim.finish()?;

    // 3. Rank 0 gathers the interior rows between the fixed boundary rows and hashes it all.
    let own = &grid[n..(rows + 1) * n];
    let root = world.process_at_rank(0);
    if rank == 0 {
        let mut full = vec![0.0f64; n * n];
        full[..n].fill(100.0);
        let (counts, displs): (Vec<i32>, Vec<i32>) = (0..size as usize)
            .map(|q| {
                let (qfirst, qrows) = block(n, size as usize, q);
                ((qrows * n) as i32, (qfirst * n) as i32)
            })
            .unzip();
        let mut partition = PartitionMut::new(&mut full[..], counts, &displs[..]);
        root.gather_varcount_into_root(own, &mut partition);
        println!(
            "checksum {}",
            blake3::hash(bytemuck::cast_slice(&full)).to_hex()
        );
    } else {
        root.gather_varcount_into(own);
    }
    Ok(ExitCode::SUCCESS)
}

/// My first row goes up while the row below arrives; my last row goes down while the row
/// above arrives. The first and last ranks keep their fixed boundary rows.
fn exchange_halos(
    grid: &mut [f64],
    n: usize,
    rows: usize,
    up: Option<&Process<'_>>,
    down: Option<&Process<'_>>,
) {
    let (head, tail) = grid.split_at_mut((rows + 1) * n);
    let below = &mut tail[..n];
    let first_row = &head[n..2 * n];
    match (up, down) {
        (Some(u), Some(d)) => {
            p2p::send_receive_into(first_row, u, below, d);
        }
        (Some(u), None) => u.send(first_row),
        (None, Some(d)) => {
            d.receive_into(below);
        }
        (None, None) => {}
    }
    let (head, rest) = grid.split_at_mut(n);
    let above = head;
    let last_row = &rest[(rows - 1) * n..rows * n];
    match (up, down) {
        (Some(u), Some(d)) => {
            p2p::send_receive_into(last_row, d, above, u);
        }
        (None, Some(d)) => d.send(last_row),
        (Some(u), None) => {
            u.receive_into(above);
        }
        (None, None) => {}
    }
}
