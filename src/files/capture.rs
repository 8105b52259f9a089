//! Capturing a code's checkpoint files into the store: find the checkpoint files that changed,
//! open each before reading it (a later rename cannot change what is read), check that it is
//! complete, read its step and its companions, and write them as one snapshot with the same
//! writer, dedup and commit rule as the shim's snapshots.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use supervise_store::format::{EntryKind, Origin};
use supervise_store::retention::Retention;
use supervise_store::writer::{SnapshotReport, SnapshotWriter};

use super::spec::{Complete, FileSpec, StepFrom};

/// The value entry that makes a snapshot a file-mode snapshot: which stored entry is which file.
pub const META_ENTRY: &str = "sv-files";

/// How restore names the files it writes before renaming them into place; never a checkpoint,
/// and removed when left behind.
pub const TMP_PREFIX: &str = ".sv-tmp-";

/// Version of [`FilesMeta`]'s layout.
pub const META_VERSION: u32 = 1;

/// What a file-mode snapshot holds (the `sv-files` value entry).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FilesMeta {
    /// [`META_VERSION`].
    pub version: u32,
    /// The preset, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// The checkpoint file, relative to the run directory.
    pub checkpoint: String,
    /// The code's step, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    /// Every stored file: the checkpoint first, then its companions.
    pub files: Vec<StoredFile>,
}

/// One stored file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredFile {
    /// The entry holding its bytes (`file-0`, `file-1`, ...).
    pub entry: String,
    /// Its path relative to the run directory.
    pub path: String,
    /// Its length as stored.
    pub len: u64,
    /// Its permission bits.
    pub mode: u32,
}

/// A file as last seen: a change of any of these is a new version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl FileId {
    /// The identity in `meta`.
    pub fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }
}

/// When a scan runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// While the program runs: a file written in place must be unchanged since the last scan.
    Running,
    /// After the program ended: nothing writes any more.
    Settle,
    /// Before a start: only a checkpoint newer than `newest_step` (by the code's step) is
    /// taken (one the store lost, or the program wrote while no supervisor watched).
    Prepare {
        /// The step of the snapshot about to be restored.
        newest_step: Option<u64>,
    },
}

/// What a scan found.
#[derive(Debug)]
pub enum Found {
    /// A checkpoint was stored.
    Captured(Captured),
    /// A checkpoint file that is not (yet) complete or valid; it is not stored.
    Refused {
        /// Relative to the run directory.
        path: String,
        /// Why.
        why: String,
    },
    /// Storing failed; earlier snapshots are intact.
    Failed {
        /// Why.
        error: String,
    },
}

/// A stored checkpoint.
#[derive(Debug)]
pub struct Captured {
    /// The writer's report (seq, sizes, time).
    pub report: SnapshotReport,
    /// When the checkpoint file was last modified (ms since the epoch).
    pub modified_unix_ms: u64,
    /// The code's step in it, when known.
    pub step: Option<u64>,
    /// Why retention after it failed, if it did (the snapshot itself is durable).
    pub retention_failed: Option<String>,
}

/// The capture side of file mode: owns the job's writer.
pub struct Capturer {
    spec: FileSpec,
    writer: SnapshotWriter,
    retention: Retention,
    origin: Option<Origin>,
    /// Versions already stored, restored or refused: never taken again.
    seen: HashMap<PathBuf, FileId>,
    /// Versions of files written in place seen once (taken when unchanged at the next scan).
    settling: HashMap<PathBuf, (FileId, std::time::Instant)>,
    /// Files inotify saw closed after writing since the last scan.
    closed: std::collections::HashSet<PathBuf>,
    /// A private directory for copies given to checking commands.
    scratch: Scratch,
}

/// A checkpoint opened and checked, before it is stored.
struct Opened {
    rel: PathBuf,
    file: File,
    meta: std::fs::Metadata,
    step: Option<u64>,
    /// Companions the code's checkpoint names, with the length it recorded if any.
    listed: Vec<(PathBuf, Option<u64>)>,
}

