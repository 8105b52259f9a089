//! The background writer thread: it takes each captured snapshot (or the pipe of a forked
//! snapshot process), writes it durably, applies retention, scrubs stored records between
//! snapshots, and hands back a typed [`Outcome`] with the task's buffers. [`Shim::settle`]
//! is the program's side: it waits for the snapshot in flight and takes note of how it went.

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use supervise_store::error::{Error, Result};
use supervise_store::format::Manifest;
use supervise_store::scrub::{Finding, Scrubber};
use supervise_store::store::Retention;
use supervise_store::writer::{SnapshotReport, SnapshotWriter};

use super::dirty::{Carried, Reprotect, reprotect};
use super::fork::await_forked;
use super::{Buffer, CaptureTask, Item, PartBytes};
use crate::runtime::Shim;

/// What the writer thread says about a capture task.
pub(crate) struct Outcome {
    /// The writer's own error on failure (shared: the program and the supervisor both see it).
    pub(crate) result: Result<SnapshotReport, Arc<Error>>,
    /// The task's buffers, back for reuse.
    pub(crate) buffers: Vec<Buffer>,
    /// What protecting the regions' pages again found (see [`reprotect`]).
    pub(crate) carried: Vec<Carried>,
}

/// Called on the writer thread with each snapshot's outcome, and why retention failed after a
/// durable snapshot (if it did).
pub(crate) type OnDone =
    Arc<dyn Fn(&Result<SnapshotReport, Arc<Error>>, Option<&str>) + Send + Sync>;

/// Called on the writer thread with the damaged records a scrub slice found, and the snapshots
/// set aside because they use them (or why setting them aside failed).
pub(crate) type OnDamage = Arc<dyn Fn(&[Finding], &Result<Vec<u64>>) + Send + Sync>;

/// What the writer thread is given.
pub(crate) enum Work {
    /// A captured snapshot to write.
    Capture(Box<CaptureTask>),
    /// A forked process writes the snapshot; its report comes through the pipe.
    Forked { pid: libc::pid_t, report: File },
}

