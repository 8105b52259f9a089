//! # supervise-store
//!
//! The snapshot store of `supervise`, shared by the supervisor and the runtime a program links:
//! the on-disk format ([`format`], [`codec`], packs), the one layer through which every visible
//! change to a store goes ([`fsops`]), writing and reading snapshots ([`writer`], [`reader`]),
//! the job lock ([`lock`]), retention, scrubbing and repair, the job's history ([`history`]),
//! and the protocol between the supervisor and the program it runs: the environment
//! ([`config`]), the control messages ([`control`]) and the exit codes ([`exit`]).
//!
//! A program does not use this crate directly: it links `supervise-shim` (Rust) or
//! `supervise-capi` (C, C++, Fortran).

#![deny(missing_docs)]

pub mod codec;
pub mod config;
pub mod control;
pub mod error;
pub mod exit;
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
pub mod writer;

pub use error::{Error, Result, UnsafeKind};
pub use reader::SnapshotReader;
pub use store::{JobStore, Store};
pub use writer::{Element, SnapshotBuilder, SnapshotReport, SnapshotWriter};
