//! Capture and background writing. At the program's safe point the shim only copies what the
//! snapshot needs into reusable buffers (values, slices, the dirty chunks of tracked regions)
//! and hands them to a writer thread, which hashes, compresses and writes them durably while
//! the program computes on.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aligned_vec::{AVec, ConstAlign};
use serde::Serialize;

use supervise_store::error::{Error, Result};
use supervise_store::format::{EntryKind, Manifest, Origin, OutputMark};
use supervise_store::name;
use supervise_store::scrub::{Finding, Scrubber};
use supervise_store::store::Retention;
use supervise_store::writer::{Element, SnapshotReport, SnapshotWriter};

/// A capture buffer: page-aligned. Regions are page-aligned too, and a copy whose destination
/// sits a few bytes past its source modulo 4 KiB runs 3-6x slower on x86 (loads falsely wait
/// on the stores just before them: "4K aliasing"); malloc's large blocks start 16 bytes into
/// a page, exactly that case. Measured: 10 MiB of dirty chunks 3.8-6 ms unaligned, 1.0-1.3 ms
/// aligned.
pub(crate) type Buffer = AVec<u8, ConstAlign<4096>>;

/// An empty capture buffer (allocates nothing).
pub(crate) fn empty_buffer() -> Buffer {
    AVec::new(0)
}

/// Makes room for `len` bytes in `buf`, asking for transparent huge pages on large buffers:
/// freshly touched memory is slow to fault in page by page, and capture buffers are only ever
/// copied into whole (unlike regions, whose writes are tracked page by page).
pub(crate) fn reserve_capture(buf: &mut Buffer, len: usize) {
    buf.clear();
    if buf.capacity() < len {
        *buf = AVec::with_capacity(0, len);
        if len >= 4 << 20 {
            let start = buf.as_mut_ptr() as usize;
            let aligned = (start + 4095) & !4095;
            let end = (start + len) & !4095;
            if end > aligned {
                // SAFETY: advice on whole pages inside the buffer's own allocation; it changes
                // how the pages are backed, never their contents.
                unsafe {
                    libc::madvise(
                        aligned as *mut libc::c_void,
                        end - aligned,
                        libc::MADV_HUGEPAGE,
                    )
                };
            }
        }
    }
}

/// One entry of a captured snapshot, owned.
pub(crate) enum Item {
    /// All the bytes of an entry.
    Whole {
        name: String,
        kind: EntryKind,
        data: Buffer,
        shuffle: u8,
    },
    /// A region read in place, in a forked snapshot process (whose memory nothing else writes).
    Mapped {
        name: String,
        kind: EntryKind,
        addr: usize,
        len: usize,
        shuffle: u8,
    },
    /// The chunks of a region that changed since snapshot `base`, one after another.
    Delta {
        name: String,
        base: u64,
        dirty: Vec<usize>,
        data: Buffer,
        shuffle: u8,
    },
}

impl Item {
    fn into_buffer(self) -> Buffer {
        match self {
            Item::Whole { data, .. } | Item::Delta { data, .. } => data,
            Item::Mapped { .. } => empty_buffer(),
        }
    }
}

/// A captured snapshot on its way to the writer thread.
pub(crate) struct CaptureTask {
    pub(crate) tag: Option<String>,
    pub(crate) items: Vec<Item>,
    pub(crate) started: Instant,
    /// What produced the snapshot.
    pub(crate) origin: Option<Origin>,
    /// The program's output files at the safe point (their bytes written out).
    pub(crate) outputs: OutputsAt,
}

/// The output files at a safe point: their marks for the manifest, and the files to fsync
/// before it is committed.
#[derive(Default)]
pub(crate) struct OutputsAt {
    pub(crate) marks: Vec<OutputMark>,
    pub(crate) files: Vec<(PathBuf, Arc<File>)>,
}

/// What the writer thread says about a capture task.
pub(crate) struct Outcome {
    /// The writer's own error on failure (shared: the program and the supervisor both see it).
    pub(crate) result: Result<SnapshotReport, Arc<Error>>,
    /// The task's buffers, back for reuse.
    pub(crate) buffers: Vec<Buffer>,
}

/// Called on the writer thread with each snapshot's outcome, and why retention failed after a
/// durable snapshot (if it did).
pub(crate) type OnDone =
    Arc<dyn Fn(&Result<SnapshotReport, Arc<Error>>, Option<&str>) + Send + Sync>;

/// Called on the writer thread with the damaged records a scrub slice found, and the snapshots
/// set aside because they use them (or why setting them aside failed).
pub(crate) type OnDamage = Arc<dyn Fn(&[Finding], &Result<Vec<u64>>) + Send + Sync>;

