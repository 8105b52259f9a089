//! The scrub: the writer thread re-reads and verifies every chunk record the committed
//! snapshots use, a little at a time between snapshots, so that a record that rotted on disk is
//! found within one scrub period and never lends its chunk to a new snapshot.
//!
//! Pace: a pass reads each distinct record the snapshots reference once; its bytes are spread
//! over the period (default a day), and after each slice the thread rests at least 19 times as
//! long as the slice took, so the scrub never takes more than 5% of one core or of the time the
//! disk spends on this job. A pass that cannot finish within the period at that rate simply
//! runs at the 5% rate; the next pass starts a period after the last one started, or at once.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::format::{ChunkRef, Hash, RecordHeader};
use crate::pack_scan::RecordReader;
use crate::store::JobStore;

/// Default time within which every stored byte is re-read.
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(24 * 3600);

/// Most of one core (and of the disk's time) the scrub takes: it rests 19 times as long as it
/// works.
const REST_PER_WORK: u32 = 19;

/// Bytes verified per slice at most (a slice ends after the record that crosses it).
const SLICE_BYTES: u64 = 4 << 20;

/// One stored record the committed snapshots reference.
#[derive(Clone, Debug)]
struct Target {
    pack: String,
    offset: u64,
    hash: Hash,
    stored_len: u32,
    raw_len: u32,
    /// The snapshots that reference it.
    snapshots: Vec<u64>,
}

/// A damaged record the scrub found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// The pack holding it.
    pub pack: String,
    /// Offset of the record in the pack.
    pub offset: u64,
    /// The chunk's hash.
    pub hash: Hash,
    /// What is wrong.
    pub why: String,
    /// The snapshots that use the record (none of them restores any more).
    pub snapshots: Vec<u64>,
}

/// The scrub's progress through the store.
pub struct Scrubber {
    period: Duration,
    queue: Vec<Target>,
    pass_started: Option<Instant>,
    /// Bytes per second that finish a pass within the period.
    rate: f64,
    next_at: Instant,
    records: Option<RecordReader>,
    raw: Vec<u8>,
    /// Records verified in all passes so far.
    pub verified_records: u64,
    /// Passes completed.
    pub passes: u64,
}

impl Scrubber {
    /// A scrub that re-reads everything once per `period`; its first slice is due after a
    /// period or a minute, whichever is shorter (a program starting up restores first).
    pub fn new(period: Duration) -> Self {
        let period = period.max(Duration::from_millis(1));
        Self {
            period,
            queue: Vec::new(),
            pass_started: None,
            rate: 0.0,
            next_at: Instant::now() + period.min(Duration::from_secs(60)),
            records: None,
            raw: Vec::new(),
            verified_records: 0,
            passes: 0,
        }
    }

    /// How long until the next slice is due.
    pub fn due_in(&self, now: Instant) -> Duration {
        self.next_at.saturating_duration_since(now)
    }

    /// Verifies the next slice of records if one is due; returns the damaged ones found.
    pub fn run_due(&mut self, job: &JobStore) -> Vec<Finding> {
        let now = Instant::now();
        if now < self.next_at {
            return Vec::new();
        }
        if self.queue.is_empty() {
            if let Some(started) = self.pass_started.take() {
                self.passes += 1;
                let next = started + self.period;
                if next > now {
                    self.next_at = next;
                    return Vec::new();
                }
            }
            self.start_pass(job);
            if self.queue.is_empty() {
                // Nothing stored yet: look again in a while.
                self.next_at = now + self.period.min(Duration::from_secs(60));
                return Vec::new();
            }
        }
        let mut findings = Vec::new();
        let mut bytes = 0u64;
        while bytes < SLICE_BYTES {
            let Some(target) = self.queue.pop() else {
                break;
            };
            bytes += RecordHeader::LEN as u64 + u64::from(target.stored_len);
            findings.extend(self.finding(job, target));
        }
        // Damage tends to come in runs (a bad sector, a torn write): check the rest of each
        // damaged pack at once rather than at the scrub's pace.
        let damaged: Vec<String> = findings.iter().map(|f| f.pack.clone()).collect();
        if !damaged.is_empty() {
            let (same, rest): (Vec<Target>, Vec<Target>) = std::mem::take(&mut self.queue)
                .into_iter()
                .partition(|t| damaged.contains(&t.pack));
            self.queue = rest;
            for target in same {
                findings.extend(self.finding(job, target));
            }
        }
        let worked = now.elapsed();
        let paced = if self.rate > 0.0 {
            Duration::from_secs_f64(bytes as f64 / self.rate)
        } else {
            Duration::ZERO
        };
        self.next_at = Instant::now() + paced.saturating_sub(worked).max(worked * REST_PER_WORK);
        findings
    }

