//! The job's durable tiers while it runs: the lease (taken before the program starts, renewed
//! by a keeper thread), the fresh-node fetch, the background uploads and their reports, and
//! the flush of the final snapshot when the job stops.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use supervise_store::JobStore;

use crate::event::JobEvent;
use crate::log::Log;
use crate::remote::fetch::{self, Trouble};
use crate::remote::lease::{self, Acquired, Holder, Lease, LeaseError};
use crate::remote::upload::{Fence, Report, UploadConfig, Uploads};
use crate::remote::{Tier, TierError, layout};
use crate::signals::Signals;
use supervise_store::clock::millis;

/// The durable tiers of a job (`--store s3://...`, `--store DIR --store DIR2`).
#[derive(Clone)]
pub struct DurableConfig {
    /// The tiers; the lease lives on the first.
    pub tiers: Vec<Arc<dyn Tier>>,
    /// The lease's time-to-live (`--lease-ttl`).
    pub lease_ttl: Duration,
}

impl std::fmt::Debug for DurableConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tiers: Vec<&str> = self.tiers.iter().map(|t| t.describe()).collect();
        f.debug_struct("DurableConfig")
            .field("tiers", &tiers)
            .field("lease_ttl", &self.lease_ttl)
            .finish()
    }
}

/// The name of the file in the local job directory that tells under which lease generation
/// its newest snapshots were taken (what a fetch compares the tiers' generations with).
const GENERATION_FILE: &str = "lease-generation";

/// What the keeper thread knows of the lease.
struct KeeperState {
    /// The program must be stopped by then.
    deadline: Instant,
    /// Why the lease is gone, once it is.
    lost: Option<String>,
    /// The last renewal error, while renewals fail.
    trouble: Option<String>,
}

/// The lease keeper thread and what it knows; dropping it stops the thread and releases the
/// lease (unless it was lost).
struct Keeper {
    state: Arc<Mutex<KeeperState>>,
    fence: Fence,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Option<Lease>>>,
}

