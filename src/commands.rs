//! The operator's commands: `ls`, `show`, `verify`, `gc`, `restore --to`, `snapshot`,
//! `status`, `log`. Each prints an aligned table by default and a documented JSON shape with
//! `--json`; long ones show a progress bar when stderr is a terminal.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use supervise_store::format::{EntryKind, Manifest};
use supervise_store::lock::{JobLock, TryLock};
use supervise_store::{JobStore, SnapshotReader, Store};

use crate::events;
use crate::human;

mod epochs;
use crate::operator::{self, Request};
use supervise_store::clock::now_unix_ms;
use supervise_store::exit;

/// Where a command looks and how it prints.
#[derive(Clone, Debug)]
pub struct Target {
    /// The store directory.
    pub store: PathBuf,
    /// The job, if named.
    pub job: Option<String>,
    /// Print JSON.
    pub json: bool,
    /// Open a store another user owns (or others may write) read-only instead of refusing it.
    pub allow_foreign_store: bool,
}

impl Target {
    fn store(&self) -> Result<Store> {
        let open = if self.allow_foreign_store {
            Store::open_read_only
        } else {
            Store::open_existing
        };
        match open(&self.store) {
            Ok(store) => Ok(store),
            Err(supervise_store::Error::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                bail!(
                    "no store at {}: it does not exist (give the store's directory with --store)",
                    self.store.display()
                )
            }
            // The error names the store's path.
            Err(e) => Err(e.into()),
        }
    }

    /// The named job, or the only one in the store.
    fn job(&self) -> Result<JobStore> {
        let store = self.store()?;
        let name = match &self.job {
            Some(j) => j.clone(),
            None => {
                let jobs = store.jobs()?;
                match jobs.as_slice() {
                    [only] => only.clone(),
                    [] => bail!("store {} holds no job", self.store.display()),
                    _ => bail!(
                        "store {} holds several jobs ({}): name one with --job",
                        self.store.display(),
                        jobs.join(", ")
                    ),
                }
            }
        };
        Ok(store.existing_job(&name)?)
    }
}

fn print_json<T: Serialize>(value: &T) -> Result<i32> {
    let mut out = human::out();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(0)
}

fn age(unix_ms: u64) -> String {
    format!(
        "{} ago",
        human::duration(Duration::from_millis(now_unix_ms().saturating_sub(unix_ms)))
    )
}

fn time(unix_ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string()
}

/// `latest` or a snapshot number.
fn snapshot_id(job: &JobStore, id: &str) -> Result<u64> {
    if id == "latest" {
        return job
            .snapshot_seqs()?
            .last()
            .copied()
            .with_context(|| format!("job {:?} has no snapshot", job.name()));
    }
    id.parse().with_context(|| {
        format!("{id:?} is not a snapshot number (see `supervise ls`) nor `latest`")
    })
}

fn progress(len: u64, what: &str) -> ProgressBar {
    // Hidden by itself when stderr is not a terminal.
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    bar
}

/// Bytes of distinct stored records a set of manifests uses (what they cost on disk).
fn stored_bytes<'a>(manifests: impl IntoIterator<Item = &'a Manifest>) -> u64 {
    supervise_store::format::distinct_records(manifests)
        .into_iter()
        .map(|(_, c)| u64::from(c.stored_len))
        .sum()
}

/// What the state of snapshots (`logical`: their bytes in memory) costs on disk (`stored`:
/// the bytes of the distinct compressed chunk records they use): state ÷ stored, the saving of
/// dedup and compression together (10 = ten times smaller); 0 when nothing is stored.
fn ratio(logical: u64, stored: u64) -> f64 {
    if stored == 0 {
        0.0
    } else {
        logical as f64 / stored as f64
    }
}

/// `ls`: the jobs of a store, or the snapshots of one job.
pub fn ls(t: &Target) -> Result<i32> {
    if t.job.is_some() {
        return ls_snapshots(t);
    }
    #[derive(Serialize)]
    struct JobRow {
        job: String,
        snapshots: usize,
        newest: Option<u64>,
        newest_unix_ms: Option<u64>,
        bytes_on_disk: u64,
        running: bool,
    }
    let store = t.store()?;
    let mut rows = Vec::new();
    for name in store.jobs()? {
        let job = store.existing_job(&name)?;
        // A job of many ranks counts its epochs.
        let epochs = supervise_store::epoch::numbers(&job)?;
        let ranked = !epochs.is_empty();
        let seqs = if ranked { epochs } else { job.snapshot_seqs()? };
        let newest = seqs.last().copied();
        let created = |s: u64| {
            if ranked {
                supervise_store::epoch::read(&job, s)
                    .ok()
                    .map(|e| e.created_unix_ms)
            } else {
                job.read_manifest(s).ok().map(|m| m.created_unix_ms)
            }
        };
        rows.push(JobRow {
            snapshots: seqs.len(),
            newest,
            newest_unix_ms: newest.and_then(created),
            bytes_on_disk: job.disk_bytes()?,
            running: JobLock::holder(job.dir())?.is_some(),
            job: name,
        });
    }
    if t.json {
        return print_json(&rows);
    }
    if rows.is_empty() {
        human::outln!("store {} holds no job", t.store.display())?;
        return Ok(0);
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.job.clone(),
                r.snapshots.to_string(),
                r.newest.map_or("-".into(), |s| s.to_string()),
                r.newest_unix_ms.map_or("-".into(), age),
                human::bytes(r.bytes_on_disk),
                if r.running { "running" } else { "-" }.into(),
            ]
        })
        .collect();
    human::table(
        &["JOB", "SNAPSHOTS", "NEWEST", "TAKEN", "ON DISK", "STATE"],
        &table,
    )?;
    Ok(0)
}

