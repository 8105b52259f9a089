//! The supervised child: spawned in its own process group with default signal dispositions, an
//! empty signal mask, the control socket, and SIGTERM on the supervisor's death; stopped by
//! killing its whole group, so no grandchild outlives it.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus};
use std::time::Instant;

use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// A running child and its end of the control channel.
pub struct Child {
    process: std::process::Child,
    /// The supervisor's end of the control socket.
    pub control: UnixStream,
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
    /// Spawns `argv` with `env` added to the supervisor's environment. The child gets the
    /// supervisor's stdin, stdout and stderr (and every descriptor it made inheritable, such
    /// as the job lock). With `die_with_supervisor`, the kernel sends the child SIGTERM if
    /// the supervisor dies (its shim then takes a final snapshot and exits).
    pub fn spawn(
        argv: &[OsString],
        env: &[(String, String)],
        control_env: &str,
        die_with_supervisor: bool,
    ) -> io::Result<Self> {
        let (ours, theirs) = UnixStream::pair()?;
        let theirs = OwnedFd::from(theirs);
        let fd = theirs.as_raw_fd();
        let parent = std::process::id() as libc::pid_t;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env(control_env, fd.to_string());
        cmd.process_group(0);
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls (rt_sigaction, sigprocmask, prctl, getppid, kill, fcntl);
        // it allocates nothing and touches no lock.
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
                let mut empty: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut empty);
                libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                if die_with_supervisor
                    && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                if die_with_supervisor && libc::getppid() != parent {
                    // The supervisor died between fork and prctl.
                    libc::kill(libc::getpid(), libc::SIGTERM);
                }
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let process = cmd.spawn()?;
        drop(theirs);
        ours.set_nonblocking(true)?;
        Ok(Self {
            process,
            control: ours,
            started: Instant::now(),
            reaped: false,
        })
    }

    /// The child's pid (also its process group id).
    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// Returns how the child ended, if it has, without blocking. Once it has ended, the rest
    /// of its process group is killed.
    pub fn try_wait(&mut self) -> io::Result<Option<Ended>> {
        if self.reaped {
            return Ok(None);
        }
        match self.process.try_wait()? {
            Some(status) => {
                self.reaped = true;
                self.kill_group(Signal::SIGKILL);
                Ok(Some(status.into()))
            }
            None => Ok(None),
        }
    }

    /// Sends `signal` to the child's whole process group.
    pub fn kill_group(&self, signal: Signal) {
        let _ = killpg(Pid::from_raw(self.process.id() as i32), signal);
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
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer flag and touches no memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
