//! One job, one owner: an OS lock (`flock`) on `<store>/<job>/lock`.
//!
//! The supervisor takes the lock for its whole life and its child inherits the locked file
//! descriptor across `exec`, so the lock stays held while any process of the job runs: a
//! second supervisor of the same job cannot start a second copy even when the first supervisor
//! died and its orphaned child is still finishing. The kernel drops the lock when the last
//! process holding the descriptor exits, so a stale lock file never blocks anyone: the file's
//! existence means nothing, only the lock on it does.
//!
//! The holder writes who it is into the file (pid, host, since when) for the error message of
//! the next one to try. The file is never replaced (a rename would give it a new inode and a
//! new, unheld lock), only rewritten in place.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, io_err};
use crate::fsops::Dir;

/// Who holds a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Process id of the supervisor (or program) that took the lock.
    pub pid: u32,
    /// Host name it runs on.
    pub host: String,
    /// When it took the lock (seconds since the Unix epoch).
    pub since_unix: u64,
    /// The command it runs, for people.
    pub command: String,
}

impl Owner {
    /// This process, now.
    pub fn this_process(command: &str) -> Self {
        Self {
            pid: std::process::id(),
            host: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "unknown host".into()),
            since_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            command: command.to_owned(),
        }
    }
}

/// A held job lock. Dropping it releases the lock for this process (children that inherited
/// the descriptor keep holding it until they exit).
#[derive(Debug)]
pub struct JobLock {
    file: Flock<File>,
    path: PathBuf,
}

/// The result of trying to take a job's lock.
#[derive(Debug)]
pub enum TryLock {
    /// Taken.
    Taken(JobLock),
    /// Another process holds it; who, if it said so.
    Held(Option<Owner>),
}

impl JobLock {
    /// The lock file's path inside a job directory.
    pub fn path_in(job_dir: &Path) -> PathBuf {
        job_dir.join("lock")
    }

    /// Tries once, without waiting, to take the lock of the job in `job_dir`; on success,
    /// records `owner` in the lock file. The job directory and the lock file are opened
    /// without following links and must belong to this user ([`Error::Unsafe`] otherwise):
    /// a lock planted as a link to another file is refused, not written through.
    pub fn try_take(job_dir: &Path, owner: &Owner) -> Result<TryLock> {
        let path = Self::path_in(job_dir);
        let file = Dir::open_owned(job_dir)?.open_private("lock", false)?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                return Ok(TryLock::Held(read_owner(&mut file)));
            }
            Err((_, e)) => {
                return Err(Error::Io {
                    op: "lock",
                    path,
                    source: e.into(),
                });
            }
        };
        let text = serde_json::to_string(owner).unwrap_or_default() + "\n";
        let write = |f: &mut File| -> std::io::Result<()> {
            f.set_len(0)?;
            f.rewind()?;
            f.write_all(text.as_bytes())?;
            f.sync_data()
        };
        write(&mut file).map_err(io_err("write lock file", &path))?;
        Ok(TryLock::Taken(JobLock { file, path }))
    }

    /// Who holds the job in `job_dir` now, or `None` when nobody does. Never blocks and never
    /// takes the lock away from anyone (a probe that got it releases it at once). The lock
    /// file is opened without following a link (a link there is [`Error::Unsafe`]).
    pub fn holder(job_dir: &Path) -> Result<Option<Owner>> {
        let path = Self::path_in(job_dir);
        let file = match nix::fcntl::open(
            &path,
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_NOFOLLOW
                | nix::fcntl::OFlag::O_CLOEXEC
                | nix::fcntl::OFlag::O_NONBLOCK,
            nix::sys::stat::Mode::empty(),
        ) {
            Ok(fd) => File::from(fd),
            Err(nix::errno::Errno::ENOENT) => return Ok(None),
            Err(nix::errno::Errno::ELOOP) => {
                return Err(Error::Unsafe {
                    path,
                    kind: crate::error::UnsafeKind::NotExpectedKind {
                        found: "symbolic link",
                    },
                });
            }
            Err(e) => return Err(io_err("open lock file", &path)(e.into())),
        };
        match Flock::lock(file, FlockArg::LockSharedNonblock) {
            Ok(_probe) => Ok(None),
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                Ok(Some(read_owner(&mut file).unwrap_or(Owner {
                    pid: 0,
                    host: "unknown".into(),
                    since_unix: 0,
                    command: String::new(),
                })))
            }
            Err((_, e)) => Err(Error::Io {
                op: "probe lock",
                path,
                source: e.into(),
            }),
        }
    }

    /// Lets processes started from here (the supervised command) inherit the lock: clears
    /// close-on-exec on its descriptor. Returns the descriptor number.
    pub fn inheritable(&self) -> Result<RawFd> {
        nix::fcntl::fcntl(
            self.file.as_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .map_err(|e| Error::Io {
            op: "make lock inheritable",
            path: self.path.clone(),
            source: e.into(),
        })?;
        Ok(self.file.as_raw_fd())
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn read_owner(file: &mut File) -> Option<Owner> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    serde_json::from_str(text.trim()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_a_stale_file_blocks_nobody() {
        let dir = tempfile::tempdir().unwrap();
        let me = Owner::this_process("test");
        // A stale file with a dead owner's record: not a lock.
        std::fs::write(
            JobLock::path_in(dir.path()),
            r#"{"pid":1,"host":"gone","since_unix":1,"command":"x"}"#,
        )
        .unwrap();
        assert_eq!(JobLock::holder(dir.path()).unwrap(), None);
        let TryLock::Taken(held) = JobLock::try_take(dir.path(), &me).unwrap() else {
            panic!("a stale lock file blocked the lock");
        };
        // flock locks belong to open file descriptions: a second open in this same process
        // conflicts like another process would.
        match JobLock::try_take(dir.path(), &Owner::this_process("second")).unwrap() {
            TryLock::Held(Some(owner)) => assert_eq!(owner, me),
            other => panic!("second taker got {other:?}"),
        }
        assert_eq!(JobLock::holder(dir.path()).unwrap(), Some(me.clone()));
        drop(held);
        assert_eq!(JobLock::holder(dir.path()).unwrap(), None);
        assert!(matches!(
            JobLock::try_take(dir.path(), &me).unwrap(),
            TryLock::Taken(_)
        ));
    }
}
