//! The supervisor's signals: handlers only set flags and write a byte to a wake-up socket that
//! the event loop polls.

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM, SIGUSR1};

/// Flags for the signals the supervisor acts on, and the wake-up socket.
pub struct Signals {
    wake: UnixStream,
    interrupt: Arc<AtomicBool>,
    terminate: Arc<AtomicBool>,
    snapshot: Arc<AtomicBool>,
    requeue: Arc<AtomicBool>,
}

impl Signals {
    /// Installs the handlers; `requeue`, if given, is the signal that means the batch job
    /// ends soon (it replaces SIGUSR1's meaning when it is SIGUSR1).
    pub fn install(requeue: Option<i32>) -> std::io::Result<Self> {
        let (wake, waker) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        waker.set_nonblocking(true)?;
        let signals = Self {
            wake,
            interrupt: Arc::new(AtomicBool::new(false)),
            terminate: Arc::new(AtomicBool::new(false)),
            snapshot: Arc::new(AtomicBool::new(false)),
            requeue: Arc::new(AtomicBool::new(false)),
        };
        signal_hook::flag::register(SIGINT, Arc::clone(&signals.interrupt))?;
        signal_hook::flag::register(SIGTERM, Arc::clone(&signals.terminate))?;
        signal_hook::flag::register(SIGHUP, Arc::clone(&signals.terminate))?;
        if requeue != Some(SIGUSR1) {
            signal_hook::flag::register(SIGUSR1, Arc::clone(&signals.snapshot))?;
        }
        let mut wake_on = vec![SIGINT, SIGTERM, SIGHUP, SIGUSR1, SIGCHLD];
        if let Some(sig) = requeue {
            signal_hook::flag::register(sig, Arc::clone(&signals.requeue))?;
            if !wake_on.contains(&sig) {
                wake_on.push(sig);
            }
        }
        for sig in wake_on {
            signal_hook::low_level::pipe::register(sig, waker.try_clone()?)?;
        }
        Ok(signals)
    }

    /// The fd to poll for readability.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// Empties the wake-up socket.
    pub fn drain(&self) {
        let mut buf = [0u8; 64];
        while matches!((&self.wake).read(&mut buf), Ok(n) if n > 0) {}
    }

    /// Takes a pending stop request: `Some(signal number)` for SIGINT or SIGTERM/SIGHUP.
    pub fn take_stop(&self) -> Option<i32> {
        if self.interrupt.swap(false, Ordering::SeqCst) {
            Some(SIGINT)
        } else if self.terminate.swap(false, Ordering::SeqCst) {
            Some(SIGTERM)
        } else {
            None
        }
    }

    /// Takes a pending "the batch job ends soon" (the requeue signal).
    pub fn take_requeue(&self) -> bool {
        self.requeue.swap(false, Ordering::SeqCst)
    }

    /// Takes a pending snapshot request (SIGUSR1).
    pub fn take_snapshot(&self) -> bool {
        self.snapshot.swap(false, Ordering::SeqCst)
    }
}