/// The writer thread and the channels to it.
pub(crate) struct Background {
    tasks: Option<Sender<(Work, Receiver<Duration>)>>,
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
        let (tasks, task_rx) = channel::<(Work, Receiver<Duration>)>();
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
                    let (work, pause) = work;
                    let cpu_before = supervise_store::clock::thread_cpu();
                    let (mut result, retention_failed, copies) = match work {
                        Work::Capture(task) => {
                            let written = write_task(&mut writer, &keep, *task);
                            (
                                written.result.map_err(Arc::new),
                                written.retention_failed,
                                Some(written.copies),
                            )
                        }
                        Work::Forked { pid, report } => {
                            let (result, retention_failed) = await_forked(&mut writer, pid, report);
                            (result, retention_failed, None)
                        }
                    };
                    // Sent once the program goes on: for a capture in parts, after the last
                    // part (which this thread has stored by now).
                    let pause = pause.recv().unwrap_or_default();
                    if let Ok(report) = &mut result {
                        use supervise_store::clock::{micros, thread_cpu};
                        report.pause_us = micros(pause);
                        // This thread's share (the workers' is in the report already).
                        report.writer_cpu_us = report
                            .writer_cpu_us
                            .saturating_add(micros(thread_cpu().saturating_sub(cpu_before)));
                    }
                    on_done(&result, retention_failed.as_deref());
                    let (buffers, carried) = copies.map(Copies::protect_again).unwrap_or_default();
                    release_free_memory();
                    let outcome = Outcome {
                        result,
                        buffers,
                        carried,
                    };
                    if out_tx.send(outcome).is_err() {
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

    /// Hands work to the writer, with where the program's pause for it will be sent (it is
    /// recorded in the report). Call [`wait`](Self::wait) first if some is in flight.
    pub(crate) fn submit(&mut self, work: Work, pause: Receiver<Duration>) {
        debug_assert!(!self.in_flight);
        if let Some(tasks) = &self.tasks
            && tasks.send((work, pause)).is_ok()
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

/// What writing one capture task gave.
pub(super) struct Written {
    pub(super) result: Result<SnapshotReport>,
    /// Why retention failed after the snapshot was durable.
    pub(super) retention_failed: Option<String>,
    /// What is left of the task.
    pub(super) copies: Copies,
}

/// A written task's buffers, with the chunks of each delta's copy (which `reprotect`
/// compares with). Nothing else of the task is kept: a capture in parts waits for its
/// channels to close.
pub(super) struct Copies {
    buffers: Vec<(Buffer, Option<Vec<usize>>)>,
    reprotect: Vec<Reprotect>,
}

impl Copies {
    /// Protects again the pages the capture read as written (see [`reprotect`]), whatever
    /// happened to the snapshot: until then the program's writes to them are recorded only
    /// by their difference from the copies. Returns the task's buffers, for reuse, and what
    /// was found. Called once the snapshot is reported: a write in the meantime is carried to
    /// the next snapshot, where it belongs anyway.
    pub(super) fn protect_again(self) -> (Vec<Buffer>, Vec<Carried>) {
        let carried = self
            .reprotect
            .iter()
            .map(|re| match self.buffers.get(re.item) {
                Some((data, Some(chunks))) => reprotect(re, chunks, data),
                _ => (re.slot, None),
            })
            .collect();
        let buffers = self.buffers.into_iter().map(|(b, _)| b).collect();
        (buffers, carried)
    }
}

/// Writes a captured snapshot durably, then applies retention; the pages the capture read
/// as written are protected again by [`Copies::protect_again`].
pub(super) fn write_task(
    writer: &mut SnapshotWriter,
    keep: &Retention,
    task: CaptureTask,
) -> Written {
    let mut retention_failed = None;
    let mut base: Option<Manifest> = None;
    let result = (|| -> Result<SnapshotReport> {
        let job_name = writer.job().name().to_owned();
        if let Some(seq) = task.seq {
            writer.prepare_part(seq)?;
        }
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
                    let entry = base_entry(&builder, &mut base, &job_name, name, *seq)?;
                    builder.add_delta(name, entry, dirty, data, *shuffle)?;
                }
                Item::Parts {
                    name,
                    kind,
                    len,
                    base: seq,
                    shuffle,
                    chunks,
                    parts,
                    returns,
                    read,
                } => {
                    let mut entry = match seq {
                        Some(seq) => {
                            let entry = base_entry(&builder, &mut base, &job_name, name, *seq)?;
                            builder.begin_delta(name, entry)?
                        }
                        None => builder.begin_whole(name, kind.clone(), *len)?,
                    };
                    // Until the program has sent the last part (and closed the channel).
                    let mut given = 0;
                    for part in parts.iter() {
                        given += part.chunks.len();
                        match part.bytes {
                            PartBytes::Copied(data) => {
                                builder.add_chunks(&mut entry, &part.chunks, &data, *shuffle)?;
                                let _ = returns.send(data);
                            }
                            PartBytes::InPlace(mem) => {
                                builder.add_chunks_in_place(
                                    &mut entry,
                                    &part.chunks,
                                    mem.bytes(),
                                    *shuffle,
                                )?;
                                // Nothing here refers to the region once the program is told.
                                drop(mem);
                                let _ = read.send(());
                            }
                        }
                    }
                    // A feed that ended early (it never should) must not leave a delta's
                    // missing chunks to be taken from its base.
                    if given != *chunks {
                        return Err(Error::Aborted(format!(
                            "region {name:?} was captured in parts, but {given} of its {chunks} \
                             chunks arrived"
                        )));
                    }
                    builder.end_entry(entry)?;
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
        builder.set_arrays(task.arrays.clone());
        let mut report = builder.commit()?;
        match writer.apply_retention(keep.clone()) {
            Ok(r) => report.removed = r.removed_snapshots,
            Err(e) => retention_failed = Some(e.to_string()),
        }
        Ok(report)
    })();
    Written {
        result,
        retention_failed,
        copies: Copies {
            buffers: task
                .items
                .into_iter()
                .map(|item| match item {
                    Item::Delta { dirty, data, .. } => (data, Some(dirty)),
                    other => (other.into_buffer(), None),
                })
                .collect(),
            reprotect: task.reprotect,
        },
    }
}

/// Entry `name` of snapshot `seq`, the base of a delta; `base` keeps the manifest last read.
fn base_entry<'m>(
    builder: &supervise_store::writer::SnapshotBuilder<'_>,
    base: &'m mut Option<Manifest>,
    job_name: &str,
    name: &str,
    seq: u64,
) -> Result<&'m supervise_store::format::EntryMeta> {
    if base.as_ref().is_none_or(|m| m.seq != seq) {
        *base = Some(builder.manifest_of(seq)?);
    }
    base.as_ref()
        .and_then(|m| m.entry(name))
        .ok_or_else(|| Error::DeltaBase {
            job: job_name.to_owned(),
            entry: name.to_owned(),
            why: format!("snapshot {seq} has no entry of that name to build on"),
        })
}

impl Shim {
    /// Waits for the snapshot in flight and takes note of how it went: on success the
    /// captured regions have a new base; on failure they are copied whole next time.
    pub(crate) fn settle(&mut self) {
        let Some(outcome) = self.background.as_mut().and_then(Background::wait) else {
            return;
        };
        // What this capture copied into buffers: the spare buffers kept are about that much, so
        // a program whose changes are small holds little between snapshots. The parts of a
        // capture beyond the budget are not kept (they would hold the budget for good).
        let copied: usize = outcome.buffers.iter().map(|b| b.len()).sum();
        self.buffers
            .extend(outcome.buffers.into_iter().filter(|b| b.capacity() > 0));
        let keep = (copied + copied / 4 + (1 << 20)).min(self.budget);
        self.buffers
            .sort_by_key(|b| std::cmp::Reverse(b.capacity()));
        self.buffers.truncate(MAX_SPARE_BUFFERS);
        let mut held = 0usize;
        self.buffers.retain(|b| {
            let fits = held.saturating_add(b.capacity()) <= keep;
            if fits {
                held += b.capacity();
            }
            fits
        });
        let base = outcome.result.as_ref().ok().map(|r| r.seq);
        for idx in self.in_flight_regions.drain(..) {
            if let Some(slot) = self.regions.get_mut(idx) {
                slot.baseline = base;
            }
        }
        for (idx, carried) in outcome.carried {
            if let Some(slot) = self.regions.get_mut(idx) {
                match carried {
                    Some(chunks) => slot.carried = chunks,
                    None => slot.baseline = None,
                }
            }
        }
        self.last = Some(outcome.result);
    }
}

/// Gives the memory the writer freed back to the system. glibc's allocator keeps freed blocks
/// for reuse, and after its first free of a pack block (2 MiB) it serves blocks of that size
/// from its heaps, so that every snapshot's blocks, compressors and chunk lists would stay
/// resident between snapshots (20 MiB measured with `supervise bench` at 1% of 1 GiB).
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory of the allocator's own heaps to the
    // system; it is thread-safe and touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Spare capture buffers kept between snapshots.
const MAX_SPARE_BUFFERS: usize = 16;
