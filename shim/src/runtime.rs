//! The shim as the program sees it: [`Shim::init`] at start (restore), [`Shim::due`] at every
//! safe point (one atomic load), [`Shim::snapshot`] when due.

use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::capture::{Background, Buffer, Capture, DirtyTracker, OutputsAt, Scanner, Work};
use crate::channel::{RankState, SNAP, STOP, Shared, adopt_control_fd};
use crate::output::{self, Output, OutputFile, Sink};
use crate::region::{Region, RegionMem};
use crate::restore::{Restored, choose_restore};
use supervise_store::config::{CaptureMode, Config, Mode, RestoreFrom};
use supervise_store::control::{DamagedPack, Event, MismatchDetail, WarningKind};
use supervise_store::error::{Error, Result};
use supervise_store::format::EntryKind;
use supervise_store::scrub::Finding;
use supervise_store::store::{JobStore, Store};
use supervise_store::writer::{Element, SnapshotReport, SnapshotWriter};

/// The exit status of a program that stopped cleanly after its final snapshot, on request
/// (see [`supervise_store::exit::STOPPED`], where every exit code of the protocol lives).
pub const EXIT_STOPPED: i32 = supervise_store::exit::STOPPED;

/// How this run of the program started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// From the beginning: no snapshot was restored.
    Fresh,
    /// From a snapshot.
    Resumed {
        /// Its sequence number.
        seq: u64,
        /// The progress tag the program gave it.
        tag: Option<String>,
    },
}

/// What the program does after [`Shim::snapshot`].
#[must_use = "on `Stop` the program must end: clean up, then exit with EXIT_STOPPED (`Shim::stopped`)"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Go on computing. Holds what the capture did, or `None` when the shim is inactive.
    Continue(Option<Captured>),
    /// A stop was requested (by the supervisor, by SIGTERM, or because the supervisor is
    /// gone) and this was the final snapshot: it is durable, or it failed (then
    /// [`Shim::wait_durable`] returns why; the supervisor was told). The program should clean
    /// up and end with [`EXIT_STOPPED`], for example with `return shim.stopped()` from `main`.
    /// The shim never ends the process itself.
    Stop,
}

/// A registered region as the shim tracks it.
pub(crate) struct RegionSlot {
    pub(crate) mem: Weak<RegionMem>,
    /// The snapshot whose entry equals the region as of its last capture (or restore): the
    /// base a delta builds on. `None`: the next capture copies the region whole.
    pub(crate) baseline: Option<u64>,
    /// Registered with the dirty tracker.
    pub(crate) tracked: bool,
    /// Chunks written after the last capture copied them and before their pages were
    /// protected again (sorted): the next delta takes them too.
    pub(crate) carried: Vec<usize>,
    /// Bytes the last capture copied of it as a delta (which spare buffer it takes next).
    pub(crate) copied: usize,
}

/// What [`Shim::snapshot`] did at the safe point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Captured {
    /// How long the program was paused (capture only; writing goes on in the background
    /// unless the capture mode is `sync`).
    pub pause: Duration,
}

/// The program's handle on the shim.
pub struct Shim {
    pub(crate) shared: Arc<Shared>,
    pub(crate) config: Config,
    pub(crate) job: Option<JobStore>,
    pub(crate) background: Option<Background>,
    pub(crate) restored: Option<Restored>,
    pub(crate) start: Start,
    pub(crate) regions: Vec<RegionSlot>,
    pub(crate) tracker: Option<Arc<DirtyTracker>>,
    /// Reads the written pages while the program copies (with a tracker, on more than one
    /// core).
    pub(crate) scanner: Option<Scanner>,
    pub(crate) buffers: Vec<Buffer>,
    pub(crate) ranges: Vec<Range<usize>>,
    /// Slots (indices into `regions`) captured in the snapshot being written.
    pub(crate) in_flight_regions: Vec<usize>,
    /// The capture memory budget of the last capture, in bytes (spare buffers stay within it).
    pub(crate) budget: usize,
    pub(crate) last: Option<std::result::Result<SnapshotReport, Arc<Error>>>,
    /// The output files this run opened (closed ones too: their lengths stay recorded).
    pub(crate) outputs: Vec<output::Shared>,
    /// A rank: the number of the part being captured (see [`supervise_store::epoch`]).
    pub(crate) part_seq: Option<u64>,
    /// Tests: make the next fork fail (after the dirty pages were collected).
    #[cfg(test)]
    pub(crate) fail_next_fork: bool,
    /// Tests: copy the parts of a capture beyond the budget, as a rank does.
    #[cfg(test)]
    pub(crate) copy_parts: bool,
}

impl Shim {
    /// Reads the environment, restores the newest complete snapshot (if any) and, under a
    /// supervisor, connects to it. Without a supervisor and without `SUPERVISE_STORE` this does
    /// nothing and the program runs unchanged. `default_job` names the job when
    /// `SUPERVISE_JOB` is unset.
    pub fn init(default_job: &str) -> Result<Self> {
        Self::open(Config::from_env(default_job)?)
    }

