//! The shim's threads and handlers, set up once by [`Shim::open`]: the signal handlers that
//! mark a snapshot (and a stop) pending, and the thread that reads the supervisor's control
//! messages (or, without a supervisor, the timer that marks snapshots due).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use supervise_store::config::Mode;
use supervise_store::error::{Error, Result};

use crate::channel::{SNAP, STOP, control_loop};
use crate::runtime::Shim;

impl Shim {
    pub(crate) fn install_signal_handlers(&self) -> Result<()> {
        let register = |signal: i32, bits: u32| {
            let shared = Arc::clone(&self.shared);
            // SAFETY: the handler only performs a lock-free atomic fetch_or, which is
            // async-signal-safe; it allocates nothing and takes no lock.
            unsafe {
                signal_hook::low_level::register(signal, move || {
                    shared.pending.fetch_or(bits, Ordering::SeqCst);
                })
            }
            .map_err(|source| Error::SignalHandler { signal, source })
        };
        register(signal_hook::consts::SIGUSR1, SNAP)?;
        if matches!(self.config.mode, Mode::Supervised(_)) {
            register(signal_hook::consts::SIGTERM, SNAP | STOP)?;
        }
        Ok(())
    }

    pub(crate) fn spawn_control_thread(&self) -> Result<()> {
        let shared = Arc::clone(&self.shared);

        let (orphan, every) = (self.config.orphan, self.config.every);
        if let Some(stream) = &self.shared.control {
            let stream = stream
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .try_clone()
                .map_err(|source| Error::Control {
                    op: "clone it",
                    source,
                })?;
            std::thread::Builder::new()
                .name("supervise-control".into())
                .spawn(move || control_loop(&shared, stream, orphan, every))
                .map_err(|source| Error::Thread {
                    name: "supervise-control",
                    source,
                })?;
        } else if let Some(every) = self.config.every {
            std::thread::Builder::new()
                .name("supervise-timer".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(every);
                        shared.pending.fetch_or(SNAP, Ordering::SeqCst);
                    }
                })
                .map_err(|source| Error::Thread {
                    name: "supervise-timer",
                    source,
                })?;
        }
        Ok(())
    }
}
