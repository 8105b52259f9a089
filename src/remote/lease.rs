//! Who holds a job across nodes: the lease, kept in the tier's [`layout::lease`] object and
//! changed only by conditional writes ([`Tier::create`], [`Tier::replace`]), so it works on
//! any tier (the object store, a directory replica) alike.
//!
//! # The record
//!
//! A small JSON object (read with a bound of [`MAX_RECORD`] bytes): the lease `generation`,
//! the `holder` (host, pid, boot id from `/proc/sys/kernel/random/boot_id`, pid namespace,
//! since when, its cache directory as text), `ttl_ms` (how long the holder promises to be
//! gone after its last renewal), `renewed_unix_ms` (for people reading it; nobody compares
//! it to their own clock), `renewals` (a counter that makes every renewal's bytes, so its
//! version, new) and `released`.
//!
//! # Taking the lease ([`try_acquire`])
//!
//! - **No lease object**: created conditionally with generation = 1 + the highest generation
//!   among the job's manifest keys ([`layout::parse_manifest`] over the `snapshots/` listing)
//!   and the caller's `floor` (the highest generation it saw on the job's other tiers).
//! - **Released**: replaced (if it still has the version read) with a higher generation.
//! - **Held by a process of this very machine and pid namespace** (same host, boot id and pid
//!   namespace) **that is dead** (no `/proc/PID`, or a zombie): its program may still be
//!   running out the lifeline's grace, at most a fifth of the ttl. With the same cache
//!   directory it holds the cache's local lock, which the taker waits for after the lease:
//!   taken at once. With another cache nothing else would stop two copies: taken once the
//!   taker has seen the holder dead (and its record unchanged) for a quarter of the ttl. A
//!   reused pid only makes the holder look alive, so the taker waits the ttl out: the safe
//!   side.
//! - **Held otherwise**: expired only when the taker has seen the *same version* unchanged
//!   for longer than the record's ttl, measured on the taker's *own monotonic clock*: the
//!   [`Watch`] remembers the version and the [`Instant`] it was first seen. No wall-clock
//!   time of one machine is compared with another's: no clock synchronisation is assumed,
//!   only a bounded drift of clock *rates*.
//! - Every takeover writes generation = 1 + max(the record's generation, the manifests'
//!   highest, the caller's floor), conditionally on the version read. A lost race
//!   ([`TierError::Conflict`]) is read again and reported as [`Acquired::Held`], unless the
//!   record read is the very one we wrote (our write landed, its reply was lost): then the
//!   lease is ours.
//!
//! # Keeping it ([`Lease::renew`])
//!
//! The holder replaces the record (if it still has the version it last wrote) every sixth of
//! the ttl ([`Lease::renew_due`]), so that two or three renewals may fail before its
//! program has to be stopped. The [`Instant`] of a renewal is taken *before* its request
//! is sent. The holder must have its program stopped by [`Lease::deadline`] = the send
//! instant of its last successful write + ttl - ttl/10. A renewal that finds another
//! version is [`LeaseError::Lost`] (someone took over: stop the program at once); one that
//! cannot reach the tier is [`LeaseError::Unreachable`] (keep going until the deadline,
//! renewing meanwhile). A write whose reply was lost may have landed: a conflicting record
//! that carries our generation and our identity can only be our own write, and is adopted.
//!
//! # Why this is safe
//!
//! Say the holder's last successful write was sent at instant `s` (real time). The version
//! the taker watches was written after `s`, so the taker first saw it at `t0 >= s`, and takes
//! over only after `ttl` more has passed on its clock. The holder stops by `s + 0.9 ttl` on
//! its clock. With clock rates within `e` of true time, the holder has stopped by
//! `s + 0.9 ttl (1 + e)` while the taker starts after `s + ttl (1 - e)`: safe for any drift
//! `e` below 5 %, far beyond what real clocks do (ppm). A renewal sent later and landed
//! changes the version, which restarts the taker's watch; a takeover and a renewal racing
//! are decided by the conditional write: exactly one wins, and the loser learns it.
//!
//! **Network partition.** The holder cannot renew: its renewals are Unreachable, and it
//! stops its program before its deadline. The taker cannot see any change (there is none,
//! or it would be a newer version), waits out the ttl from when it first saw the version,
//! and takes over with a higher generation. Should the old holder's uploads still land late
//! (a queued request), their manifest keys carry the old generation ([`layout::manifest`]);
//! a restore takes the newest snapshot of the highest generation, so they are never
//! preferred. When the partition heals the old holder's next renewal is Lost.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{Tier, TierError, TierResult, Version, layout};

