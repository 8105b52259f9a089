//! Writing a pack file: records are appended into aligned 2 MiB blocks, and full blocks go to
//! an I/O thread, so hashing and compression go on while the disk writes. Blocks are written
//! with `O_DIRECT` where the filesystem allows (no page-cache pages to allocate and write back:
//! 1.3 against 0.4-0.9 GB/s measured on this machine kind), else buffered with early writeback.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, channel, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::direct::{AlignedBuf, DIRECT_ALIGN, stop_direct};
use crate::error::{Error, Result, io_err};
use crate::format::{self, RecordHeader};
use crate::fsops::{self, Dir};

/// Size of a pack write; a multiple of any device's logical block size. 2 MiB: with three in
/// flight, what a snapshot's writer holds for its pack is 6 MiB at most (4 MiB blocks held
/// 2.4 MiB more at 1% of 1 GiB and wrote no faster, measured side by side with `supervise
/// bench`).
const BLOCK: usize = 2 << 20;
/// Blocks in flight per pack: one being filled, up to two being written.
const BLOCKS: usize = 3;
/// A pack takes its last block only once this much of it is handed to the I/O thread: a
/// small pack (a snapshot of a few MiB) is written in milliseconds either way, and with every
/// worker appending, one of 5 MiB took the third block in 4 of 14 snapshots (1 of 14 with one
/// thread appending): 2 MiB more of peak memory for nothing.
const LAST_BLOCK_FROM: u64 = 8 << 20;
/// Start the disk writing this much of a buffered pack while the rest is compressed.
const WRITEBACK_STEP: u64 = 16 << 20;

/// A block to write at an offset.
struct WriteJob {
    block: AlignedBuf,
    len: usize,
    offset: u64,
}

/// The I/O thread of a pack and the channels to it.
struct Io {
    jobs: SyncSender<WriteJob>,
    free: Receiver<AlignedBuf>,
    thread: JoinHandle<File>,
    /// The first write error, taken by the pack writer.
    failed: Arc<Mutex<Option<std::io::Error>>>,
    /// Whether the file is (still) written with O_DIRECT.
    direct: Arc<AtomicBool>,
}

/// A pack file being written under its temporary name.
pub(crate) struct PackWriter {
    pub(crate) name: String,
    /// The temporary name in the pack directory.
    tmp: String,
    /// Its path, for messages.
    tmp_path: PathBuf,
    io: Option<Io>,
    /// The block being filled (taken out only by `finish`).
    block: Option<AlignedBuf>,
    /// Blocks this pack has taken, from `spare` or new.
    blocks: usize,
    /// Blocks an earlier pack of the snapshot gave back, taken before new ones: fresh memory
    /// costs a page fault and the kernel's zeroing per page, which a VM may back slowly
    /// (`perf` of a 1 GiB full snapshot, six packs: faulting in their blocks was 3% of the
    /// writer's samples, a fifth of its blake3's).
    spare: Vec<AlignedBuf>,
    fill: usize,
    /// Logical length of the pack (handed off + in the block).
    len: u64,
    /// Bytes handed to the I/O thread.
    queued: u64,
    /// A write failed (its error already returned): every later hand-off and the finish fail
    /// too, so a caller that goes on cannot commit records that were never written.
    broken: bool,
}

/// A pack written in full, waiting to be fsynced and renamed into place at commit.
pub(crate) struct FinishedPack {
    pub(crate) name: String,
    /// The temporary name in the pack directory.
    pub(crate) tmp: String,
    pub(crate) file: File,
}

