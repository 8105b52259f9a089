//! # supervise-store
//!
//! The snapshot store of `supervise`, shared by the supervisor and the runtime a program links:
//! the on-disk format ([`format`](mod@format), [`codec`], the pack writer, [`pack_scan`] to read packs
//! back), the one layer through which every visible change to a store goes ([`fsops`]:
//! publish packs and manifests, set a damaged snapshot aside, remove durably; with the crash
//! test's hooks and the named [`failpoint`]s), the store's layout ([`store`]), writing and
//! reading snapshots ([`writer`], [`reader`]), the job lock ([`lock`]), names ([`name`]),
//! errors ([`error`]), retention ([`retention`]), scrubbing ([`scrub`]) and repair
//! ([`repair`]), the job's history ([`history`]), and the protocol between the supervisor and
//! the program it runs: the environment ([`config`]), the control messages ([`control`]) and claims on chunks ranks share ([`claims`]) and
//! the exit codes ([`exit`]).
//!
//! A program does not use this crate directly: it links `supervise-shim` (Rust) or
//! `supervise-capi` (C, C++, Fortran).

#![deny(missing_docs)]

pub mod claims;
pub mod clock;
pub mod codec;
pub mod config;
pub mod control;
pub(crate) mod direct;
pub mod epoch;
pub mod error;
pub mod exit;
mod extent;
pub mod failpoint;
pub mod format;
pub mod fsops;
pub mod history;
pub mod lock;
pub mod name;
mod pack;
pub mod pack_scan;
pub mod reader;
pub mod repair;
pub mod retention;
pub mod scrub;
pub mod store;
pub mod stream;
pub mod writer;

pub use error::{Error, Result, UnsafeKind};

/// How many threads hash, compress or decompress a snapshot's chunks in parallel: the
/// machine's parallelism, 1 to 8 (2 when it cannot be known).
pub(crate) fn worker_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8)
}
pub use reader::SnapshotReader;
pub use store::{JobStore, StagedPack, Store};
pub use writer::{Element, SnapshotBuilder, SnapshotReport, SnapshotWriter};
