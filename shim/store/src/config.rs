//! The shim's configuration, read from the environment. The supervisor sets these for its
//! child; a user can set them by hand to take local snapshots without a supervisor.
//!
//! [`ChildEnv`] is the one description of what the supervisor tells its child: it writes the
//! variables ([`ChildEnv::to_env`]) and reads them back ([`ChildEnv::from_lookup`], which
//! [`Config::from_env`] uses), so their names, formats and defaults live here only. The two
//! descriptors a child inherits ([`ENV_CONTROL_FD`], [`ENV_STDERR_FD`]) are set where the child
//! is spawned, since only that code knows their numbers.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};

/// Fd number of the control socket (set by the supervisor).
pub const ENV_CONTROL_FD: &str = "SUPERVISE_CONTROL_FD";
/// Where the ranks of a job of many processes find their supervisor (see
/// [`crate::control`]): `unix:/path` or `tcp:host:port`. Set instead of [`ENV_CONTROL_FD`].
pub const ENV_ENDPOINT: &str = "SUPERVISE_ENDPOINT";
/// The job's secret (64 hex digits) with which ranks prove they belong to the job.
pub const ENV_SECRET: &str = "SUPERVISE_SECRET";
/// A rank's number and the job's size as `RANK/SIZE`, for launchers this release does not
/// read (Open MPI, MPICH/PMI, Slurm and MVAPICH are read; see [`rank_from`]).
pub const ENV_RANK: &str = "SUPERVISE_RANK";
/// Store directory. Set without a control fd, the program takes local snapshots (on SIGUSR1 or
/// every `SUPERVISE_EVERY`) and resumes from them.
pub const ENV_STORE: &str = "SUPERVISE_STORE";
/// Job name (defaults to the name the program gives [`crate::Shim::init`]).
pub const ENV_JOB: &str = "SUPERVISE_JOB";
/// Snapshots to keep (default 3).
pub const ENV_KEEP: &str = "SUPERVISE_KEEP";
/// What to restore: `latest` (default), `none`, or a snapshot number.
pub const ENV_RESTORE: &str = "SUPERVISE_RESTORE";
/// Which run of the program this is (0 first), recorded in manifests.
pub const ENV_ATTEMPT: &str = "SUPERVISE_ATTEMPT";
/// Local mode only: take a snapshot this often (e.g. `30s`, `10m`).
pub const ENV_EVERY: &str = "SUPERVISE_EVERY";
/// `0` turns dirty-page tracking off (as on kernels without it); for measurements.
pub const ENV_TRACK_WRITES: &str = "SUPERVISE_TRACK_WRITES";
/// How to capture: `auto` (default), `dirty`, `copy`, `fork` or `sync` (see [`CaptureMode`]).
pub const ENV_CAPTURE: &str = "SUPERVISE_CAPTURE";
/// The most memory a capture may hold at once: a size (`256MiB`) or a percentage (`25%`, the
/// default) of the registered state and of the memory available, whichever is smaller (see
/// [`CaptureMemory`]).
pub const ENV_CAPTURE_MEMORY: &str = "SUPERVISE_CAPTURE_MEMORY";
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
    /// pause is the fork, and copy-on-write may cost up to the process's whole memory, whatever
    /// the capture memory budget. (`Auto` forks when regions must be copied whole, are large,
    /// and the process's memory fits the budget.)
    Fork,
    /// Copy, then wait until the snapshot is durable before the program goes on.
    Sync,
}

/// The most memory a capture may hold at once (its copies of the state, on their way to the
/// store). A capture that needs more is not copied: the writer reads the regions in place,
/// part by part, while the program waits at its safe point: its pause grows, memory does not
/// (an MPI rank copies its parts instead, at most the budget's worth at once). The writer's
/// own working memory (about 48 MiB: pack blocks, compressors) counts in the budget; a smaller
/// budget still leaves the writer that much and a rank's copies two parts of 1 MiB. In `auto` capture mode a forked capture (whose copy-on-write can cost up to the
/// process's whole memory) is taken only when the process's memory fits the budget; `fork`
/// mode always forks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureMemory {
    /// Exactly this many bytes.
    Bytes(u64),
    /// This percentage of the registered state and of the memory available (`MemAvailable`),
    /// whichever is smaller; at least [`CaptureMemory::FLOOR`] unless memory is scarcer.
    Percent(u32),
}

