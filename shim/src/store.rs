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
use std::fs::{self, File};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::durable::{self, TMP_PREFIX};
use crate::error::{Error, Result, io_err};
use crate::failpoint;
use crate::format::{self, Manifest, RecordHeader};
use crate::name;
use crate::pack::{FinishedPack, PackWriter};
pub use crate::retention::Retention;

/// A store directory.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens (creating with mode 0700 if needed) the store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        durable::create_private_dir(&root)?;
        Ok(Self { root })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Opens an existing store (for commands that only look: a missing store is an error, not
    /// something to create).
    pub fn open_existing(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        match fs::metadata(&root) {
            Ok(m) if m.is_dir() => Ok(Self { root }),
            Ok(_) => Err(Error::Io {
                op: "open store",
                path: root,
                source: std::io::Error::other("not a directory"),
            }),
            Err(e) => Err(io_err("open store", &root)(e)),
        }
    }

    /// The names of the jobs in the store, sorted.
    pub fn jobs(&self) -> Result<Vec<String>> {
        let mut jobs = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(io_err("list", &self.root))? {
            let entry = entry.map_err(io_err("list", &self.root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().join("snapshots").is_dir() && name::validate("job", &name).is_ok() {
                jobs.push(name);
            }
        }
        jobs.sort();
        Ok(jobs)
    }

    /// Opens an existing job (an error naming the jobs there are if it does not exist).
    pub fn existing_job(&self, job: &str) -> Result<JobStore> {
        name::validate("job", job)?;
        if !self.root.join(job).join("snapshots").is_dir() {
            return Err(Error::NoSuchJob {
                job: job.to_owned(),
                store: self.root.clone(),
                known: self.jobs()?.join(", "),
            });
        }
        self.job(job)
    }

    /// Opens (creating if needed) the part of the store that belongs to `job`.
    pub fn job(&self, job: &str) -> Result<JobStore> {
        name::validate("job", job)?;
        let dir = self.root.join(job);
        let store = JobStore {
            name: job.to_owned(),
            snapshots: dir.join("snapshots"),
            packs: dir.join("packs"),
            dir,
        };
        durable::create_private_dir(&store.snapshots)?;
        durable::create_private_dir(&store.packs)?;
        Ok(store)
    }
}

/// One job's snapshots and packs.
#[derive(Clone, Debug)]
pub struct JobStore {
    name: String,
    dir: PathBuf,
    snapshots: PathBuf,
    packs: PathBuf,
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
        &self.dir
    }

    /// The path of snapshot `seq`'s manifest.
    pub fn manifest_path(&self, seq: u64) -> PathBuf {
        self.snapshots.join(format!("{seq:020}{SNAP_SUFFIX}"))
    }

    /// The path of a pack file.
    pub fn pack_path(&self, pack: &str) -> PathBuf {
        self.packs.join(format!("{pack}{PACK_SUFFIX}"))
    }

    fn list(dir: &Path, suffix: &str) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
            let entry = entry.map_err(io_err("list", dir))?;
            let file = entry.file_name();
            let file = file.to_string_lossy();
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

    /// Reads and checks snapshot `seq`'s manifest.
    pub fn read_manifest(&self, seq: u64) -> Result<Manifest> {
        let path = self.manifest_path(seq);
        let bytes = fs::read(&path).map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                Error::NoSuchSnapshot {
                    job: self.name.clone(),
                    seq,
                }
            } else {
                io_err("read", &path)(e)
            }
        })?;
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
        durable::write_atomic(&self.manifest_path(manifest.seq), &bytes, |stage| {
            failpoint::hit(&format!("manifest-{stage}"))
        })?;
        Ok(bytes.len() as u64)
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
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    return Err(Error::Corrupt {
                        path,
                        why: format!("pack is missing (snapshot {} needs it)", manifest.seq),
                    });
                }
                Err(e) => return Err(io_err("open", &path)(e)),
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
        let path = self.snapshots.join(format!("{seq:020}{DAMAGED_SUFFIX}"));
        let bytes = fs::read(&path).map_err(io_err("read", &path))?;
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

    /// Replaces a committed snapshot's manifest with a mended one (same sequence number; only
    /// where its chunks are stored may differ). Only the job's owner may call it.
    pub fn republish(&self, manifest: &Manifest) -> Result<()> {
        self.publish_manifest(manifest).map(|_| ())
    }

    /// Puts a snapshot that was set aside as damaged back among the committed ones, with the
    /// (mended or verified) `manifest`. Only the job's owner may call it.
    pub fn put_back(&self, manifest: &Manifest) -> Result<()> {
        self.publish_manifest(manifest)?;
        let aside = self
            .snapshots
            .join(format!("{:020}{DAMAGED_SUFFIX}", manifest.seq));
        match fs::remove_file(&aside) {
            Ok(()) => durable::fsync_dir(&self.snapshots),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &aside)(e)),
        }
    }

    /// Moves snapshot `seq` aside as damaged so no restore picks it again. Its packs are left
    /// to retention.
    pub fn quarantine(&self, seq: u64) -> Result<()> {
        let from = self.manifest_path(seq);
        let to = self.snapshots.join(format!("{seq:020}{DAMAGED_SUFFIX}"));
        fs::rename(&from, &to).map_err(io_err("quarantine", &from))?;
        durable::fsync_dir(&self.snapshots)
    }

    /// Keeps the committed snapshots the policy names (see [`Retention`]) and removes older
    /// manifests, quarantined manifests older than the oldest kept one, and every pack no kept
    /// snapshot references. If a kept manifest cannot be read, no pack is removed (its needs
    /// are unknown).
    pub fn apply_retention(&self, policy: impl Into<Retention>) -> Result<RetentionReport> {
        let policy = policy.into();
        let seqs = self.snapshot_seqs()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let horizon = policy
            .within
            .map_or(0, |w| now.saturating_sub(w.as_millis() as u64));
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
        let mut to_remove: Vec<(PathBuf, Option<u64>)> = old
            .iter()
            .map(|s| (self.manifest_path(*s), Some(*s)))
            .collect();
        to_remove.extend(damaged_old.map(|s| {
            (
                self.snapshots.join(format!("{s:020}{DAMAGED_SUFFIX}")),
                None,
            )
        }));
        for (path, seq) in &to_remove {
            report.freed_bytes += fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            match fs::remove_file(path) {
                Ok(()) => report.removed_snapshots.extend(seq),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove", path)(e)),
            }
        }
        if !to_remove.is_empty() {
            durable::fsync_dir(&self.snapshots)?;
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
        for pack in self.pack_names()? {
            if live.contains(pack.as_str()) {
                continue;
            }
            let path = self.pack_path(&pack);
            report.freed_bytes += fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            fs::remove_file(&path).map_err(io_err("remove", &path))?;
            report.removed_packs.push(pack);
        }
        if !report.removed_packs.is_empty() {
            durable::fsync_dir(&self.packs)?;
        }
        report.sparse_packs = self.sparse_packs(&manifests)?;
        Ok(report)
    }

    /// Packs of which the given snapshots use less than half: each record is counted once, and
    /// the rest of the file is chunks no kept snapshot needs any more. The writer rewrites the
    /// chunks it finds in such packs, so they die with the snapshots that still use them and
    /// the store stays within about twice the live data.
    pub fn sparse_packs(&self, manifests: &[Manifest]) -> Result<Vec<String>> {
        let mut live: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
        let mut seen: HashSet<(&str, u64)> = HashSet::new();
        for m in manifests {
            for chunk in m.entries.iter().flat_map(|e| &e.chunks) {
                let pack = m.packs[chunk.pack as usize].as_str();
                if seen.insert((pack, chunk.offset)) {
                    *live.entry(pack).or_default() +=
                        (RecordHeader::LEN as u64) + u64::from(chunk.stored_len);
                }
            }
        }
        let mut sparse = Vec::new();
        for (pack, live) in live {
            let path = self.pack_path(pack);
            let size = match fs::metadata(&path) {
                Ok(m) => m.len(),
                // A snapshot that lost a pack is set aside by the writer; not a reason to fail.
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("stat", &path)(e)),
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
        for seq in self.snapshot_seqs()? {
            let path = self.manifest_path(seq);
            report.freed_bytes += fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            fs::remove_file(&path).map_err(io_err("remove", &path))?;
            report.removed_snapshots.push(seq);
        }
        for seq in self.damaged_seqs()? {
            let path = self.snapshots.join(format!("{seq:020}{DAMAGED_SUFFIX}"));
            fs::remove_file(&path).map_err(io_err("remove", &path))?;
        }
        durable::fsync_dir(&self.snapshots)?;
        for pack in self.pack_names()? {
            let path = self.pack_path(&pack);
            report.freed_bytes += fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            fs::remove_file(&path).map_err(io_err("remove", &path))?;
            report.removed_packs.push(pack);
        }
        durable::fsync_dir(&self.packs)?;
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
            for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
                let entry = entry.map_err(io_err("list", dir))?;
                if pick(&entry.file_name().to_string_lossy()) {
                    total += entry.metadata().map(|m| m.len()).unwrap_or(0);
                }
            }
        }
        Ok(total)
    }

    /// Removes temporary files a writer that died left behind. Only the job's writer calls it.
    pub(crate) fn remove_leftovers(&self) -> Result<usize> {
        Ok(durable::remove_leftover_tmp(&self.snapshots)?
            + durable::remove_leftover_tmp(&self.packs)?)
    }

    /// Starts a new pack file under a temporary name.
    pub(crate) fn create_pack(&self, name: String) -> Result<PackWriter> {
        let tmp = self.packs.join(format!("{TMP_PREFIX}{name}{PACK_SUFFIX}"));
        PackWriter::create(name, tmp)
    }

    /// Fsyncs finished packs, renames them into place and fsyncs the pack directory once.
    pub(crate) fn publish_packs(&self, packs: &[FinishedPack]) -> Result<()> {
        for pack in packs {
            pack.file.sync_all().map_err(io_err("fsync", &pack.tmp))?;
        }
        crate::failpoint::hit("packs-synced");
        for pack in packs {
            let to = self.pack_path(&pack.name);
            fs::rename(&pack.tmp, &to).map_err(io_err("rename into place", &to))?;
        }
        if !packs.is_empty() {
            durable::fsync_dir(&self.packs)?;
        }
        Ok(())
    }
}
