//! The operator's commands on a job of many ranks, whose snapshots are epochs (see
//! [`supervise_store::epoch`]): `ls` lists epochs, `show` an epoch's ranks, `verify` every
//! part of every epoch, `restore --to` each rank's part in a directory of its own.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use supervise_store::epoch::{self, Epoch};
use supervise_store::{JobStore, SnapshotReader};

use super::{
    Restored, Sharing, Target, age, print_json, progress, ratio, restore_snapshot, stored_bytes,
    time,
};
use crate::human;
use supervise_store::exit;

/// `latest` or an epoch number.
fn epoch_id(job: &JobStore, id: &str) -> Result<u64> {
    if id == "latest" {
        return epoch::numbers(job)?
            .last()
            .copied()
            .with_context(|| format!("job {:?} has no epoch", job.name()));
    }
    id.parse()
        .with_context(|| format!("{id:?} is not an epoch number (see `supervise ls`) nor `latest`"))
}

/// `ls JOB`: the epochs, oldest first, and those set aside.
pub fn ls(t: &Target, job: &JobStore) -> Result<i32> {
    #[derive(Serialize)]
    struct EpochRow {
        epoch: u64,
        created_unix_ms: Option<u64>,
        step: Option<u64>,
        ranks: Option<u32>,
        tag: Option<String>,
        bytes_total: Option<u64>,
        bytes_new: Option<u64>,
        bytes_written: Option<u64>,
        damaged: Option<String>,
    }
    let damaged = |epoch, why| EpochRow {
        epoch,
        created_unix_ms: None,
        step: None,
        ranks: None,
        tag: None,
        bytes_total: None,
        bytes_new: None,
        bytes_written: None,
        damaged: Some(why),
    };
    let mut rows = Vec::new();
    for n in epoch::numbers(job)? {
        rows.push(
            match epoch::read(job, n).and_then(|e| epoch::check_parts(job, &e).map(|()| e)) {
                Ok(e) => EpochRow {
                    epoch: n,
                    created_unix_ms: Some(e.created_unix_ms),
                    step: Some(e.step),
                    ranks: Some(e.size),
                    bytes_total: Some(e.bytes_total()),
                    bytes_new: Some(e.bytes_new()),
                    bytes_written: Some(e.bytes_written()),
                    tag: e.tag,
                    damaged: None,
                },
                Err(e) => damaged(n, e.to_string()),
            },
        );
    }
    for n in epoch::set_aside_numbers(job)? {
        rows.push(damaged(n, "set aside as damaged".into()));
    }
    rows.sort_by_key(|r| r.epoch);
    if t.json {
        return print_json(&rows);
    }
    let dash = || "-".to_owned();
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.epoch.to_string(),
                r.created_unix_ms.map_or_else(dash, time),
                r.created_unix_ms.map_or_else(dash, age),
                r.step.map_or_else(dash, |s| s.to_string()),
                r.ranks.map_or_else(dash, |s| s.to_string()),
                r.tag.clone().unwrap_or_else(dash),
                r.bytes_total.map_or_else(dash, human::bytes),
                r.bytes_new.map_or_else(dash, human::bytes),
                r.damaged
                    .clone()
                    .map_or_else(|| "ok".into(), |d| format!("DAMAGED: {d}")),
            ]
        })
        .collect();
    human::outln!(
        "job {} (its snapshots are epochs of every rank's part)",
        job.name()
    )?;
    human::table(
        &[
            "EPOCH",
            "TIME",
            "AGE",
            "SAFE POINT",
            "RANKS",
            "TAG",
            "SIZE",
            "NEW",
            "STATE",
        ],
        &table,
    )?;
    Ok(0)
}