    /// Like [`init`](Self::init) with a configuration given in full instead of read from the
    /// environment.
    pub fn open(mut config: Config) -> Result<Self> {
        supervise_store::failpoint::init();
        let mut rank = None;
        let control = match &config.mode {
            Mode::Supervised(fd) => Some(Mutex::new(adopt_control_fd(*fd)?)),
            Mode::Ranked(link) => {
                // A rank restores exactly its part of the epoch the supervisor names.
                let joined = crate::rank::join(link)?;
                config.restore = match joined.resume {
                    Some((_, seq)) => RestoreFrom::Exact(seq),
                    None => RestoreFrom::Nothing,
                };
                rank = Some(RankState::new(
                    joined.rank,
                    joined.size,
                    joined.step,
                    joined.agree,
                ));
                Some(Mutex::new(joined.link))
            }
            _ => None,
        };
        let shared = Arc::new(Shared {
            pending: AtomicU32::new(0),
            beats: AtomicU64::new(0),
            available: AtomicU64::new(0),
            control,
            rank,
        });
        let mut shim = Self {
            shared,
            job: None,
            background: None,
            restored: None,
            start: Start::Fresh,
            config,
            regions: Vec::new(),
            tracker: None,
            scanner: None,
            buffers: Vec::new(),
            ranges: Vec::new(),
            in_flight_regions: Vec::new(),
            budget: usize::MAX,
            last: None,
            outputs: Vec::new(),
            part_seq: None,
            #[cfg(test)]
            fail_next_fork: false,
            #[cfg(test)]
            copy_parts: false,
        };
        if shim.config.mode == Mode::Off {
            return Ok(shim);
        }
        let job = Store::open(&shim.config.store)?.job(&shim.config.job)?;
        let ranked = shim.shared.rank.is_some();
        let (restored, damaged) = match choose_restore(&job, &shim.config.restore) {
            Ok(chosen) => chosen,
            Err(e) => {
                // A rank's part that does not verify: the supervisor sets its epoch aside and
                // the job starts again from an older one.
                if let (true, true, RestoreFrom::Exact(seq)) =
                    (ranked, e.is_corruption(), &shim.config.restore)
                {
                    shim.shared.send(&Event::RestoreDamaged {
                        seq: *seq,
                        why: e.to_string(),
                    });
                }
                return Err(e);
            }
        };
        if let Some(r) = &restored {
            let m = r.reader.manifest();
            shim.start = Start::Resumed {
                seq: m.seq,
                tag: m.tag.clone(),
            };
        }
        let writer = if ranked {
            let base = restored.as_ref().map(|r| r.reader.manifest().seq);
            let mut writer = SnapshotWriter::open_part(job.clone(), shim.config.attempt, base)?;
            if crate::claims::shared_with_others(&shim.shared) {
                writer.set_claims(Arc::new(crate::claims::RankClaims {
                    shared: Arc::clone(&shim.shared),
                }));
            }
            writer
        } else {
            SnapshotWriter::open(job.clone(), shim.config.attempt)?
        };
        let mut damaged = damaged;
        damaged.extend_from_slice(writer.set_aside());
        for d in &damaged {
            // The supervisor hears of these in the hello event below.
            log::warn!(
                "snapshot {} of job {} is damaged ({}); set aside",
                d.seq,
                job.name(),
                d.why
            );
        }
        shim.shared.note_available();
        let shared = Arc::clone(&shim.shared);
        let on_done = Arc::new(
            move |result: &std::result::Result<SnapshotReport, Arc<Error>>,
                  retention_failed: Option<&str>| {
                match result {
                    Ok(report) => {
                        if let Some(why) = retention_failed {
                            shared.warn(
                                WarningKind::RetentionFailed,
                                format!(
                                    "snapshot {} is durable, but retention failed: {why}",
                                    report.seq
                                ),
                            );
                        }
                        shared.send(&Event::SnapshotDone(report.clone()));
                    }
                    Err(error) => {
                        log::warn!("snapshot failed: {error} (earlier snapshots are intact)");
                        shared.send(&Event::SnapshotFailed {
                            error: error.to_string(),
                        });
                    }
                }
                shared.note_available();
            },
        );
        let shared = Arc::clone(&shim.shared);
        let job_name = job.name().to_owned();
        let on_damage = Arc::new(move |found: &[Finding], set_aside: &Result<Vec<u64>>| {
            let mut packs: Vec<DamagedPack> = Vec::new();
            for f in found {
                match packs.iter_mut().find(|p| p.pack == f.pack) {
                    Some(p) => p.records += 1,
                    None => packs.push(DamagedPack {
                        pack: f.pack.clone(),
                        records: 1,
                        first_offset: f.offset,
                    }),
                }
            }
            let why = found.first().map(|f| f.why.clone()).unwrap_or_default();
            if let Err(e) = set_aside {
                shared.warn(
                        WarningKind::SetAsideFailed,
                        format!(
                            "scrub: job {job_name}: {} damaged records ({why}); cannot set aside the snapshots that use them: {e}",
                            found.len()
                        ),
                    );
            }
            shared.send(&Event::RecordsDamaged {
                packs,
                why,
                set_aside: set_aside.as_ref().cloned().unwrap_or_default(),
            });
        });
        shim.background = Some(Background::spawn(
            writer,
            shim.config.retention(),
            // A rank's store is shared with the other ranks: the supervisor looks after it.
            if ranked { None } else { shim.config.scrub },
            on_done,
            on_damage,
        )?);
        shim.tracker = match shim.config.capture {
            _ if !shim.config.track_writes => None,
            CaptureMode::Auto | CaptureMode::Dirty | CaptureMode::Fork => match DirtyTracker::new()
            {
                Ok(t) => Some(Arc::new(t)),
                Err(e) => {
                    if shim.config.capture == CaptureMode::Dirty {
                        shim.shared.warn(
                            WarningKind::NoDirtyTracking,
                            format!("no dirty-page tracking here ({e}); regions are copied whole"),
                        );
                    }
                    None
                }
            },
            CaptureMode::Copy | CaptureMode::Sync => None,
        };
        // On one core the scanner would only take turns with the program.
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        if shim.tracker.is_some() && cores > 1 {
            shim.scanner = Scanner::spawn().ok();
        }
        shim.restored = restored;
        shim.job = Some(job);
        shim.install_signal_handlers()?;
        let (resumed_from, tag) = match &shim.start {
            Start::Fresh => (None, None),
            Start::Resumed { seq, tag } => (Some(*seq), tag.clone()),
        };
        shim.shared.send(&Event::Hello {
            pid: std::process::id(),
            resumed_from,
            tag,
            damaged,
            capture: shim.capture_mode().to_owned(),
        });
        crate::channel::take_back_stderr();
        shim.spawn_control_thread()?;
        Ok(shim)
    }

