//! `supervise`: runs a long simulation, snapshots it on a schedule through the shim it links,
//! and restarts it from its newest complete snapshot when it dies.

mod bench;
mod child;
mod human;
mod lifeline;
mod log;
mod policy;
mod signals;
mod supervisor;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Parser, Subcommand};

use crate::log::{Level, Log};
use crate::policy::PolicyConfig;
use crate::supervisor::JobConfig;

const EXIT_CODES: &str = "\
Exit codes:
  0        the command finished with exit code 0 (the job is complete)
  1        error: bad store, bad job name, command cannot be started, ...
  2        bad command line
  3        gave up: the command failed more than --max-restarts times within --restart-window
  130/143  stopped by SIGINT/SIGTERM after a final snapshot; run the same command to resume

The command is started with SUPERVISE_* variables that the shim reads (see README.md).";

/// Runs COMMAND, snapshots it on a schedule through the supervise shim it links, and restarts
/// it from its newest complete snapshot when it crashes, is killed or exits non-zero.
#[derive(Parser, Debug)]
#[command(
    name = "supervise",
    version,
    after_help = EXIT_CODES,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    sub: Option<Sub>,

    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Sub {
    /// Measure snapshot cost against this machine's limits and the naive way, in one run.
    Bench {
        /// Store directory to measure on (a temporary job in it is removed afterwards).
        #[arg(long, value_name = "DIR", default_value = ".supervise")]
        store: PathBuf,
        /// Size of the state (e.g. 256MiB, 1GiB).
        #[arg(long, value_name = "SIZE", default_value = "1GiB", value_parser = bench::parse_size)]
        size: u64,
        /// Print rows of {scenario, metric, ours, limit, naive, unit} as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Running a command under supervision.
#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Directory of the snapshot store (created if missing, mode 0700).
    #[arg(long, value_name = "DIR", default_value = ".supervise")]
    store: PathBuf,

    /// Job name. Default: the command's file name and a hash of the whole command line, so
    /// running the same command again resumes the same job.
    #[arg(long, value_name = "NAME")]
    job: Option<String>,

    /// Take a snapshot this often (e.g. 30s, 10m, 1h). 10 minutes loses at most 10 minutes of
    /// an hours-long run to a crash, at a small cost.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    every: Duration,

    /// Keep this many complete snapshots; older ones and chunks only they use are deleted.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    keep: u64,

    /// Give up after more than N restarts within --restart-window.
    #[arg(long, value_name = "N", default_value_t = 10)]
    max_restarts: u32,

    /// The sliding window --max-restarts counts in.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    restart_window: Duration,

    /// Delay before the first restart; doubles with each consecutive failure.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    backoff: Duration,

    /// Upper bound of the restart delay.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    backoff_max: Duration,

    /// A run that lasted this long counts as healthy: the restart delay starts over.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    healthy_after: Duration,

    /// On SIGINT/SIGTERM, wait this long for the final snapshot and exit before killing.
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = parse_duration)]
    stop_timeout: Duration,

    /// Start over: ignore the job's existing snapshots (they are kept until retention).
    #[arg(long)]
    fresh: bool,

    /// Say less: only errors and how the job ended.
    #[arg(short, long, conflicts_with = "verbose")]
    quiet: bool,

    /// Say more: snapshot requests and liveness.
    #[arg(short, long, action = ArgAction::Count)]
    verbose: u8,

    /// The command to run, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 30s, 10m, 1h)"))?;
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

/// The default job name: the command's file name (letters, digits, '-', '_') and the first
/// 8 hex digits of the blake3 of the whole command line.
fn default_job_name(command: &[OsString]) -> String {
    let base = Path::new(&command[0])
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut clean: String = base
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if clean.is_empty() {
        clean = "job".into();
    }
    let mut hasher = blake3::Hasher::new();
    for arg in command {
        hasher.update(arg.as_encoded_bytes());
        hasher.update(&[0]);
    }
    format!("{clean}-{}", &hasher.finalize().to_hex()[..8])
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.sub {
        Some(Sub::Bench { store, size, json }) => run_bench(&store, size, json),
        None => run_job(cli.run),
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("supervise: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_bench(store: &Path, size: u64, json: bool) -> anyhow::Result<i32> {
    let say = |msg: &str| eprintln!("supervise bench: {msg}");
    let (limits, rows, mode) = bench::run(store, size, &say)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        bench::print_table(size, &limits, &rows, mode);
    }
    Ok(0)
}

fn run_job(cli: RunArgs) -> anyhow::Result<i32> {
    let job = cli
        .job
        .clone()
        .unwrap_or_else(|| default_job_name(&cli.command));
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => Level::Quiet,
        (false, 0) => Level::Normal,
        (false, _) => Level::Verbose,
    };
    let log = Log::new(level, &job);
    let cfg = JobConfig {
        command: cli.command,
        store: cli.store,
        job,
        every: cli.every,
        keep: cli.keep as usize,
        policy: PolicyConfig {
            max_restarts: cli.max_restarts,
            window: cli.restart_window,
            backoff: cli.backoff,
            backoff_max: cli.backoff_max,
            healthy_after: cli.healthy_after,
        },
        stop_timeout: cli.stop_timeout,
        fresh: cli.fresh,
    };
    supervisor::run(&cfg, &log)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_are_stable_valid_and_tell_commands_apart() {
        let a = default_job_name(&["./target/release/heat".into(), "--n".into(), "64".into()]);
        let b = default_job_name(&["./target/release/heat".into(), "--n".into(), "65".into()]);
        assert!(a.starts_with("heat-") && a.len() == 13, "{a}");
        assert_ne!(a, b);
        assert_eq!(
            a,
            default_job_name(&["./target/release/heat".into(), "--n".into(), "64".into()])
        );
        let odd = default_job_name(&["/x/..py thon\n".into()]);
        supervise_shim::name::validate("job", &odd).unwrap();
    }

    #[test]
    fn durations_parse_like_humans_write_them() {
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("ten").unwrap_err().contains("examples"));
    }
}
