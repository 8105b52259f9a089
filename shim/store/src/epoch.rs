//! Epochs: the snapshots of a job of many ranks (an MPI job).
//!
//! Each rank writes its part of an epoch as an ordinary snapshot of the job, numbered
//! [`part_seq`]`(epoch, rank)`, into the job's one `snapshots/` and `packs/` directories, so
//! a chunk one rank committed is not stored again by another (every rank's writer indexes
//! what every rank committed; equal chunks new in the same epoch are stored by each). When every rank's part is durable, the supervisor publishes the epoch: a small
//! file naming each part and the blake3 of its manifest, written atomically (temp name,
//! fsync, rename, fsync the directory). The rename is the instant the job's snapshot exists;
//! parts of an epoch that never got its file belong to nothing and are removed.
//!
//! ```text
//! <store>/<job>/epochs/<epoch, 20 digits>.epoch           published epochs
//! <store>/<job>/epochs/<epoch, 20 digits>.epoch.damaged   epochs found damaged (kept for a look)
//! ```
//!
//! The file: the line `supervise-epoch 1`, one line of JSON ([`Epoch`]), and the line
//! `blake3 <hex of the JSON line's bytes>`.

use std::collections::{BTreeSet, HashSet};
use std::io::{ErrorKind, Read};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::RestoreFrom;
use crate::control::DamagedSnapshot;
use crate::error::{Error, Result, io_err};
use crate::fsops::{Dir, TMP_PREFIX};
use crate::retention::Retention;
use crate::store::{JobStore, RetentionReport};

/// The format version this release writes (and the newest it reads).
pub const VERSION: u16 = 1;

/// The most ranks a job may have: a part's number holds the rank in its low 20 bits.
pub const MAX_RANKS: u32 = 1 << RANK_BITS;

const RANK_BITS: u32 = 20;

/// The bound on an epoch file's size (about 300,000 ranks).
pub const MAX_EPOCH_LEN: u64 = 64 << 20;

const MAGIC: &str = "supervise-epoch";
const SUFFIX: &str = ".epoch";
const DAMAGED_SUFFIX: &str = ".epoch.damaged";

/// The snapshot number of `rank`'s part of `epoch` (epochs count from 1).
pub fn part_seq(epoch: u64, rank: u32) -> u64 {
    (epoch << RANK_BITS) | u64::from(rank)
}

/// The epoch and rank of a part's snapshot number; `None` for a snapshot of a single process
/// (numbered below 2^20).
pub fn part_of(seq: u64) -> Option<(u64, u32)> {
    let epoch = seq >> RANK_BITS;
    (epoch > 0).then_some((epoch, (seq & u64::from(MAX_RANKS - 1)) as u32))
}

/// One rank's part of an epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// The rank.
    pub rank: u32,
    /// Its snapshot ([`part_seq`] of the epoch and rank).
    pub seq: u64,
    /// The blake3 of its manifest file (hex): the epoch names exactly this part.
    pub manifest_blake3: String,
    /// Bytes of its entries.
    pub bytes_total: u64,
    /// Bytes of its chunks not stored before.
    pub bytes_new: u64,
    /// Bytes it wrote (packs and manifest).
    pub bytes_written: u64,
}

/// A published epoch: every rank's part of one consistent cut of the job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Epoch {
    /// The job.
    pub job: String,
    /// The epoch's number (from 1).
    pub epoch: u64,
    /// The safe point every rank captured at (counted from the job's start).
    pub step: u64,
    /// How many ranks the job has.
    pub size: u32,
    /// When it was published (ms since the Unix epoch).
    pub created_unix_ms: u64,
    /// Rank 0's progress tag.
    pub tag: Option<String>,
    /// From the request to the publication.
    pub duration_ms: u64,
    /// Each rank's part, by rank.
    pub parts: Vec<Part>,
}

impl Epoch {
    /// Bytes of every part's entries.
    pub fn bytes_total(&self) -> u64 {
        self.parts.iter().map(|p| p.bytes_total).sum()
    }

    /// Bytes of chunks the parts stored anew.
    pub fn bytes_new(&self) -> u64 {
        self.parts.iter().map(|p| p.bytes_new).sum()
    }

    /// Bytes the parts wrote.
    pub fn bytes_written(&self) -> u64 {
        self.parts.iter().map(|p| p.bytes_written).sum()
    }

