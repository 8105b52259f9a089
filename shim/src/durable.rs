//! Durable file publication: write to a temporary name, fsync, rename, fsync the directory.
//! Everything the store makes visible goes through here; a reader never sees half a file.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Result, io_err};

/// Prefix of temporary files; anything with it is unfinished and may be removed by the writer.
pub const TMP_PREFIX: &str = ".tmp-";

/// Creates `dir` (and missing parents) with mode 0700, fsyncing the parent of each directory
/// it creates so that the new directory survives a crash along with what is later put in it.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_private_dir(parent)?;
    }
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => fsync_dir(
            dir.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new(".")),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(io_err("create directory", dir)(e)),
    }
}

/// Creates a new private (0600) file for writing, failing if it exists.
pub fn create_private_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("create", path))
}

/// Fsyncs a directory so that renames and removals in it are durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// The temporary name beside `path` under which its content is written before the rename.
pub fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    path.with_file_name(format!("{TMP_PREFIX}{}-{name}", std::process::id()))
}

/// Writes `bytes` to `path` atomically and durably (temp name, fsync, rename, fsync directory).
/// `stage` is called with "synced" (temp file durable, not yet renamed) and "renamed" (renamed,
/// directory not yet fsynced), so tests can crash the writer at those instants.
pub fn write_atomic(path: &Path, bytes: &[u8], stage: impl Fn(&str)) -> Result<()> {
    let tmp = tmp_path(path);
    let _ = fs::remove_file(&tmp);
    let mut file = create_private_file(&tmp)?;
    let result = file
        .write_all(bytes)
        .map_err(io_err("write", &tmp))
        .and_then(|()| file.sync_all().map_err(io_err("fsync", &tmp)));
    drop(file);
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    stage("synced");
    fs::rename(&tmp, path).map_err(io_err("rename into place", path))?;
    stage("renamed");
    fsync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Removes leftover temporary files in `dir` (from a writer that died mid-way).
/// Only the job's single writer calls this, so no live temporary file is removed.
pub fn remove_leftover_tmp(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            fs::remove_file(entry.path()).map_err(io_err("remove", entry.path()))?;
            removed += 1;
        }
    }
    Ok(removed)
}