impl Capturer {
    /// A capturer writing with `writer`.
    pub fn new(
        spec: FileSpec,
        writer: SnapshotWriter,
        retention: Retention,
        origin: Option<Origin>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            spec,
            writer,
            retention,
            origin,
            seen: HashMap::new(),
            settling: HashMap::new(),
            closed: std::collections::HashSet::new(),
            scratch: Scratch::new()?,
        })
    }

    /// The spec.
    pub fn spec(&self) -> &FileSpec {
        &self.spec
    }

    /// The job's writer (for a restore's set-aside and the newest seq).
    pub fn writer(&self) -> &SnapshotWriter {
        &self.writer
    }

    /// Notes that the code closed `rel` after writing it: a file written in place is taken at
    /// the next scan without waiting for it to stay unchanged.
    pub fn mark_closed(&mut self, rel: &Path) {
        self.closed.insert(rel.to_owned());
    }

    /// Uses `writer` from now on (reopened after snapshots were set aside).
    pub fn replace_writer(&mut self, writer: SnapshotWriter) {
        self.writer = writer;
    }

    /// Snapshots suspected by the supervisor (kept by retention until a newer good one).
    pub fn set_suspect(&mut self, suspect: Vec<(u64, u64)>) {
        self.retention.suspect = suspect;
    }

    /// Notes `rel`'s current version as known: it is not taken (a file just restored, or one
    /// older than what is restored).
    pub fn mark_seen(&mut self, rel: &Path) {
        if let Ok(meta) = std::fs::symlink_metadata(self.spec.dir.join(rel)) {
            self.seen.insert(rel.to_owned(), FileId::of(&meta));
        }
    }

    /// The checkpoint files present now, relative to the run directory, oldest first.
    pub fn checkpoint_files(&self) -> Vec<PathBuf> {
        let mut found: Vec<(i128, PathBuf)> = Vec::new();
        for dir in self.spec.checkpoint_dirs() {
            let Ok(entries) = std::fs::read_dir(self.spec.dir.join(dir)) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry
                    .file_name()
                    .as_encoded_bytes()
                    .starts_with(TMP_PREFIX.as_bytes())
                {
                    continue;
                }
                let rel = dir.join(entry.file_name());
                if !self.spec.is_checkpoint(&rel) {
                    continue;
                }
                if let Ok(meta) = entry.metadata() {
                    found.push((FileId::of(&meta).mtime_ns, rel));
                }
            }
        }
        found.sort();
        found.into_iter().map(|(_, rel)| rel).collect()
    }

    /// Looks at every checkpoint file and stores each new complete one, oldest first.
    pub fn scan(&mut self, phase: Phase) -> Vec<Found> {
        let mut found = Vec::new();
        for rel in self.checkpoint_files() {
            let opened = match self.open_checkpoint(&rel, phase) {
                Ok(Some(o)) => o,
                Ok(None) => continue,
                Err(why) => {
                    self.mark_seen(&rel);
                    found.push(Found::Refused {
                        path: rel.display().to_string(),
                        why,
                    });
                    continue;
                }
            };
            let id = FileId::of(&opened.meta);
            if let Phase::Prepare { newest_step } = phase {
                let newer = match (opened.step, newest_step) {
                    (Some(s), Some(n)) => s > n,
                    (_, None) => true,
                    (None, Some(_)) => false,
                };
                if !newer {
                    self.seen.insert(rel, id);
                    continue;
                }
            }
            match self.store(&opened) {
                Ok(c) => found.push(Found::Captured(c)),
                Err(error) => found.push(Found::Failed { error }),
            }
            // Stored or failed, this version is not taken again: a failure is reported and the
            // code's next checkpoint is the next chance.
            self.seen.insert(rel, id);
        }
        self.closed.clear();
        found
    }

    /// Opens `rel` and checks it: `Ok(None)` when there is nothing new yet, `Err(why)` when this
    /// version is not a complete checkpoint.
    fn open_checkpoint(&mut self, rel: &Path, phase: Phase) -> Result<Option<Opened>, String> {
        let path = self.spec.dir.join(rel);
        // A version already seen costs one lstat, not an open (many restart files on Lustre).
        if let Ok(meta) = std::fs::symlink_metadata(&path)
            && self.seen.get(rel) == Some(&FileId::of(&meta))
        {
            return Ok(None);
        }
        let file = match open_nofollow(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                if self.seen.contains_key(rel) {
                    return Ok(None);
                }
                return Err("it is a symbolic link; a checkpoint must be a regular file".into());
            }
            Err(e) => return Err(format!("cannot open it: {e}")),
        };
        let meta = file
            .metadata()
            .map_err(|e| format!("cannot stat it: {e}"))?;
        let id = FileId::of(&meta);
        if self.seen.get(rel) == Some(&id) {
            return Ok(None);
        }
        if !meta.is_file() {
            return Err("it is not a regular file".into());
        }
        let closed = self.closed.remove(rel);
        if self.spec.complete.contains(&Complete::Closed) && phase == Phase::Running && !closed {
            // Written in place: take it once it was closed, or stayed the same from one scan
            // to the next.
            // Two looks close together (inotify wakes the scan) prove nothing: the second must
            // come at least one scan interval after the first.
            let steady = self
                .settling
                .get(rel)
                .is_some_and(|(was, since)| *was == id && since.elapsed() >= super::SCAN_EVERY);
            if !steady {
                if self.settling.get(rel).is_none_or(|(was, _)| *was != id) {
                    self.settling
                        .insert(rel.to_owned(), (id, std::time::Instant::now()));
                }
                return Ok(None);
            }
        }
        self.settling.remove(rel);
        let len = meta.len();
        for test in &self.spec.complete {
            match test {
                Complete::Renamed | Complete::Closed => {}
                Complete::Starts(m) | Complete::Ends(m) => {
                    let at = match test {
                        Complete::Starts(_) => 0,
                        _ => len.checked_sub(m.len() as u64).ok_or_else(|| {
                            format!("it is shorter ({len} bytes) than its end marker")
                        })?,
                    };
                    let mut buf = vec![0u8; m.len()];
                    file.read_exact_at(&mut buf, at)
                        .map_err(|_| format!("it is shorter ({len} bytes) than its markers"))?;
                    if &buf != m {
                        let end = if at == 0 { "start" } else { "end" };
                        return Err(format!(
                            "its {end} is not the code's marker {:?}: it is incomplete or damaged",
                            String::from_utf8_lossy(m)
                        ));
                    }
                }
                Complete::Command(cmd) => {
                    let copy = self.scratch.copy(&file, rel, len)?;
                    let checked = run_check(cmd, &copy);
                    let _ = std::fs::remove_file(&copy);
                    checked?;
                }
            }
        }
        let (step, listed) = match &self.spec.step {
            StepFrom::Unknown => (None, Vec::new()),
            StepFrom::Name => (step_in_name(rel), Vec::new()),
            StepFrom::Command(cmd) => {
                let copy = self.scratch.copy(&file, rel, len)?;
                let out = run_check(cmd, &copy);
                let _ = std::fs::remove_file(&copy);
                (first_number(&out?), Vec::new())
            }
            StepFrom::GromacsDump { gmx } => {
                let copy = self.scratch.copy(&file, rel, len)?;
                let cmd = vec![gmx.clone(), "dump".into(), "-cp".into()];
                let out = run_check(&cmd, &copy);
                let _ = std::fs::remove_file(&copy);
                let out = out?;
                let dump = super::preset::gromacs_dump(&out);
                let step = dump
                    .step
                    .ok_or("`gmx dump -cp` shows no step: it is incomplete or damaged")?;
                (Some(step), dump.outputs)
            }
        };
        let mut listed = listed;
        if let Some(cmd) = &self.spec.companions_command {
            let copy = self.scratch.copy(&file, rel, len)?;
            let out = run_check(cmd, &copy);
            let _ = std::fs::remove_file(&copy);
            let out = out?;
            listed.extend(
                out.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(|l| (PathBuf::from(l), None)),
            );
        }
        Ok(Some(Opened {
            rel: rel.to_owned(),
            file,
            meta,
            step,
            listed,
        }))
    }

    /// Writes the checkpoint and its companions as one snapshot.
    fn store(&mut self, o: &Opened) -> Result<Captured, String> {
        let dir = self.spec.dir.clone();
        // The checkpoint first, then its companions: those it names (cut to the length it
        // recorded), then those the patterns match.
        let mut files: Vec<(PathBuf, File, u64, u32)> = vec![(
            o.rel.clone(),
            o.file.try_clone().map_err(|e| e.to_string())?,
            o.meta.len(),
            o.meta.mode() & 0o7777,
        )];
        let mut wanted: Vec<(PathBuf, Option<u64>)> = o.listed.clone();
        for pattern in &self.spec.companions {
            if let Ok(entries) = std::fs::read_dir(dir.join(&pattern.dir)) {
                let mut names: Vec<PathBuf> = entries
                    .flatten()
                    .map(|e| pattern.dir.join(e.file_name()))
                    .filter(|rel| pattern.matches(rel))
                    .collect();
                names.sort();
                wanted.extend(names.into_iter().map(|n| (n, None)));
            }
        }
        for (rel, recorded) in wanted {
            if files.iter().any(|(r, ..)| *r == rel) || self.spec.is_checkpoint(&rel) {
                continue;
            }
            if rel.is_absolute() || rel.components().any(|c| c.as_os_str() == "..") {
                continue;
            }
            let Ok(file) = open_nofollow(&dir.join(&rel)) else {
                // A companion the code did not write (e.g. -noappend) is not needed.
                continue;
            };
            let Ok(meta) = file.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let len = match recorded {
                // The code will check it against what its checkpoint records: a shorter file
                // would make that checkpoint fail at every resume.
                Some(r) if r > meta.len() => {
                    return Err(format!(
                        "{} is shorter ({} bytes) than the checkpoint records ({r} bytes): it \
                         cannot be resumed from",
                        rel.display(),
                        meta.len()
                    ));
                }
                Some(r) => r,
                None => meta.len(),
            };
            files.push((rel, file, len, meta.mode() & 0o7777));
        }
        let tag = match o.step {
            Some(step) => format!("step {step}"),
            None => o.rel.display().to_string(),
        };
        let meta = FilesMeta {
            version: META_VERSION,
            preset: self.spec.preset.map(str::to_owned),
            checkpoint: o.rel.display().to_string(),
            step: o.step,
            files: files
                .iter()
                .enumerate()
                .map(|(i, (rel, _, len, mode))| StoredFile {
                    entry: format!("file-{i}"),
                    path: rel.display().to_string(),
                    len: *len,
                    mode: *mode,
                })
                .collect(),
        };
        let shuffles: Vec<u8> = files
            .iter()
            .map(|(rel, ..)| self.spec.shuffle_for(rel))
            .collect();
        let mut b = self.writer.begin(Some(&tag));
        b.set_origin(self.origin.clone());
        for (i, (rel, file, len, _)) in files.iter().enumerate() {
            let kind = EntryKind::Slice {
                elem: "u8".into(),
                elem_size: 1,
            };
            b.add_file(
                &format!("file-{i}"),
                kind,
                file,
                *len,
                &dir.join(rel),
                shuffles[i],
            )
            .map_err(|e| e.to_string())?;
        }
        b.value(META_ENTRY, &meta).map_err(|e| e.to_string())?;
        // A file rewritten in place while it was read would mix two versions: nothing is
        // committed then (the builder dropped, nothing becomes visible). The checkpoint must
        // be exactly as opened; a companion may only have grown (appended to) meanwhile.
        for (i, (rel, file, len, _)) in files.iter().enumerate() {
            let now = file.metadata().map_err(|e| e.to_string())?;
            let same = if i == 0 {
                FileId::of(&now) == FileId::of(&o.meta)
            } else {
                now.len() >= *len
            };
            if !same {
                return Err(format!(
                    "{} changed while it was stored; the code's next checkpoint is taken",
                    rel.display()
                ));
            }
        }
        let mut report = b.commit().map_err(|e| e.to_string())?;
        report.tag = Some(tag);
        let retention_failed = match self.writer.apply_retention(self.retention.clone()) {
            Ok(r) => {
                report.removed = r.removed_snapshots;
                None
            }
            Err(e) => Some(e.to_string()),
        };
        let modified_unix_ms = o
            .meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        Ok(Captured {
            report,
            retention_failed,
            step: o.step,
            modified_unix_ms,
        })
    }
}

