//! `supervise`: runs a long simulation, snapshots it on a schedule through the shim it links,
//! and restarts it from its newest complete snapshot when it dies.

mod blame;
mod child;
mod commands;
mod event;
mod events;
mod files;
mod human;
mod identity;
mod interval;
mod lifeline;
mod log;
mod notify;
mod npy;
mod operator;
mod policy;
mod ranks;
mod remote;
mod signals;
mod slurm;
mod supervisor;

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{ArgAction, CommandFactory, Parser, Subcommand};

use crate::interval::{AutoConfig, EverySpec};
use crate::log::{Level, Log};
use crate::policy::PolicyConfig;
use crate::supervisor::{JobConfig, OnSuccess};
use supervise_store::config::{CaptureMemory, OrphanMode};

/// `--orphan`: what the program does if the supervisor dies ([`OrphanMode`], which the store
/// crate defines without clap).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Orphan {
    /// It takes a final snapshot and exits.
    Stop,
    /// It runs on unsupervised.
    Continue,
}

/// The help text's last part: the exit codes (from [`supervise_store::exit`]), each meaning
/// wrapped under its code.
fn exit_codes_help() -> String {
    const WIDTH: usize = 80;
    let mut text = String::from("Exit codes:\n");
    for (codes, meaning) in supervise_store::exit::SUPERVISOR {
        let mut line = format!("  {codes:<9}");
        let mut empty = true;
        for word in meaning.split_whitespace() {
            if !empty && line.len() + 1 + word.len() > WIDTH {
                text.push_str(&line);
                text.push('\n');
                line = " ".repeat(11);
                empty = true;
            }
            if !empty {
                line.push(' ');
            }
            line.push_str(word);
            empty = false;
        }
        text.push_str(&line);
        text.push('\n');
    }
    text.push_str(
        "\nThe command is started with SUPERVISE_* variables that the shim reads (see README.md).",
    );
    text
}

/// The two forms of the command line (clap's own would read `supervise <COMMAND>`, as if the
/// program to run came there).
const USAGE: &str = "supervise [OPTIONS] -- <PROGRAM> [ARGS]...
       supervise <SUBCOMMAND> [OPTIONS]";

/// Runs COMMAND, snapshots it on a schedule through the supervise shim it links (or, in file
/// mode, stores the checkpoint files it writes itself: --preset gromacs|lammps, --checkpoint),
/// and restarts it from its newest complete snapshot when it crashes, is killed or exits
/// non-zero.
#[derive(Parser, Debug)]
#[command(
    name = "supervise",
    version,
    override_usage = USAGE,
    subcommand_value_name = "SUBCOMMAND",
    subcommand_help_heading = "Subcommands",
    after_help = exit_codes_help(),
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    sub: Option<Sub>,

    #[command(flatten)]
    run: RunArgs,
}

/// Where operator commands look.
#[derive(clap::Args, Debug, Clone)]
struct Where {
    /// Directory of the snapshot store.
    #[arg(long, value_name = "DIR", default_value = ".supervise")]
    store: PathBuf,
    /// The job (default: the only job in the store).
    #[arg(long, value_name = "NAME")]
    job: Option<String>,
    /// Print JSON (shapes documented in README.md) instead of a table.
    #[arg(long)]
    json: bool,
    /// Look at a store that another user owns or others may write (refused otherwise), read-only:
    /// for ls, show, verify, log, restore --to; links inside it are still never followed.
    #[arg(long)]
    allow_foreign_store: bool,
}

