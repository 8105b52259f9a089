//! Resume on a fresh node: bringing the newest durable snapshot into the local store.
//!
//! Before the program starts, the supervisor compares the newest snapshot on the durable tiers
//! (highest lease generation, then highest seq) with the local store's. When the tiers hold a
//! newer one, its manifest and only the packs not already local are copied in, a few packs at
//! a time, each pack verified record by record (blake3 of every chunk) *as its bytes arrive*
//! (a thread beside each download writes the staged file and checks each record as soon as it
//! is whole), so that a verified pack is ready when its last byte is. A pack that fails on one
//! tier is taken from another that has it; a snapshot that cannot be had whole is passed over
//! for the next older one. The local commit rule holds: packs first, the manifest last
//! ([`JobStore::import`]). The program then restores from the local store as always.
//!
//! # Damage and absence are not the same
//!
//! Only *damage* makes the fetch walk back to an older snapshot or to another tier: an object
//! missing or damaged on every tier that could be asked ([`TierError::NotFound`],
//! [`TierError::Damaged`], [`TierError::TooLarge`]), a manifest that does not decode or names
//! another job or snapshot, a pack that fails verification. A tier that cannot be reached
//! ([`TierError::is_transient`]) when no other tier provided the object, or a local store that
//! fails, ends the fetch with an error ([`FetchError`]): the supervisor exits and the user runs
//! again later. A snapshot passed over because of a short outage would lose the job's
//! progress, and a fresh start would wipe it; neither is ever taken for want of a connection.
//! For the same reason, when the tiers hold snapshots newer than the local store but none can
//! be had whole and the local store has none, the fetch fails
//! ([`FetchError::NoneWhole`]) rather than let the program start from step 0: `--fresh` (which
//! skips the fetch) starts over deliberately.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use supervise_store::codec::Decoder;
use supervise_store::error::io_err;
use supervise_store::format::{
    self, Codec, HEADER_LEN, MAX_MANIFEST_LEN, Manifest, PACK_MAGIC, RecordHeader,
};
use supervise_store::{JobStore, StagedPack};

use super::{Tier, TierError, layout};

/// The largest pack accepted from a tier (a writer starts a new pack every 128 MiB; one
/// chunk may overshoot that by at most its own size).
const MAX_PACK_LEN: u64 = 1 << 30;

/// How many packs are downloaded at once (each with its verifying thread beside it).
const PARALLEL_PACKS: usize = 4;

/// Bytes a download hands to its verifying thread at a time.
const HANDOFF_LEN: usize = 1 << 20;

/// Hand-offs queued between a download and its verifying thread: with [`HANDOFF_LEN`], the
/// memory a download may run ahead of its verification by.
const HANDOFF_DEPTH: usize = 8;

/// How many reasons a [`FetchError`] quotes (the rest are counted; all are in the trouble).
const QUOTED: usize = 4;

/// A snapshot brought in from a tier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// Its number.
    pub seq: u64,
    /// The lease generation it was published under.
    pub generation: u64,
    /// The tier its manifest came from.
    pub tier: String,
    /// Bytes copied (packs not already local, and the manifest).
    pub bytes: u64,
    /// Packs copied.
    pub packs: usize,
    /// How long it took.
    pub duration: Duration,
}

/// Something the fetch tells on its way (for the log): a tier that could not be read, or a
/// snapshot passed over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trouble {
    /// The tier.
    pub tier: String,
    /// The snapshot concerned, if any.
    pub seq: Option<u64>,
    /// What went wrong.
    pub why: String,
}

/// Why [`fetch_newer`] brought nothing in and the program must not start: in every case the
/// local store is as it was (no staged file left), and running again later may succeed.
#[derive(Debug)]
pub enum FetchError {
    /// The local store failed (reading it, staging or publishing a pack, a manifest).
    Local(supervise_store::Error),
    /// A tier could not be reached, or refused ([`TierError::is_transient`]), and no other
    /// tier provided what was needed.
    Unavailable {
        /// What could not be had: the list of snapshots, or a snapshot.
        what: String,
        /// What the tiers said.
        errors: Vec<String>,
    },
    /// A tier's objects are sealed with another key than `--encrypt-key` gives, or with a key
    /// where none was given: never read as damage.
    Sealed(String),
    /// The tiers hold snapshots newer than the local store's, none could be had whole, and
    /// the local store has no snapshot: starting would begin the program from step 0.
    NoneWhole {
        /// How many snapshots were found (and tried).
        found: usize,
        /// Why each could not be had, newest first.
        why: Vec<String>,
    },
}

/// `items` joined with "; ", at most [`QUOTED`] of them, the rest counted.
fn quote(items: &[String]) -> String {
    let mut text = items
        .iter()
        .take(QUOTED)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if items.len() > QUOTED {
        text.push_str(&format!("; and {} more", items.len() - QUOTED));
    }
    text
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::Local(e) => write!(f, "the local store failed: {e}"),
            FetchError::Unavailable { what, errors } => write!(
                f,
                "{what} could not be had from any durable tier ({}); nothing was passed over \
                 for it: run again when the tier can be reached",
                quote(errors)
            ),
            FetchError::Sealed(why) => f.write_str(why),
            FetchError::NoneWhole { found, why } => write!(
                f,
                "the durable tiers hold {found} snapshot{} newer than the local store, and \
                 none can be had whole ({}); the local store has no snapshot, so the program \
                 would start from the beginning: give --fresh to start over deliberately",
                if *found == 1 { "" } else { "s" },
                quote(why)
            ),
        }
    }
}

impl std::error::Error for FetchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FetchError::Local(e) => Some(e),
            _ => None,
        }
    }
}

/// A snapshot found on the tiers: (generation, seq), and the indices of the tiers holding it.
type Listed = ((u64, u64), Vec<usize>);

/// Every snapshot the tiers hold, newest first, with the tiers holding it;
/// and what each tier that could not be listed said (also told in `trouble`).
fn list_snapshots(
    tiers: &[Arc<dyn Tier>],
    job: &str,
    trouble: &mut Vec<Trouble>,
) -> (Vec<Listed>, Vec<String>) {
    let mut found: BTreeMap<(u64, u64), Vec<usize>> = BTreeMap::new();
    let mut unlisted = Vec::new();
    for (i, tier) in tiers.iter().enumerate() {
        match tier.list(&layout::snapshots(job)) {
            Ok(objects) => {
                for object in objects {
                    if let Some(at) = layout::parse_manifest(job, &object.key) {
                        found.entry(at).or_default().push(i);
                    }
                }
            }
            Err(e) => {
                trouble.push(Trouble {
                    tier: tier.describe().to_owned(),
                    seq: None,
                    why: e.to_string(),
                });
                unlisted.push(e.to_string());
            }
        }
    }
    (found.into_iter().rev().collect(), unlisted)
}

