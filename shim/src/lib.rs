//! # supervise-shim
//!
//! The library a long-running simulation links so that `supervise` can snapshot it and resume
//! it after a crash. It owns the on-disk format of the snapshot store.
//!
//! ```no_run
//! use supervise_shim::{Next, Shim, Start};
//!
//! # fn main() -> supervise_shim::Result<std::process::ExitCode> {
//! let mut shim = Shim::init("heat")?;                 // restores if there is a snapshot
//! let mut step: u64 = shim.load("step")?.unwrap_or(0);
//! let mut grid = vec![0.0f64; 1024 * 1024];
//! shim.load_slice("grid", &mut grid)?;                // false on a fresh start
//! if let Start::Resumed { seq, .. } = shim.start() {
//!     eprintln!("resumed from snapshot {seq} at step {step}");
//! }
//! while step < 10_000 {
//!     // ... compute one step on `grid` ...
//!     step += 1;
//!     if shim.due() {                                 // one atomic load when nothing is due
//!         let tag = format!("step {step}");
//!         let next = shim.snapshot(Some(&tag), |s| {
//!             s.value("step", &step)?;
//!             s.slice("grid", &grid)
//!         })?;
//!         if next == Next::Stop {
//!             // Asked to stop; the final snapshot is durable. Clean up, then end with the
//!             // exit code that tells the supervisor the stop was clean (75).
//!             return Ok(shim.stopped());
//!         }
//!     }
//! }
//! shim.finish()?;
//! Ok(std::process::ExitCode::SUCCESS)
//! # }
//! ```
//!
//! Without a supervisor (and without `SUPERVISE_STORE` set) the same program runs unchanged:
//! nothing is restored and `due()` is never true. See [`Config`] for the environment.
//!
//! A program that appends results to a file opens it with [`Shim::output`] (C: `sv_output`):
//! each snapshot records the file's length, and a resumed run cuts the file back to it, so the
//! file ends as an uninterrupted run's.
//!
//! The library never ends the process and prints nothing: a stop request surfaces as
//! [`Next::Stop`] from [`Shim::snapshot`], and warnings go to the supervisor over the control
//! channel and to the `log` facade (target `supervise_shim`), where a program may route them.

#![deny(missing_docs)]

mod capture;
mod channel;
mod claims;
mod output;
mod rank;
mod region;
mod restore;
mod runtime;
mod setup;

pub use capture::Capture;
pub use output::Output;
pub use region::Region;
pub use runtime::{Captured, DuePoll, EXIT_STOPPED, Next, Shim, Start};
pub use supervise_store::config::{CaptureMode, Config};
/// The store's on-disk format: manifests, their entries and array shapes (see
/// [`Shim::resumed_manifest`]).
pub use supervise_store::format;
pub use supervise_store::{Error, Result, UnsafeKind};
// The runtime's one way to add entries is `Capture` (the store's `SnapshotBuilder` is not
// re-exported).
pub use supervise_store::SnapshotReport;
/// The element types a [`Region`], [`Shim::load_slice`] and [`Capture::slice`] take.
pub use supervise_store::writer::Element;