impl Default for CaptureMemory {
    fn default() -> Self {
        CaptureMemory::Percent(25)
    }
}

impl CaptureMemory {
    /// The least a percentage budget gives when memory is available: small states are never
    /// written in parts.
    pub const FLOOR: u64 = 256 << 20;

    /// Parses `256MiB`, `1G`, `1048576` (bytes) or `25%` (1 to 100).
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        if let Some(p) = value.strip_suffix('%') {
            return p
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|p| (1..=100).contains(p))
                .map(CaptureMemory::Percent);
        }
        value
            .parse::<bytesize::ByteSize>()
            .ok()
            .map(|b| b.as_u64())
            .filter(|&b| b > 0)
            .map(CaptureMemory::Bytes)
    }

    /// The budget in bytes for `state` bytes of registered state when `available` bytes of
    /// memory are available (`None`: unknown).
    pub fn bytes(self, state: u64, available: Option<u64>) -> u64 {
        match self {
            CaptureMemory::Bytes(b) => b,
            CaptureMemory::Percent(p) => {
                let share = |of: u64| (u128::from(of) * u128::from(p) / 100) as u64;
                let wanted = share(state).max(Self::FLOOR);
                available.map_or(wanted, |a| wanted.min(share(a)))
            }
        }
    }
}

impl std::fmt::Display for CaptureMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CaptureMemory::Bytes(b) => write!(f, "{b}"),
            CaptureMemory::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// The memory available for new allocations without swapping: `MemAvailable` of
/// `/proc/meminfo`, or less when this process's control group (cgroup v2 or v1: a batch job's
/// memory limit) leaves less (its limit, less its use, plus the file cache it could reclaim).
/// `None` when neither can be read.
pub fn memory_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok();
    let host = text.as_deref().and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        kib.checked_mul(1024)
    });
    match (host, cgroup_memory_left()) {
        (Some(h), Some(c)) => Some(h.min(c)),
        (h, c) => h.or(c),
    }
}

/// What this process's memory control group leaves (see [`memory_available`]), if it has a
/// limit that can be read.
fn cgroup_memory_left() -> Option<u64> {
    let groups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let read = |path: String| std::fs::read_to_string(path).ok();
    let number = |text: Option<String>| text?.trim().parse::<u64>().ok();
    let stat = |text: Option<String>, key: &str| {
        text?.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse::<u64>().ok()).flatten()
        })
    };
    for line in groups.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let (limit, used, reclaimable) = if controllers.is_empty() {
            // cgroup v2 ("max": no limit).
            let dir = format!("/sys/fs/cgroup{path}");
            (
                number(read(format!("{dir}/memory.max"))),
                number(read(format!("{dir}/memory.current"))),
                stat(read(format!("{dir}/memory.stat")), "inactive_file"),
            )
        } else if controllers.split(',').any(|c| c == "memory") {
            let dir = format!("/sys/fs/cgroup/memory{path}");
            (
                number(read(format!("{dir}/memory.limit_in_bytes"))),
                number(read(format!("{dir}/memory.usage_in_bytes"))),
                stat(read(format!("{dir}/memory.stat")), "total_inactive_file"),
            )
        } else {
            continue;
        };
        // v1 writes "no limit" as a number near 2^63.
        if let (Some(limit), Some(used)) = (limit, used)
            && limit < 1 << 60
        {
            return Some(limit.saturating_sub(used) + reclaimable.unwrap_or(0).min(used));
        }
    }
    None
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
    /// One rank of a job of many processes, connecting to its supervisor.
    Ranked(RankLink),
}

/// Where a rank's supervisor is and how the rank proves it belongs to the job.
#[derive(Clone, PartialEq, Eq)]
pub struct RankLink {
    /// The supervisor's endpoint.
    pub endpoint: Endpoint,
    /// The job's secret.
    pub secret: [u8; 32],
    /// The rank and the job's size, if the environment tells them (the program may set them:
    /// `Config::set_rank`).
    pub rank: Option<(u32, u32)>,
    /// The program agrees on each epoch's safe point itself (`Config::set_agreement`).
    pub agree: bool,
}

