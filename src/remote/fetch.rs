//! Resume on a fresh node: bringing the newest durable snapshot into the local store.
//!
//! Before the program starts, the supervisor compares the newest snapshot on the durable tiers
//! (highest lease generation, then highest seq) with the local store's. When the tiers hold a
//! newer one, its manifest and only the packs not already local are copied in, each pack
//! verified record by record (blake3 of every chunk) before it is published; a pack that fails
//! on one tier is taken from another that has it, and a snapshot that cannot be had whole is
//! passed over for the next older one. The local commit rule holds: packs first, the manifest
//! last ([`JobStore::import`]). The program then restores from the local store as always.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use supervise_store::format::{MAX_MANIFEST_LEN, Manifest};
use supervise_store::{JobStore, StagedPack};

use super::{Tier, TierError, layout};

/// The largest pack accepted from a tier (a writer starts a new pack every 128 MiB; one
/// chunk may overshoot that by at most its own size).
const MAX_PACK_LEN: u64 = 1 << 30;

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

/// Every snapshot the tiers hold, newest first: (generation, seq) and the tiers holding it.
pub fn remote_snapshots(
    tiers: &[Arc<dyn Tier>],
    job: &str,
    trouble: &mut Vec<Trouble>,
) -> Vec<((u64, u64), Vec<usize>)> {
    let mut found: std::collections::BTreeMap<(u64, u64), Vec<usize>> = Default::default();
    for (i, tier) in tiers.iter().enumerate() {
        match tier.list(&layout::snapshots(job)) {
            Ok(objects) => {
                for object in objects {
                    if let Some(at) = layout::parse_manifest(job, &object.key) {
                        found.entry(at).or_default().push(i);
                    }
                }
            }
            Err(e) => trouble.push(Trouble {
                tier: tier.describe().to_owned(),
                seq: None,
                why: e.to_string(),
            }),
        }
    }
    found.into_iter().rev().collect()
}

/// Brings in the newest durable snapshot that is newer than the local store's: one of a
/// higher generation than `local_generation` (the one the local snapshots were taken under),
/// or of the same generation and a higher seq than `local_newest`. `Ok(None)`: the local store
/// is as new as any tier (or no tier snapshot could be had whole).
pub fn fetch_newer(
    tiers: &[Arc<dyn Tier>],
    job: &JobStore,
    local_generation: u64,
    trouble: &mut Vec<Trouble>,
) -> supervise_store::Result<Option<Fetched>> {
    let local_newest = job.snapshot_seqs()?.last().copied();
    let newer = |generation: u64, seq: u64| {
        generation > local_generation
            || (generation == local_generation && local_newest.is_none_or(|l| seq > l))
    };
    for ((generation, seq), holders) in remote_snapshots(tiers, job.name(), trouble) {
        if !newer(generation, seq) {
            break;
        }
        for &first in &holders {
            match fetch_one(tiers, first, job, generation, seq, trouble) {
                Ok(Some(fetched)) => return Ok(Some(fetched)),
                Ok(None) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(None)
}

/// Fetches snapshot (`generation`, `seq`) with its manifest from `tiers[first]` and each pack
/// from the first tier that has it whole. `Ok(None)`: it cannot be had (told in `trouble`).
/// `Err`: the local store failed.
fn fetch_one(
    tiers: &[Arc<dyn Tier>],
    first: usize,
    job: &JobStore,
    generation: u64,
    seq: u64,
    trouble: &mut Vec<Trouble>,
) -> supervise_store::Result<Option<Fetched>> {
    let started = Instant::now();
    let tier = &tiers[first];
    let key = layout::manifest(job.name(), generation, seq);
    let note = |trouble: &mut Vec<Trouble>, tier: &dyn Tier, why: String| {
        trouble.push(Trouble {
            tier: tier.describe().to_owned(),
            seq: Some(seq),
            why,
        })
    };
    let bytes = match tier.get_bytes(&key, MAX_MANIFEST_LEN) {
        Ok((bytes, _)) => bytes,
        Err(e) => {
            note(trouble, tier.as_ref(), e.to_string());
            return Ok(None);
        }
    };
    let manifest = match Manifest::decode(&bytes, Path::new(&key)) {
        Ok(m) if m.seq == seq && m.job == job.name() => m,
        Ok(m) => {
            let why = format!("the manifest says job {:?} snapshot {}", m.job, m.seq);
            note(trouble, tier.as_ref(), why);
            return Ok(None);
        }
        Err(e) => {
            note(trouble, tier.as_ref(), e.to_string());
            return Ok(None);
        }
    };
    let mut staged: Vec<StagedPack> = Vec::new();
    let mut copied = bytes.len() as u64;
    let order: Vec<usize> = std::iter::once(first)
        .chain((0..tiers.len()).filter(|&i| i != first))
        .collect();
    for name in &manifest.packs {
        if job.has_pack(name)? {
            continue;
        }
        let mut got = None;
        for &i in &order {
            let from = &tiers[i];
            let mut pack = job.stage_pack(name)?;
            let key = layout::pack(job.name(), name);
            let result = from.get(&key, &mut pack.file, MAX_PACK_LEN);
            let checked = match result {
                Ok(_) => job.verify_staged(&pack).map_err(|e| e.to_string()),
                Err(TierError::NotFound { .. }) => Err("the pack is missing".to_owned()),
                Err(e) => Err(e.to_string()),
            };
            match checked {
                Ok(_) => {
                    copied += pack.file.metadata().map_or(0, |m| m.len());
                    got = Some(pack);
                    break;
                }
                Err(why) => {
                    note(trouble, from.as_ref(), format!("pack {name}: {why}"));
                    job.discard_staged(pack)?;
                }
            }
        }
        match got {
            Some(pack) => staged.push(pack),
            None => {
                for pack in staged {
                    job.discard_staged(pack)?;
                }
                return Ok(None);
            }
        }
    }
    let packs = staged.len();
    if let Err(e) = job.import(&bytes, &staged) {
        for pack in staged {
            let _ = job.discard_staged(pack);
        }
        if e.is_corruption() {
            note(trouble, tier.as_ref(), e.to_string());
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(Fetched {
        seq,
        generation,
        tier: tier.describe().to_owned(),
        bytes: copied,
        packs,
        duration: started.elapsed(),
    }))
}