/// What a forked snapshot process reports through its pipe (as JSON): the snapshot's figures
/// or why it failed, and why retention failed after it (it prints nothing itself).
#[derive(serde::Serialize, serde::Deserialize)]
struct ForkedReport {
    result: Result<SnapshotReport, String>,
    retention_failed: Option<String>,
}

/// What the writer thread is given.
pub(crate) enum Work {
    /// A captured snapshot to write.
    Capture(CaptureTask),
    /// A forked process writes the snapshot; its report comes through the pipe. `warm`: bytes
    /// of buffer to fault in meanwhile for the next captures (a fork returns no buffers, and
    /// fresh memory is slow to fault in; better here than in the program's pause).
    Forked {
        pid: libc::pid_t,
        report: File,
        warm: usize,
    },
}

/// The writer thread and the channels to it.
pub(crate) struct Background {
    tasks: Option<Sender<Work>>,
    outcomes: Receiver<Outcome>,
    in_flight: bool,
    thread: Option<JoinHandle<()>>,
    /// Set by the writer thread when the scrub found damage.
    rebase: Arc<AtomicBool>,
}

impl Background {
    /// Starts the writer thread; `on_done` is called there with each outcome (to tell the
    /// supervisor at once). With a `scrub` period, the thread verifies stored records between
    /// snapshots (see [`supervise_store::scrub`]) and calls `on_damage` with the damaged ones it finds,
    /// after setting aside the snapshots that use it.
    pub(crate) fn spawn(
        mut writer: SnapshotWriter,
        keep: Retention,
        scrub: Option<Duration>,
        on_done: OnDone,
        on_damage: OnDamage,
    ) -> Result<Self> {
        let (tasks, task_rx) = channel::<Work>();
        let (out_tx, outcomes) = channel::<Outcome>();
        let rebase = Arc::new(AtomicBool::new(false));
        let doubt = Arc::clone(&rebase);
        let thread = std::thread::Builder::new()
            .name("supervise-writer".into())
            .spawn(move || {
                let mut scrubber = scrub.map(Scrubber::new);
                loop {
                    let work = match &mut scrubber {
                        None => match task_rx.recv() {
                            Ok(work) => work,
                            Err(_) => break,
                        },
                        Some(scrubber) => {
                            match task_rx.recv_timeout(scrubber.due_in(Instant::now())) {
                                Ok(work) => work,
                                Err(RecvTimeoutError::Timeout) => {
                                    let found = scrubber.run_due(writer.job());
                                    if !found.is_empty() {
                                        let records: Vec<_> = found
                                            .iter()
                                            .map(|f| (f.pack.clone(), f.offset, f.hash))
                                            .collect();
                                        let set_aside = writer.distrust(&records);
                                        // The regions' bases may use a damaged record: copy
                                        // them whole next time, so every chunk is hashed anew.
                                        doubt.store(true, Ordering::SeqCst);
                                        on_damage(&found, &set_aside);
                                    }
                                    continue;
                                }
                                Err(RecvTimeoutError::Disconnected) => break,
                            }
                        }
                    };
                    let (result, retention_failed, buffers) = match work {
                        Work::Capture(task) => {
                            let written = write_task(&mut writer, &keep, task);
                            (
                                written.result.map_err(Arc::new),
                                written.retention_failed,
                                written.buffers,
                            )
                        }
                        Work::Forked { pid, report, warm } => {
                            let mut buffers = Vec::new();
                            if warm > 0 {
                                let mut buffer = empty_buffer();
                                reserve_capture(&mut buffer, warm);
                                buffer.resize(warm, 0);
                                buffer.clear();
                                buffers.push(buffer);
                            }
                            let (result, retention_failed) = await_forked(&mut writer, pid, report);
                            (result, retention_failed, buffers)
                        }
                    };
                    on_done(&result, retention_failed.as_deref());
                    if out_tx.send(Outcome { result, buffers }).is_err() {
                        break;
                    }
                }
            })
            .map_err(|source| Error::Thread {
                name: "supervise-writer",
                source,
            })?;
        Ok(Self {
            tasks: Some(tasks),
            outcomes,
            in_flight: false,
            thread: Some(thread),
            rebase,
        })
    }

    /// True (once) when the scrub found a damaged record since the last call: the next
    /// capture must copy every region whole instead of building on a base that may use it.
    pub(crate) fn take_rebase(&self) -> bool {
        self.rebase.swap(false, Ordering::SeqCst)
    }