    /// Lists the records the committed snapshots reference, for one pass.
    fn start_pass(&mut self, job: &JobStore) {
        let mut targets: BTreeMap<(String, u64), Target> = BTreeMap::new();
        for seq in job.snapshot_seqs().unwrap_or_default() {
            // An unreadable manifest is the restore's business, not the scrub's.
            let Ok(manifest) = job.read_manifest(seq) else {
                continue;
            };
            for chunk in manifest.entries.iter().flat_map(|e| &e.chunks) {
                let Some(pack) = manifest.packs.get(chunk.pack as usize) else {
                    continue;
                };
                let target = targets
                    .entry((pack.clone(), chunk.offset))
                    .or_insert_with(|| Target {
                        pack: pack.clone(),
                        offset: chunk.offset,
                        hash: chunk.hash,
                        stored_len: chunk.stored_len,
                        raw_len: chunk.raw_len,
                        snapshots: Vec::new(),
                    });
                if target.snapshots.last() != Some(&seq) {
                    target.snapshots.push(seq);
                }
            }
        }
        // Popped from the end: reverse so that packs are read front to back.
        self.queue = targets.into_values().rev().collect();
        let total: u64 = self
            .queue
            .iter()
            .map(|t| RecordHeader::LEN as u64 + u64::from(t.stored_len))
            .sum();
        self.rate = total as f64 / self.period.as_secs_f64();
        self.pass_started = Some(Instant::now());
    }

    /// Checks one record: what is wrong with it, or `None` when it is intact.
    fn finding(&mut self, job: &JobStore, target: Target) -> Option<Finding> {
        let why = self.check(job, &target)?;
        Some(Finding {
            pack: target.pack,
            offset: target.offset,
            hash: target.hash,
            why,
            snapshots: target.snapshots,
        })
    }

    /// Reads and verifies one record; the reason it is damaged, or `None`.
    fn check(&mut self, job: &JobStore, t: &Target) -> Option<String> {
        if t.raw_len > crate::format::MAX_CHUNK_LEN {
            return Some(format!(
                "the snapshots give it an implausible length {}",
                t.raw_len
            ));
        }
        let path = job.pack_path(&t.pack);
        let file = match job.open_pack(&t.pack) {
            Ok(f) => f,
            // Removed by retention since the pass began, unless a snapshot still needs it.
            Err(Error::Io { source, .. }) if source.kind() == ErrorKind::NotFound => {
                let needed = t.snapshots.iter().any(|s| job.manifest_path(*s).exists());
                return needed.then(|| "the pack is missing".to_owned());
            }
            // Not readable now (descriptors, permissions): not evidence of damage.
            Err(_) => return None,
        };
        let records = match &mut self.records {
            Some(r) => r,
            None => match RecordReader::new(&path) {
                Ok(r) => self.records.insert(r),
                Err(_) => return None,
            },
        };
        let chunk = ChunkRef {
            hash: t.hash,
            pack: 0,
            offset: t.offset,
            stored_len: t.stored_len,
            raw_len: t.raw_len,
        };
        self.raw.resize(t.raw_len as usize, 0);
        self.verified_records += 1;
        match records.read(&file, &path, &chunk, &mut self.raw) {
            Ok(()) => None,
            Err(Error::Io { source, .. }) => (source.kind() == ErrorKind::UnexpectedEof)
                .then(|| "the pack is truncated".to_owned()),
            Err(e) => Some(reason(e)),
        }
    }
}

fn reason(e: Error) -> String {
    match e {
        Error::Corrupt { why, .. } | Error::SnapshotDamaged { why, .. } => why,
        other => other.to_string(),
    }
}
