//! The store's one door to the file system: every change a store makes visible goes through
//! here, as one of a few named operations on a [`Dir`]:
//!
//! - **publish** files written in full under temporary names (a snapshot's packs,
//!   `Dir::publish_packs`: fsync each, rename each, fsync the directory once) or one file
//!   from bytes (a manifest, `Dir::publish_manifest`; [`Dir::write_atomic`]: temp name,
//!   fsync, rename, fsync the directory);
//! - **set aside** a file under another name (`Dir::set_aside`: rename, fsync the
//!   directory), which is how a damaged snapshot is quarantined;
//! - **remove** files durably (`Dir::remove_durably`: unlink each, fsync the directory
//!   once), for retention and the cleanup of unreferenced packs, and leftover temporary files
//!   (`Dir::remove_leftover_tmp`).
//!
//! Below them, the single steps (create, write, truncate and fsync a file; rename, remove,
//! create a name; fsync a directory) are counted one by one. Three things follow:
//!
//! - **No escape.** Every operation is relative to a [`Dir`], a directory descriptor opened
//!   without following a symbolic link (`O_NOFOLLOW`, `openat` from a verified parent) and
//!   checked: it must belong to the user running this process and be writable by nobody else.
//!   A link planted inside the store is refused, never followed, so no write, rename or removal
//!   can land outside the store. Only the store root given by the user is opened through its
//!   path (a link there is the user's choice, unless someone else owns the link).
//! - **Named fail points.** The steps of a commit ([`Failpoint`]) are hooked here, where
//!   `SUPERVISE_FAILPOINT` can kill the process (see [`crate::failpoint`]).
//! - **Crash testing at every step.** The [`crash`] module counts the operations and, when a
//!   test arms it, fails the N-th one or "crashes" there (that one and every later one fails,
//!   as if the process died), journalling what was not yet durable so the test can undo it
//!   (unsynced data lost, names in unsynced directories reverted) before it reopens the store.
//!   Unarmed, an operation costs one relaxed atomic load more.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

use crate::error::{Error, Result, UnsafeKind, io_err};
use crate::failpoint::{self, Failpoint};

/// Prefix of temporary files; anything with it is unfinished and may be removed by the writer.
pub const TMP_PREFIX: &str = ".tmp-";

/// How a directory is checked when it is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// For writing: it must belong to this process's user and be writable by nobody else.
    Owner,
    /// For looking only (`--allow-foreign-store`): any owner and mode; links are still refused
    /// below the root, and every operation that would change something fails.
    ReadOnly,
}

/// An open directory of the store: the descriptor every operation in it is relative to.
#[derive(Clone, Debug)]
pub struct Dir {
    fd: Arc<OwnedFd>,
    path: PathBuf,
    id: (u64, u64),
    access: Access,
}

fn errno_io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// What kind of file `st` describes, in words ("symbolic link", "regular file", ...).
pub fn kind_of(st: &FileStat) -> &'static str {
    match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFDIR => "directory",
        SFlag::S_IFREG => "regular file",
        SFlag::S_IFLNK => "symbolic link",
        SFlag::S_IFSOCK => "socket",
        SFlag::S_IFIFO => "FIFO",
        _ => "device",
    }
}

fn is(st: &FileStat, kind: SFlag) -> bool {
    st.st_mode & SFlag::S_IFMT.bits() == kind.bits()
}

fn unsafe_path(path: &Path, kind: UnsafeKind) -> Error {
    Error::Unsafe {
        path: path.to_owned(),
        kind,
    }
}

/// Checks that a directory or file belongs to this process's user and that nobody else may
/// write it (what the store creates: 0700 directories, 0600 files).
pub fn check_owned(st: &FileStat, path: &Path) -> Result<()> {
    let me = nix::unistd::geteuid().as_raw();
    if st.st_uid != me {
        return Err(unsafe_path(
            path,
            UnsafeKind::ForeignOwner {
                uid: st.st_uid,
                mode: st.st_mode & 0o7777,
            },
        ));
    }
    if st.st_mode & 0o022 != 0 {
        return Err(unsafe_path(
            path,
            UnsafeKind::OpenToOthers {
                mode: st.st_mode & 0o7777,
            },
        ));
    }
    Ok(())
}