#[derive(Subcommand, Debug)]
enum Sub {
    /// List the jobs in a store, or with --job the snapshots of a job.
    Ls {
        #[command(flatten)]
        at: Where,
    },
    /// Show a snapshot: its entries, sizes, chunk counts and state/stored ratio.
    ///
    /// state/stored: the snapshot's state (its bytes in memory) divided by the bytes of the
    /// distinct compressed chunks it uses on disk (JSON: dedup_ratio); dedup and compression
    /// both raise it.
    Show {
        #[command(flatten)]
        at: Where,
        /// Snapshot number, or `latest`.
        snapshot: String,
    },
    /// Re-read and re-hash every chunk of a snapshot (default: every snapshot of the job);
    /// exits 5 naming what is damaged.
    Verify {
        #[command(flatten)]
        at: Where,
        /// Snapshot number, or `latest` (default: all).
        snapshot: Option<String>,
        /// Mend what can be mended first (the job must not be running): damaged chunks are
        /// pointed at good copies found in the job's packs, and snapshots set aside as damaged
        /// that now verify are put back. With --json, prints what was done.
        #[arg(long, conflicts_with = "snapshot")]
        repair: bool,
    },
    /// Remove what no snapshot references (packs, leftovers); report what was freed.
    Gc {
        #[command(flatten)]
        at: Where,
    },
    /// Write each entry of a snapshot out as a file: raw slices as raw bytes, values as JSON,
    /// and an index, snapshot.json. Files are private like the store (0600, in a directory
    /// created 0700) unless --shared. A file that already exists in DIR (a symlink too) is an
    /// error: restore never overwrites nor follows one.
    Restore {
        #[command(flatten)]
        at: Where,
        /// Snapshot number, or `latest`.
        snapshot: String,
        /// Directory to write into (created with its parents if missing; if it exists, the
        /// files to write must not).
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        /// Let others read the files: 0644 files, a created directory 0755.
        #[arg(long)]
        shared: bool,
    },
    /// Ask the running job for a snapshot now, wait until it is durable, print its number.
    Snapshot {
        #[command(flatten)]
        at: Where,
        /// The job (default: the only job in the store).
        #[arg(value_name = "JOB")]
        job_name: Option<String>,
        /// Give up waiting after this long.
        #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration, allow_hyphen_values = true)]
        timeout: Duration,
    },
    /// The running jobs: pid, uptime, restarts, last snapshot and its age, store size,
    /// state/stored ratio.
    ///
    /// STATE/STORED: the state of the job's snapshots (their bytes in memory, summed) divided
    /// by the bytes of the distinct compressed chunks they use on disk (JSON: dedup_ratio =
    /// state_bytes / stored_bytes); dedup between snapshots and compression both raise it.
    /// `no shim`: the program has not initialised the shim (yet), so it takes no snapshot.
    Status {
        #[command(flatten)]
        at: Where,
    },
    /// The job's event history, kept in the store, oldest first; the filters combine.
    Log {
        #[command(flatten)]
        at: Where,
        /// The job (default: the only job in the store).
        #[arg(value_name = "JOB")]
        job_name: Option<String>,
        /// Only the last N records (of those the other filters keep).
        #[arg(short = 'n', long = "last", value_name = "N")]
        last: Option<usize>,
        /// Only records since WHEN: a duration ago (10m, 2h, 1d) or a time in RFC 3339
        /// (2026-12-02T14:00:00Z, 2026-12-02T15:00:00+01:00).
        #[arg(long, value_name = "WHEN", value_parser = parse_since)]
        since: Option<u64>,
        /// Only records of this kind (repeatable): e.g. start, spawned, snapshot, died,
        /// restart, gave-up, end. When none match, the kinds in the history are listed.
        #[arg(long = "kind", value_name = "KIND")]
        kinds: Vec<String>,
    },
    /// Measure snapshot cost against this machine's limits and the naive way, in one run
    /// (runs supervise-bench: `supervise bench --help` for its options).
    #[command(disable_help_flag = true)]
    Bench {
        /// supervise-bench's arguments: --store DIR, --size SIZE, --json.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<std::ffi::OsString>,
    },
    /// Make a new key for --encrypt-key: 32 random bytes as 64 hex digits in FILE (created,
    /// mode 0600; an existing file is never overwritten). Keep a copy somewhere safe: without
    /// it, sealed snapshots cannot be read.
    Keygen {
        /// The key file to create.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

/// `--lease-ttl`: a duration of at least 3 s (renewals every sixth of it must fit).
fn parse_lease_ttl(text: &str) -> Result<Duration, String> {
    let ttl = parse_duration(text)?;
    if ttl < Duration::from_secs(3) {
        return Err(format!(
            "{text} is too short: the lease's time-to-live is at least 3s"
        ));
    }
    Ok(ttl)
}

/// Running a command under supervision.
#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Where snapshots are kept: a directory (created if missing, mode 0700), or an
    /// S3-compatible object store as s3://BUCKET/PREFIX. Repeat it (or give a comma list) to
    /// keep every snapshot in several places: the program writes to a local directory (the
    /// first one given, or --cache), and the supervisor copies each snapshot to the others in
    /// the background; a rerun on any node resumes from the newest one that reached them.
    /// S3 credentials, region and endpoint come from the standard AWS environment variables
    /// and profile files.
    #[arg(
        long,
        value_name = "DIR|s3://BUCKET/PREFIX",
        default_value = ".supervise",
        value_delimiter = ','
    )]
    store: Vec<PathBuf>,

    /// The node-local directory the program writes its snapshots to when every --store is
    /// remote or another directory should stay the fast local tier (default: the first
    /// --store directory, else $TMPDIR/supervise-UID).
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,

    /// The S3 endpoint URL (MinIO, Ceph, any S3-compatible server), instead of
    /// AWS_ENDPOINT_URL or AWS itself.
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,

    /// With a --store beyond the local one: the job's lease there lasts this long unless
    /// renewed (every sixth of it). A supervisor that cannot renew stops its program before
    /// it expires; another node takes the job over only after it has expired.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_lease_ttl, allow_hyphen_values = true)]
    lease_ttl: Duration,

    /// Seal every object sent beyond the node (packs, manifests, the lease) with the key in
    /// FILE (64 hex digits, mode 0600; `supervise keygen FILE` makes one): authenticated
    /// encryption, so the storage's operator can neither read nor forge snapshots.
    #[arg(long, value_name = "FILE", env = "SUPERVISE_ENCRYPT_KEY")]
    encrypt_key: Option<PathBuf>,

    /// Also write each event, as it happens, as one JSON line to FILE (appended to; `-` is
    /// standard output), in the schema of `supervise log --json`: for programs that follow
    /// the job.
    #[arg(long, value_name = "FILE")]
    events: Option<PathBuf>,

    /// Job name. Default: the command's file name and a hash of the whole command line, so
    /// running the same command again resumes the same job.
    #[arg(long, value_name = "NAME")]
    job: Option<String>,

    /// Take a snapshot this often (e.g. 30s, 10m, 1h; default 10m). 10 minutes loses at most
    /// 10 minutes of an hours-long run to a crash, at a small cost. With --preset gromacs it
    /// becomes mdrun's -cpt. `auto`: chosen from what the job measures (each snapshot's cost
    /// to the program and the failures seen), as often as pays for itself (Young/Daly), within
    /// --max-overhead and --every-max; the history and `status` say the interval and why.
    #[arg(long, value_name = "DURATION|auto", value_parser = parse_every, allow_hyphen_values = true)]
    every: Option<EveryArg>,

    /// With --every auto: the largest share of the run's time snapshots may cost (e.g. 2%).
    #[arg(long, value_name = "PERCENT", default_value = "2%", value_parser = parse_percent)]
    max_overhead: f64,

    /// With --every auto: the longest interval, whatever the figures say.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    every_max: Duration,

    /// With --every auto: the mean time between failures to assume before the job has failed
    /// (a prior; the failures seen take over).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    mtbf: Duration,

    /// The most memory a snapshot's capture may hold at once: a size (e.g. 512MiB) or a
    /// percentage of the program's registered state and of the memory available, whichever is
    /// smaller (at least 256 MiB when available). A capture that needs more is not copied: it
    /// is written from the program's memory while the program waits at its safe point, so its
    /// pause grows instead of its memory. The writer's own working memory (about 48 MiB) counts
    /// in the budget.
    #[arg(long, value_name = "SIZE|PERCENT", default_value = "25%", value_parser = parse_capture_memory, allow_hyphen_values = true)]
    capture_memory: CaptureMemory,

    /// Keep this many complete snapshots; older ones and chunks only they use are deleted.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = parse_count, allow_hyphen_values = true)]
    keep: u64,

    /// Re-read and verify every stored chunk within this period, a little at a time between
    /// snapshots (at most 5% of one core and of the disk), so that a damaged record is found
    /// and never used by a new snapshot; `off` turns it off.
    #[arg(long, value_name = "DURATION", default_value = "1d", value_parser = parse_scrub, allow_hyphen_values = true)]
    scrub_every: Scrub,

    /// Also keep every snapshot younger than this (e.g. 24h), beyond --keep.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
    keep_within: Option<Duration>,

    /// What to do with the job's snapshots (local and on the durable tiers) when the command
    /// finishes with exit code 0.
    #[arg(long, value_name = "WHAT", value_enum, default_value_t = OnSuccess::Keep)]
    on_success: OnSuccess,

    /// Resume from this snapshot (see `supervise ls`) instead of the newest.
    #[arg(long, value_name = "SNAPSHOT", conflicts_with = "fresh", value_parser = parse_snapshot, allow_hyphen_values = true)]
    from: Option<u64>,

    /// If another supervisor holds the job, wait for it to end instead of exiting with 4.
    #[arg(long)]
    wait: bool,

    /// Restart the program when it reaches no safe point for this long (it is asked for a
    /// snapshot, then sent SIGTERM, then SIGKILL, each after min(--stop-timeout, this)).
    #[arg(long, value_name = "DURATION", value_parser = parse_hang_timeout, allow_hyphen_values = true)]
    hang_timeout: Option<Duration>,

    /// After this many deaths in a row that point at the snapshot just restored, go back to
    /// the snapshot before it. A death points at it when the program took no new snapshot and
    /// died before reaching its first safe point, or the same way (exit code or signal) each
    /// time; a SIGKILL from outside (the OOM killer, an operator) never does.
    #[arg(long, value_name = "K", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rollback_after: u32,

    /// If the supervisor dies: `stop` (the program takes a final snapshot and exits; rerun
    /// the command to resume) or `continue` (it runs on unsupervised, snapshotting on the
    /// --every schedule, and finishes).
    #[arg(long, value_name = "WHAT", value_enum, default_value_t = Orphan::Stop)]
    orphan: Orphan,

    /// Give up after more than N restarts within --restart-window.
    #[arg(long, value_name = "N", default_value_t = 10)]
    max_restarts: u32,

    /// The sliding window --max-restarts counts in.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration, allow_hyphen_values = true)]
    restart_window: Duration,

    /// Delay before the first restart; doubles with each consecutive failure.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration, allow_hyphen_values = true)]
    backoff: Duration,

    /// Upper bound of the restart delay.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration, allow_hyphen_values = true)]
    backoff_max: Duration,

    /// A run that lasted this long counts as healthy: the restart delay starts over.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration, allow_hyphen_values = true)]
    healthy_after: Duration,

    /// On SIGINT/SIGTERM, wait this long for the final snapshot and exit before killing.
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = parse_duration, allow_hyphen_values = true)]
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

    /// A job of many ranks (MPI): every rank links the shim and joins the supervisor at an
    /// endpoint; a snapshot is an epoch, every rank's part at the same safe point. On by
    /// itself when the command is mpirun, mpiexec, orterun or srun.
    #[arg(long, help_heading = "MPI")]
    mpi: bool,

    /// Where ranks join: `unix` (a private socket, for ranks on this machine: the default),
    /// `tcp` (every interface, any port; the default under srun) or `tcp:HOST:PORT`. Implies
    /// --mpi. Ranks prove a per-job secret either way.
    #[arg(long, value_name = "WHERE", value_parser = ranks::Listen::parse, help_heading = "MPI")]
    rank_endpoint: Option<ranks::Listen>,

    /// Not a job of many ranks, even if the command is a launcher.
    #[arg(long, conflicts_with_all = ["mpi", "rank_endpoint"], help_heading = "MPI")]
    no_mpi: bool,

    /// The signal that means "this batch job ends soon" (Slurm: `#SBATCH
    /// --signal=B:USR2@300`; also preemption with PreemptParameters=send_user_signal, and
    /// `scancel --batch --signal=USR2`): a final snapshot, then the job is requeued. USR2,
    /// not USR1, because libraries a program links catch USR1 (NCCL does) and because USR1
    /// asks supervise for a snapshot. Outside a batch job it stops like SIGTERM.
    #[arg(long, value_name = "SIGNAL", default_value = "USR2", value_parser = slurm::parse_requeue_signal, help_heading = "Batch systems")]
    requeue_signal: nix::sys::signal::Signal,

    /// Inside a Slurm job: the final snapshot is asked for this long before the job's end
    /// time (read from squeue), plus twice the slowest recent snapshot, so no `--signal` is
    /// needed; then the job is requeued.
    #[arg(long, value_name = "DURATION", default_value = "1m", value_parser = parse_duration, allow_hyphen_values = true, help_heading = "Batch systems")]
    requeue_margin: Duration,

    /// Inside a Slurm job: do not requeue it once SLURM_RESTART_COUNT reaches N.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 20,
        help_heading = "Batch systems"
    )]
    max_requeues: u32,

    /// Do not treat SLURM_JOB_ID as a batch job to requeue (no end-time watch, no requeue).
    #[arg(long, help_heading = "Batch systems")]
    no_slurm: bool,

    /// File mode for a code that writes its own checkpoint files: GROMACS (`gmx mdrun`) or
    /// LAMMPS (`lmp`, with an input as README shows). Fills in every option below; any of them
    /// given as well overrides the preset's.
    #[arg(long, value_name = "CODE", value_enum, help_heading = "File mode")]
    preset: Option<files::preset::Preset>,

    /// File mode: the code's checkpoint files (a file-name pattern relative to the working
    /// directory, e.g. 'restart.*'; repeatable). Each complete one is stored as a snapshot with
    /// its companions, and a restart puts the newest back and resumes from it.
    #[arg(long = "checkpoint", value_name = "PATTERN", value_parser = files::spec::FilePattern::parse, help_heading = "File mode")]
    checkpoints: Vec<files::spec::FilePattern>,

    /// File mode: when a checkpoint file is complete (repeatable; all must hold): `renamed`
    /// (the code renames it into place), `closed` (written in place: unchanged for a scan),
    /// `magic=TEXT` (starts and ends with it; also `start=`, `end=`; \0 \xHH escapes), or
    /// `command=CMD` (exits 0 given a copy of the file). Default: closed.
    #[arg(long, value_name = "WHEN", value_parser = files::spec::Complete::parse, help_heading = "File mode")]
    complete: Vec<Vec<files::spec::Complete>>,

    /// File mode: files stored with each checkpoint (a pattern, repeatable), e.g. the
    /// trajectory a resume appends to. Append-only files cost only what was appended.
    #[arg(long = "companion", value_name = "PATTERN", value_parser = files::spec::FilePattern::parse, help_heading = "File mode")]
    companions: Vec<files::spec::FilePattern>,

    /// File mode: a command that prints the files that belong with a checkpoint, one per line
    /// (relative to the working directory), given a copy of it as {checkpoint} (or last).
    #[arg(
        long,
        value_name = "CMD",
        allow_hyphen_values = true,
        help_heading = "File mode"
    )]
    companions_command: Option<String>,

    /// File mode: the code's step of a checkpoint, shown and used to order them: `name` (the
    /// last number in its file name), `command=CMD` (the first number CMD prints given a
    /// copy), or `none`.
    #[arg(long, value_name = "FROM", value_parser = files::spec::StepFrom::parse, help_heading = "File mode")]
    step_from: Option<files::spec::StepFrom>,

    /// File mode: how to ask the code for a checkpoint (on --every, SIGUSR1, `supervise
    /// snapshot`): `signal=NAME`, `touch=FILE` or `none` (default: it checkpoints on its own).
    #[arg(long, value_name = "HOW", value_parser = files::spec::Ask::parse, help_heading = "File mode")]
    ask_checkpoint: Option<files::spec::Ask>,

    /// File mode: how to ask the code to stop after a checkpoint (on SIGINT/SIGTERM to the
    /// supervisor): `signal=NAME` (sent once), `touch=FILE` or `none` (SIGTERM). Default:
    /// signal=TERM. SIGKILL follows after --stop-timeout.
    #[arg(long, value_name = "HOW", value_parser = files::spec::Ask::parse, help_heading = "File mode")]
    ask_stop: Option<files::spec::Ask>,

    /// File mode: arguments added to the command when it resumes; {checkpoint} is the
    /// checkpoint file's path, {step} its step (e.g. '-cpi {checkpoint}').
    #[arg(
        long,
        value_name = "ARGS",
        conflicts_with = "resume_command",
        allow_hyphen_values = true,
        help_heading = "File mode"
    )]
    resume_args: Option<String>,

    /// File mode: the command that resumes the code instead, with {checkpoint} and {step}.
    #[arg(long, value_name = "COMMAND", help_heading = "File mode")]
    resume_command: Option<String>,

    /// File mode: exit codes that mean the code stopped cleanly after a checkpoint (comma
    /// list), e.g. mdrun's 1 and 2 after SIGTERM.
    #[arg(
        long,
        value_name = "CODES",
        value_delimiter = ',',
        help_heading = "File mode"
    )]
    clean_exit: Vec<i32>,

    /// File mode: a file the code writes only when it has finished; an exit 0 without it is
    /// a stop (resumed by running the command again), not the end.
    #[arg(long, value_name = "FILE", help_heading = "File mode")]
    done_file: Option<PathBuf>,

    /// The command to run, after `--`.
    #[arg(last = true, required = true, value_name = "PROGRAM")]
    command: Vec<OsString>,
}