fn ls_snapshots(t: &Target) -> Result<i32> {
    {
        let job = t.job()?;
        if supervise_store::epoch::has_epochs(&job)? {
            return epochs::ls(t, &job);
        }
    }
    #[derive(Serialize)]
    struct SnapRow {
        snapshot: u64,
        created_unix_ms: Option<u64>,
        tag: Option<String>,
        bytes_total: Option<u64>,
        bytes_new: Option<u64>,
        bytes_written: Option<u64>,
        damaged: Option<String>,
        /// `local` (on this store only) or `off-node` (on a durable tier too).
        durability: &'static str,
        /// The durable tiers it reached, as the job's history tells.
        off_node: Vec<String>,
    }
    let damaged = |snapshot, why| SnapRow {
        snapshot,
        created_unix_ms: None,
        tag: None,
        bytes_total: None,
        bytes_new: None,
        bytes_written: None,
        damaged: Some(why),
        durability: "local",
        off_node: Vec::new(),
    };
    let job = t.job()?;
    let off_node = off_node_tiers(job.dir());
    let mut rows = Vec::new();
    for seq in job.snapshot_seqs()? {
        rows.push(match job.read_manifest(seq) {
            Ok(m) => SnapRow {
                snapshot: seq,
                created_unix_ms: Some(m.created_unix_ms),
                tag: m.tag,
                bytes_total: Some(m.stats.bytes_total),
                bytes_new: Some(m.stats.bytes_new),
                bytes_written: Some(m.stats.bytes_packed),
                damaged: None,
                durability: if off_node.contains_key(&seq) {
                    "off-node"
                } else {
                    "local"
                },
                off_node: off_node.get(&seq).cloned().unwrap_or_default(),
            },
            Err(e) => damaged(seq, e.to_string()),
        });
    }
    for seq in job.damaged_seqs()? {
        rows.push(damaged(seq, "set aside as damaged by a restore".into()));
    }
    rows.sort_by_key(|r| r.snapshot);
    if t.json {
        return print_json(&rows);
    }
    let dash = || "-".to_owned();
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.snapshot.to_string(),
                r.created_unix_ms.map_or_else(dash, time),
                r.created_unix_ms.map_or_else(dash, age),
                r.tag.clone().unwrap_or_else(dash),
                r.bytes_total.map_or_else(dash, human::bytes),
                r.bytes_new.map_or_else(dash, human::bytes),
                r.durability.into(),
                r.damaged
                    .clone()
                    .map_or_else(|| "ok".into(), |d| format!("DAMAGED: {d}")),
            ]
        })
        .collect();
    human::outln!("job {}", job.name())?;
    human::table(
        &[
            "SNAPSHOT", "TIME", "AGE", "TAG", "SIZE", "NEW", "DURABLE", "STATE",
        ],
        &table,
    )?;
    Ok(0)
}

/// The durable tiers each snapshot reached, from the job's history (`safe-off-node` records).
fn off_node_tiers(job_dir: &std::path::Path) -> std::collections::BTreeMap<u64, Vec<String>> {
    let mut tiers: std::collections::BTreeMap<u64, Vec<String>> = Default::default();
    for record in events::read(job_dir).unwrap_or_default() {
        let Some(data) = record.data.filter(|_| record.kind == "safe-off-node") else {
            continue;
        };
        if let (Some(seq), Some(tier)) = (
            data.get("seq").and_then(|v| v.as_u64()),
            data.get("tier").and_then(|v| v.as_str()),
        ) {
            let list = tiers.entry(seq).or_default();
            if !list.iter().any(|t| t == tier) {
                list.push(tier.to_owned());
            }
        }
    }
    tiers
}