/// Why an `O_NOFOLLOW` open of `name` in `dir` failed with `e`: a link or another kind of file
/// is refused by name; anything else is an I/O error.
fn refused(dir: &OwnedFd, name: &str, path: &Path, op: &'static str, e: Errno) -> Error {
    if matches!(e, Errno::ELOOP | Errno::ENOTDIR | Errno::ENXIO)
        && let Ok(st) = nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
    {
        return unsafe_path(
            path,
            UnsafeKind::NotExpectedKind {
                found: kind_of(&st),
            },
        );
    }
    io_err(op, path)(errno_io(e))
}

impl Dir {
    /// Opens the store root at `path` (creating it and missing parents with mode 0700 when
    /// `create`), then checks it per `access`. The root is the only path the store resolves as
    /// given; a symbolic link there is followed only when this user owns the link.
    pub fn open_root(path: &Path, create: bool, access: Access) -> Result<Self> {
        if create {
            create_dirs(path)?;
        }
        if access == Access::Owner
            && let Ok(st) = nix::sys::stat::lstat(path)
            && is(&st, SFlag::S_IFLNK)
        {
            // Like fs.protected_symlinks: a link someone else planted is not followed.
            check_owned(&st, path)
                .map_err(|_| unsafe_path(path, UnsafeKind::ForeignLink { uid: st.st_uid }))?;
        }
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::ENOTDIR => not_a_directory(path),
            e => io_err("open directory", path)(errno_io(e)),
        })?;
        Self::checked(fd, path.to_owned(), access)
    }

    /// Opens a directory of the store's (a job's directory, for the lock and the event log)
    /// without following a link at its last component, and checks it belongs to this user.
    pub fn open_owned(path: &Path) -> Result<Self> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::ELOOP | Errno::ENOTDIR => {
                let found =
                    nix::sys::stat::lstat(path).map_or("not a directory", |st| kind_of(&st));
                unsafe_path(path, UnsafeKind::NotExpectedKind { found })
            }
            e => io_err("open directory", path)(errno_io(e)),
        })?;
        Self::checked(fd, path.to_owned(), Access::Owner)
    }

    fn checked(fd: OwnedFd, path: PathBuf, access: Access) -> Result<Self> {
        let st = nix::sys::stat::fstat(&fd).map_err(|e| io_err("stat", &path)(errno_io(e)))?;
        if access == Access::Owner {
            check_owned(&st, &path)?;
        }
        Ok(Self {
            fd: Arc::new(fd),
            id: (st.st_dev, st.st_ino),
            path,
            access,
        })
    }

    /// Opens the sub-directory `name` (creating it with mode 0700 when `create`, and making
    /// the new name durable) without following a link, and checks it like this one.
    pub fn sub(&self, name: &str, create: bool) -> Result<Self> {
        let path = self.join(name);
        if create && self.access == Access::Owner {
            let armed = gate("create directory").map_err(io_err("create directory", &path))?;
            match nix::sys::stat::mkdirat(&*self.fd, name, Mode::from_bits_truncate(0o700)) {
                Ok(()) => {
                    if armed {
                        crash::record(crash::Undo::Mkdir {
                            dir: self.undo_dir(),
                            name: name.to_owned(),
                        });
                    }
                    self.fsync()?;
                }
                Err(Errno::EEXIST) => {}
                Err(e) => return Err(io_err("create directory", &path)(errno_io(e))),
            }
        }
        let fd = nix::fcntl::openat(
            &*self.fd,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| refused(&self.fd, name, &path, "open directory", e))?;
        Self::checked(fd, path, self.access)
    }

    /// The directory's path (for messages; no operation resolves it).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of `name` in this directory (for messages).
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Whether this directory was opened for looking only.
    pub fn read_only(&self) -> bool {
        self.access == Access::ReadOnly
    }

    fn undo_dir(&self) -> crash::UndoDir {
        crash::UndoDir {
            fd: Arc::clone(&self.fd),
            id: self.id,
        }
    }

    /// Fails when the directory was opened read-only; `op` and `name` name what was refused.
    fn writable(&self, op: &'static str, name: &str) -> Result<()> {
        if self.access == Access::ReadOnly {
            return Err(io_err(op, self.join(name))(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the store was opened read-only",
            )));
        }
        Ok(())
    }

    /// Metadata of `name` without following a link; `None` when there is no such name.
    pub fn stat(&self, name: &str) -> Result<Option<FileStat>> {
        match nix::sys::stat::fstatat(&*self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(io_err("stat", self.join(name))(errno_io(e))),
        }
    }

    /// Whether `name` is a directory (not a link to one).
    pub fn has_dir(&self, name: &str) -> Result<bool> {
        Ok(self.stat(name)?.is_some_and(|st| is(&st, SFlag::S_IFDIR)))
    }

    /// The names in the directory (not `.` and `..`), in no particular order.
    pub fn list(&self) -> Result<Vec<String>> {
        let list_err = |e: Errno| io_err("list", &self.path)(errno_io(e));
        let mut dir = nix::dir::Dir::openat(
            &*self.fd,
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(list_err)?;
        let mut names = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(list_err)?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(OsStr::from_bytes(name).to_string_lossy().into_owned());
            }
        }
        Ok(names)
    }

    /// Opens the regular file `name` for reading, never through a link. A missing file is an
    /// [`Error::Io`] whose source is `NotFound`.
    pub fn open_read(&self, name: &str) -> Result<File> {
        let path = self.join(name);
        let fd = nix::fcntl::openat(
            &*self.fd,
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
            Mode::empty(),
        )
        .map_err(|e| refused(&self.fd, name, &path, "open", e))?;
        let st = nix::sys::stat::fstat(&fd).map_err(|e| io_err("stat", &path)(errno_io(e)))?;
        if !is(&st, SFlag::S_IFREG) {
            return Err(unsafe_path(
                &path,
                UnsafeKind::NotExpectedKind {
                    found: kind_of(&st),
                },
            ));
        }
        Ok(File::from(fd))
    }

    /// Opens (creating with mode 0600 if missing) the file `name` for reading and writing or
    /// appending, never through a link, and checks that it is a regular file of this user's
    /// with one name (the job's lock and event log).
    pub fn open_private(&self, name: &str, append: bool) -> Result<File> {
        self.writable("open", name)?;
        let path = self.join(name);
        let mut flags = OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
        flags |= if append {
            OFlag::O_RDWR | OFlag::O_APPEND
        } else {
            OFlag::O_RDWR
        };
        let fd = nix::fcntl::openat(&*self.fd, name, flags, Mode::from_bits_truncate(0o600))
            .map_err(|e| refused(&self.fd, name, &path, "open", e))?;
        let st = nix::sys::stat::fstat(&fd).map_err(|e| io_err("stat", &path)(errno_io(e)))?;
        if !is(&st, SFlag::S_IFREG) {
            return Err(unsafe_path(
                &path,
                UnsafeKind::NotExpectedKind {
                    found: kind_of(&st),
                },
            ));
        }
        check_owned(&st, &path)?;
        if st.st_nlink != 1 {
            return Err(unsafe_path(
                &path,
                UnsafeKind::HardLinked {
                    links: st.st_nlink as u64,
                },
            ));
        }
        // Blocking from here on (O_NONBLOCK only kept a planted FIFO from hanging the open).
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags & OFlag::O_APPEND))
            .map_err(|e| io_err("open", &path)(errno_io(e)))?;
        Ok(File::from(fd))
    }

    /// Creates the new file `name` (mode 0600, failing if the name exists) for writing;
    /// `direct` asks for `O_DIRECT` (an `EINVAL` source when the file system refuses it).
    pub fn create(&self, name: &str, direct: bool) -> Result<File> {
        self.writable("create", name)?;
        let path = self.join(name);
        let armed = gate("create").map_err(io_err("create", &path))?;
        let mut flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        if direct {
            flags |= OFlag::O_DIRECT;
        }
        let fd = nix::fcntl::openat(&*self.fd, name, flags, Mode::from_bits_truncate(0o600))
            .map_err(|e| io_err("create", &path)(errno_io(e)))?;
        let file = File::from(fd);
        if armed {
            crash::record(crash::Undo::Created {
                dir: self.undo_dir(),
                name: name.to_owned(),
            });
            crash::track_data(&file, true);
        }
        Ok(file)
    }

    /// Renames `from` to `to` in this directory (replacing `to`).
    pub fn rename(&self, from: &str, to: &str) -> Result<()> {
        self.writable("rename into place", to)?;
        let path = self.join(to);
        let armed = gate("rename").map_err(io_err("rename into place", &path))?;
        let stashed = if armed {
            crash::stash(&self.fd, to)
        } else {
            None
        };
        match nix::fcntl::renameat(&*self.fd, from, &*self.fd, to) {
            Ok(()) => {
                if armed {
                    crash::record(crash::Undo::Renamed {
                        dir: self.undo_dir(),
                        from: from.to_owned(),
                        to: to.to_owned(),
                        replaced: stashed,
                    });
                }
                Ok(())
            }
            Err(e) => Err(io_err("rename into place", &path)(errno_io(e))),
        }
    }

    /// Removes the file `name`; `false` when there was none.
    pub fn remove(&self, name: &str) -> Result<bool> {
        self.writable("remove", name)?;
        let path = self.join(name);
        let armed = gate("remove").map_err(io_err("remove", &path))?;
        let stashed = if armed {
            crash::stash(&self.fd, name)
        } else {
            None
        };
        match nix::unistd::unlinkat(&*self.fd, name, nix::unistd::UnlinkatFlags::NoRemoveDir) {
            Ok(()) => {
                if let Some(stash) = stashed {
                    crash::record(crash::Undo::Removed {
                        dir: self.undo_dir(),
                        name: name.to_owned(),
                        stash,
                    });
                }
                Ok(true)
            }
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(io_err("remove", &path)(errno_io(e))),
        }
    }

    /// Fsyncs the directory, making the names created, renamed and removed in it durable.
    pub fn fsync(&self) -> Result<()> {
        if self.access == Access::ReadOnly {
            return Ok(());
        }
        let armed = gate("fsync directory").map_err(io_err("fsync directory", &self.path))?;
        nix::unistd::fsync(&*self.fd)
            .map_err(|e| io_err("fsync directory", &self.path)(errno_io(e)))?;
        if armed {
            crash::dir_synced(self.id);
        }
        Ok(())
    }

    /// Writes `bytes` to `name` atomically and durably (temp name, fsync, rename, fsync the
    /// directory): after a crash `name` holds either its old content or `bytes`.
    pub fn write_atomic(&self, name: &str, bytes: &[u8]) -> Result<()> {
        self.replace_with(name, bytes, None)
    }

    /// Publishes a snapshot's manifest as `name`: [`write_atomic`](Self::write_atomic) with
    /// the fail points [`Failpoint::ManifestSynced`] (temp file durable, not yet renamed) and
    /// [`Failpoint::ManifestRenamed`] (renamed, directory not yet fsynced).
    pub(crate) fn publish_manifest(&self, name: &str, bytes: &[u8]) -> Result<()> {
        self.replace_with(
            name,
            bytes,
            Some((Failpoint::ManifestSynced, Failpoint::ManifestRenamed)),
        )
    }

    fn replace_with(
        &self,
        name: &str,
        bytes: &[u8],
        points: Option<(Failpoint, Failpoint)>,
    ) -> Result<()> {
        let tmp = format!("{TMP_PREFIX}{}-{name}", std::process::id());
        let tmp_path = self.join(&tmp);
        self.remove(&tmp)?;
        let file = self.create(&tmp, false)?;
        let result = write_all_at(&file, bytes, 0)
            .map_err(io_err("write", &tmp_path))
            .and_then(|()| fsync_file(&file).map_err(io_err("fsync", &tmp_path)));
        drop(file);
        if let Err(e) = result {
            let _ = self.remove(&tmp);
            return Err(e);
        }
        if let Some((synced, _)) = points
            && let Err(e) = failpoint::hit(synced)
        {
            let _ = self.remove(&tmp);
            return Err(io_err("publish", &tmp_path)(e));
        }
        self.rename(&tmp, name)?;
        if let Some((_, renamed)) = points {
            failpoint::hit(renamed).map_err(io_err("publish", self.join(name)))?;
        }
        self.fsync()
    }

    /// Publishes files written in full under temporary names (a snapshot's packs): fsyncs
    /// each, renames each into place, then fsyncs the directory once. Fail points:
    /// [`Failpoint::PacksSynced`] after the fsyncs, [`Failpoint::PacksRenamed`] after the
    /// directory's fsync (both reached even when there is no file).
    pub(crate) fn publish_packs(&self, staged: &[Staged<'_>]) -> Result<()> {
        for file in staged {
            fsync_file(file.file).map_err(io_err("fsync", self.join(file.tmp)))?;
        }
        failpoint::hit(Failpoint::PacksSynced).map_err(io_err("publish packs", self.path()))?;
        for file in staged {
            self.rename(file.tmp, &file.name)?;
        }
        if !staged.is_empty() {
            self.fsync()?;
        }
        failpoint::hit(Failpoint::PacksRenamed).map_err(io_err("publish packs", self.path()))?;
        Ok(())
    }

    /// Sets the file `from` aside as `to` (replacing `to`) and makes the new name durable:
    /// after a crash the file has one of the two names.
    pub(crate) fn set_aside(&self, from: &str, to: &str) -> Result<()> {
        self.rename(from, to)?;
        self.fsync()
    }

    /// Removes the files `names` (a missing one is skipped), then fsyncs the directory once
    /// when any name was given, so that none of them comes back after a crash. Returns
    /// which of the names were removed (`false`: there was no such file).
    pub(crate) fn remove_durably<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<bool>> {
        let mut removed = Vec::new();
        for name in names {
            removed.push(self.remove(name)?);
        }
        if !removed.is_empty() {
            self.fsync()?;
        }
        Ok(removed)
    }

    /// Removes leftover temporary files (from a writer that died mid-way) and makes the
    /// removals durable. Only the job's single writer calls this, so no live temporary file
    /// is removed. Returns how many were removed.
    pub(crate) fn remove_leftover_tmp(&self) -> Result<usize> {
        let names = self.list()?;
        let leftovers = names
            .iter()
            .map(String::as_str)
            .filter(|name| name.starts_with(TMP_PREFIX));
        let removed = self.remove_durably(leftovers)?;
        Ok(removed.into_iter().filter(|r| *r).count())
    }
}

