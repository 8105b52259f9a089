//! Copying committed snapshots to the durable tiers, in the background.
//!
//! One thread per tier, so a tier that is missing, full, read-only or slow never holds up the
//! others. Each thread brings its tier up to the newest committed local snapshot: it sends the
//! packs the tier does not hold yet (the pack names are unique, so a name present is the same
//! bytes), then publishes the manifest under the lease generation, then applies retention on
//! the tier. A superseded snapshot is never sent: after an outage only the newest one goes.
//! Failures are reported and retried with a growing delay (1 s to 30 s); a new local snapshot
//! retries at once. The program never waits for any of this.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use supervise_store::JobStore;
use supervise_store::format::{MAX_MANIFEST_LEN, Manifest};

use super::{Tier, TierError, layout};
use supervise_store::clock::now_unix_ms;

/// What a tier thread tells the supervisor.
#[derive(Debug)]
pub enum Report {
    /// Snapshot `seq` is on the tier: its manifest is published and names nothing missing.
    Safe {
        /// The tier, as the user named it.
        tier: String,
        /// The snapshot.
        seq: u64,
        /// Bytes sent for it (new packs and the manifest).
        bytes_sent: u64,
        /// From the start of its upload to the manifest's publication.
        duration: Duration,
    },
    /// Bringing the tier up to date failed; it is retried after `retry_in`.
    Failed {
        /// The tier.
        tier: String,
        /// The snapshot being sent.
        seq: u64,
        /// Why.
        error: String,
        /// When the next attempt is made (sooner if a new snapshot arrives).
        retry_in: Duration,
    },
    /// Retention on the tier failed after a snapshot was safe there; tried again after the
    /// next snapshot. Nothing is lost by it but space.
    PruneFailed {
        /// The tier.
        tier: String,
        /// Why.
        error: String,
    },
}

/// Until when the lease lets this supervisor publish (`None`: it may not). Shared between
/// the lease keeper, which moves it forward on each renewal, and the tier threads, which check
/// it before each manifest: a supervisor whose lease may have expired publishes nothing.
#[derive(Clone, Debug, Default)]
pub struct Fence(Arc<Mutex<Option<Instant>>>);

impl Fence {
    /// A fence open until `until`.
    pub fn until(until: Instant) -> Self {
        Self(Arc::new(Mutex::new(Some(until))))
    }

    /// Moves the fence to `until` (`None`: closed for good).
    pub fn set(&self, until: Option<Instant>) {
        if let Ok(mut guard) = self.0.lock() {
            *guard = until;
        }
    }

    /// True while publishing is allowed.
    pub fn open(&self) -> bool {
        self.0
            .lock()
            .ok()
            .and_then(|guard| *guard)
            .is_some_and(|until| Instant::now() < until)
    }
}

/// What every tier thread needs.
#[derive(Clone)]
pub struct UploadConfig {
    /// The local job (the cache tier) to copy from.
    pub job: JobStore,
    /// The lease generation the manifests are published under.
    pub generation: u64,
    /// Manifests to keep on each tier (`--keep`).
    pub keep: usize,
    /// Checked before each manifest is published.
    pub fence: Fence,
}

/// The tier threads.
pub struct Uploads {
    workers: Vec<(Sender<()>, JoinHandle<()>)>,
    reports: Receiver<Report>,
}

impl Uploads {
    /// Starts one thread per tier; each catches up with the local store at once.
    pub fn start(tiers: &[Arc<dyn Tier>], cfg: &UploadConfig) -> std::io::Result<Self> {
        let (report_tx, reports) = mpsc::channel();
        let mut workers = Vec::new();
        for tier in tiers {
            let (tx, rx) = mpsc::channel();
            let mut worker = Worker::new(Arc::clone(tier), cfg.clone(), report_tx.clone());
            let thread = std::thread::Builder::new()
                .name("supervise-upload".into())
                .spawn(move || worker.run(&rx))?;
            workers.push((tx, thread));
        }
        Ok(Self { workers, reports })
    }

    /// Tells every tier thread that a new local snapshot exists (and to retry at once).
    pub fn nudge(&self) {
        for (tx, _) in &self.workers {
            let _ = tx.send(());
        }
    }

    /// The reports that arrived so far.
    pub fn reports(&self) -> Vec<Report> {
        self.reports.try_iter().collect()
    }

    /// Waits up to `timeout` for the next report.
    pub fn wait(&self, timeout: Duration) -> Option<Report> {
        self.reports.recv_timeout(timeout).ok()
    }