/// `show EPOCH`: its ranks' parts, their entries, and what the epoch costs on disk.
pub fn show(t: &Target, job: &JobStore, id: &str) -> Result<i32> {
    #[derive(Serialize)]
    struct PartRow {
        rank: u32,
        snapshot: u64,
        bytes_total: u64,
        bytes_new: u64,
        bytes_written: u64,
        entries: Vec<String>,
        chunks: usize,
    }
    #[derive(Serialize)]
    struct Shown {
        job: String,
        epoch: u64,
        step: u64,
        ranks: u32,
        created_unix_ms: u64,
        tag: Option<String>,
        duration_ms: u64,
        bytes_total: u64,
        bytes_new: u64,
        bytes_written: u64,
        stored_bytes: u64,
        dedup_ratio: f64,
        /// Chunks found in more than one rank's part.
        shared_chunks: usize,
        parts: Vec<PartRow>,
    }
    let n = epoch_id(job, id)?;
    let e = epoch::read(job, n)?;
    let mut manifests = Vec::new();
    for part in &e.parts {
        manifests.push(job.read_manifest(part.seq)?);
    }
    let mut seen: HashSet<[u8; 32]> = HashSet::new();
    let mut shared: HashSet<[u8; 32]> = HashSet::new();
    for m in &manifests {
        let own: HashSet<[u8; 32]> = m
            .entries
            .iter()
            .flat_map(|en| en.chunks.iter().map(|c| c.hash))
            .collect();
        for h in own {
            if !seen.insert(h) {
                shared.insert(h);
            }
        }
    }
    let stored = stored_bytes(&manifests);
    let parts = e
        .parts
        .iter()
        .zip(&manifests)
        .map(|(p, m)| PartRow {
            rank: p.rank,
            snapshot: p.seq,
            bytes_total: p.bytes_total,
            bytes_new: p.bytes_new,
            bytes_written: p.bytes_written,
            entries: m.entries.iter().map(|en| en.name.clone()).collect(),
            chunks: m.entries.iter().map(|en| en.chunks.len()).sum(),
        })
        .collect();
    let shown = Shown {
        job: e.job.clone(),
        epoch: e.epoch,
        step: e.step,
        ranks: e.size,
        created_unix_ms: e.created_unix_ms,
        tag: e.tag.clone(),
        duration_ms: e.duration_ms,
        bytes_total: e.bytes_total(),
        bytes_new: e.bytes_new(),
        bytes_written: e.bytes_written(),
        stored_bytes: stored,
        dedup_ratio: ratio(e.bytes_total(), stored),
        shared_chunks: shared.len(),
        parts,
    };
    if t.json {
        return print_json(&shown);
    }
    human::outln!(
        "job {} epoch {}: {} ranks at safe point {}, taken {} ({}) in {}{}",
        shown.job,
        shown.epoch,
        shown.ranks,
        shown.step,
        time(shown.created_unix_ms),
        age(shown.created_unix_ms),
        human::duration(std::time::Duration::from_millis(shown.duration_ms)),
        shown
            .tag
            .as_ref()
            .map(|t| format!(", tag {t:?}"))
            .unwrap_or_default()
    )?;
    human::outln!(
        "{} of state stored in {}: state/stored {:.2}; {} new when taken, {} written; {} chunks \
         held by more than one rank",
        human::bytes(shown.bytes_total),
        human::bytes(shown.stored_bytes),
        shown.dedup_ratio,
        human::bytes(shown.bytes_new),
        human::bytes(shown.bytes_written),
        shown.shared_chunks
    )?;
    let table: Vec<Vec<String>> = shown
        .parts
        .iter()
        .map(|p| {
            vec![
                p.rank.to_string(),
                p.snapshot.to_string(),
                human::bytes(p.bytes_total),
                human::bytes(p.bytes_new),
                p.chunks.to_string(),
                p.entries.join(", "),
            ]
        })
        .collect();
    human::table(
        &["RANK", "SNAPSHOT", "SIZE", "NEW", "CHUNKS", "ENTRIES"],
        &table,
    )?;
    Ok(0)
}