/// Brings in the newest durable snapshot that is newer than the local store's: one of a
/// higher generation than `local_generation` (the one the local snapshots were taken under),
/// or of the same generation and a higher seq than the local newest.
///
/// `Ok(None)`: the local store is as new as any tier, or no newer snapshot could be had
/// whole (each passed over for damage, told in `trouble`) and the local store has one to
/// start from. `Err` (nothing imported, nothing staged left): the local store failed; a tier
/// that could not be reached held something no other tier provided, or no tier could be
/// listed at all (a tier that cannot be listed while another can is told in `trouble` and
/// passed by: the tiers that answer are taken as the truth);
/// sealed objects and no key for them; or newer snapshots exist, none whole, and the local
/// store has none ([`FetchError::NoneWhole`]). Everything the fetch met on its way is in
/// `trouble`.
pub fn fetch_newer(
    tiers: &[Arc<dyn Tier>],
    job: &JobStore,
    local_generation: u64,
    trouble: &mut Vec<Trouble>,
) -> Result<Option<Fetched>, FetchError> {
    let local_newest = job
        .snapshot_seqs()
        .map_err(FetchError::Local)?
        .last()
        .copied();
    let newer = |generation: u64, seq: u64| {
        generation > local_generation
            || (generation == local_generation && local_newest.is_none_or(|l| seq > l))
    };
    let (snapshots, unlisted) = list_snapshots(tiers, job.name(), trouble);
    let mut passed_over = Vec::new();
    for ((generation, seq), holders) in snapshots {
        if !newer(generation, seq) {
            break;
        }
        match fetch_snapshot(tiers, &holders, job, generation, seq, trouble)? {
            Outcome::Fetched(fetched) => return Ok(Some(fetched)),
            Outcome::Damaged(why) => passed_over.push(format!("snapshot {seq}: {why}")),
            Outcome::Unavailable(errors) => {
                return Err(FetchError::Unavailable {
                    what: format!("snapshot {seq} (lease generation {generation})"),
                    errors,
                });
            }
        }
    }
    // A tier that could not be listed may hold a newer snapshot than any found; but the tiers
    // that could be are taken as the truth (one replica down must not stop the job: every
    // holder sends every snapshot to every tier). With none listed, nothing is known.
    if !unlisted.is_empty() && unlisted.len() == tiers.len() {
        return Err(FetchError::Unavailable {
            what: "the list of snapshots".to_owned(),
            errors: unlisted,
        });
    }
    if passed_over.is_empty() || local_newest.is_some() {
        return Ok(None);
    }
    Err(FetchError::NoneWhole {
        found: passed_over.len(),
        why: passed_over,
    })
}

/// How one snapshot's fetch ended, short of an error.
enum Outcome {
    /// Brought in.
    Fetched(Fetched),
    /// Cannot be had whole: some object of it is damaged or missing on every tier asked.
    Damaged(String),
    /// Some object of it could not be had, and a tier that could not be reached may have it.
    Unavailable(Vec<String>),
}

/// Why one object could not be had from any tier.
enum Missing {
    /// Damaged or missing wherever it was asked for.
    Damaged(Vec<String>),
    /// Some tier could not be reached (what they said, damage included).
    Unavailable(Vec<String>),
}

impl Missing {
    /// From what each tier asked said: unavailable if any of them was unreachable.
    fn of(damaged: Vec<String>, unavailable: Vec<String>) -> Missing {
        if unavailable.is_empty() {
            Missing::Damaged(damaged)
        } else {
            Missing::Unavailable(unavailable.into_iter().chain(damaged).collect())
        }
    }
}

fn note(trouble: &mut Vec<Trouble>, tier: &dyn Tier, seq: u64, why: String) {
    trouble.push(Trouble {
        tier: tier.describe().to_owned(),
        seq: Some(seq),
        why,
    });
}

/// Fetches snapshot (`generation`, `seq`): its manifest from the first of `holders` that has
/// it whole, each pack it needs from the first tier that has it whole (the manifest's tier
/// first). `Err`: the local store failed, or sealed objects; nothing staged is left.
fn fetch_snapshot(
    tiers: &[Arc<dyn Tier>],
    holders: &[usize],
    job: &JobStore,
    generation: u64,
    seq: u64,
    trouble: &mut Vec<Trouble>,
) -> Result<Outcome, FetchError> {
    let started = Instant::now();
    let (first, bytes, manifest) =
        match fetch_manifest(tiers, holders, job, generation, seq, trouble)? {
            Ok(got) => got,
            Err(Missing::Damaged(why)) => return Ok(Outcome::Damaged(quote(&why))),
            Err(Missing::Unavailable(errors)) => return Ok(Outcome::Unavailable(errors)),
        };
    let order: Vec<usize> = std::iter::once(first)
        .chain((0..tiers.len()).filter(|&i| i != first))
        .collect();
    let mut needed: Vec<&str> = Vec::new();
    for name in &manifest.packs {
        if !needed.contains(&name.as_str()) && !job.has_pack(name).map_err(FetchError::Local)? {
            needed.push(name);
        }
    }
    let staged = match fetch_packs(tiers, &order, job, &needed, seq, trouble)? {
        Ok(staged) => staged,
        Err(Missing::Damaged(why)) => return Ok(Outcome::Damaged(quote(&why))),
        Err(Missing::Unavailable(errors)) => return Ok(Outcome::Unavailable(errors)),
    };
    let copied = bytes.len() as u64 + staged.iter().map(|(_, len)| len).sum::<u64>();
    let staged: Vec<StagedPack> = staged.into_iter().map(|(pack, _)| pack).collect();
    let packs = staged.len();
    if let Err(e) = job.import(&bytes, &staged) {
        // Packs already renamed into place are packs like any other (retention removes
        // them); the rest are removed here.
        discard_all(job, staged);
        if e.is_corruption() {
            note(trouble, tiers[first].as_ref(), seq, e.to_string());
            return Ok(Outcome::Damaged(e.to_string()));
        }
        return Err(FetchError::Local(e));
    }
    Ok(Outcome::Fetched(Fetched {
        seq,
        generation,
        tier: tiers[first].describe().to_owned(),
        bytes: copied,
        packs,
        duration: started.elapsed(),
    }))
}

/// A fetched manifest: the index of its tier, its bytes, and it decoded.
type GotManifest = (usize, Vec<u8>, Manifest);

/// The manifest of (`generation`, `seq`) from the first of `holders` that has it whole.
fn fetch_manifest(
    tiers: &[Arc<dyn Tier>],
    holders: &[usize],
    job: &JobStore,
    generation: u64,
    seq: u64,
    trouble: &mut Vec<Trouble>,
) -> Result<Result<GotManifest, Missing>, FetchError> {
    let key = layout::manifest(job.name(), generation, seq);
    let (mut damaged, mut unavailable) = (Vec::new(), Vec::new());
    for &i in holders {
        let tier = tiers[i].as_ref();
        let why = match tier.get_bytes(&key, MAX_MANIFEST_LEN) {
            Ok((bytes, _)) => match Manifest::decode(&bytes, Path::new(&key)) {
                Ok(m) if m.seq == seq && m.job == job.name() => return Ok(Ok((i, bytes, m))),
                Ok(m) => format!(
                    "{}: {key} says job {:?} snapshot {}",
                    tier.describe(),
                    m.job,
                    m.seq
                ),
                Err(_) if super::seal::looks_sealed(&bytes) => {
                    return Err(FetchError::Sealed(format!(
                        "{}: the snapshots there are sealed: give the key they were sealed \
                         with (--encrypt-key)",
                        tier.describe()
                    )));
                }
                Err(e) => format!("{}: {e}", tier.describe()),
            },
            Err(e @ TierError::WrongKey { .. }) => return Err(FetchError::Sealed(e.to_string())),
            Err(e) if e.is_transient() => {
                note(trouble, tier, seq, e.to_string());
                unavailable.push(e.to_string());
                continue;
            }
            Err(e) => e.to_string(),
        };
        note(trouble, tier, seq, why.clone());
        damaged.push(why);
    }
    Ok(Err(Missing::of(damaged, unavailable)))
}

