//! A program with a large state of which little changes between snapshots, as in agent-based
//! or adaptive simulations: each round updates a few scattered blocks of a big f64 array and
//! then takes a snapshot itself (program-initiated, at the end of a phase). Under supervise
//! each snapshot line shows that only the changed bytes were written.
//!
//! ```text
//! supervise --every 1h -- ./target/release/examples/sparse --mib 256 --percent 1 --rounds 5
//! ```
//!
//! Options: `--mib M` (state size, 64), `--percent P` (changed per round, 1), `--rounds R` (3),
//! `--sleep-ms W` (pretend computation per round, 0), `--when-due` (a snapshot only when one
//! is due, on the supervisor's schedule, instead of every round), `--percent-from R:P` (from
//! round R on, P changes per round: a run whose snapshots grow costly), `--start-zero` (a
//! fresh start from zeros, whose first snapshot stores one chunk, instead of a smooth field),
//! `--report-memory` (print `peak-rss <bytes>`, the process's peak resident memory, before
//! the checksum). The last line is
//! `checksum <hex>`, the same for a run resumed any number of times as for an uninterrupted
//! one.
//!
//! ```text
//! ```

use supervise_shim::{Next, Shim};

fn main() -> std::process::ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            let line = format!("sparse: error: {e}\n");
            eprint!("{line}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<std::process::ExitCode, Box<dyn std::error::Error>> {
    let (mut mib, mut percent, mut rounds, mut sleep_ms) = (64usize, 1.0f64, 3u64, 0u64);
    let (mut when_due, mut later): (bool, Option<(u64, f64)>) = (false, None);
    let (mut start_zero, mut report_memory) = (false, false);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--when-due" {
            when_due = true;
            continue;
        }
        if arg == "--start-zero" {
            start_zero = true;
            continue;
        }
        if arg == "--report-memory" {
            report_memory = true;
            continue;
        }
        let value = args.next().ok_or(format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--mib" => mib = value.parse()?,
            "--percent" => percent = value.parse()?,
            "--rounds" => rounds = value.parse()?,
            "--sleep-ms" => sleep_ms = value.parse()?,
            "--percent-from" => {
                let (r, p) = value
                    .split_once(':')
                    .ok_or("--percent-from takes ROUND:PERCENT")?;
                later = Some((r.parse()?, p.parse()?));
            }
            other => {
                return Err(format!(
                    "unknown argument {other}; usage: sparse [--mib M] [--percent P] [--rounds R] \
                     [--sleep-ms W] [--when-due] [--percent-from R:P] [--start-zero] \
                     [--report-memory]"
                )
                .into());
            }
        }
    }
    let mut shim = Shim::init("sparse")?;
    let n = (mib << 20) / 8;
    // A registered region: restored when resuming, and where the kernel allows, a snapshot
    // copies only the 64 KiB chunks written since the last one.
    let mut state = shim.region::<f64>("state", n)?;
    let mut round: u64 = match shim.load("round")? {
        Some(round) => round,
        None => {
            if !start_zero {
                for (i, v) in state.iter_mut().enumerate() {
                    *v = (i as f64 * 1e-5).sin();
                }
            }
            0
        }
    };

    // 64 KiB blocks, a deterministic scatter.
    let per_block = 8192;
    let blocks = n / per_block;
    let changed_at = |percent: f64| ((blocks as f64) * percent / 100.0).round() as usize;
    while round < rounds {
        let changed = match later {
            Some((from, p)) if round >= from => changed_at(p),
            _ => changed_at(percent),
        };
        // Each round's blocks depend on the round alone, so a resumed run equals a whole one.
        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (round + 1).wrapping_mul(0x2545_F491_4F6C_DD1D);
        for _ in 0..changed {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = (x as usize) % blocks;
            for v in &mut state[b * per_block..(b + 1) * per_block] {
                *v += 1.0;
            }
        }
        // Stands for the rest of a round's computation.
        std::thread::sleep(std::time::Duration::from_millis(sleep_ms));
        round += 1;
        if when_due && !shim.due() {
            continue;
        }
        let tag = format!("round {round}");
        let captured = match shim.snapshot(Some(&tag), |s| s.value("round", &round))? {
            Next::Continue(captured) => captured,
            // The supervisor asked the program to stop: its final snapshot is taken.
            Next::Stop => return Ok(shim.stopped()),
        };
        if let Some(captured) = captured {
            // Only for this example's report: a program would just go on computing. A failed
            // snapshot (a full disk, say) is no reason to stop: the earlier ones are intact,
            // and the next one is tried at the next safe point.
            let line = match shim.wait_durable() {
                Ok(Some(r)) => format!(
                    "sparse: {tag}: paused {} us, {} bytes new, {} written\n",
                    captured.pause.as_micros(),
                    r.bytes_new,
                    r.bytes_written
                ),
                Ok(None) => String::new(),
                Err(e) => format!("sparse: {tag}: snapshot failed, going on: {e}\n"),
            };
            eprint!("{line}");
        }
    }
    shim.finish()?;
    if report_memory {
        println!("peak-rss {}", peak_rss()?);
    }
    println!(
        "checksum {}",
        blake3::hash(bytemuck::cast_slice(&state)).to_hex()
    );
    Ok(std::process::ExitCode::SUCCESS)
}

/// The process's peak resident memory in bytes (`VmHWM` of `/proc/self/status`).
fn peak_rss() -> Result<u64, Box<dyn std::error::Error>> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .ok_or("no VmHWM in /proc/self/status")?
        .parse::<u64>()?;
    Ok(kib * 1024)
}
