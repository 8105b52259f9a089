//! Reading many chunks back at once (a restore, a verification): their records are taken in
//! pack and offset order, records near each other are read with one request of up to
//! [`EXTENT`] bytes, straight from the disk into aligned memory (`O_DIRECT`) where the
//! filesystem allows it, and decoded from there into their destinations on every core.
//!
//! Not through the page cache: a restore is bound by its cores (decompress, verify, first
//! touch of the program's memory), and on a cold read filling the page cache and copying out
//! of it took more than a quarter of their time (`perf record` of a 1 GiB restore). Packs are
//! written with O_DIRECT, so the cache seldom holds them anyway.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};

use crate::direct::{AlignedBuf, DIRECT_ALIGN, read_direct, reopen_direct};
use crate::error::{Error, Result, io_err};
use crate::format::{ChunkRef, RecordHeader};
use crate::pack_scan::RecordReader;

/// Most bytes read with one request (unless one record is longer).
const EXTENT: u64 = 4 << 20;
/// Least bytes an extent is cut to so that a small read still gives every core some.
const MIN_EXTENT: u64 = 256 << 10;
/// Records at most this far apart in a pack are read with one request, the bytes between them
/// (records of other snapshots) read and left.
const GAP: u64 = 256 << 10;
/// Threads reading extents, so that several requests are in flight.
const READERS: usize = 4;
/// Extents read ahead of the decoders, beyond a buffer per thread: the disk delivers in bursts,
/// and with a buffer per thread alone the decoders waited for extents a fifth of a cold
/// restore (`perf`, 1 GiB). 1 GiB restored cold, twelve times each, alternated: median 0.33 s
/// with none more, 0.30 s with two, 0.28-0.29 s with four, 0.28 s with six.
const AHEAD: usize = 4;

/// A chunk's destination and its reference.
pub(crate) type Item<'a> = (&'a mut [u8], &'a ChunkRef);

/// Records of one pack read with one request: `[start, end)` of the pack holds every record
/// of `items`.
pub(crate) struct Extent<'a> {
    pack: usize,
    start: u64,
    end: u64,
    items: Vec<Item<'a>>,
}

/// The bytes of `chunk`'s record in its pack: its header and its stored bytes.
pub(crate) fn record_len(chunk: &ChunkRef) -> u64 {
    RecordHeader::LEN as u64 + u64::from(chunk.stored_len)
}