/// Launchers whose command is a job of many ranks, and where their ranks run by default.
const LAUNCHERS: [&str; 4] = ["mpirun", "mpiexec", "orterun", "srun"];

impl RunArgs {
    /// Whether this is a job of many ranks, where they join, and why.
    fn ranks(&self, file_mode: bool) -> Option<(ranks::Listen, String)> {
        let launcher = self
            .command
            .first()
            .and_then(|c| std::path::Path::new(c).file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| LAUNCHERS.contains(&n.as_str()));
        // Ranks under srun may run on other nodes: TCP.
        let default = || match launcher.as_deref() {
            Some("srun") => ranks::Listen::parse("tcp").unwrap_or(ranks::Listen::Unix),
            _ => ranks::Listen::Unix,
        };
        if self.no_mpi {
            None
        } else if let Some(listen) = &self.rank_endpoint {
            Some((listen.clone(), "--rank-endpoint".into()))
        } else if self.mpi {
            Some((default(), "--mpi".into()))
        } else {
            launcher
                .as_ref()
                .filter(|_| !file_mode)
                .map(|name| (default(), format!("the command is {name}")))
        }
    }

    /// File mode's `--every`: a duration (or none given); `auto` is refused, since it needs
    /// the shim's measurements of each snapshot's cost.
    fn fixed_every(&self) -> anyhow::Result<Option<Duration>> {
        match self.every {
            None => Ok(None),
            Some(EveryArg::Fixed(every)) => Ok(Some(every)),
            Some(EveryArg::Auto) => anyhow::bail!(
                "--every auto chooses the interval from the shim's measurements of each \
                 snapshot's cost, which a code in file mode (--preset, --checkpoint) does not \
                 have: give --every a duration (e.g. 10m)"
            ),
        }
    }