/// How `show` defines its state/stored ratio (JSON: `dedup_ratio`).
pub const SHOW_RATIO: &str = "the snapshot's state, its bytes in memory, divided by the bytes \
     of the distinct compressed chunks it uses on disk";

/// How `status` defines its STATE/STORED column (JSON: `dedup_ratio`).
pub const STATUS_RATIO: &str = "STATE/STORED: the state of the job's snapshots (their bytes \
     in memory, summed) divided by the bytes of the distinct compressed chunks they use on disk; \
     dedup between snapshots and compression both raise it (10 = ten times smaller)";

/// `show SNAPSHOT`: entries, sizes, chunk counts, dedup ratio.
pub fn show(t: &Target, id: &str) -> Result<i32> {
    #[derive(Serialize)]
    struct EntryRow {
        name: String,
        /// File mode: the file in the run directory the entry holds.
        #[serde(skip_serializing_if = "Option::is_none")]
        file: Option<String>,
        kind: String,
        bytes: u64,
        chunks: usize,
        unique_chunks: usize,
    }
    #[derive(Serialize)]
    struct Shown {
        job: String,
        snapshot: u64,
        parent: Option<u64>,
        created_unix_ms: u64,
        tag: Option<String>,
        attempt: u32,
        bytes_total: u64,
        bytes_new: u64,
        bytes_written: u64,
        stored_bytes: u64,
        dedup_ratio: f64,
        entries: Vec<EntryRow>,
        /// What produced it (snapshots of releases before format 2 record none).
        origin: Option<supervise_store::format::Origin>,
        /// The output files' lengths it recorded.
        outputs: Vec<supervise_store::format::OutputMark>,
    }
    let job = t.job()?;
    if supervise_store::epoch::has_epochs(&job)? {
        return epochs::show(t, &job, id);
    }
    let seq = snapshot_id(&job, id)?;
    let m = job.read_manifest(seq)?;
    // A file-mode snapshot says which file each entry holds.
    let files: std::collections::HashMap<String, String> = SnapshotReader::open(&job, seq)
        .ok()
        .and_then(|r| crate::files::restore::read_meta(&r).ok())
        .map(|meta| meta.files.into_iter().map(|f| (f.entry, f.path)).collect())
        .unwrap_or_default();
    let entries = m
        .entries
        .iter()
        .map(|e| EntryRow {
            name: e.name.clone(),
            file: files.get(&e.name).cloned(),
            kind: e.kind.describe(),
            bytes: e.len,
            chunks: e.chunks.len(),
            unique_chunks: e
                .chunks
                .iter()
                .map(|c| c.hash)
                .collect::<HashSet<_>>()
                .len(),
        })
        .collect();
    let stored = stored_bytes([&m]);
    let shown = Shown {
        job: m.job.clone(),
        snapshot: m.seq,
        parent: m.parent,
        created_unix_ms: m.created_unix_ms,
        tag: m.tag.clone(),
        attempt: m.attempt,
        bytes_total: m.stats.bytes_total,
        bytes_new: m.stats.bytes_new,
        bytes_written: m.stats.bytes_packed,
        stored_bytes: stored,
        dedup_ratio: ratio(m.stats.bytes_total, stored),
        entries,
        origin: m.origin.clone(),
        outputs: m.outputs.clone(),
    };
    if t.json {
        return print_json(&shown);
    }
    human::outln!(
        "job {} snapshot {} taken {} ({}){}",
        shown.job,
        shown.snapshot,
        time(shown.created_unix_ms),
        age(shown.created_unix_ms),
        shown
            .tag
            .as_ref()
            .map(|t| format!(", tag {t:?}"))
            .unwrap_or_default()
    )?;
    human::outln!(
        "{} of state stored in {}: state/stored {:.2} ({}); {} new when taken, {} written",
        human::bytes(shown.bytes_total),
        human::bytes(shown.stored_bytes),
        shown.dedup_ratio,
        SHOW_RATIO,
        human::bytes(shown.bytes_new),
        human::bytes(shown.bytes_written)
    )?;
    let table: Vec<Vec<String>> = shown
        .entries
        .iter()
        .map(|e| {
            vec![
                match &e.file {
                    Some(f) => format!("{} ({f})", e.name),
                    None => e.name.clone(),
                },
                e.kind.clone(),
                human::bytes(e.bytes),
                e.chunks.to_string(),
                e.unique_chunks.to_string(),
            ]
        })
        .collect();
    human::table(&["ENTRY", "KIND", "SIZE", "CHUNKS", "UNIQUE"], &table)?;
    if let Some(o) = &shown.origin {
        let hash = o
            .exe_blake3
            .as_ref()
            .map(|h| format!(" (blake3 {})", &h[..h.len().min(16)]))
            .unwrap_or_default();
        human::outln!("taken by {}{hash} {}", o.program, o.args.join(" "))?;
    }
    for out in &shown.outputs {
        human::outln!(
            "output file {}: {} recorded",
            out.path,
            human::bytes(out.len)
        )?;
    }
    Ok(0)
}