impl std::fmt::Debug for RankLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RankLink")
            .field("endpoint", &self.endpoint)
            .field("secret", &"(hidden)")
            .field("rank", &self.rank)
            .field("agree", &self.agree)
            .finish()
    }
}

/// The endpoint ranks connect to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix stream socket (ranks on the supervisor's machine).
    Unix(PathBuf),
    /// TCP, `host:port` (ranks on any machine that reaches it).
    Tcp(String),
}

impl Endpoint {
    /// Parses `unix:/path` or `tcp:host:port`.
    pub fn parse(value: &str) -> Option<Self> {
        if let Some(path) = value.strip_prefix("unix:") {
            return (!path.is_empty()).then(|| Endpoint::Unix(PathBuf::from(path)));
        }
        let addr = value.strip_prefix("tcp:")?;
        let (host, port) = addr.rsplit_once(':')?;
        (!host.is_empty() && port.parse::<u16>().is_ok()).then(|| Endpoint::Tcp(addr.to_owned()))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
            Endpoint::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

/// Parses a secret written as 64 hex digits.
pub fn parse_secret(value: &str) -> Option<[u8; 32]> {
    let value = value.trim();
    if value.len() != 64 || !value.is_ascii() {
        return None;
    }
    let mut secret = [0u8; 32];
    for (i, byte) in secret.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&value[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(secret)
}

/// The rank and size a launcher gave this process, read through `lookup`: [`ENV_RANK`], then
/// Open MPI (`OMPI_COMM_WORLD_RANK`/`_SIZE`), MPICH and Intel MPI (`PMI_RANK`/`PMI_SIZE`),
/// MVAPICH (`MV2_COMM_WORLD_RANK`/`_SIZE`), Slurm (`SLURM_PROCID`/`SLURM_NTASKS`). A rank not
/// below its size is not taken.
pub fn rank_from(lookup: impl Fn(&str) -> Option<String>) -> Option<(u32, u32)> {
    let num = |name: &str| lookup(name).and_then(|v| v.trim().parse::<u32>().ok());
    if let Some(v) = lookup(ENV_RANK)
        && let Some((r, n)) = v.split_once('/')
        && let (Ok(r), Ok(n)) = (r.trim().parse::<u32>(), n.trim().parse::<u32>())
        && r < n
    {
        return Some((r, n));
    }
    [
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
        ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"),
        ("SLURM_PROCID", "SLURM_NTASKS"),
    ]
    .iter()
    .find_map(|(r, n)| match (num(r), num(n)) {
        (Some(r), Some(n)) if r < n => Some((r, n)),
        _ => None,
    })
}

/// Which snapshot to restore at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestoreFrom {
    /// The newest that verifies, numbered above `after` if given.
    Latest {
        /// Lower bound (exclusive). No environment variable sets it: it is for code that
        /// builds a [`Config`] itself.
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

impl RestoreFrom {
    /// The snapshots to try, newest first, out of `seqs` (the job's committed snapshots, in
    /// any order): the one asked for, or every one above `after` and outside `skip`. The first
    /// that opens and verifies is the one to restore.
    pub fn candidates(&self, seqs: &[u64]) -> Vec<u64> {
        match self {
            RestoreFrom::Nothing => Vec::new(),
            RestoreFrom::Exact(seq) => vec![*seq],
            RestoreFrom::Latest { after, skip } => {
                let mut chosen: Vec<u64> = seqs
                    .iter()
                    .copied()
                    .filter(|s| after.is_none_or(|a| *s > a))
                    .filter(|s| !skip.iter().any(|(a, b)| (a..=b).contains(&s)))
                    .collect();
                chosen.sort_unstable_by(|a, b| b.cmp(a));
                chosen.dedup();
                chosen
            }
        }
    }

    /// [`RestoreFrom::candidates`] among `job`'s committed snapshots, newest first.
    pub fn candidates_in(&self, job: &crate::store::JobStore) -> Result<Vec<u64>> {
        match self {
            RestoreFrom::Nothing => Ok(Vec::new()),
            RestoreFrom::Exact(seq) => Ok(vec![*seq]),
            RestoreFrom::Latest { .. } => Ok(self.candidates(&job.snapshot_seqs()?)),
        }
    }

    /// The newest of `job`'s committed snapshots outside the `skip` ranges: what `latest`
    /// restores when every candidate verifies.
    pub fn newest_outside(
        job: &crate::store::JobStore,
        skip: &[(u64, u64)],
    ) -> Result<Option<u64>> {
        let latest = RestoreFrom::Latest {
            after: None,
            skip: skip.to_vec(),
        };
        Ok(latest.candidates_in(job)?.first().copied())
    }
}

/// What the supervisor tells the program it runs, through the environment: written by
/// [`ChildEnv::to_env`], read by [`ChildEnv::from_lookup`] (and so by [`Config::from_env`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildEnv {
    /// Store directory ([`ENV_STORE`]; default `.supervise`).
    pub store: PathBuf,
    /// Job name ([`ENV_JOB`]; default: the name the program gives).
    pub job: String,
    /// Snapshots to keep ([`ENV_KEEP`]; default 3).
    pub keep: usize,
    /// Which run of the program this is, 0 first ([`ENV_ATTEMPT`]).
    pub attempt: u32,
    /// What to restore ([`ENV_RESTORE`] and [`ENV_RESTORE_SKIP`]; default the latest). The
    /// `after` bound of [`RestoreFrom::Latest`] has no variable and is not written.
    pub restore: RestoreFrom,
    /// The snapshot schedule ([`ENV_EVERY`]; none when unset).
    pub every: Option<Duration>,
    /// Also keep snapshots younger than this ([`ENV_KEEP_WITHIN`]).
    pub keep_within: Option<Duration>,
    /// What to do when the supervisor goes away ([`ENV_ORPHAN`]; default stop).
    pub orphan: OrphanMode,
    /// Snapshots the supervisor suspects ([`ENV_SUSPECT`]).
    pub suspect: Vec<(u64, u64)>,
    /// The scrub's period, `None` when off ([`ENV_SCRUB`]; default one day).
    pub scrub: Option<Duration>,
    /// What produced the snapshots ([`ENV_ORIGIN`]).
    pub origin: Option<crate::format::Origin>,
    /// The most memory a capture may hold ([`ENV_CAPTURE_MEMORY`]; default 25%).
    pub capture_memory: CaptureMemory,
}

impl ChildEnv {
    /// The variables to add to the child's environment. Unset parts (no schedule, no
    /// `keep_within`, nothing skipped or suspect, no origin) write no variable, so that the
    /// child reads the default; `store` is written as text (lossily if it is not UTF-8).
    pub fn to_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            (ENV_STORE, self.store.to_string_lossy().into_owned()),
            (ENV_JOB, self.job.clone()),
            (ENV_KEEP, self.keep.to_string()),
            (ENV_ATTEMPT, self.attempt.to_string()),
        ];
        match &self.restore {
            RestoreFrom::Latest { skip, .. } => {
                env.push((ENV_RESTORE, "latest".to_owned()));
                if !skip.is_empty() {
                    env.push((ENV_RESTORE_SKIP, format_ranges(skip)));
                }
            }
            RestoreFrom::Nothing => env.push((ENV_RESTORE, "none".to_owned())),
            RestoreFrom::Exact(seq) => env.push((ENV_RESTORE, seq.to_string())),
        }
        if let Some(every) = self.every {
            env.push((ENV_EVERY, humantime::format_duration(every).to_string()));
        }
        env.push((ENV_ORPHAN, self.orphan.as_str().to_owned()));
        if let Some(origin) = &self.origin
            && let Ok(json) = serde_json::to_string(origin)
        {
            env.push((ENV_ORIGIN, json));
        }
        env.push((
            ENV_SCRUB,
            self.scrub.map_or_else(
                || "off".to_owned(),
                |d| humantime::format_duration(d).to_string(),
            ),
        ));
        if !self.suspect.is_empty() {
            env.push((ENV_SUSPECT, format_ranges(&self.suspect)));
        }
        if self.capture_memory != CaptureMemory::default() {
            env.push((ENV_CAPTURE_MEMORY, self.capture_memory.to_string()));
        }
        if let Some(within) = self.keep_within {
            env.push((
                ENV_KEEP_WITHIN,
                humantime::format_duration(within).to_string(),
            ));
        }
        env
    }

    /// Reads the description through `lookup` (a variable's value; empty counts as unset),
    /// with `default_job` when [`ENV_JOB`] is unset.
    pub fn from_lookup(
        lookup: impl Fn(&'static str) -> Option<String>,
        default_job: &str,
    ) -> Result<Self> {
        let var = |name: &'static str| lookup(name).filter(|v| !v.is_empty());
        let restore = match var(ENV_RESTORE).as_deref() {
            None | Some("latest") => RestoreFrom::Latest {
                after: None,
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
        let scrub = match var(ENV_SCRUB).as_deref() {
            Some("off") => None,
            _ => Some(duration(ENV_SCRUB)?.unwrap_or(crate::scrub::DEFAULT_PERIOD)),
        };
        let orphan = match var(ENV_ORPHAN).as_deref() {
            None => OrphanMode::Stop,
            Some(value) => OrphanMode::parse(value).ok_or_else(|| Error::Env {
                var: ENV_ORPHAN,
                value: value.to_owned(),
                why: "expected stop or continue".into(),
            })?,
        };
        Ok(Self {
            store: var(ENV_STORE).map_or_else(|| PathBuf::from(".supervise"), PathBuf::from),
            job: var(ENV_JOB).unwrap_or_else(|| default_job.to_owned()),
            keep: var(ENV_KEEP)
                .map(|v| parse(ENV_KEEP, &v, "a count"))
                .transpose()?
                .unwrap_or(3),
            attempt: var(ENV_ATTEMPT)
                .map(|v| parse(ENV_ATTEMPT, &v, "a count"))
                .transpose()?
                .unwrap_or(0),
            restore,
            every: duration(ENV_EVERY)?,
            keep_within: duration(ENV_KEEP_WITHIN)?,
            orphan,
            suspect: var(ENV_SUSPECT)
                .map(|v| parse_ranges(ENV_SUSPECT, &v))
                .transpose()?
                .unwrap_or_default(),
            scrub,
            origin: var(ENV_ORIGIN).and_then(|v| parse_origin(&v)),
            capture_memory: match var(ENV_CAPTURE_MEMORY) {
                None => CaptureMemory::default(),
                Some(v) => CaptureMemory::parse(&v).ok_or_else(|| Error::Env {
                    var: ENV_CAPTURE_MEMORY,
                    value: v.clone(),
                    why: "expected a size such as 256MiB or a percentage from 1% to 100%".into(),
                })?,
            },
        })
    }
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
    /// The most memory a capture may hold at once.
    pub capture_memory: CaptureMemory,
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

impl OrphanMode {
    /// The value of [`ENV_ORPHAN`] (and of `supervise --orphan`): `stop` or `continue`.
    pub fn as_str(self) -> &'static str {
        match self {
            OrphanMode::Stop => "stop",
            OrphanMode::Continue => "continue",
        }
    }

    /// The mode named `value` (`stop` or `continue`).
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "stop" => Some(OrphanMode::Stop),
            "continue" => Some(OrphanMode::Continue),
            _ => None,
        }
    }
}

impl Config {
    /// Sets this process's rank and the job's size, for a rank of a job of many processes
    /// whose launcher's variables [`rank_from`] does not read. No effect in other modes.
    pub fn set_rank(&mut self, rank: u32, size: u32) {
        if let Mode::Ranked(link) = &mut self.mode {
            link.rank = Some((rank, size));
        }
    }

    /// Says that the program agrees on each epoch's safe point through its own communicator
    /// (an `MPI_Allreduce` of [`Shim::epoch_offered`](../../supervise_shim/struct.Shim.html)
    /// every few steps, as `supervise_mpi.h` does) instead of counting safe points. No effect
    /// outside a job of many ranks.
    pub fn set_agreement(&mut self, on: bool) {
        if let Mode::Ranked(link) = &mut self.mode {
            link.agree = on;
        }
    }

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
    var_named(name)
}

fn var_named(name: &str) -> Option<String> {
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
            capture_memory: CaptureMemory::default(),
            keep_within: None,
            orphan: OrphanMode::Stop,
            suspect: Vec::new(),
            scrub: Some(crate::scrub::DEFAULT_PERIOD),
            origin: None,
        }
    }