/// The most bytes a lease record may have.
pub const MAX_RECORD: u64 = 64 * 1024;

/// A supervisor process that holds (or wants) a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The machine's host name.
    pub host: String,
    /// The supervisor's pid.
    pub pid: u32,
    /// The machine's boot id (`/proc/sys/kernel/random/boot_id`; empty when unknown).
    pub boot_id: String,
    /// The inode of the supervisor's pid namespace (`/proc/self/ns/pid`; 0 when unknown):
    /// containers of one machine share its boot id but not their pids.
    #[serde(default)]
    pub pid_ns: u64,
    /// When the supervisor started asking for the job, in milliseconds since the epoch.
    pub since_unix_ms: u64,
    /// Its cache directory (the node-local store), as text.
    pub cache: String,
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The first line of a small `/proc` file, trimmed (empty when unreadable).
fn proc_line(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

impl Holder {
    /// This process, keeping its node-local store in `cache`.
    pub fn this_process(cache: &Path) -> Holder {
        use std::os::unix::fs::MetadataExt;
        let host = proc_line("/proc/sys/kernel/hostname");
        Holder {
            host: if host.is_empty() {
                "unknown host".to_owned()
            } else {
                host
            },
            pid: std::process::id(),
            boot_id: proc_line("/proc/sys/kernel/random/boot_id"),
            pid_ns: std::fs::metadata("/proc/self/ns/pid").map_or(0, |m| m.ino()),
            since_unix_ms: now_unix_ms(),
            cache: cache.display().to_string(),
        }
    }

    /// Whether `other` runs on this machine, in this pid namespace (its pid means the same
    /// process here).
    fn same_pids_as(&self, other: &Holder) -> bool {
        !self.boot_id.is_empty()
            && self.pid_ns != 0
            && self.host == other.host
            && self.boot_id == other.boot_id
            && self.pid_ns == other.pid_ns
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let since = UNIX_EPOCH + Duration::from_millis(self.since_unix_ms);
        write!(
            f,
            "supervisor pid {} on {} since {} (cache {})",
            self.pid,
            self.host,
            humantime::format_rfc3339_seconds(since),
            self.cache
        )
    }
}

/// Whether process `pid` of this machine is alive (a zombie is dead). Unsure counts as alive.
fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold any byte.
        Ok(stat) => match stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
        {
            Some(state) => !matches!(state, "Z" | "X" | "x"),
            None => true,
        },
        Err(e) => e.kind() != std::io::ErrorKind::NotFound,
    }
}

/// The lease object's content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    generation: u64,
    holder: Holder,
    ttl_ms: u64,
    renewed_unix_ms: u64,
    #[serde(default)]
    renewals: u64,
    released: bool,
}