/// `verify [SNAPSHOT]`: re-read and re-hash every chunk; exit 5 naming what is damaged.
pub fn verify(t: &Target, id: Option<&str>) -> Result<i32> {
    #[derive(Serialize)]
    struct Verdict {
        snapshot: u64,
        ok: bool,
        error: Option<String>,
    }
    let job = t.job()?;
    if supervise_store::epoch::has_epochs(&job)? {
        return epochs::verify(t, &job, id);
    }
    let seqs = match id {
        Some(id) => vec![snapshot_id(&job, id)?],
        None => job.snapshot_seqs()?,
    };
    let bar = progress(seqs.len() as u64, "verifying");
    let mut verdicts = Vec::new();
    for seq in seqs {
        let result = SnapshotReader::open(&job, seq).and_then(|r| r.verify());
        bar.inc(1);
        let error = match result {
            Ok(()) => None,
            // Retention of a running job removed it meanwhile: not damage.
            Err(_) if id.is_none() && !job.manifest_path(seq).exists() => continue,
            Err(e) => Some(e.to_string()),
        };
        verdicts.push(Verdict {
            snapshot: seq,
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
            match &v.error {
                None => human::outln!("snapshot {}: ok", v.snapshot)?,
                Some(e) => human::outln!("snapshot {}: DAMAGED: {e}", v.snapshot)?,
            }
        }
        if verdicts.is_empty() {
            human::outln!("job {} has no snapshot to verify", job.name())?;
        }
    }
    if damaged > 0 {
        eprintln!(
            "supervise: {damaged} of {} snapshots of job {} are damaged",
            verdicts.len(),
            job.name()
        );
        return Ok(exit::DAMAGED);
    }
    Ok(0)
}

/// Takes the job's lock for a command that changes the store (`what`); `None`, after saying
/// who holds it and `why` the command must wait, when the job is running.
fn take_job_lock(job: &JobStore, what: &str, why: &str) -> Result<Option<JobLock>> {
    let me = supervise_store::lock::Owner::this_process(&format!("supervise {what}"));
    Ok(match JobLock::try_take(job.dir(), &me)? {
        TryLock::Taken(lock) => Some(lock),
        TryLock::Held(owner) => {
            eprintln!(
                "supervise: job {} is running ({}); {why}. Run {what} when it is not running.",
                job.name(),
                owner.map_or("holder unknown".into(), |o| format!(
                    "supervisor pid {}",
                    o.pid
                ))
            );
            None
        }
    })
}

/// `verify --repair`: mend damaged snapshots from good copies of their chunks, put back set-aside
/// snapshots that verify, say what was done; then verify as usual.
pub fn repair(t: &Target) -> Result<i32> {
    #[derive(Serialize)]
    struct Unrepairable {
        snapshot: u64,
        why: String,
    }
    #[derive(Serialize)]
    struct Repaired {
        repaired: Vec<u64>,
        put_back: Vec<u64>,
        unrepairable: Vec<Unrepairable>,
    }
    let job = t.job()?;
    let Some(_lock) = take_job_lock(&job, "verify --repair", "its program rewrites the store")?
    else {
        return Ok(exit::HELD);
    };
    let spinner = ProgressBar::new_spinner();
    spinner.set_message("repairing");
    let report = supervise_store::repair::repair(&job)?;
    spinner.finish_and_clear();
    let done = Repaired {
        repaired: report.repaired,
        put_back: report.put_back,
        unrepairable: report
            .unrepairable
            .into_iter()
            .map(|(snapshot, why)| Unrepairable { snapshot, why })
            .collect(),
    };
    if t.json {
        // One JSON document on stdout: the repair; the verdicts follow on stderr's exit code.
        print_json(&done)?;
    } else {
        for seq in &done.repaired {
            human::outln!("snapshot {seq}: repaired from good copies of its damaged chunks")?;
        }
        for seq in done.put_back.iter().filter(|s| !done.repaired.contains(s)) {
            human::outln!("snapshot {seq}: verifies in full; put back among the snapshots")?;
        }
        for u in &done.unrepairable {
            human::outln!("snapshot {}: cannot be repaired: {}", u.snapshot, u.why)?;
        }
    }
    let quiet = Target {
        store: t.store.clone(),
        job: Some(job.name().to_owned()),
        json: t.json,
        allow_foreign_store: false,
    };
    if t.json {
        // The verdicts are checked, not printed twice: the exit code says whether all verify.
        return verify_quietly(&quiet);
    }
    verify(&quiet, None)
}

/// Verifies every snapshot of the job; exit code as `verify`, nothing printed.
fn verify_quietly(t: &Target) -> Result<i32> {
    let job = t.job()?;
    for seq in job.snapshot_seqs()? {
        if SnapshotReader::open(&job, seq)
            .and_then(|r| r.verify())
            .is_err()
        {
            return Ok(exit::DAMAGED);
        }
    }
    Ok(0)
}

/// `gc`: remove what no snapshot references. Needs the job not to be running.
pub fn gc(t: &Target) -> Result<i32> {
    #[derive(Serialize)]
    struct Collected {
        job: String,
        removed_packs: Vec<String>,
        removed_snapshots: Vec<u64>,
        freed_bytes: u64,
    }
    let job = t.job()?;
    let Some(_lock) = take_job_lock(
        &job,
        "gc",
        "its program removes what no snapshot needs after each snapshot",
    )?
    else {
        return Ok(exit::HELD);
    };
    let spinner = ProgressBar::new_spinner();
    spinner.set_message("collecting garbage");
    // A job of many ranks also loses the parts of epochs that never completed.
    let report = if supervise_store::epoch::has_epochs(&job)? {
        supervise_store::epoch::collect(&job, &usize::MAX.into())?
    } else {
        job.collect_garbage()?
    };
    spinner.finish_and_clear();
    let done = Collected {
        job: job.name().to_owned(),
        removed_packs: report.removed_packs,
        removed_snapshots: report.removed_snapshots,
        freed_bytes: report.freed_bytes,
    };
    if t.json {
        return print_json(&done);
    }
    human::outln!(
        "job {}: removed {} packs; {} freed",
        done.job,
        done.removed_packs.len(),
        human::bytes(done.freed_bytes)
    )?;
    Ok(0)
}

/// Who may read what `restore --to` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sharing {
    /// The store's privacy: files 0600, a created directory 0700.
    Private,
    /// Files 0644, a created directory 0755 (`--shared`).
    Shared,
}

