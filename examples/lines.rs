//! A deterministic computation that appends one line per step to an output file through
//! `Shim::output`, made restartable with the supervise shim.
//!
//! ```text
//! cargo build --release --example lines
//! supervise --every 5s -- ./target/release/examples/lines --n 4096 --steps 100000 --out lines.txt
//! ```
//!
//! Each step mixes a state of N u64 words and appends `step <i> <digest>` to the output file.
//! A run resumed from any snapshot, killed however often, leaves the same output file, byte
//! for byte, as an uninterrupted run, and prints the same last line, `checksum <hex>` (blake3
//! of the final state).

use std::io::Write;

use supervise_shim::{Next, Shim, Start};

/// Prints one line to stderr with a single write.
fn say(msg: &str) {
    let _ = std::io::stderr().write_all(format!("lines: {msg}\n").as_bytes());
}

const USAGE: &str = "usage: lines [--n N] [--steps S] [--out FILE] [--flush-every K]";

/// The command line.
struct Args {
    n: usize,
    steps: u64,
    out: String,
    /// Flush the output file every this many lines (0: only when its buffer is full), as a
    /// program does whose output someone watches; the bytes after the last snapshot are then in
    /// the file when the program is killed, and a resumed run must cut them off.
    flush_every: u64,
}

fn parse_args() -> Result<Args, String> {
    let (mut n, mut steps, mut out) = (4096usize, 20000u64, "lines.txt".to_owned());
    let mut flush_every = 0u64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--n" => n = value("--n")?.parse().map_err(|e| format!("--n: {e}"))?,
            "--steps" => {
                steps = value("--steps")?
                    .parse()
                    .map_err(|e| format!("--steps: {e}"))?
            }
            "--out" => out = value("--out")?,
            "--flush-every" => {
                flush_every = value("--flush-every")?
                    .parse()
                    .map_err(|e| format!("--flush-every: {e}"))?
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}; {USAGE}")),
        }
    }
    if n == 0 {
        return Err("--n must be at least 1".into());
    }
    Ok(Args {
        n,
        steps,
        out,
        flush_every,
    })
}

/// One step: every word mixed with its left neighbour and the step number.
fn mix(state: &mut [u64], step: u64) -> u64 {
    let mut prev = step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut digest = 0u64;
    for x in state.iter_mut() {
        let v = (*x ^ prev)
            .wrapping_mul(0xBF58_476D_1CE4_E5B9)
            .rotate_left(29)
            ^ step;
        *x = v;
        prev = v;
        digest ^= v;
    }
    digest
}

fn main() -> std::process::ExitCode {
    let args = match parse_args() {
        Ok(v) => v,
        Err(e) => {
            say(&e);
            return std::process::ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            say(&format!("error: {e}"));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<std::process::ExitCode, Box<dyn std::error::Error>> {
    let (n, steps) = (args.n, args.steps);
    let mut shim = Shim::init("lines")?;
    let mut step: u64 = shim.load("step")?.unwrap_or(0);
    let mut state: Vec<u64> = (0..n as u64).collect();
    shim.load_slice("state", &mut state)?;
    if let Start::Resumed { seq, .. } = shim.start() {
        say(&format!("resumed from snapshot {seq} at step {step}"));
    }
    // Cut back to what it held at the snapshot (empty on a fresh start).
    let mut file = shim.output(&args.out)?;
    while step < steps {
        let digest = mix(&mut state, step);
        step += 1;
        writeln!(file, "step {step} {digest:016x}")?;
        if args.flush_every > 0 && step.is_multiple_of(args.flush_every) {
            file.flush()?;
        }
        if shim.due() {
            let tag = format!("step {step}");
            let taken = shim.snapshot(Some(&tag), |s| {
                s.value("step", &step)?;
                s.slice("state", &state)
            });
            match taken {
                Ok(Next::Continue(_)) => {}
                // The supervisor asked the program to stop: its final snapshot is taken.
                Ok(Next::Stop) => return Ok(shim.stopped()),
                Err(e) => say(&format!("snapshot failed, continuing: {e}")),
            }
        }
    }
    file.flush()?;
    shim.finish()?;
    println!(
        "checksum {}",
        blake3::hash(bytemuck::cast_slice(&state)).to_hex()
    );
    Ok(std::process::ExitCode::SUCCESS)
}
