//! Fault injection for crash tests. `SUPERVISE_FAILPOINT=NAME` (or `NAME@N`, the N-th time it is
//! reached) kills the process with SIGKILL when the code reaches the point `NAME`, the way a
//! power cut or `kill -9` would. Points: `packs-synced`, `packs-renamed`, `manifest-synced`,
//! `manifest-renamed`, and `fsop@N`: the N-th operation of the store's file-system layer
//! (any durability step: see [`crate::fsops::crash`]). Under a supervisor it fires in the first run of the program only
//! (`SUPERVISE_ATTEMPT` unset or 0), so the restarted program shows the recovery. Unset, a
//! check costs one load of an initialised `OnceLock`.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable naming the fail point.
pub const ENV: &str = "SUPERVISE_FAILPOINT";

struct Armed {
    name: String,
    at: u64,
    seen: AtomicU64,
}

fn armed() -> &'static Option<Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED.get_or_init(|| {
        let spec = std::env::var(ENV).ok()?;
        let attempt = std::env::var(crate::config::ENV_ATTEMPT).unwrap_or_default();
        if !matches!(attempt.as_str(), "" | "0") {
            return None;
        }
        let (name, at) = match spec.split_once('@') {
            Some((n, at)) => (n.to_owned(), at.parse().unwrap_or(1)),
            None => (spec, 1),
        };
        if name == "fsop" {
            crate::fsops::crash::arm_kill(at);
        }
        Some(Armed {
            name,
            at,
            seen: AtomicU64::new(0),
        })
    })
}

/// Reads the environment now (before any fork, so a forked snapshot process never reads it).
pub fn init() {
    let _ = armed();
}

/// Kills the process if the fail point `name` is armed and reached for the armed time.
pub fn hit(name: &str) {
    if let Some(armed) = armed()
        && armed.name == name
        && armed.seen.fetch_add(1, Ordering::SeqCst) + 1 == armed.at
    {
        let line = format!("supervise-shim: fail point {name} reached, killing the process\n");
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
