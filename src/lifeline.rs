//! The lifeline: a tiny helper process forked at start that outlives a supervisor killed with
//! SIGKILL just long enough to stop the child's whole process group (grandchildren included).
//!
//! The supervisor writes the current child's process group id into a pipe (0 once the group is
//! gone). The helper blocks reading it; when the pipe closes because the supervisor died, and
//! a group is still recorded, it sends SIGTERM to the group (the shim takes a final snapshot),
//! waits up to the grace period for the group to empty, then sends SIGKILL.

use std::io::{Read, Write};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::sys::signal::{SigHandler, Signal, killpg, signal};
use nix::unistd::{
    ForkResult, Pid, dup2_stderr, dup2_stdin, dup2_stdout, fork, pipe2, read, write,
};

use crate::child::StderrPipe;

/// The supervisor's end of the lifeline.
pub struct Lifeline {
    pipe: std::fs::File,
}

impl Lifeline {
    /// Forks the helper. Call before any thread is started.
    /// With `stderr` (the children's stderr pipe), the helper keeps its read end and the
    /// supervisor's stderr, and passes on what the program writes while it stops it: a
    /// program is never killed by SIGPIPE for writing to its stderr after the supervisor died.
    pub fn start(grace: Duration, stderr: Option<&StderrPipe>) -> std::io::Result<Self> {
        let keep = stderr.map(|p| (p.read_fd(), p.own_fd()));
        let (read_end, write_end) = pipe2(OFlag::O_CLOEXEC)?;
        // SAFETY: called from the single-threaded supervisor at start (no other thread exists
        // that could hold a lock across the fork); the helper only uses simple syscalls and
        // leaves with _exit.
        match unsafe { fork() }? {
            ForkResult::Child => {
                drop(write_end);
                helper(read_end, grace, keep)
            }
            ForkResult::Parent { .. } => {
                drop(read_end);
                Ok(Self {
                    pipe: std::fs::File::from(write_end),
                })
            }
        }
    }

    /// Records the live child group (`None`: no group to clean up).
    pub fn set_group(&mut self, pgid: Option<u32>) {
        let _ = self.pipe.write_all(&pgid.unwrap_or(0).to_le_bytes());
    }
}

/// Passes on what is in the children's stderr pipe (`from`, non-blocking) to `to`.
fn pass_on(from: BorrowedFd<'_>, to: BorrowedFd<'_>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match read(from, &mut buf) {
            Ok(0) | Err(_) => return,
            // A failed write drops the bytes (nobody reads them).
            Ok(n) => {
                let _ = write(to, &buf[..n]);
            }
        }
    }
}

fn helper(
    read_end: OwnedFd,
    grace: Duration,
    stderr: Option<(BorrowedFd<'_>, BorrowedFd<'_>)>,
) -> ! {
    // A session of its own: a kill of the supervisor's whole process group (`kill -9 -PGID`,
    // `timeout -s KILL`) must not take the helper with it, since then nothing would end a
    // program that reaches no safe point, and that program holds the job's lock.
    let _ = nix::unistd::setsid();
    // Keep out of the way of the terminal's and the scheduler's signals: only the pipe
    // closing ends the helper.
    for sig in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGUSR1,
        Signal::SIGQUIT,
    ] {
        // SAFETY: setting a signal to SIG_IGN installs no handler code.
        let _ = unsafe { signal(sig, SigHandler::SigIgn) };
    }
    // Hold no terminal or pipe of the supervisor's open but the copy of its stderr that the
    // children's stderr is passed on to (the helper ends with the supervisor unless a program
    // is running, which holds that stderr too).
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        let _ = dup2_stdin(&null);
        let _ = dup2_stdout(&null);
        let _ = dup2_stderr(&null);
    }
    let mut pipe = std::fs::File::from(read_end);
    let mut pgid = 0u32;
    let mut buf = [0u8; 4];
    while pipe.read_exact(&mut buf).is_ok() {
        pgid = u32::from_le_bytes(buf);
    }
    if pgid != 0 {
        let group = Pid::from_raw(pgid as i32);
        if killpg(group, Signal::SIGTERM).is_ok() {
            let until = Instant::now() + grace;
            while Instant::now() < until && killpg(group, None).is_ok() {
                if let Some((from, to)) = stderr {
                    pass_on(from, to);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = killpg(group, Signal::SIGKILL);
            if let Some((from, to)) = stderr {
                pass_on(from, to);
            }
        }
    }
    // SAFETY: ends the helper without running the supervisor's atexit handlers or destructors.
    unsafe { libc::_exit(0) }
}
