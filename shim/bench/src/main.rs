//! `supervise-bench` (also run as `supervise bench`): measures snapshot cost on this machine
//! against its limits and the naive way, in one run on one store. It is a program that links
//! the runtime, as a simulation does, which is why it is not part of the supervisor's binary.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use bytesize::ByteSize;
use clap::Parser;

mod bench;

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