/// Removes staged packs that will not be imported (each tried; a failure is only noted by
/// the caller's error already being on its way).
fn discard_all(job: &JobStore, staged: impl IntoIterator<Item = StagedPack>) {
    for pack in staged {
        let _ = job.discard_staged(pack);
    }
}

/// A staged, verified pack and its length.
type GotPack = (StagedPack, u64);

/// How one pack's fetch ended.
enum PackEnd {
    /// Staged and verified.
    Got(GotPack),
    /// Not to be had.
    Missing(Missing),
    /// Given up because another pack of the snapshot cannot be had.
    Cancelled,
}

/// Downloads and verifies packs `names`, [`PARALLEL_PACKS`] at a time, each from the first
/// tier of `order` that has it whole. Stops early once one cannot be had. `Ok(Ok)`: every
/// pack staged and verified. Otherwise nothing staged is left.
fn fetch_packs(
    tiers: &[Arc<dyn Tier>],
    order: &[usize],
    job: &JobStore,
    names: &[&str],
    seq: u64,
    trouble: &mut Vec<Trouble>,
) -> Result<Result<Vec<GotPack>, Missing>, FetchError> {
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let workers = names.len().min(PARALLEL_PACKS);
    let work = || {
        let mut ends = Vec::new();
        let mut trouble = Vec::new();
        loop {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(name) = names.get(i) else { break };
            let end = fetch_pack(tiers, order, job, name, seq, &stop, &mut trouble);
            if !matches!(end, Ok(PackEnd::Got(_))) {
                stop.store(true, Ordering::Relaxed);
            }
            ends.push(end);
        }
        (ends, trouble)
    };
    let joined: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers).map(|_| s.spawn(work)).collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    let mut got = Vec::new();
    let mut failed: Option<FetchError> = None;
    let (mut damaged, mut unavailable) = (None, Vec::new());
    let mut panicked = None;
    for worker in joined {
        let (ends, told) = match worker {
            Ok(worker) => worker,
            Err(panic) => {
                panicked = Some(panic);
                continue;
            }
        };
        trouble.extend(told);
        for end in ends {
            match end {
                Ok(PackEnd::Got(pack)) => got.push(pack),
                Ok(PackEnd::Missing(Missing::Damaged(why))) => {
                    damaged.get_or_insert(why);
                }
                Ok(PackEnd::Missing(Missing::Unavailable(why))) => unavailable.extend(why),
                Ok(PackEnd::Cancelled) => {}
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
    }
    if panicked.is_none() && failed.is_none() && damaged.is_none() && unavailable.is_empty() {
        return Ok(Ok(got));
    }
    discard_all(job, got.into_iter().map(|(pack, _)| pack));
    if let Some(panic) = panicked {
        std::panic::resume_unwind(panic);
    }
    if let Some(e) = failed {
        return Err(e);
    }
    // A pack damaged wherever it is will not come whole by waiting.
    match damaged {
        Some(why) => Ok(Err(Missing::Damaged(why))),
        None => Ok(Err(Missing::Unavailable(unavailable))),
    }
}

/// Why one download of a pack failed.
enum Fault {
    /// The local store failed: end the fetch.
    Local(supervise_store::Error),
    /// Sealed with another key: end the fetch.
    Sealed(String),
    /// The pack is damaged or missing there.
    Damaged(String),
    /// The tier could not be reached.
    Unavailable(String),
    /// Given up (another pack cannot be had).
    Cancelled,
}

/// Pack `name` from the first tier of `order` that has it whole, staged and verified.
fn fetch_pack(
    tiers: &[Arc<dyn Tier>],
    order: &[usize],
    job: &JobStore,
    name: &str,
    seq: u64,
    stop: &AtomicBool,
    trouble: &mut Vec<Trouble>,
) -> Result<PackEnd, FetchError> {
    let key = layout::pack(job.name(), name);
    let (mut damaged, mut unavailable) = (Vec::new(), Vec::new());
    for &i in order {
        if stop.load(Ordering::Relaxed) {
            return Ok(PackEnd::Cancelled);
        }
        let tier = tiers[i].as_ref();
        let pack = job.stage_pack(name).map_err(FetchError::Local)?;
        let fault = match download_verified(tier, &key, &pack, stop) {
            Ok(len) => return Ok(PackEnd::Got((pack, len))),
            Err(fault) => fault,
        };
        let discarded = job.discard_staged(pack);
        let why = |what: String| format!("pack {name}: {what}");
        match fault {
            Fault::Local(e) => return Err(FetchError::Local(e)),
            Fault::Sealed(why) => return Err(FetchError::Sealed(why)),
            Fault::Cancelled => return Ok(PackEnd::Cancelled),
            Fault::Damaged(what) => {
                note(trouble, tier, seq, why(what.clone()));
                damaged.push(format!("{}: {}", tier.describe(), why(what)));
            }
            Fault::Unavailable(what) => {
                note(trouble, tier, seq, why(what.clone()));
                unavailable.push(what);
            }
        }
        discarded.map_err(FetchError::Local)?;
    }
    Ok(PackEnd::Missing(Missing::of(damaged, unavailable)))
}

/// What goes from a download to its verifying thread.
enum Handoff {
    /// The next bytes.
    Bytes(Vec<u8>),
    /// The tier says the object is whole: check that the last record is complete.
    End,
}

/// The [`Write`] a tier downloads into: gathers bytes into [`HANDOFF_LEN`] buffers for the
/// verifying thread; fails when that thread stopped (damage, a local error) or the fetch is
/// given up, which ends the download early.
struct HandoffWriter<'a> {
    to: SyncSender<Handoff>,
    buf: Vec<u8>,
    stop: &'a AtomicBool,
    cancelled: bool,
}

impl HandoffWriter<'_> {
    fn send(&mut self, message: Handoff) -> io::Result<()> {
        self.to
            .send(message)
            .map_err(|_| io::Error::other("the verification stopped"))
    }

    fn hand_off(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(HANDOFF_LEN));
        self.send(Handoff::Bytes(full))
    }
}

