//! The snapshot store: a directory holding one sub-directory per job, each with its snapshot
//! manifests and the pack files their chunks live in.
//!
//! ```text
//! <store>/<job>/snapshots/<seq, 20 digits>.snap           committed manifests
//! <store>/<job>/snapshots/<seq, 20 digits>.snap.damaged   manifests found damaged (kept for a look)
//! <store>/<job>/packs/<seq>-<nonce>-<n>.pack              pack files, immutable once visible
//! ```
//!
//! A job has a single writer at a time (the program's shim). Retention runs in that writer
//! between snapshots, so it never races an in-progress snapshot.

use std::collections::HashSet;
use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result, io_err};
use crate::format::{self, MAX_MANIFEST_LEN, Manifest, RecordHeader};
use crate::fsops::{Access, Dir, Staged, TMP_PREFIX};
use crate::name;
use crate::pack::{FinishedPack, PackWriter};
use crate::pack_scan::PackScanner;
pub use crate::retention::Retention;

/// A store directory.
#[derive(Clone, Debug)]
pub struct Store {
    root: Dir,
}

impl Store {
    /// Opens (creating with mode 0700 if needed) the store at `root`, for writing: it must
    /// belong to this user and be writable by nobody else ([`Error::Unsafe`] otherwise).
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        Ok(Self {
            root: Dir::open_root(&root, true, Access::Owner)?,
        })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Opens an existing store (for commands that only look: a missing store is an error, not
    /// something to create). Checked like [`Store::open`].
    pub fn open_existing(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        Ok(Self {
            root: Dir::open_root(&root, false, Access::Owner)?,
        })
    }

    /// Opens an existing store for looking only, whoever owns it and whatever its mode (links
    /// inside it are still never followed); every change to it fails.
    pub fn open_read_only(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        Ok(Self {
            root: Dir::open_root(&root, false, Access::ReadOnly)?,
        })
    }

    /// The names of the jobs in the store, sorted.
    pub fn jobs(&self) -> Result<Vec<String>> {
        let mut jobs = Vec::new();
        for name in self.root.list()? {
            if name::validate("job", &name).is_ok()
                && self.root.has_dir(&name)?
                && self
                    .root
                    .sub(&name, false)
                    .and_then(|d| d.has_dir("snapshots"))
                    .unwrap_or(false)
            {
                jobs.push(name);
            }
        }
        jobs.sort();
        Ok(jobs)
    }

    /// Opens an existing job (an error naming the jobs there are if it does not exist).
    pub fn existing_job(&self, job: &str) -> Result<JobStore> {
        name::validate("job", job)?;
        // A link where the job or its snapshots should be is not "no such job": it is refused
        // by name when the job is opened.
        let exists =
            self.root.has_dir(job)? && self.root.sub(job, false)?.stat("snapshots")?.is_some();
        if !exists {
            return Err(Error::NoSuchJob {
                job: job.to_owned(),
                store: self.root().to_owned(),
                known: self.jobs()?.join(", "),
            });
        }
        self.open_job(job, false)
    }

    /// Opens (creating if needed) the part of the store that belongs to `job`.
    pub fn job(&self, job: &str) -> Result<JobStore> {
        self.open_job(job, !self.root.read_only())
    }

    fn open_job(&self, job: &str, create: bool) -> Result<JobStore> {
        name::validate("job", job)?;
        let dir = self.root.sub(job, create)?;
        let snapshots = dir.sub("snapshots", create)?;
        let packs = dir.sub("packs", create)?;
        Ok(JobStore {
            name: job.to_owned(),
            dir,
            snapshots,
            packs,
        })
    }
}

/// One job's snapshots and packs. Every operation is relative to the job's directories,
/// opened once without following links.
#[derive(Clone, Debug)]
pub struct JobStore {
    name: String,
    dir: Dir,
    snapshots: Dir,
    packs: Dir,
}

/// A pack being copied into the store from elsewhere, under a temporary name: see
/// [`JobStore::stage_pack`].
#[derive(Debug)]
pub struct StagedPack {
    /// The pack's name (without `.pack`).
    pub name: String,
    /// Its temporary file name in `packs/`.
    tmp: String,
    /// Its temporary path.
    pub path: PathBuf,
    /// The file, open for writing.
    pub file: File,
}

/// What [`JobStore::apply_retention`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Sequence numbers of the snapshots removed.
    pub removed_snapshots: Vec<u64>,
    /// Pack files removed.
    pub removed_packs: Vec<String>,
    /// Bytes freed.
    pub freed_bytes: u64,
    /// Packs less than half of which the kept snapshots still use (see [`JobStore::sparse_packs`]).
    pub sparse_packs: Vec<String>,
}

