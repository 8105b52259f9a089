//! `supervise-bench` (also run as `supervise bench`): measures snapshot cost on this machine
//! against its limits and the naive way, in one run on one store. It is a program that links
//! the runtime, as a simulation does, which is why it is not part of the supervisor's binary.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use bytesize::ByteSize;
use clap::Parser;

mod bench;
mod every;
mod ranks;

/// Writes one line to stdout; a closed pipe (`| head`) ends the output quietly.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

/// Measure snapshot cost against this machine's limits and the naive way, in one run.
#[derive(Parser)]
#[command(name = "supervise bench", version)]
struct Args {
    /// Store directory to measure on (a temporary job in it is removed afterwards).
    #[arg(long, value_name = "DIR", default_value = ".supervise")]
    store: PathBuf,
    /// Size of the state (e.g. 256MiB, 1GiB).
    #[arg(long, value_name = "SIZE", default_value = "1GiB", value_parser = parse_size)]
    size: u64,
    /// Print rows of {scenario, metric, ours, limit, naive, unit} as JSON.
    #[arg(long)]
    json: bool,
    /// Measure the epochs of a job of many ranks instead: 1, 2 and 4 ranks holding --size
    /// together (default 256MiB here), under the `supervise` beside this program.
    #[arg(long)]
    ranks: bool,
    /// Measure what the snapshot interval costs instead: a program that changes all of its
    /// --size (default 256MiB here) every round, alone, under `supervise --every 1s` and under
    /// `supervise --every auto` (the `supervise` beside this program), side by side.
    #[arg(long)]
    every: bool,
    /// (Internal) be the program --every runs.
    #[arg(long, hide = true)]
    every_worker: bool,
    /// (Internal) that program's state in bytes.
    #[arg(long, hide = true, default_value_t = 1 << 20)]
    worker_bytes: usize,
    /// (Internal) its rounds (with --every: 240).
    #[arg(long, hide = true)]
    worker_rounds: Option<u64>,
    /// (Internal) a round's computing, milliseconds (with --every: 250).
    #[arg(long, hide = true)]
    worker_round_ms: Option<u64>,
    /// (Internal) start this many ranks of the arguments after `--`.
    #[arg(long, hide = true, value_name = "N")]
    rank_launch: Option<u32>,
    /// (Internal) be one rank.
    #[arg(long, hide = true)]
    rank_worker: bool,
    /// (Internal) a rank's state in bytes.
    #[arg(long, hide = true, default_value_t = 1 << 20)]
    rank_bytes: usize,
    /// (Internal) the share of a rank's chunks changed per step.
    #[arg(long, hide = true, default_value_t = 0.01)]
    rank_share: f64,
    /// (Internal) a rank's steps.
    #[arg(long, hide = true, default_value_t = 100)]
    rank_steps: u64,
    /// (Internal) a step's length in milliseconds.
    #[arg(long, hide = true, default_value_t = 10)]
    rank_step_ms: u64,
    /// (Internal) what `--rank-launch` starts.
    #[arg(last = true, hide = true)]
    rest: Vec<String>,
}

/// The `supervise` the bench runs jobs under: the one beside this program, else the one on
/// `PATH`.
pub fn supervise_beside(me: &std::path::Path) -> PathBuf {
    me.parent()
        .map(|d| d.join("supervise"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("supervise"))
}

/// Parses sizes like `1GiB`, `256MiB`, `4096` (IEC units are powers of 1024, SI of 1000).
fn parse_size(s: &str) -> Result<u64, String> {
    let size: ByteSize = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 64MiB, 1GiB)"))?;
    if size.as_u64() < 1 << 20 {
        return Err("the size must be at least 1MiB".into());
    }
    Ok(size.as_u64())
}

fn run(args: &Args) -> anyhow::Result<()> {
    let say = |msg: &str| eprintln!("supervise bench: {msg}");
    if args.rank_worker {
        return ranks::worker(
            args.rank_bytes,
            args.rank_share,
            args.rank_steps,
            args.rank_step_ms,
        );
    }
    if let Some(n) = args.rank_launch {
        return ranks::launch(n, &args.rest);
    }
    if args.every_worker {
        return every::worker(
            args.worker_bytes,
            args.worker_rounds.unwrap_or(10),
            args.worker_round_ms.unwrap_or(10),
        );
    }
    // The default size suits one process measured on its own; ranks share this one, and
    // --every runs a program three times.
    let total = if std::env::args().any(|a| a.starts_with("--size")) {
        args.size
    } else {
        256 << 20
    };
    if args.every {
        let rounds = args.worker_rounds.unwrap_or(240);
        let round_ms = args.worker_round_ms.unwrap_or(250);
        let store = every::store_dir(&args.store)?;
        let rows = every::run(&store, total, rounds, round_ms, &say)?;
        if args.json {
            outln!("{}", serde_json::to_string_pretty(&rows)?)?;
        } else {
            every::print(total, rounds, round_ms, &rows)?;
        }
        std::io::stdout().flush()?;
        return Ok(());
    }
    if args.ranks {
        std::fs::create_dir_all(&args.store)?;
        let rows = ranks::run(&args.store, total, &say)?;
        if args.json {
            outln!("{}", serde_json::to_string_pretty(&rows)?)?;
        } else {
            ranks::print(total, &rows)?;
        }
        std::io::stdout().flush()?;
        return Ok(());
    }
    let (limits, rows, mode) = bench::run(&args.store, args.size, &say)?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&rows)?)?;
    } else {
        bench::print_table(args.size, &limits, &rows, mode)?;
    }
    std::io::stdout().flush()?;
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("supervise bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_in_iec_and_si_units_and_small_ones_are_refused() {
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("2 MB"), Ok(2_000_000));
        assert_eq!(parse_size("4194304"), Ok(4 << 20));
        assert!(parse_size("1KiB").unwrap_err().contains("at least 1MiB"));
        assert!(parse_size("lots").unwrap_err().contains("not a size"));
    }
}