/// A file written in full under a temporary name, to be published as `name` (see
/// [`Dir::publish_packs`]).
pub(crate) struct Staged<'a> {
    /// The open file.
    pub(crate) file: &'a File,
    /// Its temporary name in the directory.
    pub(crate) tmp: &'a str,
    /// The name it is published under.
    pub(crate) name: String,
}

impl AsFd for Dir {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Creates `dir` and its missing parents with mode 0700, fsyncing the parent of each one it
/// creates. (The store root's path: the one place the store resolves a path as given.)
fn create_dirs(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if dir.parent().is_some_and(|p| !p.as_os_str().is_empty()) {
        create_dirs(parent)?;
    }
    gate("create directory").map_err(io_err("create directory", dir))?;
    match nix::unistd::mkdir(dir, Mode::from_bits_truncate(0o700)) {
        Ok(()) => {
            gate("fsync directory").map_err(io_err("fsync directory", parent))?;
            File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(io_err("fsync directory", parent))
        }
        Err(Errno::EEXIST) if dir.is_dir() => Ok(()),
        Err(Errno::EEXIST | Errno::ENOTDIR) => Err(not_a_directory(dir)),
        Err(e) => Err(io_err("create directory", dir)(errno_io(e))),
    }
}

/// The error for a store root path that is not a directory: [`Error::NotADirectory`] naming
/// the first component of `path` (the path itself or a directory on the way to it) that
/// exists and is not a directory (links followed, as for the root).
fn not_a_directory(path: &Path) -> Error {
    let mut ancestors: Vec<&Path> = path
        .ancestors()
        .filter(|p| !p.as_os_str().is_empty())
        .collect();
    ancestors.reverse();
    for p in ancestors {
        match nix::sys::stat::stat(p) {
            Ok(st) if !is(&st, SFlag::S_IFDIR) => {
                return Error::NotADirectory {
                    path: p.to_owned(),
                    found: kind_of(&st),
                };
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    // A link to nothing, or something that changed meanwhile.
    let found = nix::sys::stat::lstat(path).map_or("file that is not a directory", |st| {
        if is(&st, SFlag::S_IFLNK) {
            "symbolic link to nothing"
        } else {
            kind_of(&st)
        }
    });
    Error::NotADirectory {
        path: path.to_owned(),
        found,
    }
}

/// Writes all of `data` at `offset` (a durability step: unsynced until [`fsync_file`]).
pub fn write_all_at(file: &File, data: &[u8], offset: u64) -> io::Result<()> {
    if gate("write")? {
        crash::track_data(file, false);
    }
    file.write_all_at(data, offset)
}

/// Sets a file's length.
pub fn set_len(file: &File, len: u64) -> io::Result<()> {
    if gate("truncate")? {
        crash::track_data(file, false);
    }
    file.set_len(len)
}

/// Fsyncs a file's data and metadata.
pub fn fsync_file(file: &File) -> io::Result<()> {
    let armed = gate("fsync")?;
    file.sync_all()?;
    if armed {
        crash::data_synced(file);
    }
    Ok(())
}

/// Counts an operation; in test mode, fails it when armed to. Returns whether test mode is on
/// (then the caller journals the operation's effect). Unarmed: one relaxed load.
#[inline]
fn gate(op: &'static str) -> io::Result<bool> {
    if !crash::ARMED.load(std::sync::atomic::Ordering::Relaxed) {
        return Ok(false);
    }
    crash::step(op).map(|()| true)
}

pub mod crash {
    //! Test mode of the file-system layer: fail or "crash" at the N-th operation, and undo
    //! what a power cut would have lost. Process-global (the pack I/O thread's writes count
    //! too): one test at a time may arm it. `SUPERVISE_FAILPOINT=fsop@N` uses it to kill the
    //! process at the N-th operation.
    //!
    //! The loss model (POSIX, what a file system may do after a power cut): a file's data
    //! written since its last fsync may be lost (the file is cut back to its length at that
    //! fsync, or to nothing); a name created, renamed or removed in a directory not fsynced
    //! since may be reverted. Undoing a removal or a replacing rename needs the old file: while
    //! armed, each is first hard-linked into a stash directory the test names (on the same
    //! file system).

    use std::collections::HashMap;
    use std::fs::File;
    use std::io;
    use std::os::fd::{AsFd, OwnedFd};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex, MutexGuard};

    use nix::errno::Errno;
    use nix::fcntl::{AtFlags, OFlag};
    use nix::sys::stat::Mode;

    /// Whether test mode is on (the one load an operation costs otherwise).
    pub(super) static ARMED: AtomicBool = AtomicBool::new(false);
    static STATE: Mutex<Option<State>> = Mutex::new(None);

    /// What happens at the armed operation.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Fault {
        /// That one operation fails (`EIO`); the later ones run.
        Error,
        /// That operation and every later one fail, as if the process had died there.
        Crash,
        /// The process is killed with SIGKILL there (`SUPERVISE_FAILPOINT=fsop@N`).
        Kill,
    }

    /// What the armed layer did.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Outcome {
        /// Operations counted since [`arm`].
        pub ops: u64,
        /// Whether the armed operation was reached.
        pub fired: bool,
    }

    /// A directory an undo step works in.
    #[derive(Clone, Debug)]
    pub(super) struct UndoDir {
        pub(super) fd: Arc<OwnedFd>,
        pub(super) id: (u64, u64),
    }

    /// An effect on a directory not yet durable, and how to revert it.
    #[derive(Debug)]
    pub(super) enum Undo {
        Created {
            dir: UndoDir,
            name: String,
        },
        Renamed {
            dir: UndoDir,
            from: String,
            to: String,
            replaced: Option<String>,
        },
        Removed {
            dir: UndoDir,
            name: String,
            stash: String,
        },
        Mkdir {
            dir: UndoDir,
            name: String,
        },
    }

    impl Undo {
        fn dir(&self) -> &UndoDir {
            match self {
                Undo::Created { dir, .. }
                | Undo::Renamed { dir, .. }
                | Undo::Removed { dir, .. }
                | Undo::Mkdir { dir, .. } => dir,
            }
        }
    }

    struct Unsynced {
        file: File,
        synced_len: u64,
    }

    struct State {
        at: u64,
        fault: Fault,
        count: u64,
        fired: bool,
        dead: bool,
        stash: Option<OwnedFd>,
        stashed: u64,
        journal: Vec<Undo>,
        data: HashMap<(u64, u64), Unsynced>,
    }

    fn state() -> MutexGuard<'static, Option<State>> {
        STATE.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Arms the layer: operation number `at` (counting from 1) gets `fault`, and effects are
    /// journalled, with removed files kept as links in `stash` (a directory on the store's
    /// file system). `at = u64::MAX` only counts.
    pub fn arm(at: u64, fault: Fault, stash: &std::path::Path) -> io::Result<()> {
        let stash = nix::fcntl::open(
            stash,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        install(at, fault, Some(stash));
        Ok(())
    }

    /// Arms a kill at operation `at` with no journal (for `SUPERVISE_FAILPOINT=fsop@N`).
    pub(crate) fn arm_kill(at: u64) {
        install(at, Fault::Kill, None);
    }

    fn install(at: u64, fault: Fault, stash: Option<OwnedFd>) {
        *state() = Some(State {
            at,
            fault,
            count: 0,
            fired: false,
            dead: false,
            stash,
            stashed: 0,
            journal: Vec::new(),
            data: HashMap::new(),
        });
        ARMED.store(true, Ordering::SeqCst);
    }

    /// Stops counting and failing; the journal is kept for [`lose_unsynced`] or [`forget`].
    pub fn disarm() -> Outcome {
        ARMED.store(false, Ordering::SeqCst);
        state().as_ref().map_or(Outcome::default(), |s| Outcome {
            ops: s.count,
            fired: s.fired,
        })
    }

    /// Drops the journal: everything done counts as durable.
    pub fn forget() {
        ARMED.store(false, Ordering::SeqCst);
        *state() = None;
    }

    /// Reverts what was not durable (newest first): names in directories not fsynced since
    /// they changed, then file data written since the file's last fsync. Returns how many
    /// effects were undone.
    pub fn lose_unsynced() -> io::Result<usize> {
        ARMED.store(false, Ordering::SeqCst);
        let Some(mut s) = state().take() else {
            return Ok(0);
        };
        let stash = s.stash.take();
        let mut undone = 0;
        for undo in s.journal.drain(..).rev() {
            undone += 1;
            match undo {
                Undo::Created { dir, name } => ignore_missing(nix::unistd::unlinkat(
                    &*dir.fd,
                    name.as_str(),
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                ))?,
                Undo::Renamed {
                    dir,
                    from,
                    to,
                    replaced,
                } => {
                    ignore_missing(nix::fcntl::renameat(
                        &*dir.fd,
                        to.as_str(),
                        &*dir.fd,
                        from.as_str(),
                    ))?;
                    if let (Some(old), Some(stash)) = (replaced, &stash) {
                        nix::unistd::linkat(
                            stash,
                            old.as_str(),
                            &*dir.fd,
                            to.as_str(),
                            AtFlags::empty(),
                        )?;
                    }
                }
                Undo::Removed {
                    dir,
                    name,
                    stash: old,
                } => {
                    if let Some(stash) = &stash {
                        nix::unistd::linkat(
                            stash,
                            old.as_str(),
                            &*dir.fd,
                            name.as_str(),
                            AtFlags::empty(),
                        )?;
                    }
                }
                Undo::Mkdir { dir, name } => {
                    let path = format!(
                        "/proc/self/fd/{}/{name}",
                        super::AsRawFd::as_raw_fd(&*dir.fd)
                    );
                    match std::fs::remove_dir_all(path) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                        _ => {}
                    }
                }
            }
        }
        for (_, unsynced) in s.data.drain() {
            undone += 1;
            unsynced.file.set_len(unsynced.synced_len)?;
        }
        Ok(undone)
    }

    fn ignore_missing(r: nix::Result<()>) -> io::Result<()> {
        match r {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn injected(op: &str) -> io::Error {
        io::Error::other(format!("{op}: failure injected by the crash test"))
    }

    /// Counts one operation and applies the fault when it is the armed one.
    pub(super) fn step(op: &'static str) -> io::Result<()> {
        let mut guard = state();
        let Some(s) = guard.as_mut() else {
            return Ok(());
        };
        if s.dead {
            return Err(injected(op));
        }
        s.count += 1;
        if s.count != s.at {
            return Ok(());
        }
        s.fired = true;
        match s.fault {
            Fault::Error => Err(injected(op)),
            Fault::Crash => {
                s.dead = true;
                Err(injected(op))
            }
            Fault::Kill => {
                let line = format!(
                    "supervise-shim: fail point fsop@{} ({op}) reached, killing the process\n",
                    s.at
                );
                let _ = io::Write::write_all(&mut io::stderr().lock(), line.as_bytes());
                let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
                Err(injected(op))
            }
        }
    }

    /// Journals an effect (when armed with a journal).
    pub(super) fn record(undo: Undo) {
        if let Some(s) = state().as_mut().filter(|s| s.stash.is_some()) {
            s.journal.push(undo);
        }
    }

    /// Before `name` in `dir` is removed or replaced: keeps a link to it in the stash so the
    /// removal can be undone. `None` when there is no such file or no journal.
    pub(super) fn stash(dir: &OwnedFd, name: &str) -> Option<String> {
        let mut guard = state();
        let s = guard.as_mut()?;
        let stash = s.stash.as_ref()?;
        let to = format!("{}", s.stashed);
        nix::unistd::linkat(dir, name, stash, to.as_str(), AtFlags::empty()).ok()?;
        s.stashed += 1;
        Some(to)
    }

    fn key(file: &File) -> Option<(u64, u64, u64)> {
        let st = nix::sys::stat::fstat(file.as_fd()).ok()?;
        Some((st.st_dev, st.st_ino, st.st_size as u64))
    }

    /// Before data is written to `file`: remembers its length at its last fsync (0 when it is
    /// `new`).
    pub(super) fn track_data(file: &File, new: bool) {
        let Some((dev, ino, size)) = key(file) else {
            return;
        };
        let mut guard = state();
        let Some(s) = guard.as_mut().filter(|s| s.stash.is_some()) else {
            return;
        };
        if let std::collections::hash_map::Entry::Vacant(slot) = s.data.entry((dev, ino))
            && let Ok(dup) = file.try_clone()
        {
            slot.insert(Unsynced {
                file: dup,
                synced_len: if new { 0 } else { size },
            });
        }
    }

    /// After `file` was fsynced: its data is durable.
    pub(super) fn data_synced(file: &File) {
        if let Some((dev, ino, _)) = key(file)
            && let Some(s) = state().as_mut()
        {
            s.data.remove(&(dev, ino));
        }
    }

    /// After a directory was fsynced: the names changed in it are durable.
    pub(super) fn dir_synced(id: (u64, u64)) {
        if let Some(s) = state().as_mut() {
            s.journal.retain(|u| u.dir().id != id);
        }
    }
}