const SNAP_SUFFIX: &str = ".snap";
const DAMAGED_SUFFIX: &str = ".snap.damaged";
const PACK_SUFFIX: &str = ".pack";

impl JobStore {
    /// The job's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The job's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The directory of a multi-rank job's epochs (`<job>/epochs`; see [`crate::epoch`]),
    /// created if `create`.
    pub fn epochs_dir(&self, create: bool) -> Result<Dir> {
        self.dir.sub("epochs", create && !self.dir.read_only())
    }

    /// The job's directory, open (for what lives beside the snapshots: lock, event log).
    pub fn job_dir(&self) -> &Dir {
        &self.dir
    }

    fn manifest_name(seq: u64) -> String {
        format!("{seq:020}{SNAP_SUFFIX}")
    }

    /// The file name of snapshot `seq`'s manifest once set aside as damaged.
    pub fn damaged_name(seq: u64) -> String {
        format!("{seq:020}{DAMAGED_SUFFIX}")
    }

    fn pack_file(pack: &str) -> String {
        format!("{pack}{PACK_SUFFIX}")
    }

    /// The path of snapshot `seq`'s manifest.
    pub fn manifest_path(&self, seq: u64) -> PathBuf {
        self.snapshots.join(&Self::manifest_name(seq))
    }

    /// The path of snapshot `seq`'s manifest once set aside as damaged.
    pub fn damaged_path(&self, seq: u64) -> PathBuf {
        self.snapshots.join(&Self::damaged_name(seq))
    }

    /// The path of a pack file.
    pub fn pack_path(&self, pack: &str) -> PathBuf {
        self.packs.join(&Self::pack_file(pack))
    }