    /// The part of `rank`.
    pub fn part(&self, rank: u32) -> Option<&Part> {
        self.parts.get(rank as usize).filter(|p| p.rank == rank)
    }

    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_string(self).expect("epochs serialize");
        let hash = blake3::hash(json.as_bytes()).to_hex();
        format!("{MAGIC} {VERSION}\n{json}\nblake3 {hash}\n").into_bytes()
    }

    /// Decodes and checks an epoch file's bytes (`path` names it in errors): the header, the
    /// version, the checksum, and that the parts are ranks 0 to size-1 in order, each
    /// numbered as [`part_seq`] says.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Self> {
        let bad = |why: String| Error::Corrupt {
            path: path.to_owned(),
            why,
        };
        let text = std::str::from_utf8(bytes).map_err(|_| bad("not text".into()))?;
        if !text.ends_with('\n') {
            return Err(bad("cut short".into()));
        }
        let mut lines = text.split_terminator('\n');
        let header = lines.next().unwrap_or_default();
        let version = header
            .strip_prefix(MAGIC)
            .and_then(|v| v.trim().parse::<u16>().ok())
            .ok_or_else(|| bad("not an epoch file".into()))?;
        if version > VERSION {
            return Err(Error::UnsupportedVersion {
                path: path.to_owned(),
                found: version,
                supported: VERSION,
            });
        }
        let json = lines.next().unwrap_or_default();
        let sum = lines
            .next()
            .and_then(|l| l.strip_prefix("blake3 "))
            .ok_or_else(|| bad("no checksum (cut short?)".into()))?;
        if lines.next().is_some() {
            return Err(bad("trailing lines".into()));
        }
        if blake3::hash(json.as_bytes()).to_hex().as_str() != sum {
            return Err(bad("checksum mismatch".into()));
        }
        let epoch: Epoch =
            serde_json::from_str(json).map_err(|e| bad(format!("bad epoch record: {e}")))?;
        if epoch.epoch == 0 || epoch.size == 0 || epoch.size > MAX_RANKS {
            return Err(bad(format!(
                "epoch {} of {} ranks is out of range",
                epoch.epoch, epoch.size
            )));
        }
        if epoch.parts.len() != epoch.size as usize {
            return Err(bad(format!(
                "{} parts for {} ranks",
                epoch.parts.len(),
                epoch.size
            )));
        }
        for (i, part) in epoch.parts.iter().enumerate() {
            if part.rank as usize != i || part.seq != part_seq(epoch.epoch, part.rank) {
                return Err(bad(format!(
                    "part {i} is rank {} snapshot {}",
                    part.rank, part.seq
                )));
            }
        }
        Ok(epoch)
    }
}

fn file_name(epoch: u64) -> String {
    format!("{epoch:020}{SUFFIX}")
}

fn damaged_name(epoch: u64) -> String {
    format!("{epoch:020}{DAMAGED_SUFFIX}")
}

fn list(dir: &Dir, suffix: &str) -> Result<Vec<u64>> {
    let mut epochs: Vec<u64> = dir
        .list()?
        .iter()
        .filter(|f| !f.starts_with(TMP_PREFIX))
        .filter_map(|f| f.strip_suffix(suffix))
        .filter_map(|s| s.parse().ok())
        .collect();
    epochs.sort_unstable();
    Ok(epochs)
}

/// The job's epochs directory, or `None` if it has none.
fn dir_of(job: &JobStore) -> Result<Option<Dir>> {
    if !job.job_dir().has_dir("epochs")? {
        return Ok(None);
    }
    job.epochs_dir(false).map(Some)
}

/// The numbers of the published epochs, oldest first.
pub fn numbers(job: &JobStore) -> Result<Vec<u64>> {
    match dir_of(job)? {
        Some(dir) => list(&dir, SUFFIX),
        None => Ok(Vec::new()),
    }
}

/// The numbers of the epochs set aside as damaged, oldest first.
pub fn set_aside_numbers(job: &JobStore) -> Result<Vec<u64>> {
    match dir_of(job)? {
        Some(dir) => list(&dir, DAMAGED_SUFFIX),
        None => Ok(Vec::new()),
    }
}

/// True when the job has epochs (published or set aside): it is a job of many ranks.
pub fn has_epochs(job: &JobStore) -> Result<bool> {
    Ok(!numbers(job)?.is_empty() || !set_aside_numbers(job)?.is_empty())
}

/// The highest epoch number used in the job: published, set aside, or by a part written for
/// an epoch that never completed. The next epoch is numbered above it.
pub fn highest(job: &JobStore) -> Result<u64> {
    let published = numbers(job)?.last().copied().unwrap_or(0);
    let aside = set_aside_numbers(job)?.last().copied().unwrap_or(0);
    let parts = job
        .snapshot_seqs()?
        .into_iter()
        .chain(job.damaged_seqs()?)
        .filter_map(part_of)
        .map(|(e, _)| e)
        .max()
        .unwrap_or(0);
    Ok(published.max(aside).max(parts))
}