/// Asks the kernel to start writing back `[from, to)` of `file` without waiting (a hint: the
/// fsync at commit is what makes the data durable).
fn start_writeback(file: &File, from: u64, to: u64) {
    // SAFETY: sync_file_range only reads its integer arguments.
    unsafe {
        libc::sync_file_range(
            std::os::fd::AsRawFd::as_raw_fd(file),
            from as libc::off64_t,
            (to - from) as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

/// The I/O thread: writes each block at its offset (falling back from O_DIRECT where refused),
/// returns the block for reuse, and after the first error writes nothing more.
fn io_loop(
    file: File,
    jobs: Receiver<WriteJob>,
    free: std::sync::mpsc::Sender<AlignedBuf>,
    failed: &Mutex<Option<std::io::Error>>,
    direct: &AtomicBool,
) -> File {
    let mut flushed = 0u64;
    let mut broken = false;
    for job in jobs {
        if !broken {
            let data = &job.block.bytes()[..job.len];
            let mut result = fsops::write_all_at(&file, data, job.offset);
            if let Err(e) = &result
                && direct.load(Ordering::Relaxed)
                && e.raw_os_error() == Some(libc::EINVAL)
            {
                // The filesystem opened the file with O_DIRECT but refuses direct writes.
                direct.store(false, Ordering::Relaxed);
                result =
                    stop_direct(&file).and_then(|()| fsops::write_all_at(&file, data, job.offset));
            }
            match result {
                Ok(()) => {
                    let end = job.offset + job.len as u64;
                    if !direct.load(Ordering::Relaxed) && end - flushed >= WRITEBACK_STEP {
                        start_writeback(&file, flushed, end);
                        flushed = end;
                    }
                }
                Err(e) => {
                    broken = true;
                    *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                }
            }
        }
        let _ = free.send(job.block);
    }
    file
}

impl PackWriter {
    /// Creates the pack file `tmp` in `dir` (private, new) and its I/O thread; its blocks
    /// are taken from `spare` (what [`finish`](Self::finish) of an earlier pack gave back)
    /// before new ones are made.
    pub(crate) fn create(
        name: String,
        dir: &Dir,
        tmp: String,
        mut spare: Vec<AlignedBuf>,
    ) -> Result<Self> {
        let tmp_path = dir.join(&tmp);
        let block = match spare.pop() {
            Some(block) => block,
            None => AlignedBuf::new(BLOCK).map_err(io_err("allocate a pack buffer", &tmp_path))?,
        };
        let (file, direct) = match dir.create(&tmp, true) {
            Ok(file) => (file, true),
            Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                (dir.create(&tmp, false)?, false)
            }
            Err(e) => return Err(e),
        };
        let (jobs, job_rx) = sync_channel::<WriteJob>(BLOCKS);
        let (free_tx, free) = channel::<AlignedBuf>();
        let failed = Arc::new(Mutex::new(None));
        let direct = Arc::new(AtomicBool::new(direct));
        let thread = {
            let (failed, direct) = (Arc::clone(&failed), Arc::clone(&direct));
            std::thread::Builder::new()
                .name("supervise-pack-io".into())
                .spawn(move || io_loop(file, job_rx, free_tx, &failed, &direct))
                .map_err(io_err("spawn pack I/O thread", &tmp_path))?
        };
        let mut pack = Self {
            name,
            tmp,
            tmp_path,
            io: Some(Io {
                jobs,
                free,
                thread,
                failed,
                direct,
            }),
            block: Some(block),
            blocks: 1,
            spare,
            fill: 0,
            len: 0,
            queued: 0,
            broken: false,
        };
        pack.push(&format::file_header(format::PACK_MAGIC))?;
        Ok(pack)
    }

    /// Bytes in the pack so far.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    fn io(&self) -> &Io {
        self.io
            .as_ref()
            .expect("the I/O thread lives until finish or drop")
    }

    fn block(&mut self) -> &mut AlignedBuf {
        self.block
            .as_mut()
            .expect("a pack has a block to fill until it is finished")
    }

    /// Copies `bytes` into blocks with streaming stores: nothing but the block's write reads
    /// it (the disk's DMA, or the kernel's copy into the page cache), and a plain copy was a
    /// large share of the writer's time (`perf` of a 1 GiB full snapshot: the copy had 0.63x
    /// as many samples as blake3, 0.17x streamed).
    fn push(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            let take = (BLOCK - self.fill).min(bytes.len());
            let fill = self.fill;
            crate::stream::copy(
                &mut self.block().bytes_mut()[fill..fill + take],
                &bytes[..take],
            );
            self.fill += take;
            self.len += take as u64;
            bytes = &bytes[take..];
            if self.fill == BLOCK {
                self.hand_off(BLOCK)?;
            }
        }
        Ok(())
    }

    /// Gives the first `len` bytes of the current block to the I/O thread and takes a free
    /// block (a spare or new one while fewer than `BLOCKS` are taken; the last only past
    /// `LAST_BLOCK_FROM`).
    fn hand_off(&mut self, len: usize) -> Result<()> {
        self.check_written()?;
        let next = match self.io().free.try_recv() {
            Ok(block) => block,
            // A spare block is taken whatever the pack's length: it is already made.
            Err(_)
                if self.blocks < BLOCKS - 1
                    || (self.blocks < BLOCKS
                        && (self.queued >= LAST_BLOCK_FROM || !self.spare.is_empty())) =>
            {
                self.blocks += 1;
                match self.spare.pop() {
                    Some(block) => block,
                    None => AlignedBuf::new(BLOCK)
                        .map_err(io_err("allocate a pack buffer", &self.tmp_path))?,
                }
            }
            Err(_) => self.io().free.recv().map_err(|_| {
                io_err("write", &self.tmp_path)(std::io::Error::other("pack I/O thread ended"))
            })?,
        };
        let block = std::mem::replace(self.block(), next);
        self.send(block, len)
    }

    /// Gives the first `len` bytes of `block` to the I/O thread, to write next.
    fn send(&mut self, block: AlignedBuf, len: usize) -> Result<()> {
        let job = WriteJob {
            block,
            len,
            offset: self.queued,
        };
        self.io().jobs.send(job).map_err(|_| {
            io_err("write", &self.tmp_path)(std::io::Error::other("pack I/O thread ended"))
        })?;
        self.queued += len as u64;
        self.fill = 0;
        Ok(())
    }

    /// Fails when a write of this pack has failed: with the I/O thread's error the first time,
    /// and on every later call.
    fn check_written(&mut self) -> Result<()> {
        if let Some(e) = self
            .io
            .as_ref()
            .and_then(|io| io.failed.lock().unwrap_or_else(|p| p.into_inner()).take())
        {
            self.broken = true;
            return Err(io_err("write", &self.tmp_path)(e));
        }
        if self.broken {
            return Err(io_err("write", &self.tmp_path)(std::io::Error::other(
                "an earlier write of this pack failed",
            )));
        }
        Ok(())
    }

    /// Appends a record; returns its offset.
    pub(crate) fn append(&mut self, header: &RecordHeader, data: &[u8]) -> Result<u64> {
        let offset = self.len;
        self.push(&header.encode())?;
        self.push(data)?;
        Ok(offset)
    }

    /// Writes what is buffered (padded to the alignment when direct, then cut back to the
    /// exact length), waits for the I/O thread, and starts writeback; the fsync comes at
    /// commit, for all packs. Gives back the pack's blocks, for the next pack to fill.
    pub(crate) fn finish(mut self) -> Result<(FinishedPack, Vec<AlignedBuf>)> {
        self.check_written()?;
        let exact = self.len;
        if self.fill > 0 {
            let len = if self.io().direct.load(Ordering::Relaxed) {
                let padded = self.fill.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
                let fill = self.fill;
                self.block().bytes_mut()[fill..padded].fill(0);
                padded
            } else {
                self.fill
            };
            let last = self
                .block
                .take()
                .expect("a pack has a block until finished");
            self.send(last, len)?;
        }
        let io = self.io.take().expect("finish runs once");
        drop(io.jobs);
        let file = io.thread.join().map_err(|_| {
            io_err("write", &self.tmp_path)(std::io::Error::other("pack I/O thread panicked"))
        })?;
        if let Some(e) = io.failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(io_err("write", &self.tmp_path)(e));
        }
        fsops::set_len(&file, exact).map_err(io_err("truncate", &self.tmp_path))?;
        if !io.direct.load(Ordering::Relaxed) {
            start_writeback(&file, 0, exact);
        }
        let mut blocks = std::mem::take(&mut self.spare);
        blocks.extend(self.block.take());
        blocks.extend(io.free.try_iter());
        let finished = FinishedPack {
            name: std::mem::take(&mut self.name),
            tmp: std::mem::take(&mut self.tmp),
            file,
        };
        Ok((finished, blocks))
    }
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        // An abandoned pack: let the I/O thread finish and end before the file is removed.
        if let Some(io) = self.io.take() {
            drop(io.jobs);
            let _ = io.thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsops::Access;

    /// `len` bytes counting up from `seed`.
    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
    }

    #[test]
    fn a_pack_filling_blocks_an_earlier_pack_gave_back_holds_exactly_its_own_bytes() {
        let root = tempfile::tempdir().unwrap();
        let dir = Dir::open_root(root.path(), false, Access::Owner).unwrap();
        let header = format::file_header(format::PACK_MAGIC);
        // The first pack fills whole blocks and part of one more, so every block it gives
        // back holds its bytes; the second fills those blocks again, ending part-way into
        // one, and none of the first pack's bytes may show.
        let mut spare: Vec<AlignedBuf> = Vec::new();
        for (name, seed, len) in [
            ("a", 0xAA, BLOCK * 5 / 2),
            ("b", 0x11, BLOCK * 3 / 2 + 1000),
        ] {
            let given: Vec<*const u8> = spare.iter().map(|b| b.bytes().as_ptr()).collect();
            let mut pack =
                PackWriter::create(name.into(), &dir, format!("{name}.tmp"), spare).unwrap();
            let bytes = pattern(seed, len);
            pack.push(&bytes).unwrap();
            let (_, blocks) = pack.finish().unwrap();
            assert!(
                (1..=BLOCKS).contains(&blocks.len()),
                "pack {name} gave back {} blocks",
                blocks.len()
            );
            // Every block given comes back, none lost or unmapped.
            let back: Vec<*const u8> = blocks.iter().map(|b| b.bytes().as_ptr()).collect();
            assert!(given.iter().all(|p| back.contains(p)), "pack {name}");
            spare = blocks;
            let written = std::fs::read(root.path().join(format!("{name}.tmp"))).unwrap();
            assert_eq!(written.len(), header.len() + len, "pack {name}");
            assert!(written[..header.len()] == header, "pack {name}: header");
            assert!(written[header.len()..] == bytes[..], "pack {name}: records");
        }
    }
}
