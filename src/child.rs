//! The supervised child: spawned in its own process group with default signal dispositions, an
//! empty signal mask, the control socket, and SIGTERM on the supervisor's death; stopped by
//! killing its whole group, so no grandchild outlives it.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus};
use std::time::Instant;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::prctl;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, killpg, sigprocmask};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::{Pid, getpid, getppid};
use supervise_store::config;

/// A running child and its end of the control channel.
pub struct Child {
    process: std::process::Child,
    /// The supervisor's end of the control socket.
    pub control: UnixStream,
    /// The other end, when it is not the child's but the ranks' relay's (taken at the start).
    pub relay_end: Option<UnixStream>,
    /// When it was spawned.
    pub started: Instant,
    reaped: bool,
}

/// How a child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Exited with this code.
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Exited(code) => write!(f, "exit code {code}"),
            Ended::Signaled(sig) => match Signal::try_from(*sig) {
                Ok(s) => write!(f, "signal {} ({sig})", s.as_str()),
                Err(_) => write!(f, "signal {sig}"),
            },
        }
    }
}

impl From<ExitStatus> for Ended {
    fn from(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => Ended::Exited(code),
            (None, Some(sig)) => Ended::Signaled(sig),
            (None, None) => Ended::Exited(-1),
        }
    }
}

impl Child {
    /// Spawns `program` (found and resolved before, so that what runs is what was hashed) with
    /// `argv[0]` and the rest of `argv` as its arguments, and `env` added to the supervisor's
    /// environment. The child gets the supervisor's stdin and stdout (and every descriptor it
    /// made inheritable, such as the job lock). Its stderr is the supervisor's, or with
    /// `stderr` the [`StderrPipe`]'s write end; the supervisor's own stderr is then inherited
    /// too, named by [`config::ENV_STDERR_FD`], and the shim takes it back as its stderr once
    /// it started. With `die_with_supervisor`, the kernel sends the child SIGTERM if the
    /// supervisor dies (its shim then takes a final snapshot and exits).
    pub fn spawn(
        program: &std::path::Path,
        argv: &[OsString],
        env: &[(String, String)],
        die_with_supervisor: bool,
        stderr: Option<&StderrPipe>,
        inherit_control: bool,
    ) -> io::Result<Self> {
        let (ours, theirs) = UnixStream::pair()?;
        // Without `inherit_control` (the ranks of an MPI job) the other end goes to the relay,
        // which the ranks join over the network endpoint.
        let (theirs, relay_end) = if inherit_control {
            (Some(OwnedFd::from(theirs)), None)
        } else {
            (None, Some(theirs))
        };
        let fd = theirs.as_ref().map(|t| t.as_raw_fd());
        let parent = getpid();
        let mut cmd = Command::new(program);
        cmd.arg0(&argv[0])
            .args(&argv[1..])
            .envs(env.iter().map(|(k, v)| (k, v)));
        for var in crate::notify::SUPERVISOR_ONLY_ENV {
            cmd.env_remove(var);
        }
        if let Some(fd) = fd {
            cmd.env(config::ENV_CONTROL_FD, fd.to_string());
        }
        if let Some(pipe) = stderr {
            cmd.env(config::ENV_STDERR_FD, &pipe.env_value);
            cmd.stderr(std::process::Stdio::from(pipe.write.try_clone()?));
        }
        let own_stderr_fd = stderr.map(|p| p.own.as_raw_fd());
        cmd.process_group(0);
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls (rt_sigaction, sigprocmask, prctl, getppid, getpid,
        // kill, fcntl); it allocates nothing and touches no lock. The descriptors it borrows
        // by number (the control socket's and the supervisor's stderr copy) are open in the
        // child: `theirs` and the pipe live until after the spawn.
        unsafe {
            cmd.pre_exec(move || {
                // The raw system call, because glibc's sigaction refuses signals 32 and 33 (it
                // reserves them), and an ignored one would be inherited. An all-zero kernel
                // sigaction (handler, flags, restorer, 64-bit mask) is SIG_DFL.
                let default_action = [0u64; 4];
                for sig in 1..=64 {
                    if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                        libc::syscall(
                            libc::SYS_rt_sigaction,
                            sig,
                            default_action.as_ptr(),
                            std::ptr::null_mut::<u64>(),
                            8usize,
                        );
                    }
                }
                let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
                if die_with_supervisor {
                    prctl::set_pdeathsig(Signal::SIGTERM)?;
                    if getppid() != parent {
                        // The supervisor died between fork and prctl.
                        let _ = kill(getpid(), Signal::SIGTERM);
                    }
                }
                let inheritable = || FcntlArg::F_SETFD(FdFlag::empty());
                if let Some(fd) = fd {
                    fcntl(BorrowedFd::borrow_raw(fd), inheritable())?;
                }
                if let Some(own) = own_stderr_fd {
                    fcntl(BorrowedFd::borrow_raw(own), inheritable())?;
                }
                Ok(())
            });
        }
        let process = cmd.spawn()?;
        drop(cmd);
        drop(theirs);
        ours.set_nonblocking(true)?;
        Ok(Self {
            process,
            control: ours,
            relay_end,
            started: Instant::now(),
            reaped: false,
        })
    }