    /// The file-mode spec the options describe, if any: the preset's, with what was given
    /// on top.
    fn file_spec(&self) -> anyhow::Result<Option<files::FileSpec>> {
        use files::spec::{Complete, FileSpec, Resume, split_words};
        let generic = !self.checkpoints.is_empty()
            || !self.complete.is_empty()
            || !self.companions.is_empty()
            || self.companions_command.is_some()
            || self.step_from.is_some()
            || self.ask_checkpoint.is_some()
            || self.ask_stop.is_some()
            || self.resume_args.is_some()
            || self.resume_command.is_some()
            || !self.clean_exit.is_empty()
            || self.done_file.is_some();
        if self.preset.is_none() && !generic {
            return Ok(None);
        }
        self.fixed_every()?;
        let dir = std::env::current_dir().context("cannot find the working directory")?;
        let mut spec = match self.preset {
            Some(p) => files::preset::spec(p, &self.command, &dir, self.fixed_every()?)
                .map_err(|e| anyhow::anyhow!(e))?,
            None => {
                if self.checkpoints.is_empty() {
                    anyhow::bail!(
                        "file mode needs --checkpoint PATTERN (the code's checkpoint files) or \
                         --preset"
                    );
                }
                FileSpec::new(&dir, &self.command)
            }
        };
        if !self.checkpoints.is_empty() {
            spec.checkpoints = self.checkpoints.clone();
        }
        if !self.complete.is_empty() {
            spec.complete = self.complete.concat();
        }
        spec.companions.extend(self.companions.iter().cloned());
        if let Some(cmd) = &self.companions_command {
            spec.companions_command =
                Some(split_words(cmd).map_err(|e| anyhow::anyhow!("--companions-command: {e}"))?);
        }
        if let Some(s) = &self.step_from {
            spec.step = s.clone();
        }
        if let Some(a) = &self.ask_checkpoint {
            spec.ask_checkpoint = a.clone();
        }
        if let Some(a) = &self.ask_stop {
            spec.ask_stop = a.clone();
        }
        if let Some(args) = &self.resume_args {
            spec.resume =
                Resume::Args(split_words(args).map_err(|e| anyhow::anyhow!("--resume-args: {e}"))?);
        }
        if let Some(cmd) = &self.resume_command {
            spec.resume = Resume::Command(
                split_words(cmd).map_err(|e| anyhow::anyhow!("--resume-command: {e}"))?,
            );
        }
        if !self.clean_exit.is_empty() {
            spec.clean_exits = self.clean_exit.clone();
        }
        if let Some(done) = &self.done_file {
            if done.is_absolute() || done.components().any(|c| c.as_os_str() == "..") {
                anyhow::bail!(
                    "--done-file {}: give a path inside the working directory",
                    done.display()
                );
            }
            spec.done_file = Some(done.clone());
        }
        if spec.preset.is_none() && spec.resume == Resume::Args(Vec::new()) {
            spec.advice.push(
                "no --resume-args or --resume-command: a restart runs the same command, after \
                 putting the newest checkpoint back; a code that does not look for it by itself \
                 starts over (which is said when its first checkpoint is not past the one put \
                 back)"
                    .to_owned(),
            );
        }
        let checked = spec.complete.iter().any(|c| {
            matches!(
                c,
                Complete::Starts(_) | Complete::Ends(_) | Complete::Command(_)
            )
        });
        if spec.complete.contains(&Complete::Closed) && !checked {
            spec.advice.push(
                "checkpoint files written in place are taken once closed or unchanged for \
                 500 ms: a code that pauses in the middle of writing one needs a marker \
                 (--complete magic=TEXT) or a check command (--complete command=CMD)"
                    .to_owned(),
            );
        }
        if let (Some(hang), Some(schedule)) = (self.hang_timeout, spec.schedule)
            && hang <= schedule
        {
            anyhow::bail!(
                "--hang-timeout {} is not longer than the code's checkpoint interval ({}): in \
                 file mode a new checkpoint is the sign of progress, so it would stop a healthy \
                 run",
                human::duration(hang),
                human::duration(schedule)
            );
        }
        Ok(Some(spec))
    }
}