/// How long the extents of a read of `items` on `threads` may be: [`EXTENT`], or less for a
/// small read, so that there are about four extents per thread (at least [`MIN_EXTENT`]).
pub(crate) fn extent_len(items: &[Item<'_>], threads: usize) -> u64 {
    let total: u64 = items.iter().map(|(_, c)| record_len(c)).sum();
    (total / (threads.max(1) as u64 * 4)).clamp(MIN_EXTENT, EXTENT)
}

/// Groups `items` into extents: sorted by pack and offset, a record joins the extent before
/// it when it is in the same pack, starts at most [`GAP`] after that extent's end, and the
/// extent stays within `most` bytes. Every record's length is bounded (a manifest's chunks
/// are checked against `MAX_CHUNK_LEN` when it is decoded), so no extent is longer than
/// `most` or one record.
pub(crate) fn plan(mut items: Vec<Item<'_>>, most: u64) -> Vec<Extent<'_>> {
    items.sort_by_key(|(_, c)| (c.pack, c.offset));
    let mut extents: Vec<Extent> = Vec::new();
    for (out, chunk) in items {
        let start = chunk.offset;
        let end = start.saturating_add(record_len(chunk));
        match extents.last_mut() {
            Some(e)
                if e.pack == chunk.pack as usize
                    && start <= e.end.saturating_add(GAP)
                    && end.saturating_sub(e.start) <= most =>
            {
                e.end = e.end.max(end);
                e.items.push((out, chunk));
            }
            _ => extents.push(Extent {
                pack: chunk.pack as usize,
                start,
                end,
                items: vec![(out, chunk)],
            }),
        }
    }
    extents
}

/// The packs a read takes records from, each also opened for direct reads where it can be.
pub(crate) struct Packs<'a> {
    files: &'a [(PathBuf, File)],
    /// Each pack opened again with O_DIRECT, made at its first read; `None` where that
    /// cannot be done.
    direct: Vec<OnceLock<Option<File>>>,
    /// Each pack whose direct reads the filesystem refused: read buffered from then on.
    refused: Vec<AtomicBool>,
    /// Tests: every direct read fails with `EINVAL`, as on a filesystem that refuses them.
    #[cfg(test)]
    einval: AtomicBool,
}

impl<'a> Packs<'a> {
    /// The packs `files`, indexed as a manifest's chunk references index them.
    pub(crate) fn new(files: &'a [(PathBuf, File)]) -> Self {
        Self {
            files,
            direct: files.iter().map(|_| OnceLock::new()).collect(),
            refused: files.iter().map(|_| AtomicBool::new(false)).collect(),
            #[cfg(test)]
            einval: AtomicBool::new(false),
        }
    }

    fn file(&self, pack: usize) -> Result<&'a (PathBuf, File)> {
        self.files.get(pack).ok_or_else(|| Error::Corrupt {
            path: self.dir(),
            why: format!("a chunk names pack #{pack} of {}", self.files.len()),
        })
    }

    fn dir(&self) -> PathBuf {
        self.files
            .first()
            .and_then(|(p, _)| p.parent())
            .map(|p| p.to_owned())
            .unwrap_or_default()
    }

    fn direct(&self, pack: usize) -> Option<&File> {
        if self.refused.get(pack)?.load(Ordering::Relaxed) {
            return None;
        }
        let (_, file) = self.files.get(pack)?;
        self.direct
            .get(pack)?
            .get_or_init(|| reopen_direct(file))
            .as_ref()
    }

    fn buffer(&self, cap: usize) -> Result<AlignedBuf> {
        AlignedBuf::new(cap).map_err(io_err("allocate a read buffer", self.dir()))
    }

    /// Reads `extent` into `buf` (at least its length and two alignments long); returns where
    /// in `buf` its bytes `[start, end)` are. A pack that ends first is an [`Error::Io`] whose
    /// source is `UnexpectedEof`. A direct read that fails is done again buffered, and its
    /// error, if any, returned.
    fn read(&self, extent: &Extent, buf: &mut AlignedBuf) -> Result<std::ops::Range<usize>> {
        let (path, file) = self.file(extent.pack)?;
        let len = (extent.end - extent.start) as usize;
        if let Some(direct) = self.direct(extent.pack) {
            let from = extent.start - extent.start % DIRECT_ALIGN as u64;
            let head = (extent.start - from) as usize;
            let want = (head + len).next_multiple_of(DIRECT_ALIGN);
            let read = read_direct(direct, &mut buf.bytes_mut()[..want], from, head + len);
            #[cfg(test)]
            let read = match self.einval.load(Ordering::Relaxed) {
                true => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
                false => read,
            };
            match read {
                Ok(got) if got >= head + len => return Ok(head..head + len),
                Ok(_) => {
                    let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
                    return Err(io_err("read", path)(eof));
                }
                Err(e) => {
                    // EINVAL: this filesystem refuses direct reads here, buffered from now on.
                    if e.raw_os_error() == Some(libc::EINVAL) {
                        self.refused[extent.pack].store(true, Ordering::Relaxed);
                    }
                }
            }
        }
        file.read_exact_at(&mut buf.bytes_mut()[..len], extent.start)
            .map_err(io_err("read", path))?;
        Ok(0..len)
    }

    /// Decodes every record of `extent` from `bytes` (its bytes `[start, end)`) into its
    /// destination, verified.
    fn decode(&self, records: &mut RecordReader, extent: Extent, bytes: &[u8]) -> Result<()> {
        let (path, _) = self.file(extent.pack)?;
        for (out, chunk) in extent.items {
            let at = (chunk.offset - extent.start) as usize;
            let record = &bytes[at..at + record_len(chunk) as usize];
            records.decode(record, path, chunk, out)?;
        }
        Ok(())
    }

    /// Reads and decodes every extent, on `threads` decoding threads beside [`READERS`]
    /// reading ones (one thread alone when there is one extent); stops at the first error
    /// and returns it. Holds a buffer of the longest extent (and 8 KiB) per thread and
    /// [`AHEAD`] more, no more than there are extents, fewer if memory is refused, at least
    /// one.
    pub(crate) fn read_all(&self, extents: Vec<Extent<'_>>, threads: usize) -> Result<()> {
        let cap = extents
            .iter()
            .map(|e| (e.end - e.start) as usize + 2 * DIRECT_ALIGN)
            .max()
            .unwrap_or(0);
        if extents.len() <= 1 {
            let mut buf = self.buffer(cap)?;
            let mut records = RecordReader::new(&self.dir())?;
            for extent in extents {
                let range = self.read(&extent, &mut buf)?;
                self.decode(&mut records, extent, &buf.bytes()[range])?;
            }
            return Ok(());
        }
        let readers = READERS.min(extents.len());
        let workers = threads.clamp(1, extents.len());
        let (free_tx, free_rx) = mpsc::channel();
        let wanted = (readers + workers + AHEAD).min(extents.len());
        let mut buffers = 0;
        while buffers < wanted {
            match self.buffer(cap) {
                Ok(buf) => {
                    let _ = free_tx.send(buf);
                    buffers += 1;
                }
                // Memory refused (a `ulimit -v`, strict overcommit): fewer in flight.
                Err(e) if buffers == 0 => return Err(e),
                Err(_) => break,
            }
        }
        // As long as there are buffers: a send never waits.
        let (full_tx, full_rx) = mpsc::sync_channel(buffers);
        // Each side's receiver is dropped with the last thread that takes from it, so the
        // other side's sends fail instead of waiting when a side has ended.
        let full_rx = Arc::new(Mutex::new(full_rx));
        let free_rx = Arc::new(Mutex::new(free_rx));
        let extents = Mutex::new(extents.into_iter());
        let stop = AtomicBool::new(false);
        let failure: Mutex<Option<Error>> = Mutex::new(None);
        let fail = |e: Error| {
            stop.store(true, Ordering::Relaxed);
            failure
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(e);
        };
        std::thread::scope(|scope| {
            for _ in 0..readers {
                let (full_tx, free_rx) = (full_tx.clone(), Arc::clone(&free_rx));
                let (extents, stop, fail) = (&extents, &stop, &fail);
                let started = std::thread::Builder::new()
                    .name("supervise-read".into())
                    .spawn_scoped(scope, move || {
                        while !stop.load(Ordering::Relaxed) {
                            let next = extents.lock().unwrap_or_else(|p| p.into_inner()).next();
                            let Some(extent) = next else { break };
                            let free = free_rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                            let Ok(mut buf) = free else { break };
                            match self.read(&extent, &mut buf) {
                                Ok(range) => {
                                    if full_tx.send((extent, buf, range)).is_err() {
                                        break;
                                    }
                                }
                                Err(e) => fail(e),
                            }
                        }
                    });
                if let Err(e) = started {
                    fail(io_err("start a reading thread", self.dir())(e));
                }
            }
            drop((full_tx, free_rx));
            for _ in 0..workers {
                let (free_tx, full_rx) = (free_tx.clone(), Arc::clone(&full_rx));
                let (stop, fail) = (&stop, &fail);
                let started = std::thread::Builder::new()
                    .name("supervise-decode".into())
                    .spawn_scoped(scope, move || {
                        let mut records = match RecordReader::new(&self.dir()) {
                            Ok(r) => r,
                            Err(e) => return fail(e),
                        };
                        loop {
                            let full = full_rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                            let Ok((extent, buf, range)) = full else {
                                break;
                            };
                            if !stop.load(Ordering::Relaxed)
                                && let Err(e) =
                                    self.decode(&mut records, extent, &buf.bytes()[range])
                            {
                                fail(e);
                            }
                            let _ = free_tx.send(buf);
                        }
                    });
                if let Err(e) = started {
                    fail(io_err("start a decoding thread", self.dir())(e));
                }
            }
            drop((free_tx, full_rx));
        });
        match failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Encoder;
    use crate::format::{PACK_MAGIC, file_header};

    /// Writes packs of records of `chunks` (each raw chunk, the pack it goes to, and filler
    /// bytes written before it); returns the packs and the chunks' references.
    fn packs(
        dir: &std::path::Path,
        chunks: &[(Vec<u8>, u32, usize)],
        count: u32,
    ) -> (Vec<(PathBuf, File)>, Vec<ChunkRef>) {
        let mut bytes: Vec<Vec<u8>> = (0..count)
            .map(|_| file_header(PACK_MAGIC).to_vec())
            .collect();
        let mut enc = Encoder::new().unwrap();
        let mut refs = Vec::new();
        for (raw, pack, filler) in chunks {
            let pack_bytes = &mut bytes[*pack as usize];
            pack_bytes.resize(pack_bytes.len() + filler, 0xee);
            let e = enc.encode(raw, *blake3::hash(raw).as_bytes(), 8).unwrap();
            refs.push(ChunkRef {
                hash: e.header.hash,
                pack: *pack,
                offset: pack_bytes.len() as u64,
                stored_len: e.header.stored_len,
                raw_len: e.header.raw_len,
            });
            pack_bytes.extend_from_slice(&e.header.encode());
            pack_bytes.extend_from_slice(&e.data);
        }
        let files = bytes
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let path = dir.join(format!("{i}.pack"));
                std::fs::write(&path, b).unwrap();
                let file = File::open(&path).unwrap();
                (path, file)
            })
            .collect();
        (files, refs)
    }

    /// A chunk of `len` bytes that compresses some (seeded).
    fn chunk(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i % 3 == 0 {
                    (x >> 40) as u8
                } else {
                    (i / 64) as u8
                }
            })
            .collect()
    }

    /// The extent length and the number of extents a read of `refs` on `threads` plans.
    fn planned(refs: &[ChunkRef], threads: usize) -> (u64, usize) {
        let mut outs: Vec<Vec<u8>> = refs.iter().map(|c| vec![0; c.raw_len as usize]).collect();
        let items: Vec<Item> = outs
            .iter_mut()
            .map(|o| o.as_mut_slice())
            .zip(refs)
            .collect();
        let most = extent_len(&items, threads);
        (most, plan(items, most).len())
    }

    /// How a test reads.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Mode {
        /// Direct where the filesystem allows.
        Direct,
        /// Every pack buffered from the start.
        Buffered,
        /// Every direct read refused with EINVAL.
        Refused,
    }

    /// Reads `refs` back into fresh buffers with `threads` as `mode` says, as a snapshot
    /// reader does; checks that direct reads were used, or refused and given up, when this
    /// filesystem has them.
    fn read_back(
        files: &[(PathBuf, File)],
        refs: &[ChunkRef],
        threads: usize,
        mode: Mode,
    ) -> Result<Vec<Vec<u8>>> {
        let mut outs: Vec<Vec<u8>> = refs.iter().map(|c| vec![0; c.raw_len as usize]).collect();
        let items: Vec<Item> = outs
            .iter_mut()
            .map(|o| o.as_mut_slice())
            .zip(refs)
            .collect();
        let packs = Packs::new(files);
        match mode {
            Mode::Direct => {}
            Mode::Buffered => packs
                .refused
                .iter()
                .for_each(|r| r.store(true, Ordering::Relaxed)),
            Mode::Refused => packs.einval.store(true, Ordering::Relaxed),
        }
        let most = extent_len(&items, threads);
        let result = packs.read_all(plan(items, most), threads);
        if result.is_ok() && reopen_direct(&files[0].1).is_some() {
            let opened = packs.direct[0].get().is_some_and(|d| d.is_some());
            let refused = packs.refused[0].load(Ordering::Relaxed);
            assert_eq!(
                (opened, refused),
                (mode != Mode::Buffered, mode != Mode::Direct)
            );
        }
        result.map(|()| outs)
    }

    #[test]
    fn records_are_grouped_by_pack_and_nearness_within_the_extent_size() {
        // Records of 1 MiB (stored raw: noise), out of order, in two packs, one after a gap
        // longer than GAP and one after a shorter gap.
        let dir = tempfile::tempdir().unwrap();
        let noise = |seed| {
            let mut x: u64 = seed;
            (0..1 << 20)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect::<Vec<u8>>()
        };
        let far = GAP as usize + 1;
        let chunks: Vec<(Vec<u8>, u32, usize)> = vec![
            (noise(1), 0, 0),
            (noise(2), 1, 0),
            (noise(3), 0, 1000),
            (noise(4), 0, far),
            (noise(5), 0, 0),
            (noise(6), 0, 0),
            (noise(7), 0, 0),
            (noise(8), 0, 0),
        ];
        let (_files, refs) = packs(dir.path(), &chunks, 2);
        let mut outs: Vec<Vec<u8>> = refs.iter().map(|c| vec![0; c.raw_len as usize]).collect();
        let mut items: Vec<Item> = outs
            .iter_mut()
            .map(|o| o.as_mut_slice())
            .zip(&refs)
            .collect();
        items.reverse();
        let extents = plan(items, EXTENT);
        let groups: Vec<(usize, Vec<u64>)> = extents
            .iter()
            .map(|e| (e.pack, e.items.iter().map(|(_, c)| c.offset).collect()))
            .collect();
        let at = |i: usize| refs[i].offset;
        // Pack 0: chunks 0 and 2 (a 1000-byte gap) together; 3 after a long gap starts
        // another, which takes 4, 5 and 6 up to EXTENT; 7 starts the next. Then pack 1.
        assert_eq!(
            groups,
            vec![
                (0, vec![at(0), at(2)]),
                (0, vec![at(3), at(4), at(5)]),
                (0, vec![at(6), at(7)]),
                (1, vec![at(1)]),
            ]
        );
        for e in &extents {
            assert!(e.end - e.start <= EXTENT, "{}..{}", e.start, e.end);
            let last = e.items.last().unwrap().1;
            assert_eq!(e.end, last.offset + record_len(last));
            assert_eq!(e.start, e.items[0].1.offset);
        }
    }

    #[test]
    fn every_chunk_is_read_back_direct_or_buffered_on_any_number_of_threads() {
        let dir = tempfile::tempdir().unwrap();
        // 300 chunks over three packs, some after gaps, one referenced twice (a dedup twin).
        let chunks: Vec<(Vec<u8>, u32, usize)> = (0..300u64)
            .map(|i| {
                (
                    chunk(40_000 + (i as usize * 97) % 30_000, i),
                    (i % 7 % 3) as u32,
                    if i % 11 == 0 { 5000 } else { 0 },
                )
            })
            .collect();
        let (files, mut refs) = packs(dir.path(), &chunks, 3);
        refs.push(refs[17]);
        let mut want: Vec<&[u8]> = chunks.iter().map(|(c, _, _)| c.as_slice()).collect();
        want.push(&chunks[17].0);
        for threads in [1, 2, 5] {
            for mode in [Mode::Direct, Mode::Buffered, Mode::Refused] {
                let got = read_back(&files, &refs, threads, mode).unwrap();
                assert!(
                    got.iter().zip(&want).all(|(g, w)| g == w),
                    "{threads} {mode:?}"
                );
            }
        }
    }

    #[test]
    fn a_damaged_or_short_pack_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        // More extents than buffers, so that readers wait for buffers the decoders give
        // back while the error stops them.
        let chunks: Vec<(Vec<u8>, u32, usize)> =
            (0..800u64).map(|i| (chunk(60_000, i), 0, 0)).collect();
        let (files, refs) = packs(dir.path(), &chunks, 1);
        let (path, _) = &files[0];
        assert!(planned(&refs, 2).1 > READERS + 2 + AHEAD);
        let good = std::fs::read(path).unwrap();
        // One byte of a stored chunk flipped, early or in the middle: that chunk's hash fails.
        for damaged in [30, 400] {
            let mut bad = good.clone();
            bad[refs[damaged].offset as usize + RecordHeader::LEN + 10] ^= 1;
            std::fs::write(path, &bad).unwrap();
            let files = vec![(path.clone(), File::open(path).unwrap())];
            for mode in [Mode::Direct, Mode::Buffered] {
                let err = read_back(&files, &refs, 2, mode).unwrap_err();
                assert!(
                    matches!(&err, Error::Corrupt { path: p, .. } if p == path),
                    "chunk {damaged} {mode:?}: {err}"
                );
            }
        }
        // The pack cut short in its last record: the end of the file, named.
        std::fs::write(path, &good[..good.len() - 100]).unwrap();
        let files = vec![(path.clone(), File::open(path).unwrap())];
        for mode in [Mode::Direct, Mode::Buffered] {
            let err = read_back(&files, &refs, 2, mode).unwrap_err();
            match &err {
                Error::Io {
                    path: p, source, ..
                } => {
                    assert_eq!(p, path);
                    assert_eq!(source.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
                }
                other => panic!("{other}"),
            }
        }
    }

    #[test]
    fn a_small_read_is_cut_into_extents_for_every_thread() {
        let dir = tempfile::tempdir().unwrap();
        // 2 MiB in one pack, records side by side: one extent of EXTENT would leave all but
        // one thread idle.
        let chunks: Vec<(Vec<u8>, u32, usize)> =
            (0..32u64).map(|i| (chunk(64 << 10, i), 0, 0)).collect();
        let (_files, refs) = packs(dir.path(), &chunks, 1);
        for threads in [1, 2, 4] {
            let (most, extents) = planned(&refs, threads);
            assert!(most >= MIN_EXTENT);
            assert!(extents >= 2 * threads, "{threads}: {extents}");
        }
    }
}