    /// How this run started: fresh or from which snapshot.
    pub fn start(&self) -> &Start {
        &self.start
    }

    /// True when the shim is active (under a supervisor or with a local store).
    pub fn is_active(&self) -> bool {
        self.background.is_some()
    }

    /// The capture strategy in effect: "dirty", "copy", "fork", "sync", or "off".
    pub fn capture_mode(&self) -> &'static str {
        match (&self.background, &self.tracker, self.config.capture) {
            (None, _, _) => "off",
            (_, _, CaptureMode::Sync) => "sync",
            (_, _, CaptureMode::Fork) => "fork",
            (_, Some(_), _) => "dirty",
            _ => "copy",
        }
    }

    /// Allocates a region of `len` elements of `T` under the entry name `name`, restored from
    /// the snapshot this run resumes from (if it has the entry; otherwise zero-filled). The
    /// region is part of every snapshot until it is dropped; where the kernel allows, a
    /// snapshot copies only the 64 KiB chunks of it written since the last one.
    pub fn region<T: Element>(&mut self, name: &str, len: usize) -> Result<Region<T>> {
        self.new_region(name, len, None)
    }

    /// Like [`region`](Self::region), for an array of `shape` (C order, outermost first; the
    /// region holds the product of the dimensions): each snapshot records the shape, so
    /// `supervise restore --to` writes the entry as a `.npy` file, and a resume that asks for
    /// another shape than the snapshot holds is [`Error::ShapeMismatch`] (a shape unknown to
    /// the snapshot, one taken by [`region`](Self::region), is taken as given).
    pub fn array<T: Element>(&mut self, name: &str, shape: &[usize]) -> Result<Region<T>> {
        let len = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| Error::BadArray {
                name: name.to_owned(),
                why: format!("shape {shape:?} has more elements than memory holds"),
            })?;
        let wanted = crate::capture::shape_of(name, shape)?;
        if let Some(restored) = &self.restored {
            let m = restored.reader.manifest();
            // The same elements in another shape; other differences (size, element type) are
            // what the restore itself reports.
            let same_elements = m.entry(name).is_some_and(|e| {
                e.kind.describe() == format!("[{}] slice", T::NAME)
                    && e.len == (len as u64).saturating_mul(std::mem::size_of::<T>() as u64)
            });
            if let Some(stored) = m.array_shape(name)
                && stored.shape != wanted
                && same_elements
            {
                let e = Error::ShapeMismatch {
                    name: name.to_owned(),
                    seq: m.seq,
                    stored: stored.shape.clone(),
                    wanted,
                };
                self.report_mismatch(&e, 0);
                return Err(e);
            }
        }
        self.new_region(name, len, Some(wanted))
    }

    /// The restored snapshot's manifest (its entries, their kinds and array shapes), or `None`
    /// on a fresh start.
    pub fn resumed_manifest(&self) -> Option<&supervise_store::format::Manifest> {
        self.restored.as_ref().map(|r| r.reader.manifest())
    }

    fn new_region<T: Element>(
        &mut self,
        name: &str,
        len: usize,
        shape: Option<Vec<u64>>,
    ) -> Result<Region<T>> {
        supervise_store::name::validate("entry", name)?;
        if self
            .regions
            .iter()
            .any(|s| s.mem.upgrade().is_some_and(|m| m.name == name))
        {
            return Err(Error::DuplicateEntry {
                name: name.to_owned(),
            });
        }
        let size = std::mem::size_of::<T>();
        let bytes = len.checked_mul(size).ok_or_else(|| Error::RegionTooLarge {
            name: name.to_owned(),
            len,
            elem_size: size,
        })?;
        let kind = EntryKind::Slice {
            elem: T::NAME.to_owned(),
            elem_size: size as u32,
        };
        // A staged entry of this name and kind is the region's memory as it is.
        let staged = self
            .restored
            .as_mut()
            .and_then(|r| r.staged.remove(name))
            .filter(|m| m.kind == kind && m.bytes == bytes)
            .and_then(|mut mem| {
                let m = Arc::get_mut(&mut mem)?;
                m.shuffle = size as u8;
                m.shape = shape.clone();
                Some(mem)
            });
        let (mem, mut baseline) = match staged {
            Some(mem) => (mem, self.resumed_manifest().map(|m| m.seq)),
            None => (RegionMem::new(name, kind, bytes, size as u8, shape)?, None),
        };
        if let Some(restored) = self.restored.as_ref().filter(|_| baseline.is_none()) {
            let seq = restored.reader.manifest().seq;
            match restored
                .reader
                .slice_into(name, T::NAME, mem.bytes_mut_unshared())
            {
                Ok(true) => baseline = Some(seq),
                Ok(false) => {}
                Err(e) if e.is_corruption() => return Err(self.damaged_after_open(seq, e)),
                Err(e) => {
                    self.report_mismatch(&e, bytes as u64);
                    return Err(e);
                }
            }
        }
        // A restored region is protected now: it must be tracked from its restored content on.
        // A fresh one is protected by its first (whole) capture, so the program's first fill
        // neither faults nor splits huge pages.
        let tracked = match &self.tracker {
            Some(t) => match t.register(mem.addr(), mem.mapped, baseline.is_some()) {
                Ok(()) => true,
                Err(e) => {
                    self.shared.warn(
                        WarningKind::RegionUntracked,
                        format!("cannot track writes to region {name:?} ({e}); it is copied whole"),
                    );
                    false
                }
            },
            None => false,
        };
        if self.is_active() {
            self.regions.push(RegionSlot {
                mem: Arc::downgrade(&mem),
                baseline,
                tracked,
                carried: Vec::new(),
                copied: 0,
            });
        }
        Ok(Region::new(mem, len))
    }

    /// The typed value `name` from the restored snapshot; `None` on a fresh start or if the
    /// snapshot has no such entry.
    pub fn load<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        let Some(bytes) = self.restored.as_ref().and_then(|r| r.values.get(name)) else {
            return Ok(None);
        };
        serde_json::from_slice(bytes)
            .map(Some)
            .map_err(|source| Error::Serde {
                name: name.to_owned(),
                source,
            })
    }

    /// Fills `dest` with the raw slice `name` from the restored snapshot, verifying every chunk.
    /// Returns `false` (leaving `dest` alone) on a fresh start or if there is no such entry. A
    /// size or type that differs from the snapshot's is an error naming both. The whole
    /// snapshot was verified when the shim opened it (a damaged one is set aside there, and an
    /// older one restored in its place); data damaged since then is
    /// [`Error::RestoreDamaged`]: the snapshot is set aside and the program must start again.
    pub fn load_slice<T: Element>(&mut self, name: &str, dest: &mut [T]) -> Result<bool> {
        self.load_raw_into(name, T::NAME, bytemuck::cast_slice_mut(dest))
    }

    /// [`load_slice`](Self::load_slice) for a caller that knows the element type only by its
    /// name (`elem`, as the manifest records it, e.g. `"f64"`): `dest` is the entry's bytes.
    pub fn load_raw_into(&mut self, name: &str, elem: &str, dest: &mut [u8]) -> Result<bool> {
        // A staged entry of this type and size: copied from (already verified) and freed as
        // it goes, so the staged copy and the program's add up to little more than one.
        if let Some(mut mem) = self.restored.as_mut().and_then(|r| r.staged.remove(name))
            && matches!(&mem.kind, EntryKind::Slice { elem: e, .. } if e == elem)
            && mem.bytes == dest.len()
            && let Some(staged) = Arc::get_mut(&mut mem)
        {
            staged.copy_out(dest);
            return Ok(true);
        }
        let Some(restored) = &self.restored else {
            return Ok(false);
        };
        match restored.reader.slice_into(name, elem, dest) {
            Err(e) if e.is_corruption() => {
                let seq = restored.reader.manifest().seq;
                Err(self.damaged_after_open(seq, e))
            }
            Err(e) => {
                self.report_mismatch(&e, dest.len() as u64);
                Err(e)
            }
            Ok(found) => Ok(found),
        }
    }

    /// Tells the supervisor when a restore failed on an entry's size, shape or element type:
    /// the program's parameters changed, which says nothing against the snapshot (an older one
    /// would not fit either). `wanted_bytes`: the size of the program's destination (for an
    /// element type; a size mismatch carries its own, and a shape's sizes agree).
    fn report_mismatch(&self, e: &Error, wanted_bytes: u64) {
        let seq = self.resumed_manifest().map_or(0, |m| m.seq);
        let stored_len = |name: &str| {
            self.resumed_manifest()
                .and_then(|m| m.entry(name))
                .map_or(0, |e| e.len)
        };
        let event = match e {
            Error::SizeMismatch {
                name,
                seq,
                stored,
                dest,
            } => Event::RestoreMismatch {
                seq: *seq,
                entry: name.clone(),
                stored_bytes: *stored,
                wanted_bytes: *dest,
                detail: None,
            },
            Error::ShapeMismatch {
                name,
                seq,
                stored,
                wanted,
            } => {
                let bytes = stored_len(name);
                Event::RestoreMismatch {
                    seq: *seq,
                    entry: name.clone(),
                    stored_bytes: bytes,
                    wanted_bytes: bytes,
                    detail: Some(MismatchDetail::Shape {
                        stored: stored.clone(),
                        wanted: wanted.clone(),
                    }),
                }
            }
            Error::WrongKind {
                name,
                found,
                wanted,
            } => Event::RestoreMismatch {
                seq,
                entry: name.clone(),
                stored_bytes: stored_len(name),
                wanted_bytes,
                detail: Some(MismatchDetail::Kind {
                    stored: found.clone(),
                    wanted: wanted.clone(),
                }),
            },
            _ => return,
        };
        self.shared.send(&event);
    }

    /// Opens the append-only output file `path` (relative to the working directory), whose
    /// length each snapshot records. Write to the returned [`Output`] (it buffers by itself;
    /// each snapshot writes its buffer out, then records the file's length and makes those
    /// bytes durable before the snapshot is).
    ///
    /// - Resumed from a snapshot that recorded the file: it is cut back to the recorded length,
    ///   so the file ends byte for byte as an uninterrupted run's. A file shorter than that is
    ///   [`Error::OutputShorter`], naming it and both lengths: never accepted silently.
    /// - A fresh start (or a snapshot taken before the file was opened): the file starts empty,
    ///   as in the uninterrupted run. Its former content is lost.
    /// - Without a supervisor and without `SUPERVISE_STORE`: a plain file opened for appending
    ///   (created if missing, never cut).
    ///
    /// Snapshots record the absolute path (the directory's canonical path joined with the file
    /// name, resolved now), so a resumed run finds its file wherever it starts from as long as
    /// it names the same file. A path may be opened once at a time; opened again after its
    /// [`Output`] was dropped, it goes on where it ended.
    pub fn output(&mut self, path: impl AsRef<std::path::Path>) -> Result<Output> {
        let shared = self.open_output(path.as_ref(), false)?;
        Ok(Output::new(shared))
    }

    /// [`output`](Self::output) for the C ABI: the file as a C stream (`FILE *`) that the shim
    /// flushes at every snapshot and closes at the end.
    pub fn output_stdio(&mut self, path: &std::path::Path) -> Result<*mut libc::FILE> {
        let shared = self.open_output(path, true)?;
        let out = output::lock(&shared);
        match out.sink {
            Sink::Stdio(fp) => Ok(fp),
            _ => Err(Error::Output {
                path: path.to_owned(),
                why: "is not a C stream".into(),
            }),
        }
    }

    fn open_output(&mut self, path: &std::path::Path, stdio: bool) -> Result<output::Shared> {
        let key = output::recorded_path(path)?;
        let existing = self
            .outputs
            .iter()
            .find(|o| output::lock(o).key == key)
            .cloned();
        if let Some(shared) = &existing
            && !matches!(output::lock(shared).sink, Sink::Closed)
        {
            return Err(Error::Output {
                path: path.to_owned(),
                why: "is open already".into(),
            });
        }
        let file = if self.is_active() {
            let (len, seq) = match &existing {
                Some(shared) => (output::lock(shared).len, None),
                None => {
                    let restored = self.restored.as_ref().map(|r| r.reader.manifest());
                    let mark = restored.and_then(|m| {
                        m.outputs
                            .iter()
                            .find(|o| o.path == key)
                            .map(|o| (o.len, Some(m.seq)))
                    });
                    mark.unwrap_or((0, None))
                }
            };
            output::open_at(&key, len, seq)?
        } else {
            output::open_append(std::path::Path::new(&key))?
        };
        let len = file
            .metadata()
            .map_err(supervise_store::error::io_err("stat output", path))?
            .len();
        let sink = if stdio {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
            // SAFETY: dup and fdopen take an open descriptor and a NUL-terminated mode; the
            // new descriptor belongs to the stream from here on (or is closed on failure).
            let fp = unsafe {
                let copy = libc::dup(fd);
                let fp = if copy >= 0 {
                    libc::fdopen(copy, c"a".as_ptr())
                } else {
                    std::ptr::null_mut()
                };
                if fp.is_null() && copy >= 0 {
                    libc::close(copy);
                }
                fp
            };
            if fp.is_null() {
                return Err(Error::Io {
                    op: "open a C stream on output",
                    path: path.to_owned(),
                    source: std::io::Error::last_os_error(),
                });
            }
            Sink::Stdio(fp)
        } else {
            Sink::Buffer(Vec::new())
        };
        let state = OutputFile {
            key,
            file: Some(Arc::new(file)),
            len,
            sink,
        };
        Ok(match existing {
            Some(shared) => {
                *output::lock(&shared) = state;
                shared
            }
            None => {
                let shared = Arc::new(Mutex::new(state));
                self.outputs.push(Arc::clone(&shared));
                shared
            }
        })
    }

    /// At a safe point: writes out what the program wrote to its output files and notes their
    /// lengths for the snapshot.
    fn outputs_at_safe_point(&mut self) -> Result<OutputsAt> {
        let mut at = OutputsAt::default();
        for shared in &self.outputs {
            let mut out = output::lock(shared);
            out.flush()?;
            at.marks.push(out.mark());
            if let Some(file) = &out.file {
                at.files
                    .push((std::path::PathBuf::from(&out.key), Arc::clone(file)));
            }
        }
        // Files the restored snapshot recorded that this run has not opened (yet) keep their
        // marks: a later resume must still cut them to that length, not start them empty.
        if let Some(restored) = &self.restored {
            for mark in &restored.reader.manifest().outputs {
                if !at.marks.iter().any(|m| m.path == mark.path) {
                    at.marks.push(mark.clone());
                }
            }
        }
        Ok(at)
    }

    /// Data of the restored snapshot found damaged after the program was given some of it:
    /// sets the snapshot aside, tells the supervisor, and returns the error that tells the
    /// program to start again (the next start restores an older snapshot).
    fn damaged_after_open(&self, seq: u64, err: Error) -> Error {
        let Some(job) = &self.job else { return err };
        if let Err(e) = job.quarantine(seq) {
            return e;
        }
        let why = err.to_string();
        self.shared.send(&Event::RestoreDamaged {
            seq,
            why: why.clone(),
        });
        Error::RestoreDamaged {
            job: job.name().to_owned(),
            seq,
            why,
        }
    }

    /// True when a snapshot is due: call it at every safe point. When nothing is pending this
    /// is one relaxed atomic load.
    #[inline]
    pub fn due(&self) -> bool {
        self.shared.due()
    }

    /// A handle that answers [`Shim::due`] without holding the shim, for callers that poll
    /// from code that cannot borrow it (the C ABI's lock-free `sv_due`).
    pub fn due_poll(&self) -> DuePoll {
        DuePoll {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Takes a snapshot now. `fill` adds typed values and slices (copied at once); every
    /// registered [`Region`] is captured too (only its written chunks, with dirty tracking).
    /// The snapshot is then written durably in the background while the program goes on
    /// (`SUPERVISE_CAPTURE=sync` waits instead); its figures go to the supervisor and to
    /// [`wait_durable`](Self::wait_durable). Returns [`Next::Continue`] with the pause (or
    /// `None` when the shim is inactive). At most one snapshot is written at a time: a new one
    /// first waits for the last. If the supervisor asked the program to stop (or it got
    /// SIGTERM, or lost its supervisor), this is the final snapshot: the call returns
    /// [`Next::Stop`] once it is durable (or failed), and the program should clean up and end
    /// with [`EXIT_STOPPED`] (see [`stopped`](Self::stopped)).
    pub fn snapshot<F>(&mut self, tag: Option<&str>, fill: F) -> Result<Next>
    where
        F: FnOnce(&mut Capture<'_>) -> Result<()>,
    {
        let pending = self.shared.pending.fetch_and(!SNAP, Ordering::AcqRel);
        self.release_staged();
        if self.background.is_none() {
            return Ok(Next::Continue(None));
        }
        let started = Instant::now();
        self.part_seq = None;
        let mut stop_after_part = false;
        let mut unpublished = Vec::new();
        if let Some(rank) = &self.shared.rank {
            // A rank captures only its part of an epoch, at the safe point the supervisor
            // named; alone (its supervisor gone) it stops without a snapshot of its own.
            let Some(aim) = rank.take_due(&self.shared.pending) else {
                return Ok(if pending & STOP != 0 || self.should_stop() {
                    Next::Stop
                } else {
                    Next::Continue(None)
                });
            };
            self.part_seq = Some(supervise_store::epoch::part_seq(aim.epoch, rank.rank));
            stop_after_part = aim.stop;
            unpublished = rank.take_unpublished();
        }
        self.settle();
        // After the settle, which makes the part just written each region's base: a part of
        // an epoch that was not published is no base (it is removed).
        for slot in &mut self.regions {
            let epoch = slot
                .baseline
                .and_then(supervise_store::epoch::part_of)
                .map(|(e, _)| e);
            if epoch.is_some_and(|e| unpublished.contains(&e)) {
                slot.baseline = None;
            }
        }
        if self
            .background
            .as_ref()
            .is_some_and(Background::take_rebase)
        {
            // The scrub found a damaged record that a base may use: hash everything anew.
            for slot in &mut self.regions {
                slot.baseline = None;
            }
        }
        let stop = stop_after_part
            || pending & STOP != 0
            || self.shared.pending.load(Ordering::SeqCst) & STOP != 0;
        let handed_over = self.outputs_at_safe_point().and_then(|outputs| {
            if self.fork_wanted() {
                self.capture_forked(tag, fill, started, outputs)
                    .map(|work| (work, None))
            } else {
                self.capture(tag, fill, started, outputs)
                    .map(|(task, feed)| (Work::Capture(Box::new(task)), feed))
            }
        });
        let (work, feed) = match handed_over {
            Ok(work) => work,
            Err(e) => {
                // Regions already captured had their written pages collected (a forked capture
                // protected them again; others took their carried chunks): those writes are in
                // no snapshot now, so the regions are taken whole next time.
                for idx in self.in_flight_regions.drain(..) {
                    if let Some(slot) = self.regions.get_mut(idx) {
                        slot.baseline = None;
                    }
                }
                self.shared.send(&Event::SnapshotFailed {
                    error: e.to_string(),
                });
                if stop {
                    self.shared.warn(
                        WarningKind::FinalSnapshotFailed,
                        format!("final snapshot failed ({e}); stopping anyway"),
                    );
                    self.last = Some(Err(Arc::new(e)));
                    return Ok(Next::Stop);
                }
                return Err(e);
            }
        };
        let (paused, pause_rx) = std::sync::mpsc::channel();
        if let Some(background) = self.background.as_mut() {
            background.submit(work, pause_rx);
        }
        if let Some(feed) = feed {
            feed.run();
        }
        let pause = started.elapsed();
        let _ = paused.send(pause);
        if stop || self.config.capture == CaptureMode::Sync {
            self.settle();
        }
        if stop {
            if let Some(Err(e)) = &self.last {
                self.shared.warn(
                    WarningKind::FinalSnapshotFailed,
                    format!("final snapshot failed ({e}); stopping anyway"),
                );
            }
            return Ok(Next::Stop);
        }
        Ok(Next::Continue(Some(Captured { pause })))
    }

    /// A rank that agrees on epochs itself (`Config::set_agreement`): the epoch the supervisor
    /// offers, and whether it is a final one; `None` when none is offered (one atomic load);
    /// `(0, true)` when the supervisor is gone: stop, with no epoch. It is the safe point's
    /// liveness beat too.
    /// The ranks agree (an `MPI_Allreduce` of the largest offered) and each calls
    /// [`snapshot_epoch`](Self::snapshot_epoch) with the agreed epoch at the same iteration.
    pub fn epoch_offered(&self) -> Option<(u64, bool)> {
        self.shared.epoch_offered()
    }

    /// Takes this rank's part of `epoch` now (see [`epoch_offered`](Self::epoch_offered));
    /// with `stop`, the final one: returns [`Next::Stop`] once it is durable. A program that
    /// is no rank agreeing on epochs gets [`Next::Continue`]`(None)`.
    pub fn snapshot_epoch<F>(
        &mut self,
        epoch: u64,
        stop: bool,
        tag: Option<&str>,
        fill: F,
    ) -> Result<Next>
    where
        F: FnOnce(&mut Capture<'_>) -> Result<()>,
    {
        if !self.agree_on_epoch(epoch, stop) {
            self.release_staged();
            // The ranks stop together even when this one has nothing to capture.
            return Ok(if stop && self.agrees_on_epochs() {
                Next::Stop
            } else {
                Next::Continue(None)
            });
        }
        self.snapshot(tag, fill)
    }

    /// Frees the restored entries staged at start that no region or load took: by the first
    /// snapshot the program has asked for all it needs (one asked for later is decoded from
    /// the store then).
    fn release_staged(&mut self) {
        if let Some(restored) = &mut self.restored {
            restored.staged.clear();
        }
    }

    /// True for a rank that agrees on epochs itself (`Config::set_agreement`).
    pub fn agrees_on_epochs(&self) -> bool {
        self.shared.rank.as_ref().is_some_and(|r| r.agree)
    }

    /// Marks `epoch` (agreed by the ranks) as the one the next [`snapshot`](Self::snapshot)
    /// takes this rank's part of; false (and nothing marked) for a program that is no rank
    /// agreeing on epochs, epoch 0 (a stop with no epoch: the supervisor is gone), or an
    /// epoch this rank took already or that ended. [`snapshot_epoch`](Self::snapshot_epoch) is both in
    /// one call; the C ABI's `sv_checkpoint_epoch` uses this.
    pub fn agree_on_epoch(&self, epoch: u64, stop: bool) -> bool {
        match self.shared.rank.as_ref().filter(|r| r.agree) {
            Some(rank) if epoch > 0 => rank.take_agreed(epoch, stop),
            _ => false,
        }
    }

    /// True once a stop was requested (by the supervisor, by SIGTERM, or because the
    /// supervisor is gone): the next [`snapshot`](Self::snapshot) is the final one and returns
    /// [`Next::Stop`]. For programs that want to stop without one more snapshot, or that check
    /// between safe points. One atomic load.
    pub fn should_stop(&self) -> bool {
        self.shared.pending.load(Ordering::Acquire) & STOP != 0
    }

    /// Ends the shim's work after [`Next::Stop`] and returns the exit code that tells the
    /// supervisor the program stopped cleanly and can be resumed ([`EXIT_STOPPED`]): waits for
    /// a snapshot still being written and writes out the output files (a failure there is
    /// logged through the `log` facade: the program stops either way). `return
    /// shim.stopped();` from `main` after the program's own clean-up.
    pub fn stopped(self) -> std::process::ExitCode {
        if let Err(e) = self.finish() {
            log::warn!("stopping: {e}");
        }
        std::process::ExitCode::from(EXIT_STOPPED as u8)
    }

    /// Waits until the last snapshot is durable and returns its figures (`None` if none was
    /// taken), or the reason it failed.
    pub fn wait_durable(&mut self) -> Result<Option<SnapshotReport>> {
        self.settle();
        match &self.last {
            None => Ok(None),
            Some(Ok(report)) => Ok(Some(report.clone())),
            Some(Err(e)) => Err(Error::Background(Arc::clone(e))),
        }
    }

    /// Ends the shim's work: waits for a snapshot still being written. Call it when the
    /// computation is complete.
    /// Output files still open are written out (their errors returned here) and stay open.
    pub fn finish(mut self) -> Result<()> {
        self.settle();
        for shared in &self.outputs {
            output::lock(shared).flush()?;
        }
        Ok(())
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        self.settle();
        // C streams are the shim's to close; a Rust `Output` closes when it is dropped.
        for shared in &self.outputs {
            let mut out = output::lock(shared);
            if matches!(out.sink, Sink::Stdio(_)) {
                let _ = out.close();
            }
        }
    }
}
/// What [`Shim::due`] reads, held apart from the shim: see [`Shim::due_poll`].
pub struct DuePoll {
    shared: Arc<Shared>,
}

impl DuePoll {
    /// True when a snapshot is due, as [`Shim::due`].
    #[inline]
    pub fn due(&self) -> bool {
        self.shared.due()
    }

    /// The epoch offered to a rank that agrees on epochs itself, as [`Shim::epoch_offered`].
    pub fn epoch_offered(&self) -> Option<(u64, bool)> {
        self.shared.epoch_offered()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_request_returns_stop_after_the_final_snapshot_and_never_exits() {
        let dir = tempfile::tempdir().unwrap();
        let mut shim = Shim::open(Config::local(dir.path().join("store"), "t")).unwrap();
        assert!(!shim.should_stop());
        assert!(matches!(
            shim.snapshot(None, |s| s.value("v", &1)).unwrap(),
            Next::Continue(Some(_))
        ));
        // What SIGTERM, a supervisor's stop request or its loss does.
        shim.shared.pending.fetch_or(SNAP | STOP, Ordering::SeqCst);
        assert!(shim.due() && shim.should_stop());
        assert_eq!(
            shim.snapshot(None, |s| s.value("v", &2)).unwrap(),
            Next::Stop
        );
        // Still here: the final snapshot is durable and the program decides when to end.
        assert_eq!(shim.wait_durable().unwrap().unwrap().seq, 2);
        assert!(shim.should_stop());
        assert_eq!(
            format!("{:?}", shim.stopped()),
            format!("{:?}", std::process::ExitCode::from(EXIT_STOPPED as u8))
        );
    }
}