    /// The child's pid (also its process group id).
    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// Returns how the child ended, if it has, without blocking. Once it has ended, the rest
    /// of its process group is killed, and then the child is reaped: its exit is first only
    /// observed (`waitid` with `WNOWAIT`), so that while the group is killed the child is a
    /// zombie whose pid, and so its group's id, no new process can take.
    pub fn try_wait(&mut self) -> io::Result<Option<Ended>> {
        if self.reaped {
            return Ok(None);
        }
        let observe = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        match waitid(Id::Pid(self.group()), observe) {
            Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => Ok(None),
            Ok(_) => {
                self.kill_group(Signal::SIGKILL);
                let status = self.process.wait()?;
                self.reaped = true;
                Ok(Some(status.into()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The child's process group (its pid).
    fn group(&self) -> Pid {
        Pid::from_raw(self.process.id() as i32)
    }

    /// Sends `signal` to the child's whole process group.
    pub fn kill_group(&self, signal: Signal) {
        let _ = killpg(self.group(), signal);
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if !self.reaped {
            self.kill_group(Signal::SIGKILL);
            let _ = self.process.wait();
            self.reaped = true;
        }
        reap_orphans();
    }
}

/// The pipe the children's stderr goes through while the supervisor lives: one for the
/// supervisor's life, created before the lifeline helper, which keeps its read end and passes
/// on what the program writes while it stops it after the supervisor died (so a program never
/// gets SIGPIPE for writing to its stderr).
pub struct StderrPipe {
    /// The read end (non-blocking).
    read: std::fs::File,
    /// The write end each child gets as its stderr.
    write: OwnedFd,
    /// A copy of the supervisor's own stderr each child inherits, for the shim to take back.
    own: OwnedFd,
    /// `SUPERVISE_STDERR_FD`: `own's fd:dev:inode:the pipe's dev:inode`.
    env_value: String,
}

impl StderrPipe {
    /// Makes the pipe (every descriptor close-on-exec; a child's copies are made inheritable
    /// as it starts).
    pub fn new() -> io::Result<Self> {
        let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let own = std::io::stderr().as_fd().try_clone_to_owned()?;
        let theirs = nix::sys::stat::fstat(&own)?;
        let pipe = nix::sys::stat::fstat(&write_end)?;
        let env_value = format!(
            "{}:{}:{}:{}:{}",
            own.as_raw_fd(),
            theirs.st_dev,
            theirs.st_ino,
            pipe.st_dev,
            pipe.st_ino
        );
        let read = std::fs::File::from(read_end);
        nix::fcntl::fcntl(
            &read,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        Ok(Self {
            read,
            write: write_end,
            own,
            env_value,
        })
    }

    /// The read end, to poll and for the lifeline helper.
    pub fn read_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// The copy of the supervisor's stderr the children inherit.
    pub fn own_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.own.as_fd()
    }

    /// Passes on what the children wrote since the last call (without blocking) to the
    /// supervisor's stderr, keeping the last lines in `tail`.
    pub fn pass(&self, tail: &mut StderrTail) {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match (&self.read).read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    let _ = std::io::stderr().lock().write_all(&buf[..n]);
                    tail.push(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

/// The last bytes a child wrote to its stderr, to show when it fails at once.
#[derive(Debug, Default)]
pub struct StderrTail {
    bytes: std::collections::VecDeque<u8>,
}

/// Bytes of a child's stderr kept.
const TAIL_BYTES: usize = 4096;

impl StderrTail {
    /// Whether the kept bytes contain `text`.
    pub fn contains(&self, text: &str) -> bool {
        let (a, b) = self.bytes.as_slices();
        let kept = [a, b].concat();
        kept.windows(text.len().max(1))
            .any(|w| w == text.as_bytes())
    }

    /// Appends what the child wrote, forgetting the oldest beyond the bound.
    pub fn push(&mut self, data: &[u8]) {
        let data = &data[data.len().saturating_sub(TAIL_BYTES)..];
        let over = (self.bytes.len() + data.len()).saturating_sub(TAIL_BYTES);
        self.bytes.drain(..over);
        self.bytes.extend(data);
    }

    /// The last `n` lines, as text (invalid UTF-8 replaced), without a trailing newline.
    pub fn last_lines(&self, n: usize) -> Vec<String> {
        let (a, b) = self.bytes.as_slices();
        let text = String::from_utf8_lossy(&[a, b].concat()).into_owned();
        let lines: Vec<&str> = text.trim_end_matches('\n').split('\n').collect();
        let lines: Vec<String> = lines[lines.len().saturating_sub(n)..]
            .iter()
            .map(|l| l.trim_end_matches('\r').to_owned())
            .filter(|l| !l.is_empty())
            .collect();
        lines
    }
}

/// Reaps any exited descendants that were re-parented to the supervisor (it is a
/// subreaper), without blocking.
pub fn reap_orphans() {
    while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
}

/// Makes the supervisor a child subreaper: orphaned grandchildren are re-parented to it, so
/// it can reap them and no zombie is left behind.
pub fn become_subreaper() -> io::Result<()> {
    Ok(prctl::set_child_subreaper(true)?)
}

#[cfg(test)]
mod tests {
    use super::StderrTail;

    #[test]
    fn the_tail_keeps_the_last_lines_within_its_bound() {
        let mut tail = StderrTail::default();
        assert!(tail.last_lines(3).is_empty());
        tail.push(b"one\ntwo\r\n");
        tail.push(b"thr");
        tail.push(b"ee\n\n");
        assert_eq!(tail.last_lines(2), ["two", "three"]);
        assert_eq!(tail.last_lines(10), ["one", "two", "three"]);
        tail.push(&vec![b'x'; 10_000]);
        let lines = tail.last_lines(5);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), 4096);
        tail.push(b"\n\xffbad utf-8\n");
        assert_eq!(tail.last_lines(1), ["\u{fffd}bad utf-8"]);
    }
}
