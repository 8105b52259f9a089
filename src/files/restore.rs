//! Putting a stored checkpoint and its companions back in the run directory before a start: a
//! file that is missing, shorter or different is written anew (temp name, fsync, rename, fsync
//! of the directory); one that only grew past the stored length (an append-only trajectory or
//! log) is cut back to it; one that is the same is left alone.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use supervise_store::JobStore;
use supervise_store::format::EntryMeta;
use supervise_store::reader::SnapshotReader;

use super::capture::{FilesMeta, META_ENTRY, META_VERSION, TMP_PREFIX, open_nofollow};

/// Why a snapshot could not be put back.
#[derive(Debug)]
pub enum RestoreError {
    /// The snapshot is damaged: set it aside and try an older one.
    Damaged(String),
    /// It is not a file-mode snapshot (the job's program used the shim before): passed by,
    /// left as it is.
    NotFiles(String),
    /// Reading the store or writing the run directory failed (I/O, permissions, full disk, a
    /// snapshot of a newer release): an error, never a walk back.
    Local(String),
}

impl std::fmt::Display for RestoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RestoreError::Damaged(why) | RestoreError::NotFiles(why) | RestoreError::Local(why) => {
                f.write_str(why)
            }
        }
    }
}

/// What was put back.
#[derive(Debug)]
pub struct Restored {
    /// The snapshot.
    pub meta: FilesMeta,
    /// Files written anew.
    pub written: Vec<String>,
    /// Files cut back to their stored length.
    pub cut: Vec<String>,
}

/// How a file in the run directory compares with its stored version.
enum Compare {
    Same,
    /// The stored bytes, then more.
    Longer,
    Differs,
}

/// Reads snapshot `seq`, verifies all of it, and puts its files in `dir`.
pub fn restore(job: &JobStore, seq: u64, dir: &Path) -> Result<Restored, RestoreError> {
    // Only damage walks back; a read error is not damage.
    let damaged = |e: supervise_store::Error| {
        if e.is_corruption() {
            RestoreError::Damaged(e.to_string())
        } else {
            RestoreError::Local(e.to_string())
        }
    };
    let reader = SnapshotReader::open(job, seq).map_err(damaged)?;
    let meta = read_meta(&reader)?;
    // Every byte verified before anything in the run directory changes.
    reader.verify().map_err(damaged)?;
    let mut written = Vec::new();
    let mut cut = Vec::new();
    for f in &meta.files {
        let entry = reader
            .manifest()
            .entry(&f.entry)
            .ok_or_else(|| RestoreError::Damaged(format!("entry {} is missing", f.entry)))?;
        let dest = dir.join(&f.path);
        let local = |e: std::io::Error| {
            RestoreError::Local(format!("cannot restore {}: {e}", dest.display()))
        };
        directories_beneath(dir, Path::new(&f.path)).map_err(local)?;
        match compare(&dest, entry).map_err(local)? {
            Compare::Same => {}
            Compare::Longer => {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&dest)
                    .map_err(local)?;
                file.set_len(entry.len).map_err(local)?;
                file.sync_all().map_err(local)?;
                cut.push(f.path.clone());
            }
            Compare::Differs => {
                write_anew(&reader, entry, &dest, f.mode).map_err(|e| match e {
                    Written::Store(e) => damaged(e),
                    Written::Local(e) => local(e),
                })?;
                written.push(f.path.clone());
            }
        }
    }
    Ok(Restored { meta, written, cut })
}