/// The target directory of `restore --to`: created (with its parents) when missing, then
/// opened, so every file is created relative to it.
fn open_target_dir(to: &Path, sharing: Sharing) -> Result<std::os::fd::OwnedFd> {
    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::Mode;
    use std::os::unix::fs::DirBuilderExt;
    let mode = match sharing {
        Sharing::Private => 0o700,
        Sharing::Shared => 0o755,
    };
    if std::fs::symlink_metadata(to).is_err() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(to)
            .with_context(|| format!("cannot create {}", to.display()))?;
    }
    open(
        to,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("cannot open {} as a directory", to.display()))
}

/// Creates `name` in the target directory: never an existing file, never through a symlink.
fn create_in(
    dir: &std::os::fd::OwnedFd,
    to: &Path,
    name: &str,
    sharing: Sharing,
) -> Result<std::fs::File> {
    use nix::fcntl::{OFlag, openat};
    use nix::sys::stat::Mode;
    let mode = match sharing {
        Sharing::Private => Mode::from_bits_truncate(0o600),
        Sharing::Shared => Mode::from_bits_truncate(0o644),
    };
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let path = to.join(name);
    match openat(dir, name, flags, mode) {
        Ok(fd) => Ok(std::fs::File::from(fd)),
        Err(nix::errno::Errno::EEXIST) => bail!(
            "{} already exists: restore neither overwrites nor follows a file (choose a new \
             or empty directory)",
            path.display()
        ),
        Err(e) => Err(e).with_context(|| format!("cannot create {}", path.display())),
    }
}

/// `restore SNAPSHOT --to DIR`: each entry as a file, created in `DIR` (made if missing)
/// with `sharing`'s modes; a file that exists there (a symlink too) is an error, never
/// overwritten or followed.
pub fn restore(t: &Target, id: &str, to: &Path, sharing: Sharing) -> Result<i32> {
    let job = t.job()?;
    if supervise_store::epoch::has_epochs(&job)? {
        return epochs::restore(t, &job, id, to, sharing);
    }
    let seq = snapshot_id(&job, id)?;
    let done = restore_snapshot(&job, seq, to, sharing)?;
    if t.json {
        return print_json(&done);
    }
    human::outln!(
        "job {} snapshot {} written to {} (an index is in {RESTORE_INDEX}):",
        done.job,
        seq,
        to.display()
    )?;
    let table: Vec<Vec<String>> = done
        .entries
        .iter()
        .map(|w| vec![w.file.clone(), w.kind.clone(), human::bytes(w.bytes)])
        .collect();
    human::table(&["FILE", "KIND", "SIZE"], &table)?;
    Ok(0)
}

/// A file `restore --to` wrote.
#[derive(Serialize)]
struct Written {
    name: String,
    file: String,
    kind: String,
    bytes: u64,
    /// An array's numpy type and shape: the file is a `.npy`.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    array: Option<NpyArray>,
}