/// The scrub's period, or off.
#[derive(Clone, Copy, Debug)]
struct Scrub(Option<Duration>);

fn parse_scrub(s: &str) -> Result<Scrub, String> {
    if s == "off" {
        return Ok(Scrub(None));
    }
    parse_duration(s).map(|d| Scrub(Some(d)))
}

/// A count of at least 1.
fn parse_count(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "{s:?} is not a count: give a whole number of at least 1"
        )),
    }
}

/// A snapshot number as `supervise ls` shows it.
fn parse_snapshot(s: &str) -> Result<u64, String> {
    s.parse::<u64>().map_err(|_| {
        format!("{s:?} is not a snapshot number: give one that `supervise ls` shows, such as 12")
    })
}

/// The shortest --hang-timeout: a running program reports progress once a second, so a
/// shorter timeout would stop healthy programs.
const MIN_HANG_TIMEOUT: Duration = Duration::from_secs(2);

fn parse_hang_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < MIN_HANG_TIMEOUT {
        return Err(format!(
            "must be at least {}: the program reports progress once a second, so a shorter \
             timeout would stop a healthy program",
            humantime::format_duration(MIN_HANG_TIMEOUT)
        ));
    }
    Ok(d)
}

/// `--every`: a duration or `auto`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum EveryArg {
    Fixed(Duration),
    Auto,
}

fn parse_every(s: &str) -> Result<EveryArg, String> {
    if s == "auto" {
        return Ok(EveryArg::Auto);
    }
    parse_duration(s)
        .map(EveryArg::Fixed)
        .map_err(|e| format!("{e}, or auto"))
}

/// `--max-overhead`: a percentage (`2%`, `0.5`) above 0 and below 100, as a fraction.
fn parse_percent(s: &str) -> Result<f64, String> {
    let p: f64 = s
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{s:?} is not a percentage (examples: 2%, 0.5%)"))?;
    if !(p > 0.0 && p < 100.0) {
        return Err(format!("{s:?}: give a percentage above 0 and below 100"));
    }
    Ok(p / 100.0)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.starts_with('-') {
        return Err(format!(
            "{s:?} is negative: give a positive duration (examples: 30s, 10m, 1h)"
        ));
    }
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 30s, 10m, 1h)"))?;
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

/// `--since`: a duration ago (`10m`) or an RFC 3339 time (`Z` or a `+HH:MM` offset), as ms
/// since the epoch.
fn parse_since(s: &str) -> Result<u64, String> {
    let ms = supervise_store::clock::unix_ms;
    if let Ok(ago) = humantime::parse_duration(s) {
        return Ok(ms(std::time::SystemTime::now()
            .checked_sub(ago)
            .unwrap_or(std::time::UNIX_EPOCH)));
    }
    let bad = || {
        format!(
            "{s:?} is neither a duration ago (10m, 2h, 1d) nor an RFC 3339 time \
             (2026-12-02T14:00:00Z, 2026-12-02T15:00:00+01:00)"
        )
    };
    // humantime reads UTC times only: apply a numeric offset ourselves.
    let b = s.as_bytes();
    let (local, offset_s) = match b.len().checked_sub(6).map(|i| (i, b[i], b[i + 3])) {
        Some((i, sign @ (b'+' | b'-'), b':')) if s[..i].contains('T') || s[..i].contains(' ') => {
            let hh: i64 = s[i + 1..i + 3].parse().map_err(|_| bad())?;
            let mm: i64 = s[i + 4..].parse().map_err(|_| bad())?;
            let offset = (hh * 3600 + mm * 60) * if sign == b'+' { 1 } else { -1 };
            (&s[..i], offset)
        }
        _ => (s, 0),
    };
    let t = humantime::parse_rfc3339_weak(local).map_err(|_| bad())?;
    let utc_ms = ms(t) as i64 - offset_s * 1000;
    u64::try_from(utc_ms).map_err(|_| bad())
}