/// Removes the temporary files a restore cut short (the supervisor killed while writing one)
/// left in `dirs` (relative to the run directory `dir`).
pub fn remove_leftovers(dir: &Path, dirs: &[&Path]) {
    for d in dirs {
        let Ok(entries) = std::fs::read_dir(dir.join(d)) else {
            continue;
        };
        for e in entries.flatten() {
            let ours = e
                .file_name()
                .as_encoded_bytes()
                .starts_with(TMP_PREFIX.as_bytes());
            if ours && e.file_type().is_ok_and(|t| t.is_file()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// The `sv-files` entry of a snapshot, checked.
pub fn read_meta(reader: &SnapshotReader) -> Result<FilesMeta, RestoreError> {
    let bytes = reader
        .value_bytes(META_ENTRY)
        .map_err(|e| {
            if e.is_corruption() {
                RestoreError::Damaged(e.to_string())
            } else {
                RestoreError::Local(e.to_string())
            }
        })?
        .ok_or_else(|| {
            RestoreError::NotFiles(
                "it was not taken in file mode (it holds no sv-files entry)".into(),
            )
        })?;
    // Only a version this release knows is read as one: a newer layout is not damage.
    #[derive(serde::Deserialize)]
    struct Version {
        version: u32,
    }
    if let Ok(v) = serde_json::from_slice::<Version>(&bytes)
        && v.version > META_VERSION
    {
        return Err(RestoreError::Local(format!(
            "its sv-files entry is version {}, newer than this release reads ({META_VERSION}): \
             use the release that wrote it",
            v.version
        )));
    }
    let bad = |why: String| RestoreError::Damaged(format!("its sv-files entry: {why}"));
    let meta: FilesMeta = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    for f in &meta.files {
        let p = Path::new(&f.path);
        if f.path.is_empty()
            || p.components()
                .any(|c| !matches!(c, Component::Normal(n) if !n.is_empty()))
        {
            return Err(bad(format!(
                "it names {:?}, not a path inside the run directory",
                f.path
            )));
        }
    }
    if meta.files.first().map(|f| &f.path) != Some(&meta.checkpoint) {
        return Err(bad("it does not start with the checkpoint".into()));
    }
    Ok(meta)
}

/// Checks that no directory on the way from `dir` to `rel` is a symbolic link (so nothing is
/// written outside the run directory), and makes the missing ones.
fn directories_beneath(dir: &Path, rel: &Path) -> std::io::Result<()> {
    let mut at = dir.to_path_buf();
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    for c in parent.components() {
        at.push(c);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(std::io::Error::other(format!(
                    "{} is not a directory (a symbolic link is not followed)",
                    at.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir(&at)?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn compare(dest: &Path, entry: &EntryMeta) -> std::io::Result<Compare> {
    let file = match open_nofollow(dest) {
        Ok(f) => f,
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || e.raw_os_error() == Some(libc::ELOOP) =>
        {
            return Ok(Compare::Differs);
        }
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() || meta.len() < entry.len {
        return Ok(Compare::Differs);
    }
    let mut buf = Vec::new();
    let mut at = 0u64;
    for chunk in &entry.chunks {
        buf.resize(chunk.raw_len as usize, 0);
        file.read_exact_at(&mut buf, at)?;
        if *blake3::hash(&buf).as_bytes() != chunk.hash {
            return Ok(Compare::Differs);
        }
        at += u64::from(chunk.raw_len);
    }
    Ok(if meta.len() == entry.len {
        Compare::Same
    } else {
        Compare::Longer
    })
}

enum Written {
    Store(supervise_store::Error),
    Local(std::io::Error),
}

/// Writes the entry to a temporary name beside `dest`, fsyncs it, renames it over `dest` and
/// fsyncs the directory.
fn write_anew(
    reader: &SnapshotReader,
    entry: &EntryMeta,
    dest: &Path,
    mode: u32,
) -> Result<(), Written> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = parent.join(format!("{TMP_PREFIX}{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut out: File = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode & 0o777)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(Written::Local)?;
    let mut local_err = None;
    let read = reader.read_entry(entry, |bytes| {
        if let Err(e) = out.write_all(bytes) {
            local_err = Some(e);
            return Err(supervise_store::Error::Internal {
                job: String::new(),
                seq: None,
                why: "write failed".into(),
            });
        }
        Ok(())
    });
    let result = match (read, local_err) {
        (_, Some(e)) => Err(Written::Local(e)),
        (Err(e), None) => Err(Written::Store(e)),
        (Ok(()), None) => out
            .sync_all()
            .and_then(|()| std::fs::rename(&tmp, dest))
            .and_then(|()| File::open(parent)?.sync_all())
            .map_err(Written::Local),
    };
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
