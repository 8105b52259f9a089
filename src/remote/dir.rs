//! A directory as a tier: a replica on a local disk, NFS or Lustre (`--store DIR`).
//!
//! Each key (`job/packs/NAME.pack`) is a file under the root, its `/`-separated components
//! directories. The replica may be missing, unmounted, full or read-only at any moment: a
//! [`DirTier`] is made without touching the disk, and every operation that meets such a
//! state fails with [`TierError::Unavailable`], naming the path and what the system said
//! (`ENOSPC`, `EROFS`, `EACCES`, `ENOENT` of the root...), so the caller retries later.
//!
//! - **The root is never created.** A missing root is [`TierError::Unavailable`]: an
//!   unmounted replica must not be silently re-created in the mount point's parent. The
//!   directories below it are created on demand (mode 0700, the parent fsynced).
//! - **The root stays the directory first seen.** Its device and inode, and whether it is a
//!   mount point (another device than its parent's), are noted at the first operation. A root
//!   that was a mount point and is not one any more (unmounted under the job) is
//!   [`TierError::Unavailable`] and nothing is written into the bare mount point. A root that
//!   became another directory (remounted, replaced) fails once, also Unavailable, and is
//!   taken as the new one: the caller's listing of the tier is stale and must be read again
//!   (the upload threads do so after any failure). A remount between two operations that
//!   gives the same device number (a freed one is often given again) is not seen here; the
//!   upload threads read every tier afresh every ten minutes.
//! - **No link is followed below the root.** Every directory and file is opened relative to
//!   its verified parent with `O_NOFOLLOW`; a symbolic link (or another kind of file) planted
//!   at a key or on its way is refused ([`TierError::Damaged`]), never read or written
//!   through. The root path itself is resolved as the user gave it.
//! - **Every write is atomic and durable.** The content goes to a `.tmp-<random>` file in the
//!   target directory, which is fsynced, then given its name (`rename`, or `link` for a
//!   [`Tier::create`]), then the directory is fsynced. A reader sees the old object, the new
//!   one, or none; a failed write (a full replica) removes its temporary file and leaves no
//!   part visible. Leftover temporary files of a crashed writer are skipped by
//!   [`Tier::list`], which removes those older than an hour (as does
//!   [`DirTier::remove_leftovers`]).
//! - **Versions are content hashes** (BLAKE3, hex), computed while streaming.
//! - **Conditional writes.** [`Tier::create`] links the fully written and fsynced temporary
//!   file to the key: `link(2)` fails with `EEXIST` when the name exists, atomically on a
//!   local file system and on NFS (the server performs it; the classic NFS lock-file method).
//!   When an NFS reply is lost and the retransmitted link reports `EEXIST`, the temporary
//!   file's link count (2 when our link landed) tells the truth. [`Tier::replace`], and every
//!   other change of an existing name (`put`, `delete`), runs under an exclusive `flock(2)`
//!   on the directory's `.lock` file: replace reads the current content's hash under it and
//!   fails with [`TierError::Conflict`] when it differs or the object is gone. Linux NFS
//!   clients carry `flock` to the server as a whole-file POSIX lock (NLM or NFSv4), so it
//!   holds between hosts; Lustre needs the `flock` mount option (without it `flock` fails
//!   with `ENOSYS`, reported as Unavailable, never ignored), and `localflock` would only lock
//!   within one node.

use std::collections::hash_map::RandomState;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, Flock, FlockArg, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::UnlinkatFlags;

use super::{ObjectMeta, Tier, TierError, TierResult, Version};

/// Prefix of temporary files (unfinished writes).
const TMP_PREFIX: &str = ".tmp-";
/// The per-directory lock file of conditional replacement.
const LOCK_NAME: &str = ".lock";
/// Size of the copy buffer.
const CHUNK: usize = 64 * 1024;
/// Age after which [`Tier::list`] removes a temporary file as a crashed writer's leftover.
const LEFTOVER_AGE: Duration = Duration::from_secs(3600);

/// A tier kept in a directory (a replica). See the [module documentation](self).
#[derive(Debug)]
pub struct DirTier {
    root: PathBuf,
    name: String,
    /// The root as first seen.
    seen: std::sync::Mutex<Option<RootIdentity>>,
}

/// Which directory the root is: its device and inode, and whether it is a mount point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RootIdentity {
    dev: u64,
    ino: u64,
    mount_point: bool,
}

/// An open directory below (or at) the root, with its path for messages.
struct Opened {
    fd: OwnedFd,
    path: PathBuf,
}

fn is_kind(st: &FileStat, kind: SFlag) -> bool {
    st.st_mode & SFlag::S_IFMT.bits() == kind.bits()
}

fn kind_of(st: &FileStat) -> &'static str {
    match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFREG => "a regular file",
        SFlag::S_IFLNK => "a symbolic link",
        SFlag::S_IFSOCK => "a socket",
        SFlag::S_IFIFO => "a FIFO",
        _ => "a device",
    }
}

fn mtime_ms(st: &FileStat) -> u64 {
    let secs = u64::try_from(st.st_mtime).unwrap_or(0);
    let nanos = u64::try_from(st.st_mtime_nsec).unwrap_or(0);
    secs.saturating_mul(1000).saturating_add(nanos / 1_000_000)
}

/// A fresh temporary name (`.tmp-<random>`).
fn tmp_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(nanos);
    format!("{TMP_PREFIX}{:016x}", h.finish())
}