impl Record {
    fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms)
    }

    fn to_bytes(&self) -> Vec<u8> {
        // Plain data: serialising it cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// What a taker remembers between attempts at one job's lease: the version it saw and when
/// it first saw it, on its own monotonic clock. Keep one per job, across [`try_acquire`]
/// calls.
#[derive(Debug, Default)]
pub struct Watch {
    seen: Option<(Version, Instant, Duration)>,
    /// The version whose holder was first seen dead, and when.
    dead: Option<(Version, Instant)>,
}

impl Watch {
    /// A watch that has seen nothing yet.
    pub fn new() -> Watch {
        Watch::default()
    }

    #[cfg(test)]
    /// The earliest instant at which the version now watched may be taken over (when it is
    /// still unchanged then); `None` before anything was seen.
    pub fn takeover_at(&self) -> Option<Instant> {
        self.seen.as_ref().map(|(_, first, ttl)| *first + *ttl)
    }

    /// Notes that the holder of `version` is dead at `now`: how long it has been seen dead
    /// with that version current.
    fn observe_dead(&mut self, version: &Version, now: Instant) -> Duration {
        match &self.dead {
            Some((seen, first)) if seen == version => now.saturating_duration_since(*first),
            _ => {
                self.dead = Some((version.clone(), now));
                Duration::ZERO
            }
        }
    }

    /// Notes that `version` (with that ttl) is current at `now`: how long it has been seen
    /// unchanged.
    fn observe(&mut self, version: &Version, ttl: Duration, now: Instant) -> Duration {
        match &self.seen {
            Some((seen, first, _)) if seen == version => now.saturating_duration_since(*first),
            _ => {
                self.seen = Some((version.clone(), now, ttl));
                Duration::ZERO
            }
        }
    }
}

/// What [`try_acquire`] found.
#[derive(Debug)]
pub enum Acquired {
    /// The lease is ours.
    Taken(Lease),
    /// Someone else holds it; it cannot be taken over for at least `free_in` (more if they
    /// renew).
    Held {
        /// Who holds it.
        holder: Holder,
        /// The least time before it may be taken over.
        free_in: Duration,
        /// The holder is known to be dead (a process of this machine); only its program's
        /// grace is waited out, and nobody can renew the lease meanwhile.
        holder_dead: bool,
    },
}

/// Why [`Lease::renew`] or [`Lease::release`] failed.
#[derive(Debug)]
pub enum LeaseError {
    /// Someone else took the lease over (or removed it): the program must be stopped at once.
    Lost {
        /// The new holder, when the record could be read.
        holder: Option<Holder>,
    },
    /// The tier could not be reached: keep going, and keep renewing, until the deadline.
    Unreachable(TierError),
}

impl fmt::Display for LeaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeaseError::Lost { holder: Some(h) } => write!(f, "the lease was taken over by {h}"),
            LeaseError::Lost { holder: None } => write!(f, "the lease was taken over or removed"),
            LeaseError::Unreachable(e) => write!(f, "cannot renew the lease: {e}"),
        }
    }
}

impl std::error::Error for LeaseError {}

/// A lease held: renew it by [`Lease::renew_due`], have the program stopped by
/// [`Lease::deadline`].
pub struct Lease {
    tier: Arc<dyn Tier>,
    key: String,
    record: Record,
    version: Version,
    /// When the last successful write was sent.
    sent: Instant,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("tier", &self.tier.describe())
            .field("key", &self.key)
            .field("generation", &self.record.generation)
            .field("version", &self.version)
            .finish()
    }
}

impl Lease {
    /// The lease generation (what this holder's manifest keys carry).
    pub fn generation(&self) -> u64 {
        self.record.generation
    }

    #[cfg(test)]
    /// The holder (this process).
    pub fn holder(&self) -> &Holder {
        &self.record.holder
    }

    /// The ttl.
    pub fn ttl(&self) -> Duration {
        self.record.ttl()
    }

    /// By when the program must be stopped unless a renewal succeeds: the last successful
    /// write's send instant + ttl - ttl/10 (a margin for clock-rate drift).
    pub fn deadline(&self) -> Instant {
        let ttl = self.ttl();
        self.sent + ttl - ttl / 10
    }

    /// When the next renewal is due (a sixth of the ttl after the last successful write).
    pub fn renew_due(&self) -> Instant {
        self.sent + self.ttl() / 6
    }