/// Parses the command line; exits 2 with clap's message, or with ours when the program to run
/// is given without `--` before it (or not at all).
fn parse_cli() -> Cli {
    let argv: Vec<OsString> = std::env::args_os().collect();
    match Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(e) => match forgotten_dashes(&e, &argv) {
            Some(why) => Cli::command()
                .error(clap::error::ErrorKind::InvalidSubcommand, why)
                .exit(),
            None => e.exit(),
        },
    }
}

/// Quotes `arg` for a shell when it needs it (for a command line shown to copy).
fn shell_quote(arg: &std::ffi::OsStr) -> String {
    let s = arg.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Levenshtein distance (for suggesting a subcommand to a mistyped word).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

/// The index in `args` of the first word that is neither an option nor an option's value
/// (a subcommand, the program to run, or `--`).
fn first_word(args: &[OsString]) -> Option<usize> {
    let cmd = Cli::command();
    let takes_value = |long: &str| {
        cmd.get_arguments()
            .find(|a| a.get_long() == Some(long))
            .is_some_and(|a| a.get_action().takes_values())
    };
    let mut i = 0;
    while let Some(arg) = args.get(i) {
        let arg = arg.to_string_lossy();
        match arg.strip_prefix("--") {
            Some("") => return Some(i),
            Some(long) if !long.contains('=') && takes_value(long) => i += 2,
            Some(_) => i += 1,
            None if arg.starts_with('-') && arg.len() > 1 => i += 1,
            None => return Some(i),
        }
    }
    None
}

/// When a parse error comes from a program given without `--` before it (`supervise ./sim
/// --n 4`), or from no program at all: what to say instead of clap's "unexpected argument".
fn forgotten_dashes(e: &clap::Error, argv: &[OsString]) -> Option<String> {
    use clap::error::{ContextKind, ErrorKind};
    let args = argv.get(1..).unwrap_or_default();
    // `supervise` and then `part`, as a line to copy.
    let quoted = |part: &[OsString]| {
        let mut shown = vec!["supervise".to_owned()];
        shown.extend(part.iter().map(|a| shell_quote(a)));
        shown.join(" ")
    };
    let words = |part: &[OsString]| part.iter().map(|a| shell_quote(a)).collect::<Vec<_>>();
    let word = first_word(args);
    match e.kind() {
        ErrorKind::MissingRequiredArgument if word.is_none() => Some(format!(
            "no program to run: put it after `--`: {} -- <PROGRAM> [ARGS]... (or give a \
             subcommand: see `supervise --help`)",
            quoted(args)
        )),
        ErrorKind::InvalidSubcommand | ErrorKind::UnknownArgument
            if e.get(ContextKind::SuggestedSubcommand).is_none() =>
        {
            let program = word?;
            let name = args[program].to_string_lossy();
            if name == "--" || Sub::has_subcommand(&name) {
                return None;
            }
            let like = Cli::command()
                .get_subcommands()
                .map(|c| c.get_name().to_owned())
                .find(|sub| edit_distance(sub, &name) <= 2);
            Some(format!(
                "{} is not a subcommand{}: to run a program, put it after `--`: {} -- {}",
                shell_quote(&args[program]),
                like.map(|sub| format!(" (did you mean `supervise {sub}`?)"))
                    .unwrap_or_default(),
                quoted(&args[..program]),
                words(&args[program..]).join(" ")
            ))
        }
        _ => None,
    }
}

fn main() -> ExitCode {
    let cli = parse_cli();
    if cli.sub.is_none()
        && let Err(why) = check_run_args(&cli.run)
    {
        Cli::command()
            .error(clap::error::ErrorKind::ArgumentConflict, why)
            .exit();
    }
    let result = match cli.sub {
        Some(Sub::Bench { args }) => run_bench(&args),
        Some(Sub::Keygen { file }) => remote::seal::SealKey::generate(&file)
            .map(|_| 0)
            .with_context(|| format!("cannot make a key in {}", file.display())),
        Some(Sub::Ls { at }) => commands::ls(&at.into()),
        Some(Sub::Show { at, snapshot }) => commands::show(&at.into(), &snapshot),
        Some(Sub::Verify {
            at, repair: true, ..
        }) => commands::repair(&at.into()),
        Some(Sub::Verify { at, snapshot, .. }) => commands::verify(&at.into(), snapshot.as_deref()),
        Some(Sub::Gc { at }) => commands::gc(&at.into()),
        Some(Sub::Restore {
            at,
            snapshot,
            to,
            shared,
        }) => {
            let sharing = if shared {
                commands::Sharing::Shared
            } else {
                commands::Sharing::Private
            };
            commands::restore(&at.into(), &snapshot, &to, sharing)
        }
        Some(Sub::Snapshot {
            at,
            job_name,
            timeout,
        }) => commands::snapshot(&at.with_job(job_name), timeout),
        Some(Sub::Status { at }) => commands::status(&at.into()),
        Some(Sub::Log {
            at,
            job_name,
            last,
            since,
            kinds,
        }) => commands::log(
            &at.with_job(job_name),
            &commands::LogFilter {
                last,
                since_unix_ms: since,
                kinds,
            },
        ),
        None => run_job(cli.run),
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            // Not eprintln!: a closed stderr must not turn an error into a panic.
            let _ = writeln!(std::io::stderr(), "supervise: error: {e:#}");
            ExitCode::from(supervise_store::exit::ERROR as u8)
        }
    }
}