/// Splits a key into its directory components and file name, refusing what is not a key
/// (empty components, `.`, `..`, the tier's own temporary and lock names).
fn split_key(key: &str) -> Option<(Vec<&str>, &str)> {
    let parts: Vec<&str> = key.split('/').collect();
    let valid = |p: &&str| {
        !p.is_empty() && *p != "." && *p != ".." && !p.starts_with(TMP_PREFIX) && *p != LOCK_NAME
    };
    if !parts.iter().all(valid) {
        return None;
    }
    let (name, dirs) = parts.split_last()?;
    Some((dirs.to_vec(), name))
}

/// Hashes and copies `from` into `to` (at most `max` bytes when given): the byte count and
/// the BLAKE3 hash. Errors say which side failed.
enum CopyError {
    Read(io::Error),
    Write(io::Error),
    TooLong,
}

fn copy_hashing(
    from: &mut dyn Read,
    to: &mut dyn Write,
    max: u64,
) -> Result<(u64, blake3::Hash), CopyError> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total: u64 = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        total = total.saturating_add(n as u64);
        if total > max {
            return Err(CopyError::TooLong);
        }
        hasher.update(&buf[..n]);
        to.write_all(&buf[..n]).map_err(CopyError::Write)?;
    }
    Ok((total, hasher.finalize()))
}

/// An I/O error as text, with the errno's name when it has one (`ENOSPC: No space left...`).
fn io_why(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => Errno::from_raw(n).to_string(),
        None => e.to_string(),
    }
}

fn version_of(hash: blake3::Hash) -> Version {
    Version(hash.to_hex().to_string())
}

impl DirTier {
    /// A tier over the directory `path`. Never fails and touches nothing: the directory is
    /// looked at by each operation.
    pub fn new(path: PathBuf) -> DirTier {
        let name = path.display().to_string();
        DirTier {
            root: path,
            name,
            seen: std::sync::Mutex::new(None),
        }
    }

    /// Checks that the open root `fd` is the directory first seen (see the module
    /// documentation).
    fn check_root(&self, key: &str, fd: &OwnedFd) -> TierResult<()> {
        let st = nix::sys::stat::fstat(fd)
            .map_err(|e| self.unavailable(key, &self.root, "stat the tier's root", e))?;
        let parent = nix::sys::stat::fstatat(fd, "..", AtFlags::empty())
            .map_err(|e| self.unavailable(key, &self.root, "stat the parent of", e))?;
        let now = RootIdentity {
            dev: st.st_dev,
            ino: st.st_ino,
            mount_point: st.st_dev != parent.st_dev,
        };
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let Some(first) = *seen else {
            *seen = Some(now);
            return Ok(());
        };
        if first == now {
            return Ok(());
        }
        let why = if first.mount_point && !now.mount_point {
            "it was a mount point and is not one any more (unmounted?): nothing is written \
             into the bare mount point"
        } else {
            *seen = Some(now);
            "it is not the directory first seen (remounted or replaced): read it again"
        };
        Err(TierError::Unavailable {
            tier: self.name.clone(),
            key: key.to_owned(),
            why: format!("{}: {why}", self.root.display()),
        })
    }

    #[cfg(test)]
    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn unavailable(
        &self,
        key: &str,
        path: &Path,
        op: &str,
        e: impl std::fmt::Display,
    ) -> TierError {
        TierError::Unavailable {
            tier: self.name.clone(),
            key: key.to_owned(),
            why: format!("{op} {}: {e}", path.display()),
        }
    }

    fn damaged(&self, key: &str, why: String) -> TierError {
        TierError::Damaged {
            tier: self.name.clone(),
            key: key.to_owned(),
            why,
        }
    }

    fn not_found(&self, key: &str) -> TierError {
        TierError::NotFound {
            tier: self.name.clone(),
            key: key.to_owned(),
        }
    }

    fn bad_key(&self, key: &str) -> TierError {
        self.damaged(
            key,
            "not a valid key (empty, `.` or `..` components, or a reserved name)".into(),
        )
    }

    /// Why an `O_NOFOLLOW` open of `name` in `dir` failed: a link or another kind of file is
    /// refused as damage, a missing one is `missing`, anything else is Unavailable.
    fn open_error(
        &self,
        key: &str,
        dir: &Opened,
        name: &str,
        e: Errno,
        missing: impl FnOnce() -> TierError,
    ) -> TierError {
        let path = dir.path.join(name);
        if e == Errno::ENOENT {
            return missing();
        }
        if matches!(e, Errno::ELOOP | Errno::ENOTDIR | Errno::ENXIO)
            && let Ok(st) = nix::sys::stat::fstatat(&dir.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW)
        {
            return self.damaged(
                key,
                format!(
                    "{} is {}, which this tier never follows or uses",
                    path.display(),
                    kind_of(&st)
                ),
            );
        }
        self.unavailable(key, &path, "open", e)
    }

    /// Opens the root (never creating it: a missing root is an unmounted or lost replica).
    fn open_root(&self, key: &str) -> TierResult<Opened> {
        let fd = nix::fcntl::open(
            &self.root,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.unavailable(key, &self.root, "open the tier's root", e))?;
        self.check_root(key, &fd)?;
        Ok(Opened {
            fd,
            path: self.root.clone(),
        })
    }