    /// Renews the lease (a conditional write of a new record). On success the deadline moves
    /// to this request's send instant + ttl - margin.
    pub fn renew(&mut self) -> Result<(), LeaseError> {
        let mut next = self.record.clone();
        next.renewals = next.renewals.wrapping_add(1);
        next.renewed_unix_ms = now_unix_ms();
        let mut version = self.version.clone();
        // At most twice: once more after adopting our own write whose reply was lost.
        for _ in 0..2 {
            let sent = Instant::now();
            match self.tier.replace(&self.key, &next.to_bytes(), &version) {
                Ok(v) => {
                    self.record = next;
                    self.version = v;
                    self.sent = sent;
                    return Ok(());
                }
                Err(TierError::Conflict { .. }) => match self.read_current() {
                    Ok(Some((record, v)))
                        if record.generation == self.record.generation
                            && record.holder == self.record.holder
                            && !record.released =>
                    {
                        version = v;
                        next.renewals = record.renewals.wrapping_add(1);
                    }
                    Ok(Some((record, _))) => {
                        return Err(LeaseError::Lost {
                            holder: Some(record.holder),
                        });
                    }
                    Ok(None) => return Err(LeaseError::Lost { holder: None }),
                    Err(e) if e.is_transient() => return Err(LeaseError::Unreachable(e)),
                    Err(_) => return Err(LeaseError::Lost { holder: None }),
                },
                Err(e) => return Err(LeaseError::Unreachable(e)),
            }
        }
        Err(LeaseError::Lost { holder: None })
    }

    /// Gives the lease up (a conditional write with `released`), so the next taker needs not
    /// wait out the ttl. The caller may ignore a failure: the lease then expires.
    pub fn release(self) -> Result<(), LeaseError> {
        let mut next = self.record.clone();
        next.released = true;
        next.renewals = next.renewals.wrapping_add(1);
        next.renewed_unix_ms = now_unix_ms();
        match self
            .tier
            .replace(&self.key, &next.to_bytes(), &self.version)
        {
            Ok(_) => Ok(()),
            Err(TierError::Conflict { .. }) => Err(LeaseError::Lost {
                holder: self.read_current().ok().flatten().map(|(r, _)| r.holder),
            }),
            Err(e) => Err(LeaseError::Unreachable(e)),
        }
    }

    fn read_current(&self) -> TierResult<Option<(Record, Version)>> {
        read_record(self.tier.as_ref(), &self.key)
    }
}