/// `verify [EPOCH]`: every part of every epoch (or of one) read back and re-hashed; exit 5
/// naming what is damaged.
pub fn verify(t: &Target, job: &JobStore, id: Option<&str>) -> Result<i32> {
    #[derive(Serialize)]
    struct Verdict {
        epoch: u64,
        ranks: Option<u32>,
        ok: bool,
        error: Option<String>,
    }
    let numbers = match id {
        Some(id) => vec![epoch_id(job, id)?],
        None => epoch::numbers(job)?,
    };
    let bar = progress(numbers.len() as u64, "verifying");
    let mut verdicts = Vec::new();
    for n in numbers {
        let checked = epoch::read(job, n).and_then(|e| {
            epoch::check_parts(job, &e)?;
            for part in &e.parts {
                SnapshotReader::open(job, part.seq)?
                    .verify()
                    .map_err(|err| supervise_store::Error::Corrupt {
                        path: job.manifest_path(part.seq),
                        why: format!("rank {}'s part: {err}", part.rank),
                    })?;
            }
            Ok(e)
        });
        bar.inc(1);
        let (ranks, error) = match checked {
            Ok(e) => (Some(e.size), None),
            // Retention of a running job removed it meanwhile: not damage.
            Err(_) if id.is_none() && !epoch::numbers(job)?.contains(&n) => continue,
            Err(e) => (None, Some(e.to_string())),
        };
        verdicts.push(Verdict {
            epoch: n,
            ranks,
            ok: error.is_none(),
            error,
        });
    }
    bar.finish_and_clear();
    let damaged = verdicts.iter().filter(|v| !v.ok).count();
    if t.json {
        print_json(&verdicts)?;
    } else {
        for v in &verdicts {
            match (&v.error, v.ranks) {
                (None, Some(r)) => human::outln!("epoch {}: ok ({r} ranks)", v.epoch)?,
                (None, None) => human::outln!("epoch {}: ok", v.epoch)?,
                (Some(e), _) => human::outln!("epoch {}: DAMAGED: {e}", v.epoch)?,
            }
        }
        if verdicts.is_empty() {
            human::outln!("job {} has no epoch to verify", job.name())?;
        }
    }
    if damaged > 0 {
        eprintln!(
            "supervise: {damaged} of {} epochs of job {} are damaged",
            verdicts.len(),
            job.name()
        );
        return Ok(exit::DAMAGED);
    }
    Ok(0)
}

/// `restore EPOCH --to DIR`: each rank's part in `DIR/rank-<R>` (as `restore` writes one
/// snapshot), and the epoch's record in `DIR/epoch.json`.
pub fn restore(t: &Target, job: &JobStore, id: &str, to: &Path, sharing: Sharing) -> Result<i32> {
    #[derive(Serialize)]
    struct Done {
        epoch: Epoch,
        ranks: Vec<Restored>,
    }
    let n = epoch_id(job, id)?;
    let e = epoch::read(job, n)?;
    epoch::check_parts(job, &e)?;
    let index = to.join("epoch.json");
    if std::fs::symlink_metadata(&index).is_ok() {
        anyhow::bail!(
            "{} already exists: restore neither overwrites nor follows a file (choose a new or \
             empty directory)",
            index.display()
        );
    }
    let dir = super::open_target_dir(to, sharing)?;
    let mut ranks = Vec::new();
    for part in &e.parts {
        let sub = to.join(format!("rank-{}", part.rank));
        ranks.push(restore_snapshot(job, part.seq, &sub, sharing)?);
    }
    let done = Done { epoch: e, ranks };
    std::io::Write::write_all(
        &mut super::create_in(&dir, to, "epoch.json", sharing)?,
        &serde_json::to_vec_pretty(&done)?,
    )
    .with_context(|| format!("cannot write {}", index.display()))?;
    if t.json {
        return print_json(&done);
    }
    human::outln!(
        "job {} epoch {} ({} ranks) written to {}, each rank's part in rank-<R> (the epoch is \
         in epoch.json):",
        job.name(),
        n,
        done.epoch.size,
        to.display()
    )?;
    let table: Vec<Vec<String>> = done
        .ranks
        .iter()
        .zip(&done.epoch.parts)
        .map(|(r, p)| {
            vec![
                p.rank.to_string(),
                r.dir.display().to_string(),
                r.entries
                    .iter()
                    .map(|w| w.file.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
            ]
        })
        .collect();
    human::table(&["RANK", "DIR", "FILES"], &table)?;
    Ok(0)
}