impl Write for HandoffWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if self.stop.load(Ordering::Relaxed) {
            self.cancelled = true;
            return Err(io::Error::other("the fetch was given up"));
        }
        let n = bytes.len().min(HANDOFF_LEN - self.buf.len());
        self.buf.extend_from_slice(&bytes[..n]);
        if self.buf.len() == HANDOFF_LEN {
            self.hand_off()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Downloads `key` from `tier` into the staged `pack`, verifying every record as it comes
/// (on a thread beside the download, which also writes the file). Returns its length.
fn download_verified(
    tier: &dyn Tier,
    key: &str,
    pack: &StagedPack,
    stop: &AtomicBool,
) -> Result<u64, Fault> {
    let file = &pack.file;
    let path = pack.path.as_path();
    std::thread::scope(|s| {
        let (to, from) = sync_channel(HANDOFF_DEPTH);
        let verifier = s.spawn(move || write_and_verify(from, file, path));
        let mut writer = HandoffWriter {
            to,
            buf: Vec::with_capacity(HANDOFF_LEN),
            stop,
            cancelled: false,
        };
        let got = tier.get(key, &mut writer, MAX_PACK_LEN);
        let handed = match got {
            Ok(_) => writer.hand_off().and_then(|()| writer.send(Handoff::End)),
            Err(_) => Ok(()),
        };
        let cancelled = writer.cancelled;
        drop(writer);
        let verified = match verifier.join() {
            Ok(verified) => verified,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        // The verifier's finding comes first: its stopping is what failed the download.
        let len = verified?;
        if cancelled {
            return Err(Fault::Cancelled);
        }
        match got {
            Ok(_) => {}
            Err(e @ TierError::WrongKey { .. }) => return Err(Fault::Sealed(e.to_string())),
            Err(e) if e.is_transient() => return Err(Fault::Unavailable(e.to_string())),
            Err(TierError::NotFound { .. }) => {
                return Err(Fault::Damaged(format!("missing on {}", tier.describe())));
            }
            Err(e) => return Err(Fault::Damaged(e.to_string())),
        }
        match (handed, len) {
            (Ok(()), Some(len)) => Ok(len),
            // The verifier saw the end (so got `End`), or it failed (told above).
            _ => Err(Fault::Local(supervise_store::Error::Internal {
                job: String::new(),
                seq: None,
                why: format!(
                    "{}: the verification of {key} did not finish",
                    tier.describe()
                ),
            })),
        }
    })
}

/// The verifying thread: writes what comes to `file` and checks it record by record.
/// `Ok(Some(len))`: the pack ended (`End`) whole and verified; `Ok(None)`: the download
/// stopped first (its error tells why).
fn write_and_verify(
    from: Receiver<Handoff>,
    mut file: &std::fs::File,
    path: &Path,
) -> Result<Option<u64>, Fault> {
    let mut check = PackCheck::new(path).map_err(Fault::Local)?;
    let mut writeback = Writeback::default();
    for message in from {
        match message {
            Handoff::Bytes(bytes) => {
                file.write_all(&bytes)
                    .map_err(|e| Fault::Local(io_err("write", path)(e)))?;
                writeback.wrote(file, bytes.len() as u64);
                check.feed(&bytes).map_err(damage)?;
            }
            Handoff::End => {
                check.finish().map_err(damage)?;
                return Ok(Some(check.len));
            }
        }
    }
    Ok(None)
}

/// Bytes of a staged pack written out to the disk at a time while it downloads.
const WRITEBACK_STEP: u64 = 8 << 20;

/// Starts writing a staged pack out to the disk while it is still coming, [`WRITEBACK_STEP`]
/// at a time, and waits for each step one step later, so that the fsync of the import finds
/// at most one step still to write instead of the whole pack. Only an early start: the
/// import's fsync is what makes the pack durable (and reports any error), so the calls'
/// errors are ignored here.
#[derive(Default)]
struct Writeback {
    /// Bytes written to the file.
    written: u64,
    /// Bytes whose writing out was started.
    started: u64,
    /// Where the step before the last started begins (waited for next).
    waiting: u64,
}

impl Writeback {
    fn wrote(&mut self, file: &std::fs::File, len: u64) {
        self.written += len;
        if self.written - self.started < WRITEBACK_STEP {
            return;
        }
        sync_range(
            file,
            self.started,
            self.written - self.started,
            libc::SYNC_FILE_RANGE_WRITE,
        );
        if self.started > self.waiting {
            sync_range(
                file,
                self.waiting,
                self.started - self.waiting,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            );
            self.waiting = self.started;
        }
        self.started = self.written;
    }
}

/// `sync_file_range(2)` on `file` (errors ignored: see [`Writeback`]).
fn sync_range(file: &std::fs::File, offset: u64, len: u64, flags: libc::c_uint) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range only reads its integer arguments; the descriptor is open for
    // the whole call (borrowed from `file`), and the call touches no memory of ours.
    let _ = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) };
}

/// A failed check: damage, unless the decompressor could not be made.
fn damage(e: supervise_store::Error) -> Fault {
    if e.is_corruption() || matches!(e, supervise_store::Error::UnsupportedVersion { .. }) {
        Fault::Damaged(e.to_string())
    } else {
        Fault::Local(e)
    }
}

/// Checks a pack's bytes as they arrive, as a scan of the whole file does
/// ([`supervise_store::pack_scan::PackScanner`]): the file header, then each record's header
/// and its stored bytes decoded and verified against the record's blake3. Memory: one record
/// (bounded by the header's check, 16 MiB), whatever the bytes say.
struct PackCheck<'a> {
    path: &'a Path,
    decoder: Decoder,
    /// The part of the next unit (file header, record header, stored bytes) seen so far.
    part: Vec<u8>,
    /// Past the file header.
    started: bool,
    /// The header of the record whose stored bytes come next, and its offset.
    record: Option<(RecordHeader, u64)>,
    /// Where the next unit starts.
    offset: u64,
    /// Bytes seen.
    len: u64,
    raw: Vec<u8>,
    /// A raw record's bytes are hashed as they come, not gathered: the hash so far, and how
    /// many of its bytes were hashed.
    hasher: blake3::Hasher,
    hashed: usize,
}

impl<'a> PackCheck<'a> {
    fn new(path: &'a Path) -> supervise_store::Result<Self> {
        Ok(Self {
            path,
            decoder: Decoder::new().map_err(io_err("create decompressor", path))?,
            part: Vec::new(),
            started: false,
            record: None,
            offset: 0,
            len: 0,
            raw: Vec::new(),
            hasher: blake3::Hasher::new(),
            hashed: 0,
        })
    }

    fn corrupt(&self, offset: u64, why: &str) -> supervise_store::Error {
        supervise_store::Error::Corrupt {
            path: self.path.to_owned(),
            why: format!("record at offset {offset}: {why}"),
        }
    }

    /// The length of the unit that comes next.
    fn want(&self) -> usize {
        match (self.started, &self.record) {
            (false, _) => HEADER_LEN,
            (true, None) => RecordHeader::LEN,
            (true, Some((header, _))) => header.stored_len as usize,
        }
    }