/// Reads and checks epoch `n` (never through a link, never more than [`MAX_EPOCH_LEN`]).
pub fn read(job: &JobStore, n: u64) -> Result<Epoch> {
    let missing = || Error::NoSuchSnapshot {
        job: job.name().to_owned(),
        seq: n,
    };
    let dir = dir_of(job)?.ok_or_else(missing)?;
    let name = file_name(n);
    let path = dir.join(&name);
    let file = dir.open_read(&name).map_err(|e| match e {
        Error::Io { source, .. } if source.kind() == ErrorKind::NotFound => missing(),
        e => e,
    })?;
    let len = file.metadata().map_err(io_err("stat", &path))?.len();
    if len > MAX_EPOCH_LEN {
        return Err(Error::TooLarge {
            path,
            len,
            max: MAX_EPOCH_LEN,
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(MAX_EPOCH_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err("read", &path))?;
    let epoch = Epoch::decode(&bytes, &path)?;
    if epoch.epoch != n || epoch.job != job.name() {
        return Err(Error::Corrupt {
            path,
            why: format!(
                "the file says job {:?} epoch {}, not job {:?} epoch {n}",
                epoch.job,
                epoch.epoch,
                job.name()
            ),
        });
    }
    Ok(epoch)
}

/// Checks that every part of `epoch` is there: its manifest reads, is the one the epoch names
/// (blake3), and its packs open. Chunks are verified by each rank when it restores.
pub fn check_parts(job: &JobStore, epoch: &Epoch) -> Result<()> {
    for part in &epoch.parts {
        // A part that is gone makes the epoch incomplete: damage, never restored.
        let (bytes, manifest) = job.manifest_file(part.seq).map_err(|e| match e {
            Error::NoSuchSnapshot { .. } => Error::Corrupt {
                path: job.manifest_path(part.seq),
                why: format!(
                    "rank {}'s part of epoch {} is missing",
                    part.rank, epoch.epoch
                ),
            },
            e => e,
        })?;
        if blake3::hash(&bytes).to_hex().as_str() != part.manifest_blake3 {
            return Err(Error::Corrupt {
                path: job.manifest_path(part.seq),
                why: format!(
                    "not the manifest epoch {} names for rank {}",
                    epoch.epoch, part.rank
                ),
            });
        }
        job.open_packs(&manifest)?;
    }
    Ok(())
}

/// The blake3 (hex) of snapshot `seq`'s manifest file, for [`Part::manifest_blake3`].
pub fn manifest_hash(job: &JobStore, seq: u64) -> Result<String> {
    let (bytes, _) = job.manifest_file(seq)?;
    Ok(blake3::hash(&bytes).to_hex().to_string())
}

/// Publishes `epoch` durably and atomically, after checking that every part it names is
/// there. Only the job's owner (the supervisor) calls it.
pub fn publish(job: &JobStore, epoch: &Epoch) -> Result<()> {
    check_parts(job, epoch)?;
    job.epochs_dir(true)?
        .write_atomic(&file_name(epoch.epoch), &epoch.encode())
}

/// Sets epoch `n` aside as damaged (renamed to `.epoch.damaged`, kept for a look).
pub fn set_aside(job: &JobStore, n: u64) -> Result<()> {
    job.epochs_dir(false)?
        .set_aside(&file_name(n), &damaged_name(n))
}

/// Picks the epoch to restore: the newest `from` allows (its numbers are epoch numbers)
/// whose file reads and whose parts are all there. Damaged ones are set aside (never under
/// [`RestoreFrom::Exact`], where damage is an error) and listed.
pub fn choose(job: &JobStore, from: &RestoreFrom) -> Result<(Option<Epoch>, Vec<DamagedSnapshot>)> {
    let candidates = match from {
        RestoreFrom::Nothing => Vec::new(),
        RestoreFrom::Exact(n) => vec![*n],
        RestoreFrom::Latest { .. } => from.candidates(&numbers(job)?),
    };
    let mut damaged = Vec::new();
    for n in candidates {
        match read(job, n).and_then(|e| check_parts(job, &e).map(|()| e)) {
            Ok(epoch) => return Ok((Some(epoch), damaged)),
            Err(e) if e.is_corruption() && !matches!(from, RestoreFrom::Exact(_)) => {
                set_aside(job, n)?;
                damaged.push(DamagedSnapshot {
                    seq: n,
                    why: e.to_string(),
                });
            }
            Err(e) => return Err(e),
        }
    }
    Ok((None, damaged))
}

/// Retention over epochs, run by the supervisor while no rank writes: keeps the epochs
/// `policy` names (its numbers are epoch numbers), removes older ones and damaged ones older
/// than the oldest kept, then every part no kept epoch names (parts of epochs that never
/// completed among them), what dead writers left, and the packs nothing references. Snapshots
/// of a single process (numbered below 2^20) are left alone. An epoch file that cannot be
/// read keeps everything (what it needs is unknown).
pub fn collect(job: &JobStore, policy: &Retention) -> Result<RetentionReport> {
    let published = numbers(job)?;
    let now = crate::clock::now_unix_ms();
    let horizon = policy
        .within
        .map_or(0, |w| now.saturating_sub(crate::clock::millis(w)));
    let (old, kept) = policy.choose(&published, |n| {
        read(job, n).map_or(true, |e| e.created_unix_ms >= horizon)
    });
    let mut live: HashSet<u64> = HashSet::new();
    for &n in &kept {
        match read(job, n) {
            Ok(e) => live.extend(e.parts.iter().map(|p| p.seq)),
            Err(_) => return Ok(RetentionReport::default()),
        }
    }
    let oldest_kept = kept.first().copied().unwrap_or(u64::MAX);
    let dir = job.epochs_dir(true)?;
    let mut files: Vec<String> = old.iter().map(|&n| file_name(n)).collect();
    files.extend(
        list(&dir, DAMAGED_SUFFIX)?
            .into_iter()
            .filter(|&n| n < oldest_kept)
            .map(damaged_name),
    );
    dir.remove_durably(files.iter().map(String::as_str))?;
    dir.remove_leftover_tmp()?;
    let dead: BTreeSet<u64> = job
        .snapshot_seqs()?
        .into_iter()
        .chain(job.damaged_seqs()?)
        .filter(|s| part_of(*s).is_some() && !live.contains(s))
        .collect();
    let dead: Vec<u64> = dead.into_iter().collect();
    let mut report = job.remove_snapshots(&dead)?;
    report.removed_snapshots = old;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(n: u64, size: u32) -> Epoch {
        Epoch {
            job: "j".into(),
            epoch: n,
            step: 40,
            size,
            created_unix_ms: 1,
            tag: Some("step 40".into()),
            duration_ms: 3,
            parts: (0..size)
                .map(|rank| Part {
                    rank,
                    seq: part_seq(n, rank),
                    manifest_blake3: "00".into(),
                    bytes_total: 10,
                    bytes_new: 5,
                    bytes_written: 6,
                })
                .collect(),
        }
    }

    #[test]
    fn part_numbers_round_trip_and_leave_single_process_snapshots_alone() {
        assert_eq!(part_of(part_seq(3, 7)), Some((3, 7)));
        assert_eq!(
            part_of(part_seq(1, MAX_RANKS - 1)),
            Some((1, MAX_RANKS - 1))
        );
        assert_eq!(part_of(5), None);
        assert!(part_seq(1, 0) > 999_999);
    }

    #[test]
    fn files_round_trip_and_damage_is_named() {
        let path = Path::new("e");
        let e = epoch(2, 3);
        let bytes = e.encode();
        assert_eq!(Epoch::decode(&bytes, path).unwrap(), e);
        assert_eq!(e.bytes_total(), 30);
        // Every cut and every flipped byte is refused.
        for cut in 0..bytes.len() {
            assert!(Epoch::decode(&bytes[..cut], path).is_err(), "cut at {cut}");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x20;
            assert!(Epoch::decode(&b, path).is_err(), "flip at {i}");
        }
        // A part missing, or numbered for another epoch, is refused even with a good checksum.
        let mut short = epoch(2, 3);
        short.parts.pop();
        assert!(matches!(
            Epoch::decode(&short.encode(), path),
            Err(Error::Corrupt { .. })
        ));
        let mut wrong = epoch(2, 2);
        wrong.parts[1].seq = part_seq(1, 1);
        assert!(Epoch::decode(&wrong.encode(), path).is_err());
        // A newer version is named as such.
        let newer = String::from_utf8(bytes)
            .unwrap()
            .replacen(" 1\n", " 9\n", 1);
        assert!(matches!(
            Epoch::decode(newer.as_bytes(), path),
            Err(Error::UnsupportedVersion { found: 9, .. })
        ));
    }
}