/// Checks what no single option's parser can: options that must agree with each other.
fn check_run_args(run: &RunArgs) -> Result<(), String> {
    if run.backoff_max < run.backoff {
        return Err(format!(
            "--backoff-max {} is below --backoff {}: the delay starts at --backoff and doubles \
             up to --backoff-max",
            humantime::format_duration(run.backoff_max),
            humantime::format_duration(run.backoff)
        ));
    }
    Ok(())
}

/// `supervise bench`: the benchmark links the runtime a program links, so it is a program of
/// its own, `supervise-bench`, found beside this binary or on `PATH`.
fn run_bench(args: &[std::ffi::OsString]) -> anyhow::Result<i32> {
    const BENCH: &str = "supervise-bench";
    if args.iter().any(|a| a == "--remote") {
        return run_remote_bench(args);
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(BENCH)))
        .filter(|path| path.is_file());
    let program = beside.unwrap_or_else(|| PathBuf::from(BENCH));
    match std::process::Command::new(&program).args(args).status() {
        Ok(status) => Ok(status.code().unwrap_or(1)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "supervise bench needs the {BENCH} program, which is not installed: \
             cargo install --locked --path shim/bench (from the supervise source tree)"
        ),
        Err(e) => Err(anyhow::Error::new(e).context(format!("cannot run {}", program.display()))),
    }
}

/// Where a job's snapshots go, from `--store`, `--cache` and their companions: the local
/// store the program writes to, and the durable tiers beyond it (none for one directory).
fn tiers(cli: &RunArgs) -> anyhow::Result<(PathBuf, Option<supervisor::DurableConfig>)> {
    use std::sync::Arc;
    let mut dirs = Vec::new();
    let mut urls = Vec::new();
    for store in &cli.store {
        match store.to_str() {
            Some(url) if url.contains("://") => {
                if !url.starts_with("s3://") {
                    anyhow::bail!("--store {url}: only s3:// URLs are supported, or a directory");
                }
                urls.push(url.to_owned());
            }
            _ => dirs.push(store.clone()),
        }
    }
    let cache = match &cli.cache {
        Some(cache) => cache.clone(),
        None if !dirs.is_empty() => dirs.remove(0),
        None => std::env::temp_dir().join(format!("supervise-{}", nix::unistd::getuid())),
    };
    if urls.is_empty() && dirs.is_empty() {
        return Ok((cache, None));
    }
    // One order whatever the order of the options, so that every node takes the lease on the
    // same tier: the object stores first, then the directories, each sorted; each tier once.
    urls.sort();
    urls.dedup();
    let cache_at = same_place(&cache)?;
    let mut replicas: Vec<PathBuf> = Vec::new();
    for dir in dirs {
        let at = same_place(&dir)?;
        if at.starts_with(&cache_at) || cache_at.starts_with(&at) {
            anyhow::bail!(
                "--store {}: it is, holds or is inside the local cache {} (--cache, or the first \
                 --store directory): a durable tier must be another directory",
                dir.display(),
                cache.display()
            );
        }
        replicas.push(at);
    }
    replicas.sort();
    replicas.dedup();
    let seal = |tier: Box<dyn remote::Tier>| -> anyhow::Result<Arc<dyn remote::Tier>> {
        Ok(match &cli.encrypt_key {
            Some(path) => {
                let key = remote::seal::SealKey::load(path)
                    .with_context(|| format!("--encrypt-key {}", path.display()))?;
                Arc::new(remote::seal::Sealed::new(tier, key))
            }
            None => Arc::from(tier),
        })
    };
    let mut tiers = Vec::new();
    for url in &urls {
        let tier = remote::object::ObjectTier::open(url, cli.s3_endpoint.as_deref())
            .with_context(|| format!("--store {url}"))?;
        tiers.push(seal(Box::new(tier))?);
    }
    for dir in replicas {
        tiers.push(seal(Box::new(remote::dir::DirTier::new(dir)))?);
    }
    Ok((
        cache,
        Some(supervisor::DurableConfig {
            tiers,
            lease_ttl: cli.lease_ttl,
        }),
    ))
}

/// Where `dir` is, for comparing directories: absolute, and with links resolved as far as it
/// exists (a replica directory may be missing when the job starts).
fn same_place(dir: &Path) -> anyhow::Result<PathBuf> {
    let abs = std::path::absolute(dir)
        .with_context(|| format!("cannot resolve the directory {}", dir.display()))?;
    let mut missing = Vec::new();
    let mut at = abs.as_path();
    loop {
        if let Ok(real) = at.canonicalize() {
            return Ok(missing.iter().rev().fold(real, |p: PathBuf, c| p.join(c)));
        }
        match (at.parent(), at.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name.to_owned());
                at = parent;
            }
            _ => return Ok(abs),
        }
    }
}

/// `supervise bench --remote s3://BUCKET/PREFIX [--s3-endpoint URL] [--size SIZE] [--json]`:
/// the durable tier's figures (the remote code is the supervisor's, so it runs here).
fn run_remote_bench(args: &[std::ffi::OsString]) -> anyhow::Result<i32> {
    let mut url = None;
    let mut endpoint = None;
    let mut size: u64 = 256 << 20;
    let mut json = false;
    let mut args = args.iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("bench --remote: {arg} needs a value"))
        };
        match arg.as_str() {
            "--remote" => url = Some(value()?),
            "--s3-endpoint" => endpoint = Some(value()?),
            "--size" => {
                let text = value()?;
                size = text
                    .trim()
                    .parse::<bytesize::ByteSize>()
                    .map_err(|_| anyhow::anyhow!("--size {text:?} is not a size (e.g. 256MiB)"))?
                    .as_u64();
            }
            "--json" => json = true,
            other => anyhow::bail!(
                "bench --remote: unknown argument {other:?} (--remote URL, --s3-endpoint URL, \
                 --size SIZE, --json)"
            ),
        }
    }
    let url = url.context("bench --remote needs a URL")?;
    let tier = remote::object::ObjectTier::open(&url, endpoint.as_deref())
        .with_context(|| format!("--remote {url}"))?;
    remote::bench::run(std::sync::Arc::new(tier), size, json)
}

/// `--capture-memory`: a size or a percentage (see [`CaptureMemory::parse`]).
fn parse_capture_memory(value: &str) -> Result<CaptureMemory, String> {
    CaptureMemory::parse(value).ok_or_else(|| {
        format!("{value:?} is neither a size (512MiB) nor a percentage (1% to 100%)")
    })
}