    /// Takes the next bytes of the pack.
    fn feed(&mut self, mut bytes: &[u8]) -> supervise_store::Result<()> {
        self.len += bytes.len() as u64;
        loop {
            if let Some((header, at)) = self.record
                && header.codec == Codec::Raw
            {
                let n = (header.stored_len as usize - self.hashed).min(bytes.len());
                self.hasher.update(&bytes[..n]);
                self.hashed += n;
                bytes = &bytes[n..];
                if self.hashed < header.stored_len as usize {
                    return Ok(());
                }
                self.raw_hashed(&header, at)?;
                continue;
            }
            let want = self.want();
            if self.part.is_empty() && bytes.len() >= want {
                // A whole unit in what came: checked where it is.
                let (unit, rest) = bytes.split_at(want);
                self.unit(unit)?;
                bytes = rest;
                continue;
            }
            let take = (want - self.part.len()).min(bytes.len());
            self.part.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.part.len() < want {
                return Ok(());
            }
            let unit = std::mem::take(&mut self.part);
            self.unit(&unit)?;
            self.part = unit;
            self.part.clear();
        }
    }

    /// Checks one whole unit.
    fn unit(&mut self, unit: &[u8]) -> supervise_store::Result<()> {
        if !self.started {
            format::check_header(unit, PACK_MAGIC, "pack", self.path)?;
            self.started = true;
            self.offset = HEADER_LEN as u64;
            return Ok(());
        }
        match self.record.take() {
            None => {
                let header = RecordHeader::decode(unit, self.path)
                    .map_err(|e| self.corrupt(self.offset, &e.to_string()))?;
                let end = RecordHeader::end(self.offset, header.stored_len)
                    .ok_or_else(|| self.corrupt(self.offset, "truncated record"))?;
                self.record = Some((header, self.offset));
                self.offset = end;
            }
            Some((header, at)) => {
                self.raw.resize(header.raw_len as usize, 0);
                self.decoder
                    .decode(&header, unit, &mut self.raw, self.path)
                    .map_err(|e| self.corrupt(at, &e.to_string()))?;
            }
        }
        Ok(())
    }

    /// A raw record's bytes were all hashed: checks the hash as decoding it would
    /// ([`Decoder::decode`] of a raw record is a copy and this check).
    fn raw_hashed(&mut self, header: &RecordHeader, at: u64) -> supervise_store::Result<()> {
        let hash = self.hasher.finalize();
        self.hasher.reset();
        self.hashed = 0;
        self.record = None;
        if hash.as_bytes() != &header.hash {
            let e = supervise_store::Error::Corrupt {
                path: self.path.to_owned(),
                why: format!(
                    "chunk {} does not match its hash",
                    supervise_store::codec::hex(&header.hash[..8])
                ),
            };
            return Err(self.corrupt(at, &e.to_string()));
        }
        Ok(())
    }