    /// Tells every tier thread to end after what it is doing, and waits up to `within` for
    /// them (a thread stuck on a slow tier is left to end with the process).
    pub fn stop(mut self, within: Duration) {
        let deadline = Instant::now() + within;
        let threads: Vec<JoinHandle<()>> = std::mem::take(&mut self.workers)
            .into_iter()
            .map(|(_, thread)| thread)
            .collect();
        while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Uploads {
    fn drop(&mut self) {
        // Closing the channels ends each thread after its current operation; a thread stuck
        // on a slow tier is left to end with the process.
        self.workers.clear();
    }
}

/// How long an unreferenced pack must have been on a tier before a holder removes it: an
/// upload that died half-way (ours or an earlier holder's) left it.
const ORPHAN_AGE: Duration = Duration::from_secs(3600);

/// How long a tier's listing is trusted: objects removed behind the supervisor's back (by
/// hand, a lifecycle rule, a replica restored from an old copy) are noticed and sent again
/// at the first snapshot after this.
const RELIST_EVERY: Duration = Duration::from_secs(600);

/// The first retry delay and its bound.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// One tier's thread and what it knows of the tier.
struct Worker {
    tier: Arc<dyn Tier>,
    cfg: UploadConfig,
    reports: Sender<Report>,
    /// The packs on the tier and when each was written (ms), once listed, and when listed.
    packs: Option<HashMap<String, u64>>,
    listed_at: Option<Instant>,
    /// The manifests on the tier by (generation, seq), with the packs each names once read.
    manifests: BTreeMap<(u64, u64), Option<Vec<String>>>,
    /// Packs this thread sent (removable at once when unreferenced).
    sent: HashSet<String>,
    /// The newest snapshot known to be on the tier.
    safe: Option<u64>,
}

impl Worker {
    fn new(tier: Arc<dyn Tier>, cfg: UploadConfig, reports: Sender<Report>) -> Self {
        Self {
            tier,
            cfg,
            reports,
            packs: None,
            listed_at: None,
            manifests: BTreeMap::new(),
            sent: HashSet::new(),
            safe: None,
        }
    }

    fn run(&mut self, nudges: &Receiver<()>) {
        let mut retry: Option<(Instant, Duration)> = None;
        let mut pending = true;
        loop {
            let wait = match retry {
                Some((at, _)) if pending => at.saturating_duration_since(Instant::now()),
                _ if pending => Duration::ZERO,
                _ => Duration::from_secs(3600),
            };
            match nudges.recv_timeout(wait) {
                Ok(()) => {
                    pending = true;
                    retry = retry.map(|(_, delay)| (Instant::now(), delay));
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            while nudges.try_recv().is_ok() {}
            if !pending || retry.is_some_and(|(at, _)| Instant::now() < at) {
                continue;
            }
            match self.catch_up() {
                Ok(()) => {
                    pending = false;
                    retry = None;
                }
                Err((seq, error)) => {
                    let delay = retry.map_or(RETRY_FIRST, |(_, d)| (d * 2).min(RETRY_MAX));
                    retry = Some((Instant::now() + delay, delay));
                    // Listings may be stale after a failure: read the tier afresh next time.
                    self.packs = None;
                    let _ = self.reports.send(Report::Failed {
                        tier: self.tier.describe().to_owned(),
                        seq,
                        error,
                        retry_in: delay,
                    });
                }
            }
        }
    }

    /// Sends the newest local snapshot if the tier lacks it. `Err((seq, why))` on failure.
    fn catch_up(&mut self) -> Result<(), (u64, String)> {
        // Retention may remove the newest snapshot while we read it: look again, a few times.
        for _ in 0..5 {
            let newest = self
                .cfg
                .job
                .snapshot_seqs()
                .map_err(|e| (0, format!("cannot list the local snapshots: {e}")))?
                .last()
                .copied();
            let Some(seq) = newest else { return Ok(()) };
            if self.safe.is_some_and(|safe| safe >= seq) {
                return Ok(());
            }
            match self.send(seq) {
                Ok(Some(sent)) => {
                    self.safe = Some(seq);
                    let _ = self.reports.send(sent);
                    if let Err(error) = self.prune() {
                        // Listings may be stale after a failure: read the tier afresh next time.
                        self.packs = None;
                        let _ = self.reports.send(Report::PruneFailed {
                            tier: self.tier.describe().to_owned(),
                            error,
                        });
                    }
                }
                Ok(None) => continue,
                Err(e) => return Err((seq, e)),
            }
        }
        Ok(())
    }

    /// Lists the tier's packs and manifests (once, again after a failure, and again when
    /// the listing is older than [`RELIST_EVERY`]).
    fn list(&mut self) -> Result<(), String> {
        if self.packs.is_some() && self.listed_at.is_some_and(|at| at.elapsed() < RELIST_EVERY) {
            return Ok(());
        }
        let listed_at = Instant::now();
        let job = self.cfg.job.name().to_owned();
        let mut packs = HashMap::new();
        for object in self.tier.list(&layout::packs(&job)).map_err(tier_err)? {
            if let Some(name) = layout::parse_pack(&job, &object.key) {
                packs.insert(name.to_owned(), object.modified_unix_ms);
            }
        }
        let mut manifests = BTreeMap::new();
        for object in self.tier.list(&layout::snapshots(&job)).map_err(tier_err)? {
            if let Some(at) = layout::parse_manifest(&job, &object.key) {
                let known = self.manifests.remove(&at).flatten();
                manifests.insert(at, known);
            }
        }
        self.packs = Some(packs);
        self.listed_at = Some(listed_at);
        self.manifests = manifests;
        Ok(())
    }

    /// Sends snapshot `seq`: its missing packs, then its manifest. `Ok(None)`: it is gone
    /// locally (retention) before it could be read whole.
    fn send(&mut self, seq: u64) -> Result<Option<Report>, String> {
        let started = Instant::now();
        self.list()?;
        let job = &self.cfg.job;
        let (bytes, manifest) = match job.manifest_file(seq) {
            Ok(read) => read,
            Err(supervise_store::Error::NoSuchSnapshot { .. }) => return Ok(None),
            Err(e) => return Err(format!("cannot read local snapshot {seq}: {e}")),
        };
        let known = self
            .packs
            .as_ref()
            .map(|p| p.keys().cloned().collect::<HashSet<_>>());
        let known = known.unwrap_or_default();
        // Open every missing pack first: once open, local retention cannot take it away.
        let mut files = Vec::new();
        for name in manifest.packs.iter().filter(|name| !known.contains(*name)) {
            match job.open_pack_file(name) {
                Ok(file) => files.push((name.clone(), file)),
                Err(_) if !job.snapshot_seqs().is_ok_and(|s| s.contains(&seq)) => {
                    return Ok(None);
                }
                Err(e) => return Err(format!("cannot open local pack {name}: {e}")),
            }
        }
        let mut bytes_sent = 0;
        for (name, mut file) in files {
            let len = file
                .metadata()
                .map_err(|e| format!("cannot stat local pack {name}: {e}"))?
                .len();
            let key = layout::pack(job.name(), &name);
            self.tier.put(&key, &mut file, len).map_err(tier_err)?;
            bytes_sent += len;
            self.sent.insert(name.clone());
            if let Some(packs) = self.packs.as_mut() {
                packs.insert(name, now_unix_ms());
            }
        }
        if !self.cfg.fence.open() {
            return Err(
                "the lease is not held (lost, or not renewed in time): nothing is \
                        published"
                    .into(),
            );
        }
        let key = layout::manifest(job.name(), self.cfg.generation, seq);
        self.tier.put_bytes(&key, &bytes).map_err(tier_err)?;
        bytes_sent += bytes.len() as u64;
        self.manifests
            .insert((self.cfg.generation, seq), Some(manifest.packs.clone()));
        Ok(Some(Report::Safe {
            tier: self.tier.describe().to_owned(),
            seq,
            bytes_sent,
            duration: started.elapsed(),
        }))
    }

    /// Retention on the tier: keeps the newest `keep` manifests (by generation, then seq),
    /// removes the older ones, then the packs no kept manifest names that this thread sent
    /// or that are older than [`ORPHAN_AGE`]. If a kept manifest cannot be read, no pack is
    /// removed.
    fn prune(&mut self) -> Result<(), String> {
        // A supervisor whose lease may have expired removes nothing: the tier may be another
        // holder's by now.
        if !self.cfg.fence.open() {
            return Ok(());
        }
        let job = self.cfg.job.name().to_owned();
        let keep = self.cfg.keep.max(1);
        let old: Vec<(u64, u64)> = self.manifests.keys().rev().skip(keep).copied().collect();
        for (generation, seq) in old {
            self.tier
                .delete(&layout::manifest(&job, generation, seq))
                .map_err(tier_err)?;
            self.manifests.remove(&(generation, seq));
        }
        let mut referenced = HashSet::new();
        let kept: Vec<(u64, u64)> = self.manifests.keys().copied().collect();
        for at in kept {
            let packs = match self.manifests.get(&at).cloned().flatten() {
                Some(packs) => packs,
                None => {
                    let key = layout::manifest(&job, at.0, at.1);
                    let (bytes, _) = match self.tier.get_bytes(&key, MAX_MANIFEST_LEN) {
                        Ok(read) => read,
                        // Removed meanwhile: by retention of a holder before us.
                        Err(TierError::NotFound { .. }) => continue,
                        Err(e) => return Err(tier_err(e)),
                    };
                    let packs = match Manifest::decode(&bytes, Path::new(&key)) {
                        Ok(m) => m.packs,
                        // A damaged manifest on the tier: its packs' fate is unknown.
                        Err(_) => return Ok(()),
                    };
                    self.manifests.insert(at, Some(packs.clone()));
                    packs
                }
            };
            referenced.extend(packs);
        }
        let now = now_unix_ms();
        let orphan_ms = ORPHAN_AGE.as_millis() as u64;
        let Some(packs) = self.packs.as_mut() else {
            return Ok(());
        };
        let dead: Vec<String> = packs
            .iter()
            .filter(|(name, written)| {
                !referenced.contains(*name)
                    && (self.sent.contains(*name) || now.saturating_sub(**written) > orphan_ms)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in dead {
            if !self.cfg.fence.open() {
                return Ok(());
            }
            self.tier
                .delete(&layout::pack(&job, &name))
                .map_err(tier_err)?;
            packs.remove(&name);
            self.sent.remove(&name);
        }
        Ok(())
    }
}

fn tier_err(e: TierError) -> String {
    e.to_string()
}
