//! The shim's configuration, read from the environment. The supervisor sets these for its
//! child; a user can set them by hand to take local snapshots without a supervisor.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};

/// Fd number of the control socket (set by the supervisor).
pub const ENV_CONTROL_FD: &str = "SUPERVISE_CONTROL_FD";
/// Store directory. Set without a control fd, the program takes local snapshots (on SIGUSR1 or
/// every `SUPERVISE_EVERY`) and resumes from them.
pub const ENV_STORE: &str = "SUPERVISE_STORE";
/// Job name (defaults to the name the program gives [`crate::Shim::init`]).
pub const ENV_JOB: &str = "SUPERVISE_JOB";
/// Snapshots to keep (default 3).
pub const ENV_KEEP: &str = "SUPERVISE_KEEP";
/// What to restore: `latest` (default), `none`, or a snapshot number.
pub const ENV_RESTORE: &str = "SUPERVISE_RESTORE";
/// With `latest`: consider only snapshots numbered above this (used by `supervise --fresh`).
pub const ENV_RESTORE_AFTER: &str = "SUPERVISE_RESTORE_AFTER";
/// Which run of the program this is (0 first), recorded in manifests.
pub const ENV_ATTEMPT: &str = "SUPERVISE_ATTEMPT";
/// Local mode only: take a snapshot this often (e.g. `30s`, `10m`).
pub const ENV_EVERY: &str = "SUPERVISE_EVERY";
/// `0` turns dirty-page tracking off (as on kernels without it); for measurements.
pub const ENV_TRACK_WRITES: &str = "SUPERVISE_TRACK_WRITES";
/// How to capture: `auto` (default), `dirty`, `copy`, `fork` or `sync` (see [`CaptureMode`]).
pub const ENV_CAPTURE: &str = "SUPERVISE_CAPTURE";

/// How a snapshot is captured at the program's safe point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureMode {
    /// Dirty tracking where the kernel offers it, else copy.
    Auto,
    /// Copy only the chunks of regions written since the last snapshot (userfaultfd
    /// write-protect + PAGEMAP_SCAN); values and slices are copied. Written in the background.
    Dirty,
    /// Copy everything into reusable buffers; written in the background.
    Copy,
    /// Fork a copy-on-write process that writes the snapshot from its view of memory: the
    /// pause is the fork. (`Auto` forks when regions must be copied whole and are large.)
    Fork,
    /// Copy, then wait until the snapshot is durable before the program goes on.
    Sync,
}

/// How the shim runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No supervisor and no store: snapshots are skipped, nothing is restored.
    Off,
    /// Snapshots to a store on request, without a supervisor.
    Local,
    /// Under a supervisor, talking over the control socket with this fd.
    Supervised(i32),
}

/// Which snapshot to restore at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestoreFrom {
    /// The newest that verifies, numbered above `after` if given.
    Latest {
        /// Lower bound (exclusive).
        after: Option<u64>,
    },
    /// Nothing: start fresh.
    Nothing,
    /// Exactly this one (an error if it is missing or damaged).
    Exact(u64),
}

/// Everything the shim reads from the environment.
#[derive(Clone, Debug)]
pub struct Config {
    /// The mode.
    pub mode: Mode,
    /// Store directory.
    pub store: PathBuf,
    /// Job name.
    pub job: String,
    /// Snapshots to keep.
    pub keep: usize,
    /// What to restore.
    pub restore: RestoreFrom,
    /// Attempt number.
    pub attempt: u32,
    /// Local-mode schedule.
    pub every: Option<Duration>,
    /// Capture strategy.
    pub capture: CaptureMode,
    /// Use dirty-page tracking where the kernel offers it (default true).
    pub track_writes: bool,
}

fn var(name: &'static str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn parse<T: std::str::FromStr>(name: &'static str, value: &str, what: &str) -> Result<T> {
    value.trim().parse().map_err(|_| Error::Env {
        var: name,
        value: value.to_owned(),
        why: format!("expected {what}"),
    })
}

impl Config {
    /// A configuration for local snapshots of `job` in `store`, without a supervisor and
    /// without reading the environment (for tests, benchmarks and embedding).
    pub fn local(store: impl Into<PathBuf>, job: &str) -> Self {
        Self {
            mode: Mode::Local,
            store: store.into(),
            job: job.to_owned(),
            keep: 3,
            restore: RestoreFrom::Latest { after: None },
            attempt: 0,
            every: None,
            capture: CaptureMode::Auto,
            track_writes: true,
        }
    }

    /// Reads the configuration; `default_job` is used when `SUPERVISE_JOB` is unset.
    pub fn from_env(default_job: &str) -> Result<Self> {
        let mode = match var(ENV_CONTROL_FD) {
            Some(fd) => Mode::Supervised(parse(ENV_CONTROL_FD, &fd, "a file descriptor number")?),
            None if var(ENV_STORE).is_some() => Mode::Local,
            None => Mode::Off,
        };
        let restore = match var(ENV_RESTORE).as_deref() {
            None | Some("latest") => RestoreFrom::Latest {
                after: var(ENV_RESTORE_AFTER)
                    .map(|v| parse(ENV_RESTORE_AFTER, &v, "a snapshot number"))
                    .transpose()?,
            },
            Some("none") => RestoreFrom::Nothing,
            Some(n) => {
                RestoreFrom::Exact(parse(ENV_RESTORE, n, "latest, none or a snapshot number")?)
            }
        };
        let every = var(ENV_EVERY)
            .map(|v| {
                humantime::parse_duration(&v).map_err(|e| Error::Env {
                    var: ENV_EVERY,
                    value: v.clone(),
                    why: e.to_string(),
                })
            })
            .transpose()?;
        let capture = match var(ENV_CAPTURE).as_deref() {
            None | Some("auto") => CaptureMode::Auto,
            Some("dirty") => CaptureMode::Dirty,
            Some("copy") => CaptureMode::Copy,
            Some("sync") => CaptureMode::Sync,
            Some("fork") => CaptureMode::Fork,
            Some(other) => {
                return Err(Error::Env {
                    var: ENV_CAPTURE,
                    value: other.to_owned(),
                    why: "expected auto, dirty, copy, fork or sync".into(),
                });
            }
        };
        Ok(Self {
            capture,
            track_writes: var(ENV_TRACK_WRITES).as_deref() != Some("0"),
            mode,
            store: var(ENV_STORE).map_or_else(|| PathBuf::from(".supervise"), PathBuf::from),
            job: var(ENV_JOB).unwrap_or_else(|| default_job.to_owned()),
            keep: var(ENV_KEEP)
                .map(|v| parse(ENV_KEEP, &v, "a count"))
                .transpose()?
                .unwrap_or(3),
            restore,
            attempt: var(ENV_ATTEMPT)
                .map(|v| parse(ENV_ATTEMPT, &v, "a count"))
                .transpose()?
                .unwrap_or(0),
            every,
        })
    }
}