/// The numpy type and shape of an array entry, as its `.npy` file says them.
#[derive(Serialize)]
struct NpyArray {
    dtype: String,
    shape: Vec<u64>,
}

/// The numpy type and shape of entry `e`, if the program gave it as an array.
fn array_of(m: &Manifest, e: &supervise_store::format::EntryMeta) -> Option<NpyArray> {
    let shape = m.array_shape(&e.name)?;
    let dtype = match (&shape.dtype, &e.kind) {
        (Some(d), _) => d.clone(),
        (None, EntryKind::Slice { elem, .. }) => {
            supervise_store::format::numpy_dtype(elem)?.to_owned()
        }
        (None, EntryKind::Value) => return None,
    };
    Some(NpyArray {
        dtype,
        shape: shape.shape.clone(),
    })
}

/// What `restore --to` wrote (and its index file holds).
#[derive(Serialize)]
struct Restored {
    job: String,
    snapshot: u64,
    created_unix_ms: u64,
    tag: Option<String>,
    dir: PathBuf,
    entries: Vec<Written>,
}

/// The index file `restore --to` writes beside the entries.
const RESTORE_INDEX: &str = "snapshot.json";

/// Writes snapshot `seq`'s entries as files in `to` (see [`restore`]).
fn restore_snapshot(job: &JobStore, seq: u64, to: &Path, sharing: Sharing) -> Result<Restored> {
    const INDEX: &str = RESTORE_INDEX;
    let reader = SnapshotReader::open(job, seq)?;
    let m = reader.manifest().clone();
    // Entry and element names were checked when the manifest was decoded: plain names.
    // A file-mode snapshot's files keep their names (those in the run directory's top level).
    let named: std::collections::HashMap<String, String> =
        crate::files::restore::read_meta(&reader)
            .map(|meta| {
                meta.files
                    .into_iter()
                    .filter(|f| {
                        !f.path.contains('/')
                            && !f.path.ends_with(".json")
                            && !f.path.ends_with(".u8")
                    })
                    .map(|f| (f.entry, f.path))
                    .collect()
            })
            .unwrap_or_default();
    let files: Vec<String> = m
        .entries
        .iter()
        .map(|e| match (&e.kind, named.get(&e.name)) {
            (EntryKind::Slice { .. }, Some(path)) => path.clone(),
            (EntryKind::Value, _) => format!("{}.json", e.name),
            (EntryKind::Slice { .. }, None) if array_of(&m, e).is_some() => {
                format!("{}.npy", e.name)
            }
            (EntryKind::Slice { elem, .. }, None) => format!("{}.{elem}", e.name),
        })
        .collect();
    if files.iter().any(|f| f == INDEX) {
        bail!(
            "snapshot {seq} has a value entry named \"snapshot\", which would be written to the index's file {INDEX}"
        );
    }
    let dir = open_target_dir(to, sharing)?;
    // Refuse before writing anything when a file is there already (creating each file with
    // O_EXCL|O_NOFOLLOW below is what guarantees it).
    for file in files.iter().map(String::as_str).chain([INDEX]) {
        let path = to.join(file);
        if std::fs::symlink_metadata(&path).is_ok() {
            bail!(
                "{} already exists: restore neither overwrites nor follows a file (choose a new \
                 or empty directory)",
                path.display()
            );
        }
    }
    let total: u64 = m.entries.iter().map(|e| e.len).sum();
    let bar = progress(total, "restoring");
    let mut entries = Vec::new();
    for (e, file) in m.entries.iter().zip(files) {
        let array = array_of(&m, e);
        let path = to.join(&file);
        let mut out = create_in(&dir, to, &file, sharing)?;
        let write_err = |e: std::io::Error| supervise_store::Error::Io {
            op: "write",
            path: path.clone(),
            source: e,
        };
        if e.kind == EntryKind::Value {
            let mut data = reader.value_bytes(&e.name)?.unwrap_or_default();
            // Re-indented as text: a number is kept as the program wrote it (a 128-bit
            // integer, such as a numpy Generator's state, is not rounded through an f64).
            if serde_json::from_slice::<serde::de::IgnoredAny>(&data).is_ok() {
                data = human::pretty_json(&data);
                data.push(b'\n');
            }
            out.write_all(&data).map_err(write_err)?;
            bar.inc(e.len);
        } else {
            if let Some(array) = &array {
                out.write_all(&crate::npy::header(&array.dtype, &array.shape))
                    .map_err(write_err)?;
            }
            reader.read_entry(e, |batch| {
                bar.inc(batch.len() as u64);
                out.write_all(batch).map_err(write_err)
            })?;
        }
        entries.push(Written {
            name: e.name.clone(),
            file,
            kind: e.kind.describe(),
            bytes: e.len,
            array,
        });
    }
    bar.finish_and_clear();
    let done = Restored {
        job: job.name().to_owned(),
        snapshot: seq,
        created_unix_ms: m.created_unix_ms,
        tag: m.tag.clone(),
        dir: to.to_owned(),
        entries,
    };
    let index = serde_json::to_vec_pretty(&done)?;
    create_in(&dir, to, INDEX, sharing)?
        .write_all(&index)
        .with_context(|| format!("cannot write {}", to.join(INDEX).display()))?;
    Ok(done)
}