    /// Hands work to the writer. Call [`wait`](Self::wait) first if some is in flight.
    pub(crate) fn submit(&mut self, work: Work) {
        debug_assert!(!self.in_flight);
        if let Some(tasks) = &self.tasks
            && tasks.send(work).is_ok()
        {
            self.in_flight = true;
        }
    }

    /// Waits for the work in flight, if any.
    pub(crate) fn wait(&mut self) -> Option<Outcome> {
        if !self.in_flight {
            return None;
        }
        self.in_flight = false;
        self.outcomes.recv().ok()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.wait();
        drop(self.tasks.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Waits for a forked snapshot process: reads its report, reaps exactly that process (never
/// another child of the program), and reopens the writer on the store it changed. Returns the
/// outcome and why retention failed after it. The process's own error comes as text through
/// the pipe: [`Error::SnapshotFailed`].
fn await_forked(
    writer: &mut SnapshotWriter,
    pid: libc::pid_t,
    mut report: File,
) -> (Result<SnapshotReport, Arc<Error>>, Option<String>) {
    let mut text = String::new();
    let read = report.read_to_string(&mut text);
    let reaped = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
    let (result, retention_failed) = match serde_json::from_str::<ForkedReport>(&text) {
        Ok(r) => (r.result.map_err(Error::SnapshotFailed), r.retention_failed),
        Err(_) => {
            let why = match (read, reaped) {
                (Err(e), _) => format!("cannot read the snapshot process's report: {e}"),
                (_, Ok(nix::sys::wait::WaitStatus::Signaled(_, signal, _))) => {
                    format!(
                        "the snapshot process was killed by signal {}",
                        signal as i32
                    )
                }
                _ => "the snapshot process ended without a report".to_owned(),
            };
            (Err(Error::SnapshotFailed(why)), None)
        }
    };
    // It wrote (and applied retention to) the store behind this writer's back.
    match SnapshotWriter::open(writer.job().clone(), writer.attempt()) {
        Ok(fresh) => *writer = fresh,
        Err(e) => return (Err(Arc::new(e)), retention_failed),
    }
    (result.map_err(Arc::new), retention_failed)
}

/// The body of a forked snapshot process: write `task` with a writer of its own, send the
/// outcome through `report`, and leave without running the program's exit handlers.
pub(crate) fn forked_child(
    job_store: supervise_store::store::JobStore,
    attempt: u32,
    keep: Retention,
    task: Result<CaptureTask>,
    mut report: File,
) -> ! {
    let forked = match task.and_then(|task| {
        let mut writer = SnapshotWriter::open(job_store, attempt)?;
        Ok(write_task(&mut writer, &keep, task))
    }) {
        Ok(written) => ForkedReport {
            result: written.result.map_err(|e| e.to_string()),
            retention_failed: written.retention_failed,
        },
        Err(e) => ForkedReport {
            result: Err(e.to_string()),
            retention_failed: None,
        },
    };
    let text = serde_json::to_string(&forked).unwrap_or_default();
    let _ = report.write_all(text.as_bytes());
    drop(report);
    leave_forked_child(0)
}

/// Ends a forked snapshot process: the one place the shim ends a process. The forked process
/// is a copy of the program made only to write a snapshot, not the program itself: it must not
/// run the program's exit handlers, flush its stdio buffers a second time, or take a lock
/// another thread held at the fork. It prints nothing and takes no lock.
pub(crate) fn leave_forked_child(code: i32) -> ! {
    // SAFETY: `_exit` ends the calling process at once; it takes an integer and touches no
    // memory of the program.
    unsafe { libc::_exit(code) }
}

/// What writing one capture task gave.
struct Written {
    result: Result<SnapshotReport>,
    /// Why retention failed after the snapshot was durable.
    retention_failed: Option<String>,
    /// The task's buffers, back for reuse.
    buffers: Vec<Buffer>,
}

/// Writes a captured snapshot durably, then applies retention.
fn write_task(writer: &mut SnapshotWriter, keep: &Retention, task: CaptureTask) -> Written {
    let mut retention_failed = None;
    let mut base: Option<Manifest> = None;
    let result = (|| -> Result<SnapshotReport> {
        let mut builder = writer.begin_at(task.tag.as_deref(), task.started);
        for item in &task.items {
            match item {
                Item::Whole {
                    name,
                    kind,
                    data,
                    shuffle,
                } => builder.add_whole(name, kind.clone(), data, *shuffle)?,
                Item::Mapped {
                    name,
                    kind,
                    addr,
                    len,
                    shuffle,
                } => {
                    // SAFETY: only built in a forked snapshot process, for a region mapping that
                    // stays mapped and unwritten there until the process exits.
                    let data = unsafe { std::slice::from_raw_parts(*addr as *const u8, *len) };
                    builder.add_whole(name, kind.clone(), data, *shuffle)?
                }
                Item::Delta {
                    name,
                    base: seq,
                    dirty,
                    data,
                    shuffle,
                } => {
                    if base.as_ref().is_none_or(|m| m.seq != *seq) {
                        base = Some(builder.manifest_of(*seq)?);
                    }
                    let entry = base.as_ref().and_then(|m| m.entry(name)).ok_or_else(|| {
                        Error::Corrupt {
                            path: format!("snapshot {seq}").into(),
                            why: format!("has no entry {name:?} to build on"),
                        }
                    })?;
                    builder.add_delta(name, entry, dirty, data, *shuffle)?;
                }
            }
        }
        // The outputs' bytes up to their recorded lengths are durable before the manifest that
        // records them.
        for (path, file) in &task.outputs.files {
            file.sync_data()
                .map_err(supervise_store::error::io_err("fsync output", path))?;
        }
        builder.set_origin(task.origin.clone());
        builder.set_outputs(task.outputs.marks.clone());
        let mut report = builder.commit()?;
        match writer.apply_retention(keep.clone()) {
            Ok(r) => report.removed = r.removed_snapshots,
            Err(e) => retention_failed = Some(e.to_string()),
        }
        Ok(report)
    })();
    let buffers = task.items.into_iter().map(Item::into_buffer).collect();
    Written {
        result,
        retention_failed,
        buffers,
    }
}

/// What the program's snapshot closure adds entries to: typed values and slices, copied at
/// once into reusable buffers so the program can go on while they are written.
pub struct Capture<'a> {
    pub(crate) items: &'a mut Vec<Item>,
    pub(crate) buffers: &'a mut Vec<Buffer>,
    pub(crate) names: &'a mut HashSet<String>,
}

impl Capture<'_> {
    fn claim(&mut self, name: &str) -> Result<()> {
        name::validate("entry", name)?;
        if !self.names.insert(name.to_owned()) {
            return Err(Error::DuplicateEntry {
                name: name.to_owned(),
            });
        }
        Ok(())
    }

    fn buffer(&mut self, len: usize) -> Buffer {
        let mut buf = self.buffers.pop().unwrap_or_else(empty_buffer);
        reserve_capture(&mut buf, len);
        buf
    }

    /// Adds a typed value (serialized as JSON).
    pub fn value<T: Serialize + ?Sized>(&mut self, name: &str, value: &T) -> Result<()> {
        self.claim(name)?;
        let json = serde_json::to_vec(value).map_err(|source| Error::Serde {
            name: name.to_owned(),
            source,
        })?;
        if json.len() as u64 > supervise_store::format::MAX_VALUE_LEN {
            return Err(Error::ValueTooLarge {
                name: name.to_owned(),
                len: json.len() as u64,
                max: supervise_store::format::MAX_VALUE_LEN,
            });
        }
        let mut data = self.buffer(json.len());
        data.extend_from_slice(&json);
        self.items.push(Item::Whole {
            name: name.to_owned(),
            kind: EntryKind::Value,
            data,
            shuffle: 0,
        });
        Ok(())
    }

    /// Adds a slice, copied now (the copy is the program's whole pause for it).
    pub fn slice<T: Element>(&mut self, name: &str, slice: &[T]) -> Result<()> {
        self.claim(name)?;
        let bytes: &[u8] = bytemuck::cast_slice(slice);
        let mut data = self.buffer(bytes.len());
        data.extend_from_slice(bytes);
        self.items.push(Item::Whole {
            name: name.to_owned(),
            kind: EntryKind::Slice {
                elem: T::NAME.to_owned(),
                elem_size: std::mem::size_of::<T>() as u32,
            },
            data,
            shuffle: std::mem::size_of::<T>() as u8,
        });
        Ok(())
    }

    /// Adds untyped bytes (the C ABI's regions), stored as a `u8` slice. Lengths that are a
    /// multiple of 8 are byte-shuffled as 8-byte elements before compression: C simulation
    /// state is mostly `double`, and shuffling only changes how well a chunk compresses.
    pub fn raw(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.claim(name)?;
        let mut data = self.buffer(bytes.len());
        data.extend_from_slice(bytes);
        self.items.push(Item::Whole {
            name: name.to_owned(),
            kind: EntryKind::Slice {
                elem: "u8".to_owned(),
                elem_size: 1,
            },
            data,
            shuffle: if bytes.len().is_multiple_of(8) { 8 } else { 0 },
        });
        Ok(())
    }
}
