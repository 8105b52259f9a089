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
/// Snapshots `latest` must not restore: `3-5,9` (set by the supervisor).
pub const ENV_RESTORE_SKIP: &str = "SUPERVISE_RESTORE_SKIP";
/// Snapshots the supervisor suspects (`7-8`): retention neither counts them toward the
/// snapshots to keep nor removes them before a newer good snapshot exists.
pub const ENV_SUSPECT: &str = "SUPERVISE_SUSPECT";
/// Re-read and verify every stored chunk within this period (a duration such as `1d`; `off`
/// turns the scrub off). Default one day.
pub const ENV_SCRUB: &str = "SUPERVISE_SCRUB";
/// Also keep snapshots younger than this (a duration such as `2h`).
pub const ENV_KEEP_WITHIN: &str = "SUPERVISE_KEEP_WITHIN";
/// What to do when the supervisor goes away: `stop` (final snapshot, then exit; the default)
/// or `continue` (keep running, snapshotting on the `SUPERVISE_EVERY` schedule, and finish).
pub const ENV_ORPHAN: &str = "SUPERVISE_ORPHAN";
/// The supervisor's own stderr, inherited as `FD:DEV:INODE` when the program's stderr is a pipe
/// through the supervisor (which keeps its last lines to show if the program fails at once):
/// the shim makes it its stderr again when it starts, so that a program that uses the shim
/// writes straight to the terminal or log, and keeps writing there if the supervisor dies.
pub const ENV_STDERR_FD: &str = "SUPERVISE_STDERR_FD";

/// What produced the snapshots, as JSON of [`crate::format::Origin`] (`{"program":
/// "/abs/path", "exe_blake3": "<hex>" or null, "args": [...]}`), set by the supervisor and
/// recorded in each manifest. Missing, unparsable or invalid: no origin is recorded (never an
/// error).
pub const ENV_ORIGIN: &str = "SUPERVISE_ORIGIN";

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
        /// Snapshots not to restore (inclusive ranges): ones the supervisor found suspect,
        /// or newer ones the user chose to go back past.
        skip: Vec<(u64, u64)>,
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
    /// Also keep snapshots younger than this.
    pub keep_within: Option<Duration>,
    /// What to do when the supervisor goes away.
    pub orphan: OrphanMode,
    /// Snapshots the supervisor suspects (see [`ENV_SUSPECT`]).
    pub suspect: Vec<(u64, u64)>,
    /// The scrub's period, or `None` when it is off (see [`ENV_SCRUB`]).
    pub scrub: Option<Duration>,
    /// What produced the snapshots (see [`ENV_ORIGIN`]).
    pub origin: Option<crate::format::Origin>,
}

/// What the program does when its supervisor goes away (the control channel closes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrphanMode {
    /// Take a final snapshot at the next safe point, then exit (code 75): the work since the
    /// last scheduled snapshot is kept, and rerunning the supervisor resumes the job.
    Stop,
    /// Keep running unsupervised to the end, snapshotting on the `SUPERVISE_EVERY` schedule.
    Continue,
}

impl Config {
    /// The retention policy: keep-last and keep-within.
    pub fn retention(&self) -> crate::store::Retention {
        crate::store::Retention {
            keep: self.keep,
            within: self.keep_within,
            suspect: self.suspect.clone(),
        }
    }
}

/// Parses `3-5,9` (the value of `var`) into `[(3, 5), (9, 9)]`.
fn parse_ranges(var: &'static str, value: &str) -> Result<Vec<(u64, u64)>> {
    value
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|part| {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            let what = "snapshot numbers and ranges such as 3-5,9";
            Ok((parse(var, a, what)?, parse(var, b, what)?))
        })
        .collect()
}

/// Formats ranges the way [`ENV_RESTORE_SKIP`] and [`ENV_SUSPECT`] read them.
pub fn format_ranges(ranges: &[(u64, u64)]) -> String {
    ranges
        .iter()
        .map(|(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The origin in `value` (JSON), if it parses and would pass a manifest's checks.
pub fn parse_origin(value: &str) -> Option<crate::format::Origin> {
    serde_json::from_str::<crate::format::Origin>(value)
        .ok()
        .filter(|o| o.check().is_ok())
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
            restore: RestoreFrom::Latest {
                after: None,
                skip: Vec::new(),
            },
            attempt: 0,
            every: None,
            capture: CaptureMode::Auto,
            track_writes: true,
            keep_within: None,
            orphan: OrphanMode::Stop,
            suspect: Vec::new(),
            scrub: Some(crate::scrub::DEFAULT_PERIOD),
            origin: None,
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
                skip: var(ENV_RESTORE_SKIP)
                    .map(|v| parse_ranges(ENV_RESTORE_SKIP, &v))
                    .transpose()?
                    .unwrap_or_default(),
            },
            Some("none") => RestoreFrom::Nothing,
            Some(n) => {
                RestoreFrom::Exact(parse(ENV_RESTORE, n, "latest, none or a snapshot number")?)
            }
        };
        let duration = |name: &'static str| {
            var(name)
                .map(|v| {
                    humantime::parse_duration(&v).map_err(|e| Error::Env {
                        var: name,
                        value: v.clone(),
                        why: e.to_string(),
                    })
                })
                .transpose()
        };
        let every = duration(ENV_EVERY)?;
        let keep_within = duration(ENV_KEEP_WITHIN)?;
        let scrub = match var(ENV_SCRUB).as_deref() {
            Some("off") => None,
            _ => Some(duration(ENV_SCRUB)?.unwrap_or(crate::scrub::DEFAULT_PERIOD)),
        };
        let orphan = match var(ENV_ORPHAN).as_deref() {
            None | Some("stop") => OrphanMode::Stop,
            Some("continue") => OrphanMode::Continue,
            Some(other) => {
                return Err(Error::Env {
                    var: ENV_ORPHAN,
                    value: other.to_owned(),
                    why: "expected stop or continue".into(),
                });
            }
        };
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
            keep_within,
            orphan,
            scrub,
            origin: var(ENV_ORIGIN).and_then(|v| parse_origin(&v)),
            suspect: var(ENV_SUSPECT)
                .map(|v| parse_ranges(ENV_SUSPECT, &v))
                .transpose()?
                .unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_origin_that_does_not_parse_or_check_is_none() {
        let o = parse_origin(r#"{"program":"/bin/heat","exe_blake3":null,"args":["--n","8"]}"#)
            .unwrap();
        assert_eq!(o.program, "/bin/heat");
        assert_eq!(o.args, ["--n", "8"]);
        assert!(parse_origin(r#"{"program":"/bin/heat"}"#).is_some());
        for bad in [
            "",
            "not json",
            r#"{"args":[]}"#,
            r#"{"program":"/bin/heat","exe_blake3":"xyz"}"#,
            r#"{"program":"a\u0000b"}"#,
        ] {
            assert_eq!(parse_origin(bad), None, "{bad}");
        }
    }
}