/// `snapshot JOB`: ask the running job for a snapshot and wait for it.
pub fn snapshot(t: &Target, timeout: Duration) -> Result<i32> {
    let job = t.job()?;
    let Some(reply) = operator::ask(job.dir(), &Request::Snapshot, timeout)? else {
        bail!("job {} is not running (no supervisor answers)", job.name());
    };
    match (reply.ok, reply.snapshot) {
        (true, Some(seq)) => {
            if t.json {
                #[derive(Serialize)]
                struct Taken<'a> {
                    job: &'a str,
                    snapshot: u64,
                }
                return print_json(&Taken {
                    job: job.name(),
                    snapshot: seq,
                });
            }
            human::outln!("{seq}")?;
            Ok(0)
        }
        _ => bail!(
            "job {}: {}",
            job.name(),
            reply
                .error
                .unwrap_or_else(|| "no snapshot was taken".into())
        ),
    }
}

/// `status`: the running jobs of a store.
pub fn status(t: &Target) -> Result<i32> {
    #[derive(Serialize)]
    struct Row {
        job: String,
        supervisor_pid: Option<u32>,
        child_pid: Option<u32>,
        started_unix_ms: Option<u64>,
        restarts: Option<u32>,
        last_snapshot: Option<u64>,
        last_snapshot_unix_ms: Option<u64>,
        /// The newest snapshot on every durable tier (`null`: none, or no durable tier).
        last_off_node: Option<u64>,
        bytes_on_disk: u64,
        /// `state_bytes / stored_bytes` (0 when nothing is stored).
        dedup_ratio: f64,
        /// The state of the job's snapshots: their bytes in memory, summed.
        state_bytes: u64,
        /// The bytes of the distinct compressed chunk records they use.
        stored_bytes: u64,
        /// Whether the program's shim has connected (`null`: the supervisor does not say).
        shim_connected: Option<bool>,
        /// The snapshot interval now, in milliseconds (`null`: the supervisor does not say).
        every_ms: Option<u64>,
        /// With `--every auto`, why that interval.
        every_why: Option<String>,
        note: Option<String>,
    }
    let store = t.store()?;
    let names = match &t.job {
        Some(j) => vec![j.clone()],
        None => store.jobs()?,
    };
    let mut rows = Vec::new();
    for name in names {
        let job = store.existing_job(&name)?;
        let Some(owner) = JobLock::holder(job.dir())? else {
            continue;
        };
        let manifests: Vec<Manifest> = job
            .snapshot_seqs()?
            .into_iter()
            .filter_map(|s| job.read_manifest(s).ok())
            .collect();
        let logical: u64 = manifests.iter().map(|m| m.stats.bytes_total).sum();
        let stored = stored_bytes(&manifests);
        let mut row = Row {
            job: name.clone(),
            supervisor_pid: Some(owner.pid),
            child_pid: None,
            started_unix_ms: Some(owner.since_unix * 1000),
            restarts: None,
            last_snapshot: manifests.last().map(|m| m.seq),
            last_snapshot_unix_ms: manifests.last().map(|m| m.created_unix_ms),
            last_off_node: None,
            bytes_on_disk: job.disk_bytes()?,
            dedup_ratio: ratio(logical, stored),
            state_bytes: logical,
            stored_bytes: stored,
            shim_connected: None,
            every_ms: None,
            every_why: None,
            note: None,
        };
        match operator::ask(job.dir(), &Request::Status, Duration::from_secs(5)) {
            Ok(Some(reply)) if reply.ok => {
                if let Some(s) = reply.status {
                    row.supervisor_pid = Some(s.supervisor_pid);
                    row.child_pid = s.child_pid;
                    row.started_unix_ms = Some(s.started_unix_ms);
                    row.restarts = Some(s.restarts);
                    row.shim_connected = s.shim_connected;
                    row.last_off_node = s.last_off_node;
                    row.every_ms = s.every_ms;
                    row.every_why = s.every_why;
                }
            }
            Ok(_) => {
                row.note = Some(
                    "no supervisor answers: the program a lost supervisor started still runs"
                        .into(),
                )
            }
            Err(e) => row.note = Some(format!("supervisor did not answer: {e:#}")),
        }
        rows.push(row);
    }
    if t.json {
        return print_json(&rows);
    }
    if rows.is_empty() {
        human::outln!("no job is running in store {}", t.store.display())?;
        return Ok(0);
    }
    let dash = || "-".to_owned();
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.job.clone(),
                r.supervisor_pid.map_or_else(dash, |p| p.to_string()),
                r.child_pid.map_or_else(dash, |p| p.to_string()),
                r.started_unix_ms.map_or_else(dash, |t| {
                    human::duration(Duration::from_millis(now_unix_ms().saturating_sub(t)))
                }),
                r.restarts.map_or_else(dash, |n| n.to_string()),
                r.last_snapshot.map_or_else(dash, |s| s.to_string()),
                r.last_snapshot_unix_ms.map_or_else(dash, age),
                r.last_off_node.map_or_else(dash, |s| s.to_string()),
                match (r.every_ms, &r.every_why) {
                    (None, _) => dash(),
                    (Some(ms), None) => human::duration(Duration::from_millis(ms)),
                    (Some(ms), Some(why)) => format!(
                        "{} (auto: {why})",
                        human::duration(Duration::from_millis(ms))
                    ),
                },
                human::bytes(r.bytes_on_disk),
                ratio_cell(r.shim_connected, r.stored_bytes, r.dedup_ratio),
                r.note.clone().unwrap_or_default(),
            ]
        })
        .collect();
    human::table(
        &[
            "JOB",
            "PID",
            "CHILD",
            "UPTIME",
            "RESTARTS",
            "SNAPSHOT",
            "TAKEN",
            "OFF-NODE",
            "EVERY",
            "ON DISK",
            "STATE/STORED",
            "",
        ],
        &table,
    )?;
    human::outln!("\n{STATUS_RATIO}")?;
    Ok(0)
}