/// The record at `key` and its version; `None` when there is none.
fn read_record(tier: &dyn Tier, key: &str) -> TierResult<Option<(Record, Version)>> {
    let (bytes, version) = match tier.get_bytes(key, MAX_RECORD) {
        Ok(found) => found,
        Err(TierError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let record = serde_json::from_slice(&bytes).map_err(|e| TierError::Damaged {
        tier: tier.describe().to_owned(),
        key: key.to_owned(),
        why: format!("not a lease record: {e}"),
    })?;
    Ok(Some((record, version)))
}

/// The highest lease generation among the job's manifest keys (0 when none).
fn highest_manifest_generation(tier: &dyn Tier, job: &str) -> TierResult<u64> {
    Ok(tier
        .list(&layout::snapshots(job))?
        .iter()
        .filter_map(|m| layout::parse_manifest(job, &m.key))
        .map(|(generation, _)| generation)
        .max()
        .unwrap_or(0))
}

/// Tries to take the lease of `job` on `tier` for `me`, promising to renew within `ttl`.
/// `watch` must be kept by the caller across attempts at this job; the generation taken is
/// above `floor` (the highest the caller saw on the job's other tiers). See the
/// [module documentation](self) for the protocol.
pub fn try_acquire(
    tier: &Arc<dyn Tier>,
    job: &str,
    me: &Holder,
    ttl: Duration,
    watch: &mut Watch,
    floor: u64,
) -> TierResult<Acquired> {
    let key = layout::lease(job);
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    let record_for = |generation: u64| Record {
        generation,
        holder: me.clone(),
        ttl_ms,
        renewed_unix_ms: now_unix_ms(),
        renewals: 0,
        released: false,
    };
    let taken = |record: Record, version: Version, sent: Instant| {
        Acquired::Taken(Lease {
            tier: Arc::clone(tier),
            key: key.clone(),
            record,
            version,
            sent,
        })
    };
    // A conditional write that conflicted: someone else's record, or our own write whose
    // reply was lost (the same generation and holder, not released): then it is ours.
    let after_conflict = |record: Record, watch: &mut Watch| match read_record(tier.as_ref(), &key)?
    {
        Some((current, version)) if current == record => Ok(taken(record, version, Instant::now())),
        Some((current, version)) => {
            let seen_for = watch.observe(&version, current.ttl(), Instant::now());
            Ok(Acquired::Held {
                free_in: current.ttl().saturating_sub(seen_for),
                holder: current.holder,
                holder_dead: false,
            })
        }
        // Removed meanwhile: the race goes on; report it as the conflict it was.
        None => Err(TierError::Conflict {
            tier: tier.describe().to_owned(),
            key: key.clone(),
        }),
    };
    let Some((current, version)) = read_record(tier.as_ref(), &key)? else {
        let generation = highest_manifest_generation(tier.as_ref(), job)?.max(floor);
        let record = record_for(generation.saturating_add(1));
        let sent = Instant::now();
        return match tier.create(&key, &record.to_bytes()) {
            Ok(v) => Ok(taken(record, v, sent)),
            Err(TierError::Conflict { .. }) => after_conflict(record, watch),
            Err(e) => Err(e),
        };
    };
    let now = Instant::now();
    let seen_for = watch.observe(&version, current.ttl(), now);
    // How long the holder keeps it still, and whether it is dead; `None`: takeable now.
    let held_for = if current.released {
        None
    } else if current.holder.same_pids_as(me)
        && (current.holder.pid == me.pid || !pid_alive(current.holder.pid))
    {
        let dead_for = watch.observe_dead(&version, now);
        let wait = current.ttl() / 4;
        (current.holder.cache != me.cache && dead_for <= wait).then(|| (wait - dead_for, true))
    } else {
        (seen_for <= current.ttl()).then(|| (current.ttl() - seen_for, false))
    };
    if let Some((free_in, holder_dead)) = held_for {
        return Ok(Acquired::Held {
            free_in,
            holder: current.holder,
            holder_dead,
        });
    }
    let generation = current
        .generation
        .max(highest_manifest_generation(tier.as_ref(), job)?)
        .max(floor)
        .saturating_add(1);
    let record = record_for(generation);
    let sent = Instant::now();
    match tier.replace(&key, &record.to_bytes(), &version) {
        Ok(v) => Ok(taken(record, v, sent)),
        Err(TierError::Conflict { .. }) => after_conflict(record, watch),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::dir::DirTier;
    use std::sync::Barrier;

    const JOB: &str = "heat-1";

    fn new_tier() -> (tempfile::TempDir, Arc<dyn Tier>) {
        let tmp = tempfile::tempdir().unwrap();
        let tier = DirTier::new(tmp.path().join("replica"));
        std::fs::create_dir(tier.root()).unwrap();
        (tmp, Arc::new(tier))
    }

    /// This process as a holder (alive), and another one on another host.
    fn holders() -> (Holder, Holder) {
        let me = Holder::this_process(Path::new("/cache/a"));
        let other = Holder {
            host: "node7".into(),
            pid: 4242,
            boot_id: "another-boot".into(),
            pid_ns: 1,
            since_unix_ms: now_unix_ms(),
            cache: "/cache/b".into(),
        };
        (me, other)
    }

    fn take(a: TierResult<Acquired>) -> Lease {
        match a.unwrap() {
            Acquired::Taken(lease) => lease,
            Acquired::Held {
                holder, free_in, ..
            } => panic!("held by {holder} for {free_in:?}"),
        }
    }

    fn held(a: TierResult<Acquired>) -> (Holder, Duration) {
        match a.unwrap() {
            Acquired::Taken(lease) => panic!("taken: {lease:?}"),
            Acquired::Held {
                holder, free_in, ..
            } => (holder, free_in),
        }
    }

    #[test]
    fn first_acquire_takes_generation_one_or_past_the_manifests() {
        let (_tmp, tier) = new_tier();
        let (me, _) = holders();
        let lease = take(try_acquire(
            &tier,
            JOB,
            &me,
            Duration::from_secs(30),
            &mut Watch::new(),
            0,
        ));
        assert_eq!(lease.generation(), 1);
        assert_eq!(lease.holder(), &me);

        let (_tmp2, tier2) = new_tier();
        tier2
            .put_bytes(&layout::manifest(JOB, 6, 40), b"m")
            .unwrap();
        tier2
            .put_bytes(&layout::manifest(JOB, 2, 90), b"m")
            .unwrap();
        tier2
            .put_bytes(&layout::manifest("heat-10", 9, 1), b"m")
            .unwrap();
        let lease = take(try_acquire(
            &tier2,
            JOB,
            &me,
            Duration::from_secs(30),
            &mut Watch::new(),
            0,
        ));
        assert_eq!(lease.generation(), 7);
    }

    #[test]
    fn held_renewed_expired_and_lost() {
        let (_tmp, tier) = new_tier();
        let (me, other) = holders();
        let ttl = Duration::from_millis(300);
        let mut lease = take(try_acquire(&tier, JOB, &me, ttl, &mut Watch::new(), 0));
        assert_eq!(lease.generation(), 1);
        assert!(lease.renew_due() < lease.deadline());

        // The other sees it held, and a renewal restarts its watch.
        let mut watch = Watch::new();
        let (holder, free_in) = held(try_acquire(&tier, JOB, &other, ttl, &mut watch, 0));
        assert_eq!(holder, me);
        assert_eq!(free_in, ttl);
        let first_takeover = watch.takeover_at().unwrap();
        let before = lease.deadline();
        lease.renew().unwrap();
        assert!(lease.deadline() > before);
        let (_, free_in) = held(try_acquire(&tier, JOB, &other, ttl, &mut watch, 0));
        assert_eq!(free_in, ttl, "a new version is watched afresh");
        assert!(watch.takeover_at().unwrap() > first_takeover);
        // The holder's deadline is before the earliest takeover of what it last wrote.
        assert!(lease.deadline() < watch.takeover_at().unwrap());

        // The holder stops renewing: not taken before the ttl has passed on the taker's clock.
        std::thread::sleep(ttl / 2);
        let (_, free_in) = held(try_acquire(&tier, JOB, &other, ttl, &mut watch, 0));
        assert!(free_in < ttl && free_in > Duration::ZERO, "{free_in:?}");
        let takeover_at = watch.takeover_at().unwrap();
        std::thread::sleep(takeover_at.saturating_duration_since(Instant::now()) + ttl / 10);
        let taken_at = Instant::now();
        let mut theirs = take(try_acquire(&tier, JOB, &other, ttl, &mut watch, 0));
        assert_eq!(theirs.generation(), 2);
        assert!(lease.deadline() < taken_at);

        match lease.renew() {
            Err(LeaseError::Lost { holder: Some(h) }) => assert_eq!(h, other),
            r => panic!("{r:?}"),
        }
        theirs.renew().unwrap();
        assert!(matches!(lease.release(), Err(LeaseError::Lost { .. })));
        assert_eq!(theirs.generation(), 2);
    }

    #[test]
    fn release_lets_the_next_take_it_at_once() {
        let (_tmp, tier) = new_tier();
        let (me, other) = holders();
        let ttl = Duration::from_secs(60);
        let lease = take(try_acquire(&tier, JOB, &me, ttl, &mut Watch::new(), 0));
        held(try_acquire(&tier, JOB, &other, ttl, &mut Watch::new(), 0));
        lease.release().unwrap();
        let theirs = take(try_acquire(&tier, JOB, &other, ttl, &mut Watch::new(), 0));
        assert_eq!(theirs.generation(), 2);
    }

    #[test]
    fn a_dead_holder_on_this_machine_is_gone_at_once() {
        let (_tmp, tier) = new_tier();
        let (me, other) = holders();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = child.id();
        child.wait().unwrap();
        assert!(!pid_alive(dead_pid));
        assert!(pid_alive(std::process::id()));
        let dead = Holder {
            pid: dead_pid,
            ..me.clone()
        };
        let ttl = Duration::from_secs(60);
        let _gone = take(try_acquire(&tier, JOB, &dead, ttl, &mut Watch::new(), 0));
        // Another machine must wait; this one sees the pid is dead.
        held(try_acquire(&tier, JOB, &other, ttl, &mut Watch::new(), 0));
        let lease = take(try_acquire(&tier, JOB, &me, ttl, &mut Watch::new(), 0));
        assert_eq!(lease.generation(), 2);
        // A live holder of this machine is not taken.
        held(try_acquire(&tier, JOB, &dead, ttl, &mut Watch::new(), 0));
    }

    #[test]
    fn racing_acquirers_have_exactly_one_winner() {
        let (_tmp, tier) = new_tier();
        let tier = Arc::new(tier);
        let barrier = Arc::new(Barrier::new(8));
        let (_, other) = holders();
        let handles: Vec<_> = (0..8u32)
            .map(|i| {
                let tier = Arc::clone(&tier);
                let barrier = Arc::clone(&barrier);
                // Eight machines: on one machine, a racer would see the others' made-up
                // pids dead here and take over from them, rightly.
                let me = Holder {
                    host: format!("node{i}"),
                    pid: 1000 + i,
                    ..other.clone()
                };
                std::thread::spawn(move || {
                    barrier.wait();
                    let r = try_acquire(
                        &tier,
                        JOB,
                        &me,
                        Duration::from_secs(60),
                        &mut Watch::new(),
                        0,
                    );
                    match r {
                        Ok(Acquired::Taken(lease)) => Ok(Some(lease.generation())),
                        Ok(Acquired::Held { .. }) => Ok(None),
                        Err(e) => Err(e.to_string()),
                    }
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let taken: Vec<u64> = results
            .iter()
            .filter_map(|r| r.clone().ok().flatten())
            .collect();
        assert_eq!(taken, vec![1], "{results:?}");
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    }

    #[test]
    fn a_damaged_record_is_an_error_and_a_holder_reads_well() {
        let (_tmp, tier) = new_tier();
        let (me, _) = holders();
        tier.put_bytes(&layout::lease(JOB), b"{not json").unwrap();
        let err = try_acquire(
            &tier,
            JOB,
            &me,
            Duration::from_secs(1),
            &mut Watch::new(),
            0,
        )
        .unwrap_err();
        assert!(matches!(err, TierError::Damaged { .. }), "{err}");
        let text = me.to_string();
        assert!(
            text.starts_with(&format!("supervisor pid {} on ", me.pid)),
            "{text}"
        );
        assert!(text.contains("/cache/a"), "{text}");
    }

    /// A tier whose next `replace` lands but whose reply is lost (reported Unavailable), and
    /// whose next `create` lands but is answered as a conflict (what a client's retry of a
    /// create whose reply was lost sees).
    struct LostReply {
        inner: Arc<dyn Tier>,
        lose_next: std::sync::atomic::AtomicBool,
        conflict_next_create: std::sync::atomic::AtomicBool,
    }

    impl Tier for LostReply {
        fn describe(&self) -> &str {
            self.inner.describe()
        }
        fn list(&self, prefix: &str) -> TierResult<Vec<crate::remote::ObjectMeta>> {
            self.inner.list(prefix)
        }
        fn get(&self, key: &str, out: &mut dyn std::io::Write, max: u64) -> TierResult<Version> {
            self.inner.get(key, out, max)
        }
        fn put(&self, key: &str, data: &mut dyn std::io::Read, len: u64) -> TierResult<Version> {
            self.inner.put(key, data, len)
        }
        fn create(&self, key: &str, bytes: &[u8]) -> TierResult<Version> {
            let v = self.inner.create(key, bytes)?;
            if self
                .conflict_next_create
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                return Err(TierError::Conflict {
                    tier: self.describe().to_owned(),
                    key: key.to_owned(),
                });
            }
            Ok(v)
        }
        fn replace(&self, key: &str, bytes: &[u8], version: &Version) -> TierResult<Version> {
            let v = self.inner.replace(key, bytes, version)?;
            if self
                .lose_next
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                return Err(TierError::Unavailable {
                    tier: self.describe().to_owned(),
                    key: key.to_owned(),
                    why: "reply lost".into(),
                });
            }
            Ok(v)
        }
        fn delete(&self, key: &str) -> TierResult<()> {
            self.inner.delete(key)
        }
    }

    #[test]
    fn a_renewal_whose_reply_was_lost_is_adopted_not_lost() {
        let (_tmp, inner) = new_tier();
        let lost = Arc::new(LostReply {
            inner,
            lose_next: false.into(),
            conflict_next_create: false.into(),
        });
        let tier: Arc<dyn Tier> = lost.clone();
        let (me, other) = holders();
        let ttl = Duration::from_secs(60);
        let mut lease = take(try_acquire(&tier, JOB, &me, ttl, &mut Watch::new(), 0));
        let deadline = lease.deadline();
        lost.lose_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(matches!(lease.renew(), Err(LeaseError::Unreachable(_))));
        assert_eq!(
            lease.deadline(),
            deadline,
            "an unconfirmed renewal moves nothing"
        );
        lease.renew().unwrap();
        assert!(lease.deadline() > deadline);
        assert_eq!(lease.generation(), 1);
        // And the record is what the holder last wrote: another taker sees it held.
        held(try_acquire(&tier, JOB, &other, ttl, &mut Watch::new(), 0));
        lease.release().unwrap();
    }

    #[test]
    fn a_create_whose_reply_was_lost_is_ours_not_held_by_ourselves() {
        let (_tmp, inner) = new_tier();
        let lost = Arc::new(LostReply {
            inner,
            lose_next: false.into(),
            conflict_next_create: true.into(),
        });
        let tier: Arc<dyn Tier> = lost.clone();
        let (me, other) = holders();
        let ttl = Duration::from_secs(60);
        let mut lease = take(try_acquire(&tier, JOB, &me, ttl, &mut Watch::new(), 0));
        assert_eq!(lease.generation(), 1);
        lease.renew().unwrap();
        held(try_acquire(&tier, JOB, &other, ttl, &mut Watch::new(), 0));
    }

    #[test]
    fn a_dead_holder_with_another_cache_is_waited_for() {
        let (_tmp, tier) = new_tier();
        let (me, _) = holders();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = child.id();
        child.wait().unwrap();
        let dead = Holder {
            pid: dead_pid,
            cache: "/cache/elsewhere".into(),
            ..me.clone()
        };
        let ttl = Duration::from_secs(60);
        let _gone = take(try_acquire(&tier, JOB, &dead, ttl, &mut Watch::new(), 0));
        // Its program may run on in its own cache, which no local lock of ours covers, for
        // at most a fifth of the ttl: a quarter of it is waited out.
        let mut watch = Watch::new();
        let (holder, free_in) = held(try_acquire(&tier, JOB, &me, ttl, &mut watch, 0));
        assert_eq!(holder, dead);
        assert_eq!(free_in, ttl / 4);
        let ttl = Duration::from_millis(400);
        let (_tmp, tier) = new_tier();
        let _gone = take(try_acquire(&tier, JOB, &dead, ttl, &mut Watch::new(), 0));
        let mut watch = Watch::new();
        held(try_acquire(&tier, JOB, &me, ttl, &mut watch, 0));
        std::thread::sleep(ttl / 4 + Duration::from_millis(20));
        let lease = take(try_acquire(&tier, JOB, &me, ttl, &mut watch, 0));
        assert_eq!(lease.generation(), 2);
    }

    #[test]
    fn the_generation_taken_is_above_the_floor_from_other_tiers() {
        let (_tmp, tier) = new_tier();
        let (me, other) = holders();
        let ttl = Duration::from_secs(60);
        let lease = take(try_acquire(&tier, JOB, &me, ttl, &mut Watch::new(), 41));
        assert_eq!(lease.generation(), 42);
        lease.release().unwrap();
        let theirs = take(try_acquire(&tier, JOB, &other, ttl, &mut Watch::new(), 50));
        assert_eq!(theirs.generation(), 51);
    }
}