    /// The pack ended: the last record must be whole.
    fn finish(&self) -> supervise_store::Result<()> {
        if !self.started {
            return format::check_header(&[0; HEADER_LEN], PACK_MAGIC, "pack", self.path)
                .map(|_| ());
        }
        if let Some((_, at)) = self.record {
            return Err(self.corrupt(at, "truncated record"));
        }
        if !self.part.is_empty() {
            return Err(self.corrupt(self.offset, "truncated record header"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::dir::DirTier;
    use crate::remote::upload::{Fence, Report, UploadConfig, Uploads};
    use supervise_store::{SnapshotWriter, Store};

    /// A job with `n` snapshots of distinct data, in a fresh store under `dir`.
    fn job_with_snapshots(dir: &Path, n: usize) -> JobStore {
        let job = Store::open(dir.join("node-a")).unwrap().job("j").unwrap();
        let mut writer = SnapshotWriter::open(job.clone(), 0).unwrap();
        for i in 0..n {
            let grid: Vec<f64> = (0..40_000).map(|x| (x * (i + 1)) as f64).collect();
            let mut b = writer.begin(Some(&format!("step {i}")));
            b.slice("grid", &grid).unwrap();
            b.value("step", &i).unwrap();
            b.commit().unwrap();
        }
        job
    }

    fn replica(dir: &Path, name: &str) -> Arc<dyn Tier> {
        std::fs::create_dir(dir.join(name)).unwrap();
        Arc::new(DirTier::new(dir.join(name)))
    }

    /// Sends the local job's newest snapshot to every tier, waiting for each to report it.
    fn upload(job: &JobStore, tiers: &[Arc<dyn Tier>]) {
        let newest = *job.snapshot_seqs().unwrap().last().unwrap();
        let uploads = Uploads::start(
            tiers,
            &UploadConfig {
                job: job.clone(),
                generation: 1,
                keep: 5,
                fence: Fence::until(Instant::now() + Duration::from_secs(60)),
            },
        )
        .unwrap();
        let mut safe = 0;
        while safe < tiers.len() {
            match uploads.wait(Duration::from_secs(30)).expect("a report") {
                Report::Safe { seq, .. } => {
                    assert_eq!(seq, newest);
                    safe += 1;
                }
                Report::Failed { error, .. } | Report::PruneFailed { error, .. } => {
                    panic!("{error}")
                }
            }
        }
    }

    fn fresh_job(dir: &Path, name: &str) -> JobStore {
        Store::open(dir.join(name)).unwrap().job("j").unwrap()
    }

    /// Flips the `back`-th byte from the end (in the last record's stored bytes) of every
    /// pack file under `root`.
    fn damage_packs(root: &Path, back: usize) {
        for entry in std::fs::read_dir(root.join("j/packs")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "pack") {
                let mut bytes = std::fs::read(&path).unwrap();
                let at = bytes.len() - back;
                bytes[at] ^= 0x20;
                std::fs::write(&path, bytes).unwrap();
            }
        }
    }

    #[test]
    fn a_fresh_node_fetches_the_newest_snapshot_and_a_damaged_pack_comes_from_another_replica() {
        let dir = tempfile::tempdir().unwrap();
        let job = job_with_snapshots(dir.path(), 3);
        let tiers = [replica(dir.path(), "r1"), replica(dir.path(), "r2")];
        upload(&job, &tiers);
        damage_packs(&dir.path().join("r1"), 1);
        let fresh = fresh_job(dir.path(), "node-b");
        let mut trouble = Vec::new();
        let fetched = fetch_newer(&tiers, &fresh, 0, &mut trouble)
            .unwrap()
            .unwrap();
        assert_eq!(fetched.seq, 3);
        assert_eq!(fetched.generation, 1);
        assert!(fetched.packs >= 1);
        assert!(
            trouble
                .iter()
                .any(|t| t.tier.ends_with("r1") && t.why.contains("pack")),
            "{trouble:?}"
        );
        // The fetched snapshot reads back whole, verified.
        let reader = supervise_store::SnapshotReader::open(&fresh, 3).unwrap();
        reader.verify().unwrap();
        assert_eq!(fresh.snapshot_seqs().unwrap(), vec![3]);
        // Nothing newer on the tiers now: nothing to fetch.
        assert_eq!(
            fetch_newer(&tiers, &fresh, 1, &mut Vec::new()).unwrap(),
            None
        );
    }

    #[test]
    fn a_snapshot_no_replica_has_whole_is_passed_over_for_an_older_one() {
        let dir = tempfile::tempdir().unwrap();
        let job = job_with_snapshots(dir.path(), 2);
        let tiers = [replica(dir.path(), "r1")];
        upload(&job, &tiers);
        // Snapshot 2's packs damaged; snapshot 3 comes, uploaded with new packs only.
        let mut writer = SnapshotWriter::open(job.clone(), 0).unwrap();
        let mut b = writer.begin(None);
        b.slice("grid", &vec![7.0f64; 40_000]).unwrap();
        b.commit().unwrap();
        damage_packs(&dir.path().join("r1"), 1);
        upload(&job, &tiers);
        // Every pack on r1 is damaged except snapshot 3's new one: 3 needs only its own.
        let fresh = fresh_job(dir.path(), "node-b");
        let mut trouble = Vec::new();
        let fetched = fetch_newer(&tiers, &fresh, 0, &mut trouble)
            .unwrap()
            .unwrap();
        assert_eq!(fetched.seq, 3, "{trouble:?}");
        // Now damage everything: a fresh node gets nothing, and says why for each.
        damage_packs(&dir.path().join("r1"), 2);
        let empty = fresh_job(dir.path(), "node-c");
        let mut trouble = Vec::new();
        // With nothing local, starting would begin the program from step 0: an error.
        match fetch_newer(&tiers, &empty, 0, &mut trouble) {
            Err(FetchError::NoneWhole { found, why }) => {
                assert!(found >= 2, "{found} {why:?}");
                assert_eq!(why.len(), found);
                assert!(why[0].starts_with("snapshot 3:"), "{why:?}");
            }
            other => panic!("{other:?} {trouble:?}"),
        }
        assert!(trouble.iter().any(|t| t.seq == Some(3)), "{trouble:?}");
        assert!(empty.snapshot_seqs().unwrap().is_empty());
        assert_no_staged_files(&empty);
        assert!(
            empty.pack_names().unwrap().is_empty(),
            "no pack of a failed fetch stays: {:?} {trouble:?}",
            empty.pack_names()
        );
        // A node with a snapshot of its own starts from it (every remote one is damaged).
        let own = job_with_snapshots(&dir.path().join("node-d"), 1);
        assert_eq!(fetch_newer(&tiers, &own, 0, &mut Vec::new()).unwrap(), None);
        assert_eq!(own.snapshot_seqs().unwrap(), vec![1]);
        assert_no_staged_files(&own);
    }

    #[test]
    fn a_newer_generation_supersedes_local_snapshots_numbered_higher() {
        let dir = tempfile::tempdir().unwrap();
        let job = job_with_snapshots(dir.path(), 2);
        let tiers = [replica(dir.path(), "r1")];
        upload(&job, &tiers);
        // Node B has its own, diverged snapshots 1..4 taken under generation 0.
        let b_dir = tempfile::tempdir().unwrap();
        let b = {
            let job = Store::open(b_dir.path().join("s"))
                .unwrap()
                .job("j")
                .unwrap();
            let mut writer = SnapshotWriter::open(job.clone(), 0).unwrap();
            for _ in 0..4 {
                let mut s = writer.begin(None);
                s.value("step", &99).unwrap();
                s.commit().unwrap();
            }
            job
        };
        let fetched = fetch_newer(&tiers, &b, 0, &mut Vec::new())
            .unwrap()
            .unwrap();
        assert_eq!(fetched.seq, 2);
        assert_eq!(b.snapshot_seqs().unwrap(), vec![1, 2]);
        let reader = supervise_store::SnapshotReader::open(&b, 2).unwrap();
        reader.verify().unwrap();
        assert!(reader.manifest().entry("grid").is_some());
    }

    /// Fails with [`TierError::Unavailable`] on every key (or list prefix) `fails` accepts,
    /// and passes everything else to the tier it wraps.
    struct Unreachable<F: Fn(&str) -> bool + Send + Sync> {
        inner: Arc<dyn Tier>,
        fails: F,
    }

    impl<F: Fn(&str) -> bool + Send + Sync> Unreachable<F> {
        fn check(&self, key: &str) -> crate::remote::TierResult<()> {
            if (self.fails)(key) {
                return Err(TierError::Unavailable {
                    tier: self.inner.describe().to_owned(),
                    key: key.to_owned(),
                    why: "connection refused (test)".to_owned(),
                });
            }
            Ok(())
        }
    }

    impl<F: Fn(&str) -> bool + Send + Sync> Tier for Unreachable<F> {
        fn describe(&self) -> &str {
            self.inner.describe()
        }
        fn list(&self, prefix: &str) -> crate::remote::TierResult<Vec<crate::remote::ObjectMeta>> {
            self.check(prefix)?;
            self.inner.list(prefix)
        }
        fn get(
            &self,
            key: &str,
            out: &mut dyn Write,
            max: u64,
        ) -> crate::remote::TierResult<crate::remote::Version> {
            self.check(key)?;
            self.inner.get(key, out, max)
        }
        fn put(
            &self,
            key: &str,
            data: &mut dyn std::io::Read,
            len: u64,
        ) -> crate::remote::TierResult<crate::remote::Version> {
            self.inner.put(key, data, len)
        }
        fn create(
            &self,
            key: &str,
            bytes: &[u8],
        ) -> crate::remote::TierResult<crate::remote::Version> {
            self.inner.create(key, bytes)
        }
        fn replace(
            &self,
            key: &str,
            bytes: &[u8],
            version: &crate::remote::Version,
        ) -> crate::remote::TierResult<crate::remote::Version> {
            self.inner.replace(key, bytes, version)
        }
        fn delete(&self, key: &str) -> crate::remote::TierResult<()> {
            self.inner.delete(key)
        }
    }

    fn unreachable(
        inner: &Arc<dyn Tier>,
        fails: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> Arc<dyn Tier> {
        Arc::new(Unreachable {
            inner: Arc::clone(inner),
            fails,
        })
    }

    /// The job's `packs/` directory.
    fn packs_dir(job: &JobStore) -> std::path::PathBuf {
        job.pack_path("x").parent().unwrap().to_owned()
    }

    /// No staged (temporary) file is left in the job's `packs/`.
    fn assert_no_staged_files(job: &JobStore) {
        let left: Vec<String> = std::fs::read_dir(packs_dir(job))
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().unwrap().is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(".tmp-"))
            .collect();
        assert!(left.is_empty(), "staged files left: {left:?}");
    }

    /// The local store is as it was before a failed fetch: nothing in it.
    fn assert_untouched(job: &JobStore) {
        assert!(job.snapshot_seqs().unwrap().is_empty());
        assert!(
            job.pack_names().unwrap().is_empty(),
            "{:?}",
            job.pack_names()
        );
        assert_no_staged_files(job);
    }

    /// The packs snapshot `seq` of `job` uses.
    fn packs_of(job: &JobStore, seq: u64) -> Vec<String> {
        supervise_store::SnapshotReader::open(job, seq)
            .unwrap()
            .manifest()
            .packs
            .clone()
    }

    /// A job whose newest snapshot (`n`) uses `n` packs, one written by each of `n` writers;
    /// entry `e{i}` holds `entry(i)`.
    fn job_of_many_packs(dir: &Path, n: usize) -> JobStore {
        let job = Store::open(dir.join("node-a")).unwrap().job("j").unwrap();
        for last in 0..n {
            let mut writer = SnapshotWriter::open(job.clone(), 0).unwrap();
            let mut b = writer.begin(None);
            for i in 0..=last {
                b.slice(&format!("e{i}"), &entry(i)).unwrap();
            }
            b.commit().unwrap();
        }
        job
    }

    fn entry(i: usize) -> Vec<u64> {
        (0..60_000u64)
            .map(|x| x.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64 + 1).rotate_left(17))
            .collect()
    }

    #[test]
    fn a_snapshot_of_several_packs_comes_in_parallel_whole_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let n = 6;
        let job = job_of_many_packs(dir.path(), n);
        let packs = packs_of(&job, n as u64);
        assert_eq!(packs.len(), n, "{packs:?}");
        let tiers = [replica(dir.path(), "r1"), replica(dir.path(), "r2")];
        upload(&job, &tiers);
        // One pack damaged on r1 (comes from r2), one missing on r1.
        let r1_packs = dir.path().join("r1/j/packs");
        let one = r1_packs.join(format!("{}.pack", packs[1]));
        let mut bytes = std::fs::read(&one).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 1;
        std::fs::write(&one, bytes).unwrap();
        std::fs::remove_file(r1_packs.join(format!("{}.pack", packs[4]))).unwrap();
        let fresh = fresh_job(dir.path(), "node-b");
        let mut trouble = Vec::new();
        let fetched = fetch_newer(&tiers, &fresh, 0, &mut trouble)
            .unwrap()
            .unwrap();
        assert_eq!(fetched.seq, n as u64);
        assert_eq!(fetched.packs, n);
        assert!(fetched.tier.ends_with("r1"), "{fetched:?}");
        let on_disk: u64 = packs
            .iter()
            .map(|p| std::fs::metadata(fresh.pack_path(p)).unwrap().len())
            .sum();
        assert!(fetched.bytes > on_disk, "{} {on_disk}", fetched.bytes);
        assert_eq!(trouble.len(), 2, "{trouble:?}");
        assert!(
            trouble
                .iter()
                .any(|t| t.why.contains(&packs[1]) && t.why.contains("damaged")),
            "{trouble:?}"
        );
        assert!(
            trouble.iter().any(|t| t.why.contains(&packs[4])),
            "{trouble:?}"
        );
        let mut names = fresh.pack_names().unwrap();
        names.sort();
        let mut want = packs.clone();
        want.sort();
        assert_eq!(names, want);
        assert_no_staged_files(&fresh);
        let reader = supervise_store::SnapshotReader::open(&fresh, n as u64).unwrap();
        reader.verify().unwrap();
        for i in 0..n {
            let mut got = vec![0u8; 60_000 * 8];
            assert!(
                reader
                    .slice_into(&format!("e{i}"), "u64", &mut got)
                    .unwrap()
            );
            assert_eq!(got, bytemuck::cast_slice::<u64, u8>(&entry(i)));
        }
    }

    #[test]
    fn a_pack_damaged_everywhere_passes_the_snapshot_over_and_leaves_nothing_staged() {
        let dir = tempfile::tempdir().unwrap();
        let n = 5;
        let job = job_of_many_packs(dir.path(), n);
        let tiers = [replica(dir.path(), "r1")];
        upload(&job, &tiers);
        // Only the newest snapshot's own pack (its last) is damaged; older ones are whole
        // but were not uploaded (only the newest is): the fetch finds nothing whole.
        let packs = packs_of(&job, n as u64);
        let last = dir.path().join(format!("r1/j/packs/{}.pack", packs[n - 1]));
        let mut bytes = std::fs::read(&last).unwrap();
        let end = bytes.len() - 1;
        bytes[end] ^= 0x40;
        std::fs::write(&last, bytes).unwrap();
        let fresh = fresh_job(dir.path(), "node-b");
        let mut trouble = Vec::new();
        match fetch_newer(&tiers, &fresh, 0, &mut trouble) {
            Err(FetchError::NoneWhole { found: 1, why }) => {
                assert!(why[0].contains(&packs[n - 1]), "{why:?}")
            }
            other => panic!("{other:?} {trouble:?}"),
        }
        assert_untouched(&fresh);
    }

    #[test]
    fn a_replica_that_cannot_be_listed_is_passed_by_when_another_answers() {
        let dir = tempfile::tempdir().unwrap();
        let job = job_with_snapshots(dir.path(), 2);
        let (r1, r2) = (replica(dir.path(), "r1"), replica(dir.path(), "r2"));
        upload(&job, &[Arc::clone(&r1), Arc::clone(&r2)]);
        let down = unreachable(&r2, |_: &str| true);
        // A fresh node fetches from the replica that answers.
        let fresh = fresh_job(dir.path(), "node-b");
        let mut trouble = Vec::new();
        let tiers = [Arc::clone(&down), Arc::clone(&r1)];
        let fetched = fetch_newer(&tiers, &fresh, 0, &mut trouble)
            .unwrap()
            .unwrap();
        assert_eq!(fetched.seq, 2);
        assert!(
            trouble.iter().any(|t| t.tier == down.describe()),
            "{trouble:?}"
        );
        // A node as new as what answers starts from its own snapshots.
        let mut trouble = Vec::new();
        assert_eq!(fetch_newer(&tiers, &fresh, 1, &mut trouble).unwrap(), None);
        assert!(!trouble.is_empty());
        // With no tier answering, nothing is known: an error.
        let all_down = [down, unreachable(&r1, |_: &str| true)];
        assert!(matches!(
            fetch_newer(&all_down, &fresh, 1, &mut Vec::new()),
            Err(FetchError::Unavailable { .. })
        ));
    }

    #[test]
    fn an_unreachable_tier_ends_the_fetch_with_an_error_and_nothing_imported() {
        let dir = tempfile::tempdir().unwrap();
        let job = job_with_snapshots(dir.path(), 2);
        let r1 = replica(dir.path(), "r1");
        upload(&job, std::slice::from_ref(&r1));
        // Snapshot 3 brings a pack of its own; snapshot 2 stays on the tier, whole.
        let mut writer = SnapshotWriter::open(job.clone(), 0).unwrap();
        let mut b = writer.begin(None);
        b.slice("grid", &vec![7.0f64; 40_000]).unwrap();
        b.commit().unwrap();
        upload(&job, std::slice::from_ref(&r1));
        let new_pack: Vec<String> = packs_of(&job, 3)
            .into_iter()
            .filter(|p| !packs_of(&job, 2).contains(p))
            .collect();
        assert_eq!(new_pack.len(), 1);
        let new_key = layout::pack("j", &new_pack[0]);
        let cases: Vec<(&str, Arc<dyn Tier>)> = vec![
            (
                "the list",
                unreachable(&r1, |k: &str| k.ends_with("/snapshots/")),
            ),
            ("every get", unreachable(&r1, |k: &str| !k.ends_with('/'))),
            ("the newest manifest", {
                let key = layout::manifest("j", 1, 3);
                unreachable(&r1, move |k: &str| k == key)
            }),
            ("the newest snapshot's own pack", {
                let key = new_key.clone();
                unreachable(&r1, move |k: &str| k == key)
            }),
        ];
        for (i, (what, tier)) in cases.into_iter().enumerate() {
            let fresh = fresh_job(dir.path(), &format!("node-{i}"));
            let mut trouble = Vec::new();
            match fetch_newer(&[tier], &fresh, 0, &mut trouble) {
                Err(e @ FetchError::Unavailable { .. }) => {
                    assert!(e.to_string().contains("connection refused"), "{what}: {e}")
                }
                other => panic!("{what}: {other:?} {trouble:?}"),
            }
            assert!(!trouble.is_empty(), "{what}");
            assert_untouched(&fresh);
        }
        // A node with a snapshot of its own is not started from it either while the tier
        // may hold a newer one.
        let own = job_with_snapshots(&dir.path().join("node-own"), 1);
        let tier = unreachable(&r1, |k: &str| k.ends_with("/snapshots/"));
        assert!(matches!(
            fetch_newer(&[tier], &own, 0, &mut Vec::new()),
            Err(FetchError::Unavailable { .. })
        ));
        // Damage on one tier and an outage on the other: not passed over either.
        let r2 = replica(dir.path(), "r2");
        upload(&job, std::slice::from_ref(&r2));
        damage_packs(&dir.path().join("r2"), 1);
        let key = new_key.clone();
        let tiers = [unreachable(&r1, move |k: &str| k == key), r2];
        let fresh = fresh_job(dir.path(), "node-mixed");
        assert!(matches!(
            fetch_newer(&tiers, &fresh, 0, &mut Vec::new()),
            Err(FetchError::Unavailable { .. })
        ));
        assert_untouched(&fresh);
        // The other tier has what the first cannot give: the fetch goes on.
        let r3 = replica(dir.path(), "r3");
        upload(&job, std::slice::from_ref(&r3));
        let key = new_key.clone();
        let tiers = [unreachable(&r1, move |k: &str| k == key), r3];
        let fresh = fresh_job(dir.path(), "node-ok");
        let fetched = fetch_newer(&tiers, &fresh, 0, &mut Vec::new())
            .unwrap()
            .unwrap();
        assert_eq!(fetched.seq, 3);
        supervise_store::SnapshotReader::open(&fresh, 3)
            .unwrap()
            .verify()
            .unwrap();
    }

    #[test]
    fn a_local_error_midway_ends_the_fetch_and_leaves_no_staged_file() {
        let dir = tempfile::tempdir().unwrap();
        let n = 4;
        let job = job_of_many_packs(dir.path(), n);
        let tiers = [replica(dir.path(), "r1")];
        upload(&job, &tiers);
        let packs = packs_of(&job, n as u64);
        let fresh = fresh_job(dir.path(), "node-b");
        // A directory where the last pack is to be staged: staging it fails (a local error)
        // while the others are staged or downloading.
        let blocker = packs_dir(&fresh).join(format!(".tmp-import-{}.pack", packs[n - 1]));
        std::fs::create_dir(&blocker).unwrap();
        std::fs::write(blocker.join("x"), b"x").unwrap();
        let mut trouble = Vec::new();
        match fetch_newer(&tiers, &fresh, 0, &mut trouble) {
            Err(FetchError::Local(_)) => {}
            other => panic!("{other:?} {trouble:?}"),
        }
        assert_untouched(&fresh);
        // Once the disk is right again, the fetch goes through.
        std::fs::remove_dir_all(&blocker).unwrap();
        let fetched = fetch_newer(&tiers, &fresh, 0, &mut Vec::new())
            .unwrap()
            .unwrap();
        assert_eq!(fetched.packs, n);
    }

    /// Incompressible words (xorshift).
    fn state_like(n: usize) -> Vec<u64> {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            })
            .collect()
    }

    #[test]
    fn the_streaming_check_finds_what_a_scan_of_the_file_finds() {
        let dir = tempfile::tempdir().unwrap();
        // Records of both kinds: compressed (smooth data) and raw (noise).
        let job = Store::open(dir.path().join("s")).unwrap().job("j").unwrap();
        let mut writer = SnapshotWriter::open(job.clone(), 0).unwrap();
        let mut b = writer.begin(None);
        let smooth: Vec<f64> = (0..30_000).map(|i| (i as f64 * 1e-4).sin()).collect();
        b.slice("smooth", &smooth).unwrap();
        b.slice("noise", &state_like(30_000)).unwrap();
        b.commit().unwrap();
        let name = &packs_of(&job, 1)[0];
        let pack = std::fs::read(job.pack_path(name)).unwrap();
        let kinds: Vec<Codec> = supervise_store::pack_scan::scan_pack(&pack, Path::new("p"))
            .unwrap()
            .iter()
            .map(|r| r.header.codec)
            .collect();
        assert!(
            kinds.contains(&Codec::Raw) && kinds.contains(&Codec::Zstd),
            "{kinds:?}"
        );
        let path = Path::new("p");
        let check = |bytes: &[u8], piece: usize| -> supervise_store::Result<u64> {
            let mut check = PackCheck::new(path)?;
            for part in bytes.chunks(piece.max(1)) {
                check.feed(part)?;
            }
            if bytes.is_empty() {
                check.feed(&[])?;
            }
            check.finish()?;
            Ok(check.len)
        };
        let scan = |bytes: &[u8]| supervise_store::pack_scan::scan_pack(bytes, path).map(|_| ());
        for piece in [1, 7, 44, 4096, 1 << 20, pack.len()] {
            assert_eq!(check(&pack, piece).unwrap(), pack.len() as u64, "{piece}");
        }
        // Every cut and a spread of flipped bytes: the same verdict as a scan.
        let mut cuts: Vec<usize> = (0..200).collect();
        cuts.extend((0..pack.len()).step_by(997));
        for len in cuts {
            let bytes = &pack[..len.min(pack.len())];
            assert_eq!(
                check(bytes, 4096).is_ok(),
                scan(bytes).is_ok(),
                "cut at {len}"
            );
        }
        for at in (0..pack.len()).step_by(1009).chain(0..100) {
            let mut bad = pack.clone();
            bad[at] ^= 0x21;
            let (streamed, scanned) = (check(&bad, 3000), scan(&bad));
            assert_eq!(streamed.is_ok(), scanned.is_ok(), "byte {at}");
            if let (Err(a), Err(b)) = (streamed, scanned) {
                assert_eq!(a.to_string(), b.to_string(), "byte {at}");
            }
        }
    }
}