    /// Reads the configuration; `default_job` is used when `SUPERVISE_JOB` is unset.
    pub fn from_env(default_job: &str) -> Result<Self> {
        let endpoint = var(ENV_ENDPOINT)
            .map(|v| {
                Endpoint::parse(&v).ok_or_else(|| Error::Env {
                    var: ENV_ENDPOINT,
                    value: v.clone(),
                    why: "expected unix:/path or tcp:host:port".into(),
                })
            })
            .transpose()?;
        let mode = match (endpoint, var(ENV_CONTROL_FD)) {
            (Some(endpoint), _) => {
                let secret = var(ENV_SECRET).ok_or_else(|| Error::Env {
                    var: ENV_SECRET,
                    value: String::new(),
                    why: format!("is unset, but {ENV_ENDPOINT} is set"),
                })?;
                let secret = parse_secret(&secret).ok_or_else(|| Error::Env {
                    var: ENV_SECRET,
                    value: "(hidden)".into(),
                    why: "expected 64 hex digits".into(),
                })?;
                Mode::Ranked(RankLink {
                    endpoint,
                    secret,
                    rank: rank_from(var_named),
                    agree: false,
                })
            }
            (None, Some(fd)) => {
                Mode::Supervised(parse(ENV_CONTROL_FD, &fd, "a file descriptor number")?)
            }
            (None, None) if var(ENV_STORE).is_some() => Mode::Local,
            (None, None) => Mode::Off,
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
        let child = ChildEnv::from_lookup(|name| std::env::var(name).ok(), default_job)?;
        Ok(Self {
            capture,
            track_writes: var(ENV_TRACK_WRITES).as_deref() != Some("0"),
            capture_memory: child.capture_memory,
            mode,
            store: child.store,
            job: child.job,
            keep: child.keep,
            restore: child.restore,
            attempt: child.attempt,
            every: child.every,
            keep_within: child.keep_within,
            orphan: child.orphan,
            scrub: child.scrub,
            origin: child.origin,
            suspect: child.suspect,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_back(env: &[(&'static str, String)]) -> ChildEnv {
        let lookup =
            |name: &'static str| env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone());
        ChildEnv::from_lookup(lookup, "unused").unwrap()
    }

    #[test]
    fn the_child_environment_reads_back_as_written() {
        let full = ChildEnv {
            store: PathBuf::from("/data/store"),
            job: "heat".into(),
            keep: 5,
            attempt: 2,
            restore: RestoreFrom::Latest {
                after: None,
                skip: vec![(3, 5), (9, 9)],
            },
            every: Some(Duration::from_millis(90_500)),
            keep_within: Some(Duration::from_secs(7200)),
            orphan: OrphanMode::Continue,
            suspect: vec![(7, 8)],
            scrub: None,
            origin: parse_origin(r#"{"program":"/bin/heat","exe_blake3":null,"args":["-n"]}"#),
            capture_memory: CaptureMemory::Bytes(3 << 30),
        };
        assert_eq!(read_back(&full.to_env()), full);
        let bare = ChildEnv {
            restore: RestoreFrom::Exact(4),
            every: None,
            keep_within: None,
            orphan: OrphanMode::Stop,
            suspect: Vec::new(),
            scrub: Some(Duration::from_secs(3600)),
            origin: None,
            capture_memory: CaptureMemory::Percent(10),
            ..full.clone()
        };
        assert_eq!(read_back(&bare.to_env()), bare);
        let nothing = ChildEnv {
            restore: RestoreFrom::Nothing,
            ..bare
        };
        assert_eq!(read_back(&nothing.to_env()), nothing);
        // Unset, everything takes its default.
        let defaults = read_back(&[]);
        assert_eq!(defaults.store, PathBuf::from(".supervise"));
        assert_eq!(defaults.job, "unused");
        assert_eq!(defaults.keep, 3);
        assert_eq!(defaults.scrub, Some(crate::scrub::DEFAULT_PERIOD));
        assert_eq!(defaults.orphan, OrphanMode::Stop);
        assert_eq!(defaults.capture_memory, CaptureMemory::Percent(25));
        let bad = ChildEnv::from_lookup(
            |name| (name == ENV_CAPTURE_MEMORY).then(|| "0%".to_owned()),
            "unused",
        )
        .unwrap_err()
        .to_string();
        assert!(bad.contains(ENV_CAPTURE_MEMORY), "{bad}");
    }

    #[test]
    fn the_memory_available_is_known_here_and_no_more_than_the_host_s() {
        let host: u64 = std::fs::read_to_string("/proc/meminfo")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap();
        let available = memory_available().unwrap();
        assert!(available > 0);
        // The host's figure moves between the two reads; a control group's can only lower it.
        assert!(
            available <= (host + (64 << 10)) * 1024,
            "{available} vs {host} KiB"
        );
    }

    #[test]
    fn the_capture_memory_budget_is_a_size_or_the_smaller_share_of_state_and_memory() {
        const MIB: u64 = 1 << 20;
        let parse = |v: &str| CaptureMemory::parse(v);
        assert_eq!(parse("512MiB"), Some(CaptureMemory::Bytes(512 * MIB)));
        assert_eq!(parse("1G"), Some(CaptureMemory::Bytes(1_000_000_000)));
        assert_eq!(parse(" 25% "), Some(CaptureMemory::Percent(25)));
        assert_eq!(parse("100%"), Some(CaptureMemory::Percent(100)));
        for bad in ["0", "0%", "101%", "-1%", "lots", "", "12.5%"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        for budget in [CaptureMemory::Bytes(7 * MIB), CaptureMemory::Percent(30)] {
            assert_eq!(parse(&budget.to_string()), Some(budget));
        }
        let quarter = CaptureMemory::Percent(25);
        // A quarter of 4 GiB of state, with plenty of memory.
        assert_eq!(quarter.bytes(4096 * MIB, Some(64 << 30)), 1024 * MIB);
        // A quarter of what is available when that is less.
        assert_eq!(quarter.bytes(4096 * MIB, Some(2048 * MIB)), 512 * MIB);
        // Small states get the floor, unless memory is scarcer still.
        assert_eq!(
            quarter.bytes(10 * MIB, Some(64 << 30)),
            CaptureMemory::FLOOR
        );
        assert_eq!(quarter.bytes(10 * MIB, Some(100 * MIB)), 25 * MIB);
        assert_eq!(quarter.bytes(4096 * MIB, None), 1024 * MIB);
        // A size is a size.
        assert_eq!(CaptureMemory::Bytes(5).bytes(1 << 40, Some(1)), 5);
    }

    #[test]
    fn restore_candidates_are_newest_first_outside_the_skipped() {
        let seqs = [1, 2, 3, 4, 5, 6, 9];
        let latest = |after, skip: &[(u64, u64)]| RestoreFrom::Latest {
            after,
            skip: skip.to_vec(),
        };
        assert_eq!(latest(None, &[]).candidates(&seqs), [9, 6, 5, 4, 3, 2, 1]);
        assert_eq!(latest(None, &[(3, 5), (9, 9)]).candidates(&seqs), [6, 2, 1]);
        assert_eq!(latest(Some(4), &[(6, 6)]).candidates(&seqs), [9, 5]);
        assert_eq!(latest(None, &[(0, 9)]).candidates(&seqs), Vec::<u64>::new());
        assert_eq!(RestoreFrom::Exact(4).candidates(&seqs), [4]);
        // Asked for by number, it is tried even if the listing does not show it.
        assert_eq!(RestoreFrom::Exact(7).candidates(&seqs), [7]);
        assert!(RestoreFrom::Nothing.candidates(&seqs).is_empty());
    }

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
