//! Fault injection for crash tests. `SUPERVISE_FAILPOINT=NAME` (or `NAME@N`, the N-th time it is
//! reached) kills the process with SIGKILL when the code reaches the point `NAME`, the way a
//! power cut or `kill -9` would. The points are the steps of a commit ([`Failpoint`], hooked in
//! the store's file-system layer, [`crate::fsops`]): `packs-synced`, `packs-renamed`,
//! `manifest-synced`, `manifest-renamed`; and `fsop@N`: the N-th operation of that layer (any
//! durability step: see [`crate::fsops::crash`]). Under a supervisor it fires in the first run
//! of the program only (`SUPERVISE_ATTEMPT` unset or 0), so the restarted program shows the
//! recovery. `NAME@N:error` makes the operation fail with an I/O error instead (the process
//! lives on). Unset, a check costs one load of an initialised `OnceLock`.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable naming the fail point.
pub const ENV: &str = "SUPERVISE_FAILPOINT";
/// With it, the fail point is armed only in the rank it names (of a job of many ranks).
pub const ENV_RANK: &str = "SUPERVISE_FAILPOINT_RANK";

/// A named step of a commit where `SUPERVISE_FAILPOINT` can kill the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failpoint {
    /// A snapshot's packs are fsynced under their temporary names, not yet renamed.
    PacksSynced,
    /// The packs are renamed into place and the pack directory is fsynced; the manifest is
    /// not yet written.
    PacksRenamed,
    /// The manifest is fsynced under its temporary name, not yet renamed.
    ManifestSynced,
    /// The manifest is renamed into place (the snapshot is visible), its directory not yet
    /// fsynced.
    ManifestRenamed,
}

impl Failpoint {
    /// Every fail point, in the order a commit reaches them.
    pub const ALL: [Failpoint; 4] = [
        Failpoint::PacksSynced,
        Failpoint::PacksRenamed,
        Failpoint::ManifestSynced,
        Failpoint::ManifestRenamed,
    ];

    /// The name `SUPERVISE_FAILPOINT` gives it.
    pub const fn name(self) -> &'static str {
        match self {
            Failpoint::PacksSynced => "packs-synced",
            Failpoint::PacksRenamed => "packs-renamed",
            Failpoint::ManifestSynced => "manifest-synced",
            Failpoint::ManifestRenamed => "manifest-renamed",
        }
    }
}

struct Armed {
    name: String,
    at: u64,
    seen: AtomicU64,
    /// `NAME@N:error`: the operation fails with an I/O error instead of the process being
    /// killed (a full disk, say), for a failure the program survives.
    error: bool,
}

fn armed() -> &'static Option<Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED.get_or_init(|| {
        let spec = std::env::var(ENV).ok()?;
        let attempt = std::env::var(crate::config::ENV_ATTEMPT).unwrap_or_default();
        if !matches!(attempt.as_str(), "" | "0") {
            return None;
        }
        // In a job of many ranks, only the rank `SUPERVISE_FAILPOINT_RANK` names.
        if let Ok(only) = std::env::var(ENV_RANK) {
            let rank = crate::config::rank_from(|name| std::env::var(name).ok()).map(|(r, _)| r);
            if only.trim().parse::<u32>().ok() != rank {
                return None;
            }
        }
        let (spec, error) = match spec.strip_suffix(":error") {
            Some(spec) => (spec.to_owned(), true),
            None => (spec, false),
        };
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
            error,
        })
    })
}

/// Reads the environment now (before any fork, so a forked snapshot process never reads it).
pub fn init() {
    let _ = armed();
}

/// Kills the process (or, armed with `:error`, fails the operation) if the fail point
/// `point` is armed and reached for the armed time.
pub(crate) fn hit(point: Failpoint) -> std::io::Result<()> {
    let name = point.name();
    if let Some(armed) = armed()
        && armed.name == name
        && armed.seen.fetch_add(1, Ordering::SeqCst) + 1 == armed.at
    {
        if armed.error {
            return Err(std::io::Error::other(format!(
                "injected failure at fail point {name}"
            )));
        }
        let line = format!("supervise-shim: fail point {name} reached, killing the process\n");
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_names_are_the_documented_ones() {
        let names: Vec<&str> = Failpoint::ALL.iter().map(|p| p.name()).collect();
        assert_eq!(
            names,
            [
                "packs-synced",
                "packs-renamed",
                "manifest-synced",
                "manifest-renamed"
            ]
        );
    }
}