/// Opens a file for reading without following a link at its last component.
/// (`O_NONBLOCK` too, so that a FIFO at the name cannot block; it only matters for FIFOs and
/// devices, which are then refused as not regular files.)
pub fn open_nofollow(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
}

/// How long a check or step command may run (it was killed after: the checkpoint is refused).
const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// The last run of digits in the file name (`restart.5000` -> 5000).
fn step_in_name(rel: &Path) -> Option<u64> {
    let name = rel.file_name()?.to_str()?;
    let end = name.rfind(|c: char| c.is_ascii_digit())? + 1;
    let start = name[..end]
        .rfind(|c: char| !c.is_ascii_digit())
        .map_or(0, |i| i + 1);
    name[start..end].parse().ok()
}

/// The first whole number in `text`.
fn first_number(text: &str) -> Option<u64> {
    text.split(|c: char| !c.is_ascii_digit())
        .find(|w| !w.is_empty())
        .and_then(|w| w.parse().ok())
}

/// Runs `cmd` with `copy` in place of `{checkpoint}` (or appended); its stdout, or why it
/// failed.
fn run_check(cmd: &[String], copy: &Path) -> Result<String, String> {
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    let mut substituted = false;
    for word in cmd {
        match word.split_once("{checkpoint}") {
            Some((a, b)) => {
                let mut w = std::ffi::OsString::from(a);
                w.push(copy.as_os_str());
                w.push(b);
                args.push(w);
                substituted = true;
            }
            None => args.push(word.into()),
        }
    }
    if !substituted {
        args.push(copy.as_os_str().to_owned());
    }
    let (program, rest) = args.split_first().ok_or("the check command is empty")?;
    let child = Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", program.to_string_lossy()))?;
    // A check that hangs (a stalled file system) must not stop the capture for good.
    let pid = child.id();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let done = std::sync::Arc::clone(&done);
        std::thread::spawn(move || {
            let until = std::time::Instant::now() + CHECK_TIMEOUT;
            while std::time::Instant::now() < until {
                if done.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            if !done.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        })
    };
    let out = child.wait_with_output();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = watchdog.join();
    let out = out.map_err(|e| format!("cannot run {}: {e}", program.to_string_lossy()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim();
        return Err(format!(
            "`{}` refused it ({}){}: it is incomplete or damaged",
            cmd.join(" "),
            out.status,
            if last.is_empty() {
                String::new()
            } else {
                format!(": {last}")
            }
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A private directory (mode 0700) for copies of checkpoints handed to check commands, so a
/// command reads exactly the bytes that are stored.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new() -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let base = std::env::temp_dir();
        let mut n = 0u32;
        loop {
            let dir = base.join(format!("supervise-files-{}-{n}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(Self { dir }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Copies the first `len` bytes of `file` under its own file name; the path of the copy.
    fn copy(&self, file: &File, rel: &Path, len: u64) -> Result<PathBuf, String> {
        let name = rel.file_name().ok_or("no file name")?;
        let path = self.dir.join(name);
        let _ = std::fs::remove_file(&path);
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| format!("cannot make a copy at {}: {e}", path.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], at)
                .map_err(|e| format!("it shrank while read ({e})"))?;
            out.write_all(&buf[..n])
                .map_err(|e| format!("cannot copy it to {}: {e}", path.display()))?;
            at += n as u64;
        }
        Ok(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_come_from_the_last_digits_of_a_name_or_the_first_number_printed() {
        assert_eq!(step_in_name(Path::new("restart.5000")), Some(5000));
        assert_eq!(step_in_name(Path::new("out/r2.1200.bin")), Some(1200));
        assert_eq!(step_in_name(Path::new("restart")), None);
        assert_eq!(first_number("step = 42\n"), Some(42));
        assert_eq!(first_number("none"), None);
    }
}
