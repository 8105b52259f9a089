//! The shim as the program sees it: [`Shim::init`] at start (restore), [`Shim::due`] at every
//! safe point (one atomic load), [`Shim::snapshot`] when due.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::capture::{
    Background, Buffer, Capture, CaptureTask, Item, OutputsAt, Work, empty_buffer,
};
use crate::channel::{SNAP, STOP, Shared, adopt_control_fd, control_loop};
use crate::dirty::DirtyTracker;
use crate::output::{self, Output, OutputFile, Sink};
use crate::region::{Region, RegionMem};
use crate::restore::{Restored, choose_restore};
use supervise_store::config::{CaptureMode, Config, Mode};
use supervise_store::control::{DamagedPack, Event, WarningKind};
use supervise_store::error::{Error, Result};
use supervise_store::format::{CHUNK_SIZE, EntryKind};
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
struct RegionSlot {
    mem: Weak<RegionMem>,
    /// The snapshot whose entry equals the region as of its last capture (or restore): the
    /// base a delta builds on. `None`: the next capture copies the region whole.
    baseline: Option<u64>,
    /// Registered with the dirty tracker.
    tracked: bool,
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
    shared: Arc<Shared>,
    config: Config,
    job: Option<JobStore>,
    background: Option<Background>,
    restored: Option<Restored>,
    start: Start,
    regions: Vec<RegionSlot>,
    tracker: Option<DirtyTracker>,
    buffers: Vec<Buffer>,
    ranges: Vec<Range<usize>>,
    /// Slots (indices into `regions`) captured in the snapshot being written.
    in_flight_regions: Vec<usize>,
    last: Option<std::result::Result<SnapshotReport, Arc<Error>>>,
    /// The output files this run opened (closed ones too: their lengths stay recorded).
    outputs: Vec<output::Shared>,
    /// Tests: make the next fork fail (after the dirty pages were collected).
    #[cfg(test)]
    fail_next_fork: bool,
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
    pub fn open(config: Config) -> Result<Self> {
        supervise_store::failpoint::init();
        let control = match config.mode {
            Mode::Supervised(fd) => Some(Mutex::new(adopt_control_fd(fd)?)),
            _ => None,
        };
        let shared = Arc::new(Shared {
            pending: AtomicU32::new(0),
            beats: AtomicU64::new(0),
            control,
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
            buffers: Vec::new(),
            ranges: Vec::new(),
            in_flight_regions: Vec::new(),
            last: None,
            outputs: Vec::new(),
            #[cfg(test)]
            fail_next_fork: false,
        };
        if shim.config.mode == Mode::Off {
            return Ok(shim);
        }
        let job = Store::open(&shim.config.store)?.job(&shim.config.job)?;
        let (restored, damaged) = choose_restore(&job, &shim.config.restore)?;
        if let Some(r) = &restored {
            let m = r.reader.manifest();
            shim.start = Start::Resumed {
                seq: m.seq,
                tag: m.tag.clone(),
            };
        }
        let writer = SnapshotWriter::open(job.clone(), shim.config.attempt)?;
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
            shim.config.scrub,
            on_done,
            on_damage,
        )?);
        shim.tracker = match shim.config.capture {
            _ if !shim.config.track_writes => None,
            CaptureMode::Auto | CaptureMode::Dirty | CaptureMode::Fork => match DirtyTracker::new()
            {
                Ok(t) => Some(t),
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

    fn install_signal_handlers(&self) -> Result<()> {
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

    fn spawn_control_thread(&self) -> Result<()> {
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
        let mem = RegionMem::new(name, kind, bytes, size as u8)?;
        let mut baseline = None;
        if let Some(restored) = &self.restored {
            let seq = restored.reader.manifest().seq;
            match restored
                .reader
                .slice_into(name, T::NAME, mem.bytes_mut_unshared())
            {
                Ok(true) => baseline = Some(seq),
                Ok(false) => {}
                Err(e) if e.is_corruption() => return Err(self.damaged_after_open(seq, e)),
                Err(e) => {
                    self.report_mismatch(&e);
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
        let Some(restored) = &self.restored else {
            return Ok(false);
        };
        match restored
            .reader
            .slice_into(name, T::NAME, bytemuck::cast_slice_mut(dest))
        {
            Err(e) if e.is_corruption() => {
                let seq = restored.reader.manifest().seq;
                Err(self.damaged_after_open(seq, e))
            }
            Err(e) => {
                self.report_mismatch(&e);
                Err(e)
            }
            Ok(found) => Ok(found),
        }
    }

    /// Tells the supervisor when a restore failed on an entry's size: the program's parameters
    /// changed, which says nothing against the snapshot (an older one would not fit either).
    fn report_mismatch(&self, e: &Error) {
        if let Error::SizeMismatch {
            name,
            seq,
            stored,
            dest,
        } = e
        {
            self.shared.send(&Event::RestoreMismatch {
                seq: *seq,
                entry: name.clone(),
                stored_bytes: *stored,
                wanted_bytes: *dest,
            });
        }
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
        if self.background.is_none() {
            return Ok(Next::Continue(None));
        }
        let started = Instant::now();
        self.settle();
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
        let stop = pending & STOP != 0 || self.shared.pending.load(Ordering::SeqCst) & STOP != 0;
        let handed_over = self.outputs_at_safe_point().and_then(|outputs| {
            if self.fork_wanted() {
                self.capture_forked(tag, fill, started, outputs)
            } else {
                self.capture(tag, fill, started, outputs).map(Work::Capture)
            }
        });
        let work = match handed_over {
            Ok(work) => work,
            Err(e) => {
                // Regions already captured had their written pages collected (and protected
                // again): those writes are in no snapshot now, so they are taken whole next time.
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
        let pause = started.elapsed();
        if let Some(background) = self.background.as_mut() {
            background.submit(work);
        }
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

    /// Whether this snapshot should be taken by a forked process: always in fork mode; in auto
    /// mode when regions must be copied whole and that is a lot to copy.
    fn fork_wanted(&self) -> bool {
        match self.config.capture {
            CaptureMode::Fork => true,
            CaptureMode::Auto => {
                let whole: usize = self
                    .regions
                    .iter()
                    .filter(|slot| {
                        !(slot.tracked && slot.baseline.is_some() && self.tracker.is_some())
                    })
                    .filter_map(|slot| slot.mem.upgrade().map(|m| m.bytes))
                    .sum();
                whole >= FORK_ABOVE
            }
            _ => false,
        }
    }

    /// Takes the snapshot in a forked copy-on-write process: here only the dirty pages are
    /// collected (and tracking reset); the child runs `fill`, reads regions in place, writes
    /// the snapshot with a writer of its own and reports through a pipe.
    fn capture_forked<F>(
        &mut self,
        tag: Option<&str>,
        fill: F,
        started: Instant,
        outputs: OutputsAt,
    ) -> Result<Work>
    where
        F: FnOnce(&mut Capture<'_>) -> Result<()>,
    {
        self.regions.retain(|slot| slot.mem.strong_count() > 0);
        let mut plan: Vec<(Arc<RegionMem>, Option<Delta>)> = Vec::new();
        self.in_flight_regions.clear();
        for idx in 0..self.regions.len() {
            let Some(mem) = self.regions[idx].mem.upgrade() else {
                continue;
            };
            let delta = self.collect_dirty(idx, &mem);
            plan.push((mem, delta));
            self.in_flight_regions.push(idx);
        }
        let job = self
            .job
            .clone()
            .ok_or_else(|| Error::Aborted("no store".into()))?;
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::Io {
                op: "create pipe for snapshot process",
                path: job.dir().to_owned(),
                source: e.into(),
            })?;
        #[cfg(test)]
        if std::mem::take(&mut self.fail_next_fork) {
            return Err(Error::Aborted("injected fork failure".into()));
        }
        let parent = std::process::id() as libc::pid_t;
        let (attempt, keep) = (self.config.attempt, self.config.retention());
        let origin = self.config.origin.clone();
        // SAFETY: the child only runs the snapshot code path (allocation, file I/O, thread
        // creation for hashing, all of which glibc keeps usable after fork) and the program's
        // `fill` closure, and leaves through `capture::leave_forked_child` (`_exit`). The shim
        // itself takes none of its locks and writes nothing to stdout or stderr there; what the
        // program's closure does is the program's (it should only add entries).
        match unsafe { nix::unistd::fork() } {
            Err(e) => Err(Error::Io {
                op: "fork snapshot process",
                path: job.dir().to_owned(),
                source: e.into(),
            }),
            Ok(nix::unistd::ForkResult::Parent { child }) => {
                drop(write);
                // In auto mode the next captures are deltas copied here: have a buffer for
                // them faulted in meanwhile, unless a spare one is big enough. (In fork mode
                // every capture forks and nothing is copied here.)
                let regions: usize = plan.iter().map(|(m, _)| m.bytes).sum();
                let want = (regions / 8).min(256 << 20);
                let spare = self.buffers.iter().map(Buffer::capacity).max().unwrap_or(0);
                let auto = self.config.capture == CaptureMode::Auto;
                Ok(Work::Forked {
                    pid: child.as_raw(),
                    report: std::fs::File::from(read),
                    warm: if auto && spare < want { want } else { 0 },
                })
            }
            Ok(nix::unistd::ForkResult::Child) => {
                drop(read);
                // The snapshot process must never outlive the program (a restarted program
                // would be a second writer): killed when its parent dies, and gone at once if
                // that happened already.
                let orphaned = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .is_err()
                    || nix::unistd::getppid().as_raw() != parent;
                if orphaned {
                    crate::capture::leave_forked_child(1);
                }
                let built = (|| {
                    let mut items = Vec::new();
                    let mut names: HashSet<String> =
                        plan.iter().map(|(m, _)| m.name.clone()).collect();
                    let mut buffers = Vec::new();
                    fill(&mut Capture {
                        items: &mut items,
                        buffers: &mut buffers,
                        names: &mut names,
                    })?;
                    for (mem, delta) in &plan {
                        items.push(match delta {
                            Some((base, dirty)) => Item::Delta {
                                name: mem.name.clone(),
                                base: *base,
                                data: copy_chunks(mem.bytes(), dirty),
                                dirty: dirty.clone(),
                                shuffle: mem.shuffle,
                            },
                            None => Item::Mapped {
                                name: mem.name.clone(),
                                kind: mem.kind.clone(),
                                addr: mem.addr(),
                                len: mem.bytes,
                                shuffle: mem.shuffle,
                            },
                        });
                    }
                    Ok(CaptureTask {
                        tag: tag.map(str::to_owned),
                        items,
                        started,
                        origin,
                        outputs,
                    })
                })();
                crate::capture::forked_child(job, attempt, keep, built, std::fs::File::from(write))
            }
        }
    }

    /// For a region with tracking and a base: the chunks written since the last collection
    /// (which protects them again). Otherwise `None`, after resetting the tracking, so the
    /// caller takes the region whole.
    fn collect_dirty(&mut self, idx: usize, mem: &RegionMem) -> Option<Delta> {
        let slot = &self.regions[idx];
        let tracker = self.tracker.as_ref().filter(|_| slot.tracked)?;
        if let Some(base) = slot.baseline {
            self.ranges.clear();
            match tracker.collect(mem.addr(), mem.mapped, &mut self.ranges) {
                Ok(()) => {
                    let len = mem.bytes;
                    let mut dirty: Vec<usize> = Vec::new();
                    for r in self.ranges.iter().filter(|r| r.start < len) {
                        let last = (r.end.min(len) - 1) / CHUNK_SIZE;
                        for chunk in r.start / CHUNK_SIZE..=last {
                            if dirty.last() != Some(&chunk) {
                                dirty.push(chunk);
                            }
                        }
                    }
                    return Some((base, dirty));
                }
                Err(e) => self.shared.warn(
                    WarningKind::RegionUntracked,
                    format!(
                        "dirty tracking failed for region {:?} ({e}); copying it whole",
                        mem.name
                    ),
                ),
            }
        }
        // Start tracking afresh from this whole copy.
        if let Err(e) = tracker.protect(mem.addr(), mem.mapped) {
            self.shared.warn(
                WarningKind::RegionUntracked,
                format!("cannot reset write tracking of region {:?} ({e})", mem.name),
            );
        }
        None
    }

    /// Copies what the snapshot needs; the program is paused for exactly this.
    fn capture<F>(
        &mut self,
        tag: Option<&str>,
        fill: F,
        started: Instant,
        outputs: OutputsAt,
    ) -> Result<CaptureTask>
    where
        F: FnOnce(&mut Capture<'_>) -> Result<()>,
    {
        self.regions.retain(|slot| slot.mem.strong_count() > 0);
        let mut names: HashSet<String> = self
            .regions
            .iter()
            .filter_map(|slot| slot.mem.upgrade().map(|m| m.name.clone()))
            .collect();
        let mut items = Vec::new();
        fill(&mut Capture {
            items: &mut items,
            buffers: &mut self.buffers,
            names: &mut names,
        })?;
        self.in_flight_regions.clear();
        for idx in 0..self.regions.len() {
            if let Some(mem) = self.regions[idx].mem.upgrade() {
                items.push(self.capture_region(idx, &mem));
                self.in_flight_regions.push(idx);
            }
        }
        Ok(CaptureTask {
            tag: tag.map(str::to_owned),
            items,
            started,
            origin: self.config.origin.clone(),
            outputs,
        })
    }

    /// Captures one region: its written chunks when they are tracked and a base exists,
    /// else all of it.
    fn capture_region(&mut self, idx: usize, mem: &RegionMem) -> Item {
        let delta = self.collect_dirty(idx, mem);
        // The largest spare buffer: a whole copy needs all of it.
        self.buffers.sort_by_key(Buffer::capacity);
        let mut data = self.buffers.pop().unwrap_or_else(empty_buffer);
        match delta {
            Some((base, dirty)) => {
                crate::capture::reserve_capture(&mut data, dirty.len() * CHUNK_SIZE);
                append_chunks(&mut data, mem.bytes(), &dirty);
                Item::Delta {
                    name: mem.name.clone(),
                    base,
                    dirty,
                    data,
                    shuffle: mem.shuffle,
                }
            }
            None => {
                crate::capture::reserve_capture(&mut data, mem.bytes);
                data.extend_from_slice(mem.bytes());
                Item::Whole {
                    name: mem.name.clone(),
                    kind: mem.kind.clone(),
                    data,
                    shuffle: mem.shuffle,
                }
            }
        }
    }

    /// Waits for the snapshot in flight and takes note of how it went: on success the
    /// captured regions have a new base; on failure they are copied whole next time.
    fn settle(&mut self) {
        let Some(outcome) = self.background.as_mut().and_then(Background::wait) else {
            return;
        };
        self.buffers
            .extend(outcome.buffers.into_iter().filter(|b| b.capacity() > 0));
        // Spare buffers beyond what a capture uses are only memory held: keep the largest few.
        if self.buffers.len() > MAX_SPARE_BUFFERS {
            self.buffers
                .sort_by_key(|b| std::cmp::Reverse(b.capacity()));
            self.buffers.truncate(MAX_SPARE_BUFFERS);
        }
        let base = outcome.result.as_ref().ok().map(|r| r.seq);
        for idx in self.in_flight_regions.drain(..) {
            if let Some(slot) = self.regions.get_mut(idx) {
                slot.baseline = base;
            }
        }
        self.last = Some(outcome.result);
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

/// Spare capture buffers kept between snapshots.
const MAX_SPARE_BUFFERS: usize = 16;

/// A region's delta: the base snapshot and the numbers of the chunks written since.
type Delta = (u64, Vec<usize>);

/// Whole region copies of at least this many bytes are taken by a forked process in auto mode
/// (below it, copying is cheaper than a fork and the copy-on-write faults that follow).
const FORK_ABOVE: usize = 64 << 20;

/// Appends the 64 KiB chunks numbered in `dirty` of `bytes` to `out`.
fn append_chunks(out: &mut Buffer, bytes: &[u8], dirty: &[usize]) {
    for &chunk in dirty {
        out.extend_from_slice(
            &bytes[chunk * CHUNK_SIZE..((chunk + 1) * CHUNK_SIZE).min(bytes.len())],
        );
    }
}

/// The chunks numbered in `dirty` of `bytes`, one after another.
fn copy_chunks(bytes: &[u8], dirty: &[usize]) -> Buffer {
    let mut out = empty_buffer();
    crate::capture::reserve_capture(&mut out, dirty.len() * CHUNK_SIZE);
    append_chunks(&mut out, bytes, dirty);
    out
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use supervise_store::reader::SnapshotReader;

    fn fork_shim(dir: &std::path::Path) -> Shim {
        let mut config = Config::local(dir.join("store"), "t");
        config.capture = CaptureMode::Fork;
        Shim::open(config).unwrap()
    }

    fn restored(dir: &std::path::Path, seq: u64, len: usize) -> Vec<u64> {
        let job = Store::open(dir.join("store")).unwrap().job("t").unwrap();
        let mut out = vec![0u64; len];
        SnapshotReader::open(&job, seq)
            .unwrap()
            .slice_into("r", "u64", bytemuck::cast_slice_mut(&mut out))
            .unwrap();
        out
    }

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

    #[test]
    fn writes_collected_by_a_failed_capture_are_in_the_next_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let mut shim = fork_shim(dir.path());
        let len = (8 << 20) / 8;
        let mut r = shim.region::<u64>("r", len).unwrap();
        r.fill(1);
        assert!(matches!(
            shim.snapshot(None, |_| Ok(())).unwrap(),
            Next::Continue(_)
        ));
        shim.wait_durable().unwrap();
        r[3 * 8192] = 7; // collected (and protected again) by the capture that fails
        shim.fail_next_fork = true;
        assert!(shim.snapshot(None, |_| Ok(())).is_err());
        r[100 * 8192] = 9;
        assert!(matches!(
            shim.snapshot(None, |_| Ok(())).unwrap(),
            Next::Continue(_)
        ));
        let report = shim.wait_durable().unwrap().unwrap();
        assert_eq!(restored(dir.path(), report.seq, len), &r[..]);
    }

    #[test]
    fn spare_buffers_stay_bounded_over_many_forked_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let mut shim = fork_shim(dir.path());
        let mut r = shim.region::<u64>("r", (64 << 20) / 8).unwrap();
        for round in 0..12u64 {
            r[(round as usize) * 8192] = round;
            assert!(matches!(
                shim.snapshot(None, |s| s.value("round", &round)).unwrap(),
                Next::Continue(_)
            ));
            shim.wait_durable().unwrap();
        }
        let held: usize = shim.buffers.iter().map(Buffer::capacity).sum();
        assert!(
            held < 1 << 20,
            "fork mode holds {held} bytes of spare buffers"
        );
    }
}