/// `--every` when not given.
const DEFAULT_EVERY: Duration = Duration::from_secs(600);

fn run_job(cli: RunArgs) -> anyhow::Result<i32> {
    // Before anything is created in the store: a program that cannot start is an error here.
    let program = identity::resolve(&cli.command)?;
    let (store, durable) = tiers(&cli)?;
    if durable.is_some() && matches!(cli.orphan, Orphan::Continue) {
        anyhow::bail!(
            "--orphan continue cannot be used with durable tiers (--store s3://... or several \
             --store directories): a program left running without its supervisor cannot keep \
             the job's lease, and another node would start a second copy"
        );
    }
    let job = match cli.job.clone() {
        Some(job) => job,
        None => {
            let name = identity::job_name(&program, &cli.command);
            // A job an earlier release named differently (from the command line as typed, or
            // a Python script after its interpreter) keeps its name.
            let earlier = [
                identity::legacy_job_name(&cli.command),
                identity::interpreter_job_name(&program, &cli.command),
            ];
            match earlier.into_iter().find(|e| store.join(e).is_dir()) {
                Some(earlier) if !store.join(&name).exists() => earlier,
                _ => name,
            }
        }
    };
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => Level::Quiet,
        (false, 0) => Level::Normal,
        (false, _) => Level::Verbose,
    };
    let mut log = Log::new(level, &job);
    if let Some(path) = &cli.events {
        let sink: Box<dyn Write + Send> = if path.as_os_str() == "-" {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("cannot open --events {}", path.display()))?,
            )
        };
        log.events_to(sink);
    }
    if let Some(notifier) = notify::Notifier::from_env() {
        log.notify_to(notifier);
    }
    let files = cli.file_spec()?;
    let ranks = cli.ranks(files.is_some());
    let slurm = if cli.no_slurm {
        None
    } else {
        slurm::SlurmJob::from_env()
            .map_err(anyhow::Error::msg)
            .context("inside a Slurm job (--no-slurm ignores it)")?
            .map(|job| slurm::SlurmConfig {
                job,
                margin: cli.requeue_margin,
                max_requeues: cli.max_requeues,
            })
    };
    let cfg = JobConfig {
        ranks,
        slurm,
        requeue_signal: cli.requeue_signal,
        files,
        origin: program.origin(&cli.command),
        program,
        command: cli.command,
        store,
        job,
        every: match cli.every {
            Some(EveryArg::Fixed(every)) => EverySpec::Fixed(every),
            None => EverySpec::Fixed(DEFAULT_EVERY),
            Some(EveryArg::Auto) => EverySpec::Auto(AutoConfig {
                max_overhead: cli.max_overhead,
                every_max: cli.every_max,
                mtbf_prior: cli.mtbf,
            }),
        },
        keep: cli.keep as usize,
        keep_within: cli.keep_within,
        from: cli.from,
        wait: cli.wait,
        hang_timeout: cli.hang_timeout,
        rollback_after: cli.rollback_after,
        on_success: cli.on_success,
        orphan: match cli.orphan {
            Orphan::Stop => OrphanMode::Stop,
            Orphan::Continue => OrphanMode::Continue,
        },
        policy: PolicyConfig {
            max_restarts: cli.max_restarts,
            window: cli.restart_window,
            backoff: cli.backoff,
            backoff_max: cli.backoff_max,
            healthy_after: cli.healthy_after,
        },
        stop_timeout: cli.stop_timeout,
        fresh: cli.fresh,
        scrub: cli.scrub_every.0,
        capture_memory: cli.capture_memory,
        durable,
    };
    supervisor::run(&cfg, &mut log)
}

impl Where {
    fn with_job(mut self, job: Option<String>) -> commands::Target {
        if job.is_some() {
            self.job = job;
        }
        self.into()
    }
}

impl From<Where> for commands::Target {
    fn from(w: Where) -> Self {
        Self {
            store: w.store,
            job: w.job,
            json: w.json,
            allow_foreign_store: w.allow_foreign_store,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_humans_write_them() {
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("ten").unwrap_err().contains("examples"));
    }

    #[test]
    fn since_takes_a_duration_ago_or_an_rfc3339_time() {
        let now = supervise_store::clock::now_unix_ms();
        let ago = parse_since("10m").unwrap();
        assert!(ago <= now - 600_000 && ago > now - 610_000, "{ago} {now}");
        let utc = parse_since("2026-12-02T14:00:00Z").unwrap();
        assert_eq!(utc, 1_796_220_000_000);
        assert_eq!(parse_since("2026-12-02T15:00:00+01:00").unwrap(), utc);
        assert_eq!(parse_since("2026-12-02T09:30:00-04:30").unwrap(), utc);
        assert!(parse_since("yesterday").unwrap_err().contains("RFC 3339"));
    }

    #[test]
    fn bad_numbers_get_errors_that_name_the_option_not_a_hint_to_use_dashes() {
        let parse = |args: &[&str]| {
            let mut argv = vec!["supervise"];
            argv.extend_from_slice(args);
            argv.extend_from_slice(&["--", "true"]);
            Cli::try_parse_from(argv)
        };
        for (args, says) in [
            (&["--every", "-1s"][..], "negative"),
            (&["--keep", "-1"], "not a count"),
            (&["--keep", "0"], "not a count"),
            (&["--from", "-1"], "not a snapshot number"),
            (&["--hang-timeout", "1ns"], "at least 2s"),
            (&["--backoff", "-5s"], "negative"),
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{args:?}"
            );
            let text = err.to_string();
            assert!(
                text.contains(args[0]) && text.contains(says),
                "{args:?}: {text}"
            );
        }
        let ok = parse(&["--every", "1s", "--keep", "2", "--hang-timeout", "2s"]).unwrap();
        assert_eq!(ok.run.keep, 2);
        check_run_args(&ok.run).unwrap();
        let crossed = parse(&["--backoff", "5s", "--backoff-max", "1s"]).unwrap();
        assert!(
            check_run_args(&crossed.run)
                .unwrap_err()
                .contains("--backoff-max 1s is below")
        );
    }
}