/// The STATE/STORED cell of `status`: `no shim` when the program has not connected the shim
/// (so it takes no snapshot), `-` when nothing is stored yet, else the ratio.
fn ratio_cell(shim_connected: Option<bool>, stored: u64, ratio: f64) -> String {
    match (shim_connected, stored) {
        (Some(false), 0) => "no shim".into(),
        (_, 0) => "-".into(),
        (_, _) => format!("{ratio:.2}"),
    }
}

/// Which records `log` shows.
#[derive(Clone, Debug, Default)]
pub struct LogFilter {
    /// Only the last N records (of those the other filters keep).
    pub last: Option<usize>,
    /// Only records written at or after this time (ms since the epoch).
    pub since_unix_ms: Option<u64>,
    /// Only records of these kinds (all kinds when empty).
    pub kinds: Vec<String>,
}

impl LogFilter {
    /// The records this filter keeps, oldest first.
    fn apply(&self, records: Vec<events::Record>) -> Vec<events::Record> {
        let mut kept: Vec<events::Record> = records
            .into_iter()
            .filter(|r| self.since_unix_ms.is_none_or(|since| r.unix_ms >= since))
            .filter(|r| self.kinds.is_empty() || self.kinds.contains(&r.kind))
            .collect();
        if let Some(n) = self.last {
            kept.drain(..kept.len().saturating_sub(n));
        }
        kept
    }
}

/// The kinds of `records` with how many of each, in the order they first appear:
/// `start (2), spawned (5)`.
fn kinds_present(records: &[events::Record]) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for r in records {
        match counts.iter_mut().find(|(k, _)| *k == r.kind) {
            Some((_, n)) => *n += 1,
            None => counts.push((&r.kind, 1)),
        }
    }
    if counts.is_empty() {
        return "none (the history is empty)".into();
    }
    counts
        .iter()
        .map(|(k, n)| format!("{k} ({n})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `log JOB`: the job's event history, filtered.
pub fn log(t: &Target, filter: &LogFilter) -> Result<i32> {
    let job = t.job()?;
    let history = events::history(job.dir())?;
    if let Some(note) = events::skipped_note(job.dir(), &history) {
        eprintln!("supervise: {note}");
    }
    let kinds_there = (!filter.kinds.is_empty()).then(|| kinds_present(&history.records));
    let records = filter.apply(history.records);
    if let Some(there) = kinds_there.filter(|_| records.is_empty()) {
        eprintln!(
            "supervise: no record of kind {} in the history of job {}{}; kinds there: {there}",
            filter.kinds.join(", "),
            job.name(),
            filter
                .since_unix_ms
                .map(|since| format!(" since {}", time(since)))
                .unwrap_or_default()
        );
    }
    if t.json {
        return print_json(&records);
    }
    let mut out = human::out();
    for r in &records {
        writeln!(out, "{}  [{}] {}", time(r.unix_ms), r.pid, r.message)?;
    }
    Ok(0)
}