    /// Opens the directory `dirs` below the root, creating missing ones when `create`.
    /// `Ok(None)`: one is missing and `create` is false.
    fn open_dirs(&self, key: &str, dirs: &[&str], create: bool) -> TierResult<Option<Opened>> {
        let mut dir = self.open_root(key)?;
        for name in dirs {
            let path = dir.path.join(name);
            let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
            let fd = match nix::fcntl::openat(&dir.fd, *name, flags, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) if create => {
                    match nix::sys::stat::mkdirat(&dir.fd, *name, Mode::from_bits_truncate(0o700)) {
                        Ok(()) => self.fsync_dir(key, &dir)?,
                        Err(Errno::EEXIST) => {}
                        Err(e) => return Err(self.unavailable(key, &path, "create directory", e)),
                    }
                    nix::fcntl::openat(&dir.fd, *name, flags, Mode::empty()).map_err(|e| {
                        self.open_error(key, &dir, name, e, || {
                            self.unavailable(key, &path, "open", Errno::ENOENT)
                        })
                    })?
                }
                Err(Errno::ENOENT) => return Ok(None),
                Err(e) => {
                    return Err(self.open_error(key, &dir, name, e, || self.not_found(key)));
                }
            };
            dir = Opened { fd, path };
        }
        Ok(Some(dir))
    }

    fn fsync_dir(&self, key: &str, dir: &Opened) -> TierResult<()> {
        nix::unistd::fsync(&dir.fd).map_err(|e| self.unavailable(key, &dir.path, "fsync", e))
    }

    /// Takes the directory's exclusive lock (released when the guard is dropped).
    fn lock(&self, key: &str, dir: &Opened) -> TierResult<Flock<File>> {
        let path = dir.path.join(LOCK_NAME);
        let fd = nix::fcntl::openat(
            &dir.fd,
            LOCK_NAME,
            OFlag::O_RDWR
                | OFlag::O_CREAT
                | OFlag::O_NOFOLLOW
                | OFlag::O_CLOEXEC
                | OFlag::O_NONBLOCK,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| self.open_error(key, dir, LOCK_NAME, e, || self.not_found(key)))?;
        let st = nix::sys::stat::fstat(&fd).map_err(|e| self.unavailable(key, &path, "stat", e))?;
        if !is_kind(&st, SFlag::S_IFREG) {
            return Err(self.damaged(key, format!("{} is {}", path.display(), kind_of(&st))));
        }
        Flock::lock(File::from(fd), FlockArg::LockExclusive)
            .map_err(|(_, e)| self.unavailable(key, &path, "lock (flock)", e))
    }

    /// Writes `data` to a new temporary file in `dir`, fsynced: its name, size and hash.
    /// On failure the temporary file is removed.
    fn write_tmp(
        &self,
        key: &str,
        dir: &Opened,
        data: &mut dyn Read,
        len: u64,
    ) -> TierResult<(String, blake3::Hash)> {
        let (name, file) = loop {
            let name = tmp_name();
            match nix::fcntl::openat(
                &dir.fd,
                name.as_str(),
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            ) {
                Ok(fd) => break (name, File::from(fd)),
                Err(Errno::EEXIST) => continue,
                Err(e) => {
                    return Err(self.unavailable(key, &dir.path.join(&name), "create", e));
                }
            }
        };
        let path = dir.path.join(&name);
        let written = (|| {
            let mut out = io::BufWriter::with_capacity(CHUNK, &file);
            let (n, hash) = match copy_hashing(data, &mut out, len) {
                Ok(r) => r,
                Err(CopyError::Write(e)) => {
                    return Err(self.unavailable(key, &path, "write", io_why(&e)));
                }
                Err(CopyError::Read(e)) => {
                    return Err(self.unavailable(key, &path, "read the data for", io_why(&e)));
                }
                Err(CopyError::TooLong) => {
                    return Err(self.damaged(key, format!("the data is longer than {len} bytes")));
                }
            };
            out.flush()
                .map_err(|e| self.unavailable(key, &path, "write", io_why(&e)))?;
            drop(out);
            if n != len {
                return Err(self.damaged(key, format!("the data has {n} bytes, not {len}")));
            }
            file.sync_all()
                .map_err(|e| self.unavailable(key, &path, "fsync", io_why(&e)))?;
            Ok(hash)
        })();
        match written {
            Ok(hash) => Ok((name, hash)),
            Err(e) => {
                let _ = nix::unistd::unlinkat(&dir.fd, name.as_str(), UnlinkatFlags::NoRemoveDir);
                Err(e)
            }
        }
    }

    /// Renames the temporary `tmp` to `name` in `dir` and fsyncs the directory (the temporary
    /// file is removed if the rename fails).
    fn publish(&self, key: &str, dir: &Opened, tmp: &str, name: &str) -> TierResult<()> {
        if let Err(e) = nix::fcntl::renameat(&dir.fd, tmp, &dir.fd, name) {
            let _ = nix::unistd::unlinkat(&dir.fd, tmp, UnlinkatFlags::NoRemoveDir);
            return Err(self.unavailable(key, &dir.path.join(name), "rename into", e));
        }
        self.fsync_dir(key, dir)
    }

    /// The content hash of the regular file `name` in `dir`; `None` when there is none.
    fn current_hash(&self, key: &str, dir: &Opened, name: &str) -> TierResult<Option<Version>> {
        let file = match self.open_regular(key, dir, name) {
            Ok(file) => file,
            Err(TierError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let path = dir.path.join(name);
        match copy_hashing(&mut &file, &mut io::sink(), u64::MAX) {
            Ok((_, hash)) => Ok(Some(version_of(hash))),
            Err(CopyError::Read(e) | CopyError::Write(e)) => {
                Err(self.unavailable(key, &path, "read", io_why(&e)))
            }
            Err(CopyError::TooLong) => Err(self.damaged(key, "impossibly long".into())),
        }
    }

    /// Opens the regular file `name` in `dir` for reading, never through a link.
    fn open_regular(&self, key: &str, dir: &Opened, name: &str) -> TierResult<File> {
        let path = dir.path.join(name);
        let fd = nix::fcntl::openat(
            &dir.fd,
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
            Mode::empty(),
        )
        .map_err(|e| self.open_error(key, dir, name, e, || self.not_found(key)))?;
        let st = nix::sys::stat::fstat(&fd).map_err(|e| self.unavailable(key, &path, "stat", e))?;
        if !is_kind(&st, SFlag::S_IFREG) {
            return Err(self.damaged(
                key,
                format!("{} is {}, not a regular file", path.display(), kind_of(&st)),
            ));
        }
        // Blocking reads from here on (O_NONBLOCK only kept a planted FIFO from hanging).
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()))
            .map_err(|e| self.unavailable(key, &path, "open", e))?;
        Ok(File::from(fd))
    }

    #[cfg(test)]
    /// Removes the temporary files (unfinished or crashed writes) not modified for
    /// `older_than`, everywhere below the root. Returns how many were removed.
    pub fn remove_leftovers(&self, older_than: Duration) -> TierResult<usize> {
        let root = self.open_root("")?;
        let mut removed = 0;
        self.walk(
            "",
            &root,
            "",
            "",
            Some(older_than),
            &mut Vec::new(),
            &mut removed,
        )?;
        Ok(removed)
    }

    /// Lists `dir` (whose key prefix is `at`, empty or ending in `/`): regular files whose
    /// name starts with `name_prefix`, recursively into sub-directories. Temporary files older
    /// than `leftover` are removed (best effort).
    #[allow(clippy::too_many_arguments)]
    fn walk(
        &self,
        prefix: &str,
        dir: &Opened,
        at: &str,
        name_prefix: &str,
        leftover: Option<Duration>,
        found: &mut Vec<ObjectMeta>,
        removed: &mut usize,
    ) -> TierResult<()> {
        let list_err = |e: Errno| self.unavailable(prefix, &dir.path, "list", e);
        let mut entries = nix::dir::Dir::openat(
            &dir.fd,
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(list_err)?;
        let mut names = Vec::new();
        for entry in entries.iter() {
            let entry = entry.map_err(list_err)?;
            let bytes = entry.file_name().to_bytes();
            if bytes == b"." || bytes == b".." {
                continue;
            }
            // Keys are UTF-8; a name that is not is nobody's object.
            if let Ok(name) = std::str::from_utf8(bytes) {
                names.push(name.to_owned());
            }
        }
        drop(entries);
        let now = SystemTime::now();
        for name in names {
            if name == LOCK_NAME {
                continue;
            }
            let st =
                match nix::sys::stat::fstatat(&dir.fd, name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                {
                    Ok(st) => st,
                    Err(Errno::ENOENT) => continue,
                    Err(e) => {
                        return Err(self.unavailable(prefix, &dir.path.join(&name), "stat", e));
                    }
                };
            if name.starts_with(TMP_PREFIX) {
                if let Some(age) = leftover
                    && is_kind(&st, SFlag::S_IFREG)
                {
                    let modified = UNIX_EPOCH + Duration::from_millis(mtime_ms(&st));
                    if now.duration_since(modified).is_ok_and(|d| d > age)
                        && nix::unistd::unlinkat(&dir.fd, name.as_str(), UnlinkatFlags::NoRemoveDir)
                            .is_ok()
                    {
                        *removed += 1;
                        let _ = nix::unistd::fsync(&dir.fd);
                    }
                }
                continue;
            }
            if !name.starts_with(name_prefix) {
                continue;
            }
            if is_kind(&st, SFlag::S_IFREG) {
                found.push(ObjectMeta {
                    key: format!("{at}{name}"),
                    size: u64::try_from(st.st_size).unwrap_or(0),
                    modified_unix_ms: mtime_ms(&st),
                });
            } else if is_kind(&st, SFlag::S_IFDIR) {
                let path = dir.path.join(&name);
                let fd = match nix::fcntl::openat(
                    &dir.fd,
                    name.as_str(),
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                ) {
                    Ok(fd) => fd,
                    Err(Errno::ENOENT) => continue,
                    Err(e) => return Err(self.unavailable(prefix, &path, "open", e)),
                };
                let sub = Opened { fd, path };
                self.walk(
                    prefix,
                    &sub,
                    &format!("{at}{name}/"),
                    "",
                    leftover,
                    found,
                    removed,
                )?;
            }
            // Links and other kinds of files are nobody's objects: never followed.
        }
        Ok(())
    }
}

impl Tier for DirTier {
    fn describe(&self) -> &str {
        &self.name
    }

    fn list(&self, prefix: &str) -> TierResult<Vec<ObjectMeta>> {
        // `a/b/c` lists `c*` in `a/b`; `a/b/` lists all of `a/b`.
        let (dir_part, name_prefix) = match prefix.rfind('/') {
            Some(i) => (&prefix[..i], &prefix[i + 1..]),
            None => ("", prefix),
        };
        let dirs: Vec<&str> = if dir_part.is_empty() {
            Vec::new()
        } else {
            dir_part.split('/').collect()
        };
        if dirs.iter().any(|d| d.is_empty() || *d == "." || *d == "..") {
            return Err(self.bad_key(prefix));
        }
        let dir = match self.open_dirs(prefix, &dirs, false) {
            Ok(Some(dir)) => dir,
            Ok(None) | Err(TierError::NotFound { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let at = if dir_part.is_empty() {
            String::new()
        } else {
            format!("{dir_part}/")
        };
        let mut found = Vec::new();
        let mut removed = 0;
        self.walk(
            prefix,
            &dir,
            &at,
            name_prefix,
            Some(LEFTOVER_AGE),
            &mut found,
            &mut removed,
        )?;
        Ok(found)
    }

    fn get(&self, key: &str, out: &mut dyn Write, max: u64) -> TierResult<Version> {
        let (dirs, name) = split_key(key).ok_or_else(|| self.bad_key(key))?;
        let dir = self
            .open_dirs(key, &dirs, false)?
            .ok_or_else(|| self.not_found(key))?;
        let file = self.open_regular(key, &dir, name)?;
        let path = dir.path.join(name);
        let st = nix::sys::stat::fstat(file.as_fd())
            .map_err(|e| self.unavailable(key, &path, "stat", e))?;
        let too_large = || TierError::TooLarge {
            tier: self.name.clone(),
            key: key.to_owned(),
            max,
        };
        if u64::try_from(st.st_size).unwrap_or(u64::MAX) > max {
            return Err(too_large());
        }
        match copy_hashing(&mut &file, out, max) {
            Ok((_, hash)) => Ok(version_of(hash)),
            Err(CopyError::Read(e)) => Err(self.unavailable(key, &path, "read", io_why(&e))),
            Err(CopyError::Write(e)) => {
                Err(self.unavailable(key, &path, "copy out of", io_why(&e)))
            }
            Err(CopyError::TooLong) => Err(too_large()),
        }
    }

    fn put(&self, key: &str, data: &mut dyn Read, len: u64) -> TierResult<Version> {
        let (dirs, name) = split_key(key).ok_or_else(|| self.bad_key(key))?;
        let dir = self
            .open_dirs(key, &dirs, true)?
            .ok_or_else(|| self.not_found(key))?;
        // A link or a directory at the key is refused, never written through or replaced.
        if let Ok(st) = nix::sys::stat::fstatat(&dir.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW)
            && !is_kind(&st, SFlag::S_IFREG)
        {
            return Err(self.damaged(
                key,
                format!(
                    "{} is {}, not replaced",
                    dir.path.join(name).display(),
                    kind_of(&st)
                ),
            ));
        }
        let (tmp, hash) = self.write_tmp(key, &dir, data, len)?;
        let _lock = match self.lock(key, &dir) {
            Ok(lock) => lock,
            Err(e) => {
                let _ = nix::unistd::unlinkat(&dir.fd, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
                return Err(e);
            }
        };
        self.publish(key, &dir, &tmp, name)?;
        Ok(version_of(hash))
    }

    fn create(&self, key: &str, bytes: &[u8]) -> TierResult<Version> {
        let (dirs, name) = split_key(key).ok_or_else(|| self.bad_key(key))?;
        let dir = self
            .open_dirs(key, &dirs, true)?
            .ok_or_else(|| self.not_found(key))?;
        let (tmp, hash) = self.write_tmp(key, &dir, &mut &bytes[..], bytes.len() as u64)?;
        let linked = nix::unistd::linkat(&dir.fd, tmp.as_str(), &dir.fd, name, AtFlags::empty());
        let outcome = match linked {
            Ok(()) => Ok(()),
            Err(Errno::EEXIST) => {
                // A lost NFS reply: the retransmitted link fails although the first landed.
                match nix::sys::stat::fstatat(&dir.fd, tmp.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                    Ok(st) if st.st_nlink == 2 => Ok(()),
                    _ => Err(TierError::Conflict {
                        tier: self.name.clone(),
                        key: key.to_owned(),
                    }),
                }
            }
            Err(e) => Err(self.unavailable(key, &dir.path.join(name), "link into", e)),
        };
        let _ = nix::unistd::unlinkat(&dir.fd, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        outcome?;
        self.fsync_dir(key, &dir)?;
        Ok(version_of(hash))
    }

    fn replace(&self, key: &str, bytes: &[u8], version: &Version) -> TierResult<Version> {
        let (dirs, name) = split_key(key).ok_or_else(|| self.bad_key(key))?;
        let conflict = || TierError::Conflict {
            tier: self.name.clone(),
            key: key.to_owned(),
        };
        let dir = self.open_dirs(key, &dirs, false)?.ok_or_else(conflict)?;
        let (tmp, hash) = self.write_tmp(key, &dir, &mut &bytes[..], bytes.len() as u64)?;
        let checked =
            self.lock(key, &dir)
                .and_then(|lock| match self.current_hash(key, &dir, name)? {
                    Some(current) if current == *version => Ok(lock),
                    _ => Err(conflict()),
                });
        let _lock = match checked {
            Ok(lock) => lock,
            Err(e) => {
                let _ = nix::unistd::unlinkat(&dir.fd, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
                return Err(e);
            }
        };
        self.publish(key, &dir, &tmp, name)?;
        Ok(version_of(hash))
    }

    fn delete(&self, key: &str) -> TierResult<()> {
        let (dirs, name) = split_key(key).ok_or_else(|| self.bad_key(key))?;
        let dir = match self.open_dirs(key, &dirs, false) {
            Ok(Some(dir)) => dir,
            Ok(None) | Err(TierError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        match nix::sys::stat::fstatat(&dir.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Err(Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(self.unavailable(key, &dir.path.join(name), "stat", e)),
            Ok(st) if is_kind(&st, SFlag::S_IFDIR) => {
                return Err(self.damaged(
                    key,
                    format!(
                        "{} is a directory, not removed",
                        dir.path.join(name).display()
                    ),
                ));
            }
            Ok(_) => {}
        }
        let _lock = self.lock(key, &dir)?;
        match nix::unistd::unlinkat(&dir.fd, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) => self.fsync_dir(key, &dir),
            Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(self.unavailable(key, &dir.path.join(name), "remove", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::sync::{Arc, Barrier};

    fn tier() -> (tempfile::TempDir, DirTier) {
        let tmp = tempfile::tempdir().unwrap();
        let tier = DirTier::new(tmp.path().join("replica"));
        std::fs::create_dir(tier.root()).unwrap();
        (tmp, tier)
    }

    fn hash(bytes: &[u8]) -> Version {
        Version(blake3::hash(bytes).to_hex().to_string())
    }

    /// Names in `dir` and below (relative), every kind of file.
    fn all_names(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type().unwrap().is_dir() {
                for sub in all_names(&entry.path()) {
                    out.push(format!("{name}/{sub}"));
                }
            }
            out.push(name);
        }
        out
    }

    /// A tmpfs mounted for a test (unmounted on drop); None when not root.
    struct Mount(PathBuf);

    impl Mount {
        fn tmpfs(path: &Path, size: &str) -> Option<Mount> {
            if !nix::unistd::geteuid().is_root() {
                return None;
            }
            std::fs::create_dir_all(path).unwrap();
            let ok = Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size},mode=0700"),
                    "tmpfs",
                ])
                .arg(path)
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                ok,
                "mounting a tmpfs at {} failed (as root)",
                path.display()
            );
            Some(Mount(path.to_owned()))
        }

        fn remount_ro(&self) {
            let ok = Command::new("mount")
                .args(["-o", "remount,ro"])
                .arg(&self.0)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "remounting {} read-only failed", self.0.display());
        }
    }

    impl Drop for Mount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }

    #[test]
    fn round_trips_list_and_delete() {
        let (_tmp, tier) = tier();
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let v = tier
            .put("job/packs/a.pack", &mut &big[..], big.len() as u64)
            .unwrap();
        assert_eq!(v, hash(&big));
        let mut out = Vec::new();
        assert_eq!(tier.get("job/packs/a.pack", &mut out, 1 << 20).unwrap(), v);
        assert_eq!(out, big);
        // Replacing by put.
        let v2 = tier.put_bytes("job/packs/a.pack", b"small").unwrap();
        assert_eq!(
            tier.get_bytes("job/packs/a.pack", 100).unwrap(),
            (b"small".to_vec(), v2)
        );
        tier.put_bytes("job/snapshots/0000000001-00000000000000000001.snap", b"m")
            .unwrap();
        tier.put_bytes("jobber/lease", b"x").unwrap();

        let mut keys: Vec<(String, u64)> = tier
            .list("job/")
            .unwrap()
            .into_iter()
            .map(|m| (m.key, m.size))
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            vec![
                ("job/packs/a.pack".to_owned(), 5),
                (
                    "job/snapshots/0000000001-00000000000000000001.snap".to_owned(),
                    1
                ),
            ]
        );
        assert_eq!(
            tier.list("job").unwrap().len(),
            3,
            "a prefix, not a directory"
        );
        assert_eq!(tier.list("job/snapshots/").unwrap().len(), 1);
        assert!(tier.list("nothing/here/").unwrap().is_empty());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        for m in tier.list("").unwrap() {
            assert!(
                m.modified_unix_ms <= now && m.modified_unix_ms + 60_000 > now,
                "{m:?}"
            );
        }

        // Too large is refused before anything is written out.
        let mut out = Vec::new();
        let err = tier.get("job/packs/a.pack", &mut out, 4).unwrap_err();
        assert!(matches!(err, TierError::TooLarge { max: 4, .. }), "{err}");
        assert!(out.is_empty());

        tier.delete("job/packs/a.pack").unwrap();
        tier.delete("job/packs/a.pack").unwrap();
        tier.delete("no/such/key").unwrap();
        let err = tier.get_bytes("job/packs/a.pack", 100).unwrap_err();
        assert!(matches!(err, TierError::NotFound { .. }), "{err}");
        let err = tier.get_bytes("nowhere/x", 100).unwrap_err();
        assert!(matches!(err, TierError::NotFound { .. }), "{err}");

        // No temporary file is left, only the lock files.
        for name in all_names(tier.root()) {
            assert!(!name.contains(TMP_PREFIX), "{name}");
        }
        // Bad keys are refused.
        for key in ["", "a//b", "../x", "a/./b", "a/.lock", "a/.tmp-1", "/abs"] {
            assert!(tier.put_bytes(key, b"x").is_err(), "{key}");
        }
    }

    #[test]
    fn put_with_a_wrong_length_publishes_nothing() {
        let (_tmp, tier) = tier();
        let err = tier.put("j/k", &mut &b"abc"[..], 5).unwrap_err();
        assert!(matches!(err, TierError::Damaged { .. }), "{err}");
        let err = tier.put("j/k", &mut &b"abcdef"[..], 5).unwrap_err();
        assert!(matches!(err, TierError::Damaged { .. }), "{err}");
        assert!(tier.list("").unwrap().is_empty());
        assert!(
            all_names(tier.root())
                .iter()
                .all(|n| !n.contains(TMP_PREFIX))
        );
    }

    #[test]
    fn create_and_replace_are_conditional() {
        let (_tmp, tier) = tier();
        let v1 = tier.create("j/lease", b"one").unwrap();
        assert_eq!(v1, hash(b"one"));
        let err = tier.create("j/lease", b"two").unwrap_err();
        assert!(matches!(err, TierError::Conflict { .. }), "{err}");
        assert_eq!(tier.get_bytes("j/lease", 10).unwrap().0, b"one");

        let v2 = tier.replace("j/lease", b"two", &v1).unwrap();
        assert_eq!(
            tier.get_bytes("j/lease", 10).unwrap(),
            (b"two".to_vec(), v2.clone())
        );
        // Stale version.
        let err = tier.replace("j/lease", b"three", &v1).unwrap_err();
        assert!(matches!(err, TierError::Conflict { .. }), "{err}");
        assert_eq!(tier.get_bytes("j/lease", 10).unwrap().0, b"two");
        // Gone.
        tier.delete("j/lease").unwrap();
        let err = tier.replace("j/lease", b"three", &v2).unwrap_err();
        assert!(matches!(err, TierError::Conflict { .. }), "{err}");
        let err = tier.replace("other/lease", b"three", &v2).unwrap_err();
        assert!(matches!(err, TierError::Conflict { .. }), "{err}");
        assert!(tier.list("j/").unwrap().is_empty());
        assert!(
            all_names(tier.root())
                .iter()
                .all(|n| !n.contains(TMP_PREFIX))
        );
    }

    #[test]
    fn concurrent_creates_have_exactly_one_winner() {
        let (_tmp, tier) = tier();
        let tier = Arc::new(tier);
        let barrier = Arc::new(Barrier::new(8));
        let handles: Vec<_> = (0..8u8)
            .map(|i| {
                let tier = Arc::clone(&tier);
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    barrier.wait();
                    tier.create("race/lease", &[i; 100]).map(|_| i)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let winners: Vec<u8> = results
            .iter()
            .filter_map(|r| r.as_ref().ok().copied())
            .collect();
        assert_eq!(winners.len(), 1, "{results:?}");
        for r in &results {
            if let Err(e) = r {
                assert!(matches!(e, TierError::Conflict { .. }), "{e}");
            }
        }
        assert_eq!(
            tier.get_bytes("race/lease", 1000).unwrap().0,
            vec![winners[0]; 100]
        );
    }

    #[test]
    fn planted_links_are_never_followed() {
        let (tmp, tier) = tier();
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, b"secret").unwrap();
        std::fs::create_dir_all(tier.root().join("j")).unwrap();
        std::os::unix::fs::symlink(&outside, tier.root().join("j/lease")).unwrap();

        let err = tier.get_bytes("j/lease", 100).unwrap_err();
        assert!(
            matches!(&err, TierError::Damaged { why, .. } if why.contains("symbolic link")),
            "{err}"
        );
        assert!(tier.put_bytes("j/lease", b"overwrite").is_err());
        let err = tier
            .replace("j/lease", b"overwrite", &hash(b"secret"))
            .unwrap_err();
        assert!(matches!(err, TierError::Damaged { .. }), "{err}");
        assert!(tier.create("j/lease", b"overwrite").is_err());
        assert_eq!(std::fs::read(&outside).unwrap(), b"secret");
        assert!(
            tier.list("j/").unwrap().is_empty(),
            "a link is nobody's object"
        );

        // A link on the way to a key, to a directory outside.
        let out_dir = tmp.path().join("outdir");
        std::fs::create_dir(&out_dir).unwrap();
        std::fs::write(out_dir.join("x.pack"), b"outside").unwrap();
        std::os::unix::fs::symlink(&out_dir, tier.root().join("j/packs")).unwrap();
        let err = tier.get_bytes("j/packs/x.pack", 100).unwrap_err();
        assert!(matches!(err, TierError::Damaged { .. }), "{err}");
        let err = tier.put_bytes("j/packs/y.pack", b"in").unwrap_err();
        assert!(matches!(err, TierError::Damaged { .. }), "{err}");
        assert!(!out_dir.join("y.pack").exists());
        assert!(tier.list("j/").unwrap().is_empty());
    }

    #[test]
    fn a_missing_root_is_unavailable_and_not_created() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("unmounted");
        let tier = DirTier::new(root.clone());
        let check = |err: TierError| {
            assert!(err.is_transient(), "{err}");
            let text = err.to_string();
            assert!(
                text.contains("unmounted") && text.contains("ENOENT"),
                "{text}"
            );
        };
        check(tier.put_bytes("j/packs/a.pack", b"x").unwrap_err());
        check(tier.create("j/lease", b"x").unwrap_err());
        check(tier.get_bytes("j/lease", 10).unwrap_err());
        check(tier.list("j/").unwrap_err());
        check(tier.replace("j/lease", b"x", &hash(b"y")).unwrap_err());
        check(tier.delete("j/lease").unwrap_err());
        assert!(!root.exists());
    }

    #[test]
    fn a_full_replica_is_unavailable_and_shows_no_part() {
        let tmp = tempfile::tempdir().unwrap();
        let Some(mount) = Mount::tmpfs(&tmp.path().join("full"), "1m") else {
            return;
        };
        let tier = DirTier::new(mount.0.clone());
        tier.put_bytes("j/packs/small.pack", b"fits").unwrap();
        let big = vec![7u8; 2 << 20];
        let err = tier
            .put("j/packs/big.pack", &mut &big[..], big.len() as u64)
            .unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(err.to_string().contains("ENOSPC"), "{err}");
        let err = tier.create("j/lease", &big).unwrap_err();
        assert!(err.to_string().contains("ENOSPC"), "{err}");
        let keys: Vec<String> = tier.list("").unwrap().into_iter().map(|m| m.key).collect();
        assert_eq!(keys, vec!["j/packs/small.pack".to_owned()]);
        assert!(all_names(&mount.0).iter().all(|n| !n.contains(TMP_PREFIX)));
        // The space was given back: a small write works again. A process another test forks
        // at that moment holds a copy of the removed temp file's descriptor until it execs, so
        // the space may come back a moment later.
        let mut again = tier.put_bytes("j/packs/again.pack", b"ok");
        for _ in 0..50 {
            if again.is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            again = tier.put_bytes("j/packs/again.pack", b"ok");
        }
        again.unwrap();
    }

    #[test]
    fn an_unmounted_replica_gets_nothing_and_a_remounted_one_is_read_again() {
        let tmp = tempfile::tempdir().unwrap();
        let at = tmp.path().join("mnt");
        let Some(mount) = Mount::tmpfs(&at, "1m") else {
            return;
        };
        let tier = DirTier::new(at.clone());
        tier.put_bytes("j/packs/a.pack", b"first").unwrap();
        // Unmounted under the job: the bare mount point gets nothing.
        assert!(Command::new("umount").arg(&at).status().unwrap().success());
        for _ in 0..2 {
            let err = tier.put_bytes("j/packs/b.pack", b"second").unwrap_err();
            assert!(err.is_transient(), "{err}");
            assert!(err.to_string().contains("mount point"), "{err}");
        }
        assert!(tier.list("j/packs/").is_err());
        assert!(all_names(&at).is_empty(), "{:?}", all_names(&at));
        // Mounted again (a new, empty file system): it is the tier, as it now is (after one
        // failure saying to read it again when the new mount has another device number;
        // a freed tmpfs number is often given again).
        drop(mount);
        let _mount = Mount::tmpfs(&at, "1m").unwrap();
        if let Err(err) = tier.list("j/packs/") {
            assert!(err.to_string().contains("read it again"), "{err}");
        }
        assert!(tier.list("j/packs/").unwrap().is_empty());
        tier.put_bytes("j/packs/b.pack", b"second").unwrap();
    }

    #[test]
    fn a_read_only_replica_is_unavailable() {
        let tmp = tempfile::tempdir().unwrap();
        let Some(mount) = Mount::tmpfs(&tmp.path().join("ro"), "1m") else {
            return;
        };
        let tier = DirTier::new(mount.0.clone());
        let v = tier.put_bytes("j/lease", b"before").unwrap();
        mount.remount_ro();
        for err in [
            tier.put_bytes("j/lease", b"after").unwrap_err(),
            tier.put_bytes("k/new", b"after").unwrap_err(),
            tier.create("j/other", b"after").unwrap_err(),
            tier.replace("j/lease", b"after", &v).unwrap_err(),
            tier.delete("j/lease").unwrap_err(),
        ] {
            assert!(err.is_transient(), "{err}");
            assert!(err.to_string().contains("EROFS"), "{err}");
        }
        // Reading still works.
        assert_eq!(
            tier.get_bytes("j/lease", 100).unwrap(),
            (b"before".to_vec(), v)
        );
        assert_eq!(tier.list("j/").unwrap().len(), 1);
    }

    #[test]
    fn leftovers_are_skipped_and_old_ones_removed() {
        let (_tmp, tier) = tier();
        tier.put_bytes("j/packs/a.pack", b"a").unwrap();
        let dir = tier.root().join("j/packs");
        std::fs::write(dir.join(".tmp-fresh"), b"unfinished").unwrap();
        let old = dir.join(".tmp-old");
        std::fs::write(&old, b"crashed").unwrap();
        let file = std::fs::File::options().write(true).open(&old).unwrap();
        file.set_modified(SystemTime::now() - Duration::from_secs(7200))
            .unwrap();
        drop(file);
        let keys: Vec<String> = tier
            .list("j/")
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(keys, vec!["j/packs/a.pack".to_owned()]);
        assert!(!old.exists());
        assert!(dir.join(".tmp-fresh").exists());
        assert_eq!(tier.remove_leftovers(Duration::ZERO).unwrap(), 1);
        assert!(!dir.join(".tmp-fresh").exists());
    }
}
