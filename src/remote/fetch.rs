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
/// is as new as any tier (or no tier snapshot could be had whole). `Err`: the local store
/// failed, or a tier's objects are sealed with another key (never a reason to start afresh).
pub fn fetch_newer(
    tiers: &[Arc<dyn Tier>],
    job: &JobStore,
    local_generation: u64,
    trouble: &mut Vec<Trouble>,
) -> anyhow::Result<Option<Fetched>> {
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
) -> anyhow::Result<Option<Fetched>> {
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
        Err(e @ TierError::WrongKey { .. }) => return Err(e.into()),
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
        Err(_) if super::seal::looks_sealed(&bytes) => anyhow::bail!(
            "{}: the snapshots there are sealed: give the key they were sealed with \
             (--encrypt-key)",
            tier.describe()
        ),
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
                Err(e @ TierError::WrongKey { .. }) => return Err(e.into()),
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
        return Err(e.into());
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
        assert_eq!(fetch_newer(&tiers, &empty, 0, &mut trouble).unwrap(), None);
        assert!(trouble.iter().any(|t| t.seq == Some(3)), "{trouble:?}");
        assert!(empty.snapshot_seqs().unwrap().is_empty());
        assert!(
            empty.pack_names().unwrap().is_empty(),
            "no pack of a failed fetch stays: {:?} {trouble:?}",
            empty.pack_names()
        );
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
}