    fn list(dir: &Dir, suffix: &str) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for file in dir.list()? {
            if let Some(stem) = file.strip_suffix(suffix)
                && !file.starts_with(TMP_PREFIX)
            {
                names.push(stem.to_owned());
            }
        }
        Ok(names)
    }

    fn list_seqs(&self, suffix: &str) -> Result<Vec<u64>> {
        let mut seqs: Vec<u64> = Self::list(&self.snapshots, suffix)?
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        seqs.sort_unstable();
        Ok(seqs)
    }

    /// Sequence numbers of the committed (not quarantined) snapshots, oldest first.
    pub fn snapshot_seqs(&self) -> Result<Vec<u64>> {
        self.list_seqs(SNAP_SUFFIX)
    }

    /// Sequence numbers of snapshots quarantined as damaged, oldest first.
    pub fn damaged_seqs(&self) -> Result<Vec<u64>> {
        self.list_seqs(DAMAGED_SUFFIX)
    }

    /// The highest sequence number ever used in this job (committed or quarantined).
    pub fn highest_seq(&self) -> Result<Option<u64>> {
        let a = self.snapshot_seqs()?.last().copied();
        let b = self.damaged_seqs()?.last().copied();
        Ok(a.max(b))
    }

    /// Names of the visible pack files.
    pub fn pack_names(&self) -> Result<Vec<String>> {
        Self::list(&self.packs, PACK_SUFFIX)
    }

    /// Names of the packs the committed snapshots reference.
    pub fn referenced_packs(&self) -> Result<std::collections::BTreeSet<String>> {
        let mut packs = std::collections::BTreeSet::new();
        for seq in self.snapshot_seqs()? {
            packs.extend(self.read_manifest(seq)?.packs);
        }
        Ok(packs)
    }

    /// Reads and checks snapshot `seq`'s manifest (never through a link, and never more than
    /// the bound on a manifest's size: [`Error::TooLarge`]).
    pub fn read_manifest(&self, seq: u64) -> Result<Manifest> {
        self.read_manifest_named(&Self::manifest_name(seq), seq)
    }

    /// Reads and checks the manifest file `name` of snapshot `seq` in `snapshots/`.
    fn read_manifest_named(&self, name: &str, seq: u64) -> Result<Manifest> {
        let path = self.snapshots.join(name);
        let file = self.snapshots.open_read(name).map_err(|e| match e {
            Error::Io { source, .. } if source.kind() == ErrorKind::NotFound => {
                Error::NoSuchSnapshot {
                    job: self.name.clone(),
                    seq,
                }
            }
            e => e,
        })?;
        let len = file.metadata().map_err(io_err("stat", &path))?.len();
        if len > MAX_MANIFEST_LEN {
            return Err(Error::TooLarge {
                path,
                len,
                max: MAX_MANIFEST_LEN,
            });
        }
        let bytes = format::read_manifest_bytes(file, &path)?;
        let manifest = Manifest::decode(&bytes, &path)?;
        if manifest.seq != seq || manifest.job != self.name {
            return Err(Error::Corrupt {
                path,
                why: format!(
                    "manifest says job {:?} snapshot {}, not job {:?} snapshot {seq}",
                    manifest.job, manifest.seq, self.name
                ),
            });
        }
        Ok(manifest)
    }

    /// Publishes a manifest: temp name, fsync, rename, fsync directory. Returns its size.
    pub(crate) fn publish_manifest(&self, manifest: &Manifest) -> Result<u64> {
        let bytes = manifest.encode();
        self.snapshots
            .publish_manifest(&Self::manifest_name(manifest.seq), &bytes)?;
        Ok(bytes.len() as u64)
    }

    /// Opens a pack file for reading (never through a link).
    pub(crate) fn open_pack(&self, pack: &str) -> Result<File> {
        self.packs.open_read(&Self::pack_file(pack))
    }

    /// Opens every pack a manifest names and checks that each holds every record the manifest
    /// points into (a missing or truncated pack is reported as damage).
    pub fn open_packs(&self, manifest: &Manifest) -> Result<Vec<(PathBuf, File)>> {
        let mut needed = vec![0u64; manifest.packs.len()];
        for chunk in manifest.entries.iter().flat_map(|e| &e.chunks) {
            let end = chunk.offset + RecordHeader::LEN as u64 + u64::from(chunk.stored_len);
            let slot = &mut needed[chunk.pack as usize];
            *slot = (*slot).max(end);
        }
        let mut files = Vec::with_capacity(manifest.packs.len());
        for (pack, needed) in manifest.packs.iter().zip(needed) {
            let path = self.pack_path(pack);
            let file = match self.open_pack(pack) {
                Ok(f) => f,
                Err(Error::Io { source, .. }) if source.kind() == ErrorKind::NotFound => {
                    return Err(Error::Corrupt {
                        path,
                        why: format!("pack is missing (snapshot {} needs it)", manifest.seq),
                    });
                }
                Err(e) => return Err(e),
            };
            let len = file.metadata().map_err(io_err("stat", &path))?.len();
            if len < needed {
                return Err(Error::Corrupt {
                    path,
                    why: format!(
                        "pack is truncated: {len} bytes, snapshot {} needs {needed}",
                        manifest.seq
                    ),
                });
            }
            let mut header = [0u8; format::HEADER_LEN];
            file.read_exact_at(&mut header, 0)
                .map_err(io_err("read", &path))?;
            format::check_header(&header, format::PACK_MAGIC, "pack", &path)?;
            files.push((path, file));
        }
        Ok(files)
    }

    /// Reads the manifest of snapshot `seq` that was set aside as damaged.
    pub fn read_set_aside(&self, seq: u64) -> Result<Manifest> {
        self.read_manifest_named(&Self::damaged_name(seq), seq)
    }

    /// Replaces a committed snapshot's manifest with a mended one (same sequence number; only
    /// where its chunks are stored may differ). Only the job's owner may call it.
    pub fn republish(&self, manifest: &Manifest) -> Result<()> {
        self.publish_manifest(manifest).map(|_| ())
    }

    /// Puts a snapshot that was set aside as damaged back among the committed ones, with the
    /// (mended or verified) `manifest`. Only the job's owner may call it.
    pub fn put_back(&self, manifest: &Manifest) -> Result<()> {
        self.publish_manifest(manifest)?;
        self.snapshots
            .remove_durably([Self::damaged_name(manifest.seq).as_str()])?;
        Ok(())
    }

    /// Moves snapshot `seq` aside as damaged so no restore picks it again. Its packs are left
    /// to retention.
    pub fn quarantine(&self, seq: u64) -> Result<()> {
        self.snapshots
            .set_aside(&Self::manifest_name(seq), &Self::damaged_name(seq))
    }

    fn size_of(dir: &Dir, name: &str) -> u64 {
        dir.stat(name)
            .ok()
            .flatten()
            .map_or(0, |st| st.st_size as u64)
    }

    /// Keeps the committed snapshots the policy names (see [`Retention`]) and removes older
    /// manifests, quarantined manifests older than the oldest kept one, and every pack no kept
    /// snapshot references. If a kept manifest cannot be read, no pack is removed (its needs
    /// are unknown).
    pub fn apply_retention(&self, policy: impl Into<Retention>) -> Result<RetentionReport> {
        let policy = policy.into();
        let seqs = self.snapshot_seqs()?;
        let now = crate::clock::now_unix_ms();
        let horizon = policy
            .within
            .map_or(0, |w| now.saturating_sub(crate::clock::millis(w)));
        // An unreadable manifest is kept: its age is unknown.
        let (old, kept) = policy.choose(&seqs, |s| {
            self.read_manifest(s)
                .map_or(true, |m| m.created_unix_ms >= horizon)
        });
        let mut report = RetentionReport::default();
        let oldest_kept = kept.first().copied().unwrap_or(u64::MAX);
        let damaged_old = self
            .damaged_seqs()?
            .into_iter()
            .filter(|s| *s < oldest_kept);
        let mut to_remove: Vec<(String, Option<u64>)> = old
            .iter()
            .map(|s| (Self::manifest_name(*s), Some(*s)))
            .collect();
        to_remove.extend(damaged_old.map(|s| (Self::damaged_name(s), None)));
        for (name, _) in &to_remove {
            report.freed_bytes += Self::size_of(&self.snapshots, name);
        }
        let removed = self
            .snapshots
            .remove_durably(to_remove.iter().map(|(name, _)| name.as_str()))?;
        for ((_, seq), removed) in to_remove.iter().zip(removed) {
            if removed {
                report.removed_snapshots.extend(seq);
            }
        }
        let mut manifests = Vec::with_capacity(kept.len());
        for seq in &kept {
            match self.read_manifest(*seq) {
                Ok(m) => manifests.push(m),
                Err(_) => return Ok(report),
            }
        }
        let live: HashSet<&str> = manifests
            .iter()
            .flat_map(|m| m.packs.iter().map(String::as_str))
            .collect();
        let dead: Vec<String> = self
            .pack_names()?
            .into_iter()
            .filter(|pack| !live.contains(pack.as_str()))
            .collect();
        report.freed_bytes += self.remove_packs(&dead)?;
        report.removed_packs = dead;
        report.sparse_packs = self.sparse_packs(&manifests)?;
        Ok(report)
    }

    /// Removes the snapshots `seqs` (committed or set aside), what writers that died left
    /// behind, and every pack no remaining snapshot (committed or set aside) references. For
    /// the epochs of a multi-rank job ([`crate::epoch`]), whose writers are the ranks: only
    /// while none of them writes. If a remaining manifest cannot be read, no pack is removed.
    pub fn remove_snapshots(&self, seqs: &[u64]) -> Result<RetentionReport> {
        let mut report = RetentionReport {
            freed_bytes: self.bytes_of(|name| name.starts_with(TMP_PREFIX))?,
            ..RetentionReport::default()
        };
        self.remove_leftovers()?;
        let committed: HashSet<u64> = self.snapshot_seqs()?.into_iter().collect();
        let names: Vec<(String, u64)> = seqs
            .iter()
            .map(|&s| {
                if committed.contains(&s) {
                    (Self::manifest_name(s), s)
                } else {
                    (Self::damaged_name(s), s)
                }
            })
            .collect();
        for (name, _) in &names {
            report.freed_bytes += Self::size_of(&self.snapshots, name);
        }
        let removed = self
            .snapshots
            .remove_durably(names.iter().map(|(n, _)| n.as_str()))?;
        for ((_, seq), removed) in names.iter().zip(removed) {
            if removed {
                report.removed_snapshots.push(*seq);
            }
        }
        let mut manifests = Vec::new();
        for seq in self.snapshot_seqs()? {
            match self.read_manifest(seq) {
                Ok(m) => manifests.push(m),
                Err(_) => return Ok(report),
            }
        }
        let before = self.bytes_of(|name| name.ends_with(PACK_SUFFIX))?;
        report.removed_packs = self.remove_unreferenced_packs(&manifests)?;
        report.freed_bytes += before.saturating_sub(self.bytes_of(|n| n.ends_with(PACK_SUFFIX))?);
        Ok(report)
    }

    /// Removes the packs that neither `manifests` (the committed snapshots) nor the snapshots
    /// set aside as damaged reference (`verify --repair` may put those back). Only the job's
    /// writer calls it, with every committed manifest. Returns the packs removed.
    pub(crate) fn remove_unreferenced_packs(&self, manifests: &[Manifest]) -> Result<Vec<String>> {
        let mut live: HashSet<String> = manifests
            .iter()
            .flat_map(|m| m.packs.iter().cloned())
            .collect();
        for seq in self.damaged_seqs()? {
            match self.read_set_aside(seq) {
                Ok(m) => live.extend(m.packs),
                // What it needs is unknown: keep every pack.
                Err(_) => return Ok(Vec::new()),
            }
        }
        let dead: Vec<String> = self
            .pack_names()?
            .into_iter()
            .filter(|pack| !live.contains(pack))
            .collect();
        self.remove_packs(&dead)?;
        Ok(dead)
    }

    /// Removes the visible packs `packs` durably; returns the bytes they took.
    fn remove_packs(&self, packs: &[String]) -> Result<u64> {
        let files: Vec<String> = packs.iter().map(|p| Self::pack_file(p)).collect();
        let bytes = files.iter().map(|f| Self::size_of(&self.packs, f)).sum();
        self.packs
            .remove_durably(files.iter().map(String::as_str))?;
        Ok(bytes)
    }

    /// Packs of which the given snapshots use less than half: each record is counted once, and
    /// the rest of the file is chunks no kept snapshot needs any more. The writer rewrites the
    /// chunks it finds in such packs, so they die with the snapshots that still use them and
    /// the store stays within about twice the live data.
    pub fn sparse_packs(&self, manifests: &[Manifest]) -> Result<Vec<String>> {
        let mut live: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
        for (pack, chunk) in format::distinct_records(manifests) {
            *live.entry(pack).or_default() +=
                (RecordHeader::LEN as u64) + u64::from(chunk.stored_len);
        }
        let mut sparse = Vec::new();
        for (pack, live) in live {
            let file = Self::pack_file(pack);
            let size = match self.packs.stat(&file)? {
                Some(st) => st.st_size as u64,
                // A snapshot that lost a pack is set aside by the writer; not a reason to fail.
                None => continue,
            };
            if live.saturating_mul(2) < size {
                sparse.push(pack.to_owned());
            }
        }
        Ok(sparse)
    }

    /// Removes every snapshot of the job and the packs they use (the job directory, its lock
    /// and its event log stay). Only the job's owner may call it.
    pub fn remove_all_snapshots(&self) -> Result<RetentionReport> {
        let mut report = RetentionReport::default();
        let seqs = self.snapshot_seqs()?;
        let mut names: Vec<String> = seqs.iter().map(|s| Self::manifest_name(*s)).collect();
        report.freed_bytes += names
            .iter()
            .map(|n| Self::size_of(&self.snapshots, n))
            .sum::<u64>();
        names.extend(self.damaged_seqs()?.into_iter().map(Self::damaged_name));
        self.snapshots
            .remove_durably(names.iter().map(String::as_str))?;
        report.removed_snapshots = seqs;
        let packs = self.pack_names()?;
        report.freed_bytes += self.remove_packs(&packs)?;
        report.removed_packs = packs;
        Ok(report)
    }

    /// Removes what no committed snapshot references: packs, temporary files a writer that
    /// died left behind, and quarantined manifests older than the oldest snapshot. Only the
    /// job's owner may call it (a running writer's packs are unreferenced until it commits).
    pub fn collect_garbage(&self) -> Result<RetentionReport> {
        let freed = self.bytes_of(|name| name.starts_with(TMP_PREFIX))?;
        self.remove_leftovers()?;
        let mut report = self.apply_retention(usize::MAX)?;
        report.freed_bytes += freed;
        Ok(report)
    }

    /// Bytes the job's snapshots and packs take on disk.
    pub fn disk_bytes(&self) -> Result<u64> {
        self.bytes_of(|_| true)
    }

    /// Bytes of the files in the snapshot and pack directories whose names `pick` accepts.
    fn bytes_of(&self, pick: impl Fn(&str) -> bool) -> Result<u64> {
        let mut total = 0;
        for dir in [&self.snapshots, &self.packs] {
            for name in dir.list()? {
                if pick(&name) {
                    total += Self::size_of(dir, &name);
                }
            }
        }
        Ok(total)
    }

    /// Removes temporary files a writer that died left behind (and makes the removals
    /// durable). Only the job's writer calls it.
    pub(crate) fn remove_leftovers(&self) -> Result<usize> {
        let mut removed = 0;
        for dir in [&self.snapshots, &self.packs] {
            removed += dir.remove_leftover_tmp()?;
        }
        Ok(removed)
    }

    /// Starts a new pack file under a temporary name, filling `spare` blocks (given back by
    /// an earlier pack's finish) before new ones.
    pub(crate) fn create_pack(
        &self,
        name: String,
        spare: Vec<crate::direct::AlignedBuf>,
    ) -> Result<PackWriter> {
        let tmp = format!("{TMP_PREFIX}{}", Self::pack_file(&name));
        PackWriter::create(name, &self.packs, tmp, spare)
    }

    /// Removes an unfinished pack (a snapshot that failed).
    pub(crate) fn remove_unfinished_pack(&self, tmp: &str) -> Result<bool> {
        self.packs.remove(tmp)
    }

    /// Reads snapshot `seq`'s manifest file as stored (bounded, never through a link), with
    /// its decoded and checked form: what a copy of the snapshot elsewhere holds, byte for byte.
    pub fn manifest_file(&self, seq: u64) -> Result<(Vec<u8>, Manifest)> {
        let manifest = self.read_manifest(seq)?;
        let name = Self::manifest_name(seq);
        let path = self.snapshots.join(&name);
        let file = self.snapshots.open_read(&name)?;
        let bytes = format::read_manifest_bytes(file, &path)?;
        // The file was replaced between the two reads (a repair): the bytes must be what was checked.
        if Manifest::decode(&bytes, &path)? != manifest {
            return Err(Error::Corrupt {
                path,
                why: "the manifest changed while it was read".into(),
            });
        }
        Ok((bytes, manifest))
    }

    /// Opens pack `name` for reading, as a copy elsewhere takes it (never through a link).
    pub fn open_pack_file(&self, name: &str) -> Result<File> {
        self.open_pack(name)
    }

    /// True when pack `name` is in place.
    pub fn has_pack(&self, name: &str) -> Result<bool> {
        Ok(self.packs.stat(&Self::pack_file(name))?.is_some())
    }

    /// Creates a temporary file in `packs/` to receive pack `name` from elsewhere (see
    /// [`JobStore::import`]); a file left by a crash is removed by the next writer.
    pub fn stage_pack(&self, name: &str) -> Result<StagedPack> {
        if !format::is_pack_name(name) {
            return Err(Error::Corrupt {
                path: self.pack_path(name),
                why: "not a pack name".into(),
            });
        }
        let tmp = format!("{TMP_PREFIX}import-{}", Self::pack_file(name));
        // A stale file of that name is from an import that died: start over.
        self.packs.remove(&tmp)?;
        let file = self.packs.create(&tmp, false)?;
        Ok(StagedPack {
            name: name.to_owned(),
            path: self.packs.join(&tmp),
            tmp,
            file,
        })
    }

    /// Reads a staged pack through and verifies every record (header, decoding, blake3).
    /// Returns the number of records.
    pub fn verify_staged(&self, pack: &StagedPack) -> Result<u64> {
        let file = self.packs.open_read(&pack.tmp)?;
        let mut records = 0;
        for record in PackScanner::new(&file, &pack.path)? {
            record?;
            records += 1;
        }
        Ok(records)
    }

    /// Removes a staged pack that will not be imported.
    pub fn discard_staged(&self, pack: StagedPack) -> Result<()> {
        self.packs.remove(&pack.tmp).map(|_| ())
    }

    /// Brings a snapshot copied from elsewhere into the store, with the local commit rule:
    /// the staged packs (each verified with [`JobStore::verify_staged`] by the caller) are
    /// fsynced and renamed into place, every pack the manifest names is checked to be there
    /// (present, long enough, a pack), local manifests numbered at or above this one are
    /// removed (a newer owner's snapshot supersedes them), and the manifest bytes are published
    /// last. Only the job's owner may call it. Returns the decoded manifest.
    pub fn import(&self, manifest_bytes: &[u8], packs: &[StagedPack]) -> Result<Manifest> {
        let path = self.snapshots.join("(imported manifest)");
        let manifest = Manifest::decode(manifest_bytes, &path)?;
        if manifest.job != self.name {
            return Err(Error::Corrupt {
                path,
                why: format!(
                    "the manifest is of job {:?}, not {:?}",
                    manifest.job, self.name
                ),
            });
        }
        if let Some(stray) = packs.iter().find(|p| !manifest.packs.contains(&p.name)) {
            return Err(Error::Corrupt {
                path: stray.path.clone(),
                why: format!("snapshot {} does not use this pack", manifest.seq),
            });
        }
        let staged: Vec<Staged<'_>> = packs
            .iter()
            .map(|p| Staged {
                file: &p.file,
                tmp: &p.tmp,
                name: Self::pack_file(&p.name),
            })
            .collect();
        self.packs.publish_packs(&staged)?;
        self.open_packs(&manifest)?;
        let superseded: Vec<String> = self
            .snapshot_seqs()?
            .into_iter()
            .filter(|&seq| seq >= manifest.seq)
            .map(Self::manifest_name)
            .collect();
        self.snapshots
            .remove_durably(superseded.iter().map(String::as_str))?;
        self.snapshots
            .publish_manifest(&Self::manifest_name(manifest.seq), manifest_bytes)?;
        Ok(manifest)
    }

    /// Fsyncs finished packs, renames them into place and fsyncs the pack directory once.
    pub(crate) fn publish_packs(&self, packs: &[FinishedPack]) -> Result<()> {
        let staged: Vec<Staged<'_>> = packs
            .iter()
            .map(|pack| Staged {
                file: &pack.file,
                tmp: &pack.tmp,
                name: Self::pack_file(&pack.name),
            })
            .collect();
        self.packs.publish_packs(&staged)
    }
}