impl Keeper {
    /// Starts renewing `lease` in a thread.
    fn start(lease: Lease) -> Result<Self> {
        let state = Arc::new(Mutex::new(KeeperState {
            deadline: lease.deadline(),
            lost: None,
            trouble: None,
        }));
        let fence = Fence::until(lease.deadline());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, fence, stop) = (Arc::clone(&state), fence.clone(), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("supervise-lease".into())
                .spawn(move || keep_lease(lease, &state, &fence, &stop))
                .context("cannot start the lease keeper")?
        };
        Ok(Self {
            state,
            fence,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Keeper {
    /// Stops the keeper and lets the lease go (the next owner need not wait for it to expire);
    /// a lease already lost is left alone.
    fn drop(&mut self) {
        self.fence.set(None);
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take()
            && let Ok(Some(lease)) = thread.join()
        {
            let _ = lease.release();
        }
    }
}

/// How long the upload threads get to finish what they are doing when the job ends, before
/// the lease is released anyway (a manifest sent later carries the old generation, which a
/// restore never prefers).
const UPLOADS_STOP_WITHIN: Duration = Duration::from_secs(3);

/// The tiers of a running job.
pub(super) struct Durable {
    tiers: Vec<Arc<dyn Tier>>,
    /// The job's name.
    job: String,
    ttl: Duration,
    /// Dropped (stopped) before the keeper releases the lease.
    uploads: Option<Uploads>,
    keeper: Keeper,
    /// The newest snapshot known to be on each tier.
    safe: RefCell<BTreeMap<String, u64>>,
}

/// How the lease stands, as the watcher needs it.
pub(super) enum LeaseState {
    /// Held, renewed in time.
    Held,
    /// Gone or about to expire: stop the program now, and have it ended by `deadline`.
    Stop {
        /// Why.
        why: String,
        /// When the lease may expire.
        deadline: Instant,
    },
}

impl Durable {
    /// Takes the lease (waiting for it with `wait`), brings in a newer snapshot from the
    /// tiers, and starts the uploads and the lease keeper. `Ok(Err(code))`: the supervisor
    /// must exit with that code (the job is held elsewhere, or a stop came while waiting).
    pub(super) fn start(
        cfg: &DurableConfig,
        job: &JobStore,
        fresh: bool,
        wait: bool,
        keep: usize,
        signals: &Signals,
        log: &Log,
    ) -> Result<std::result::Result<Self, i32>> {
        let lease_tier = Arc::clone(&cfg.tiers[0]);
        let me = Holder::this_process(job.dir());
        // The generation taken must be above every one on any tier, not only the lease's: a
        // tier added later, or one that lost objects, must not make older snapshots elsewhere
        // look newer than this run's.
        let mut floor = 0;
        for tier in &cfg.tiers[1..] {
            match highest_generation(tier.as_ref(), job.name()) {
                Ok(g) => floor = floor.max(g),
                Err(e) => log.emit(&JobEvent::TierTrouble {
                    tier: tier.describe().to_owned(),
                    seq: None,
                    why: format!("cannot list its snapshots: {e}"),
                }),
            }
        }
        let mut watch = lease::Watch::new();
        let mut said_waiting = false;
        let lease = loop {
            let acquired = lease::try_acquire(
                &lease_tier,
                job.name(),
                &me,
                cfg.lease_ttl,
                &mut watch,
                floor,
            );
            match acquired {
                Ok(Acquired::Taken(lease)) => break lease,
                Ok(Acquired::Held {
                    holder,
                    free_in,
                    holder_dead,
                }) => {
                    let holder = if holder_dead {
                        format!(
                            "{holder}, which died; its program may run out its grace (lease on \
                             {}; free in {})",
                            lease_tier.describe(),
                            crate::human::duration(free_in)
                        )
                    } else {
                        format!(
                            "{holder} (lease on {}; free in {} at most unless renewed)",
                            lease_tier.describe(),
                            crate::human::duration(free_in)
                        )
                    };
                    // A dead holder of this machine: only its program's grace is left (a
                    // quarter of the ttl at most), which is worth waiting for.
                    if !wait && !holder_dead {
                        log.emit(&JobEvent::Held {
                            holder,
                            waiting: false,
                        });
                        return Ok(Err(supervise_store::exit::HELD));
                    }
                    if !said_waiting {
                        log.emit(&JobEvent::Held {
                            holder,
                            waiting: true,
                        });
                        said_waiting = true;
                    }
                }
                Err(e) if e.is_transient() => log.emit(&JobEvent::TierTrouble {
                    tier: lease_tier.describe().to_owned(),
                    seq: None,
                    why: format!("cannot take the job's lease yet: {e}"),
                }),
                Err(e) => {
                    let key = crate::remote::layout::lease(job.name());
                    let sealed = matches!(e, TierError::Damaged { .. })
                        && lease_tier
                            .get_bytes(&key, crate::remote::lease::MAX_RECORD)
                            .is_ok_and(|(b, _)| crate::remote::seal::looks_sealed(&b));
                    if sealed {
                        anyhow::bail!(
                            "{}: the job's objects there are sealed: give the key they were \
                             sealed with (--encrypt-key)",
                            lease_tier.describe()
                        );
                    }
                    return Err(anyhow::Error::new(e).context("cannot take the job's lease"));
                }
            }
            let pause =
                (cfg.lease_ttl / 6).clamp(Duration::from_millis(100), Duration::from_secs(5));
            if let Some(sig) = super::sleep_unless_stopped(signals, pause) {
                return Ok(Err(supervise_store::exit::stopped_by(sig)));
            }
        };
        log.emit(&JobEvent::LeaseTaken {
            tier: lease_tier.describe().to_owned(),
            generation: lease.generation(),
            ttl_ms: millis(cfg.lease_ttl),
        });
        let generation = lease.generation();
        // Renewed from now on, also while a large snapshot is fetched; an error below drops
        // the keeper, which releases the lease (the next owner need not wait it out).
        let keeper = Keeper::start(lease)?;
        bring_in_newer(&cfg.tiers, job, fresh, generation, log)?;
        let uploads = Uploads::start(
            &cfg.tiers,
            &UploadConfig {
                job: job.clone(),
                generation,
                keep,
                fence: keeper.fence.clone(),
            },
        )
        .context("cannot start the upload threads")?;
        Ok(Ok(Self {
            tiers: cfg.tiers.clone(),
            job: job.name().to_owned(),
            ttl: cfg.lease_ttl,
            uploads: Some(uploads),
            keeper,
            safe: RefCell::new(BTreeMap::new()),
        }))
    }

    /// The tier the lease lives on.
    pub(super) fn lease_tier(&self) -> &str {
        self.tiers[0].describe()
    }

    /// A new local snapshot exists: the uploads take it.
    pub(super) fn nudge(&self) {
        if let Some(uploads) = &self.uploads {
            uploads.nudge();
        }
    }

    /// Tells what the uploads reported since the last call.
    pub(super) fn report(&self, log: &Log) {
        let Some(uploads) = &self.uploads else { return };
        for report in uploads.reports() {
            self.tell(report, log);
        }
    }

    fn tell(&self, report: Report, log: &Log) {
        match report {
            Report::Safe {
                tier,
                seq,
                bytes_sent,
                duration,
            } => {
                self.safe.borrow_mut().insert(tier.clone(), seq);
                log.emit(&JobEvent::SafeOffNode {
                    seq,
                    tier,
                    bytes_sent,
                    duration_ms: millis(duration),
                });
            }
            Report::Failed {
                tier,
                seq,
                error,
                retry_in,
            } => log.emit(&JobEvent::UploadFailed {
                seq,
                tier,
                error,
                retry_in_ms: millis(retry_in),
            }),
            Report::PruneFailed { tier, error } => log.emit(&JobEvent::TierTrouble {
                tier,
                seq: None,
                why: format!("cannot remove old snapshots there (tried again later): {error}"),
            }),
        }
    }

    /// The newest snapshot that is on every tier.
    pub(super) fn safe_everywhere(&self) -> Option<u64> {
        let safe = self.safe.borrow();
        if safe.len() < self.tiers.len() {
            return None;
        }
        safe.values().min().copied()
    }

    /// How the lease stands: the program must be stopped when the lease is lost or has less
    /// than a quarter of its time-to-live left (renewals, due every sixth, failed for a while).
    pub(super) fn lease_state(&self) -> LeaseState {
        let Ok(keeper) = self.keeper.state.lock() else {
            return LeaseState::Stop {
                why: "the lease keeper failed".into(),
                deadline: Instant::now(),
            };
        };
        if let Some(why) = &keeper.lost {
            return LeaseState::Stop {
                why: why.clone(),
                deadline: keeper.deadline,
            };
        }
        let left = keeper.deadline.saturating_duration_since(Instant::now());
        if left < self.ttl / 4 {
            let why = keeper
                .trouble
                .clone()
                .unwrap_or_else(|| "no renewal".into());
            return LeaseState::Stop {
                why: format!(
                    "it could not be renewed ({why}) and expires in {}",
                    crate::human::duration(left)
                ),
                deadline: keeper.deadline,
            };
        }
        LeaseState::Held
    }

    /// Waits until snapshot `seq` (or a newer one) is on every tier, or until `deadline`.
    /// True when it made it.
    pub(super) fn flush(&self, seq: u64, deadline: Instant, log: &Log) -> bool {
        let Some(uploads) = &self.uploads else {
            return false;
        };
        uploads.nudge();
        loop {
            self.report(log);
            if self.safe_everywhere().is_some_and(|safe| safe >= seq) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            if let Some(report) = uploads.wait(left.min(Duration::from_millis(200))) {
                self.tell(report, log);
            }
        }
    }

    /// `--on-success delete` on the durable tiers: stops the uploads, then removes the job's
    /// manifests (first, so no reader ever sees one naming a missing pack) and packs from
    /// every tier, while the lease is held. Failures are told (`tier-trouble`) and what they
    /// spared is left. Returns the objects removed and their bytes.
    pub(super) fn delete_everywhere(&mut self, log: &Log) -> (u64, u64) {
        if let Some(uploads) = self.uploads.take() {
            uploads.stop(UPLOADS_STOP_WITHIN);
        }
        let (mut removed, mut bytes) = (0, 0);
        for tier in &self.tiers {
            let job = self.job.as_str();
            for prefix in [layout::snapshots(job), layout::packs(job)] {
                let listed = match tier.list(&prefix) {
                    Ok(listed) => listed,
                    Err(e) => {
                        log.emit(&JobEvent::TierTrouble {
                            tier: tier.describe().to_owned(),
                            seq: None,
                            why: format!("--on-success delete: cannot list {prefix}: {e}"),
                        });
                        break;
                    }
                };
                for object in listed {
                    if !self.keeper.fence.open() {
                        log.emit(&JobEvent::TierTrouble {
                            tier: tier.describe().to_owned(),
                            seq: None,
                            why: "--on-success delete: the lease is no longer held; the \
                                  rest is left"
                                .into(),
                        });
                        return (removed, bytes);
                    }
                    match tier.delete(&object.key) {
                        Ok(()) => {
                            removed += 1;
                            bytes += object.size;
                        }
                        Err(e) => log.emit(&JobEvent::TierTrouble {
                            tier: tier.describe().to_owned(),
                            seq: None,
                            why: format!("--on-success delete: {e}"),
                        }),
                    }
                }
            }
        }
        (removed, bytes)
    }

    /// Tiers that do not hold snapshot `seq` yet, for messages.
    pub(super) fn lagging(&self, seq: u64) -> Vec<String> {
        let safe = self.safe.borrow();
        self.tiers
            .iter()
            .map(|t| t.describe().to_owned())
            .filter(|t| safe.get(t).is_none_or(|&s| s < seq))
            .collect()
    }
}

impl Drop for Durable {
    /// Closes the fence (nothing more is published or pruned), gives the upload threads a
    /// moment to finish what they are doing, then the keeper releases the lease.
    fn drop(&mut self) {
        self.keeper.fence.set(None);
        if let Some(uploads) = self.uploads.take() {
            uploads.stop(UPLOADS_STOP_WITHIN);
        }
    }
}

/// The keeper thread: renews the lease every sixth of its time-to-live (a failed renewal is
/// tried again after a short pause), moves the fence with each renewal, and closes it when
/// the lease is lost or its deadline passes. Returns the lease when asked to stop (to be
/// released), `None` when it was lost.
fn keep_lease(
    mut lease: Lease,
    state: &Mutex<KeeperState>,
    fence: &Fence,
    stop: &AtomicBool,
) -> Option<Lease> {
    let pause = (lease.ttl() / 20).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut failed_at: Option<Instant> = None;
    loop {
        let due = match failed_at {
            Some(at) => at + pause,
            None => lease.renew_due(),
        };
        while Instant::now() < due {
            if stop.load(Ordering::Relaxed) {
                return Some(lease);
            }
            std::thread::sleep(Duration::from_millis(50).min(due - Instant::now()));
        }
        if stop.load(Ordering::Relaxed) {
            return Some(lease);
        }
        let result = lease.renew();
        let Ok(mut s) = state.lock() else {
            fence.set(None);
            return None;
        };
        match result {
            Ok(()) => {
                failed_at = None;
                s.deadline = lease.deadline();
                s.trouble = None;
                fence.set(Some(lease.deadline()));
            }
            Err(LeaseError::Lost { holder }) => {
                s.lost = Some(match holder {
                    Some(holder) => format!("{holder} took it over"),
                    None => "its record was removed or replaced".into(),
                });
                fence.set(None);
                return None;
            }
            Err(e) => {
                failed_at = Some(Instant::now());
                s.trouble = Some(e.to_string());
                if Instant::now() >= lease.deadline() {
                    s.lost = Some(format!("it could not be renewed in time ({e})"));
                    fence.set(None);
                    return None;
                }
            }
        }
    }
}

/// Brings the newest durable snapshot into the local store when it is newer (unless `fresh`),
/// then records that the local store works under `generation` from now on.
fn bring_in_newer(
    tiers: &[Arc<dyn Tier>],
    job: &JobStore,
    fresh: bool,
    generation: u64,
    log: &Log,
) -> Result<()> {
    if !fresh {
        let mut trouble = Vec::new();
        let fetched = fetch::fetch_newer(tiers, job, local_generation(job), &mut trouble);
        for Trouble { tier, seq, why } in trouble {
            log.emit(&JobEvent::TierTrouble { tier, seq, why });
        }
        let fetched =
            fetched.context("cannot bring the newest durable snapshot into the local store")?;
        if let Some(f) = fetched {
            log.emit(&JobEvent::Fetched {
                seq: f.seq,
                generation: f.generation,
                tier: f.tier,
                bytes: f.bytes,
                packs: f.packs as u64,
                duration_ms: millis(f.duration),
            });
        }
    }
    job.job_dir()
        .write_atomic(GENERATION_FILE, format!("{generation}\n").as_bytes())
        .context("cannot record the lease generation in the local store")
}

/// The highest lease generation among the job's manifests on `tier` (0: none).
fn highest_generation(tier: &dyn Tier, job: &str) -> Result<u64, TierError> {
    Ok(tier
        .list(&crate::remote::layout::snapshots(job))?
        .iter()
        .filter_map(|m| crate::remote::layout::parse_manifest(job, &m.key))
        .map(|(generation, _)| generation)
        .max()
        .unwrap_or(0))
}

/// The lease generation the local job's snapshots were taken under (0: none recorded).
fn local_generation(job: &JobStore) -> u64 {
    let Ok(file) = job.job_dir().open_read(GENERATION_FILE) else {
        return 0;
    };
    let mut text = String::new();
    use std::io::Read;
    let _ = file.take(64).read_to_string(&mut text);
    text.trim().parse().unwrap_or(0)
}
