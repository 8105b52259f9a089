//! `supervise bench`: measures, in one run and on one store, the machine's limits (memcpy,
//! blake3, zstd, decoding, sequential write + fsync, cold read, first touch of memory), the
//! naive way to checkpoint (compress everything, write a new file, fsync) and `supervise`
//! itself, on a smooth f64 field: a full snapshot, one after 1% and after 10% changed
//! (scattered 64 KiB blocks), the same 1% without dirty tracking, and a restore. Ratios, not
//! absolute numbers, are what carries over between runs on a noisy machine.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytesize::ByteSize;
use serde::Serialize;
use supervise_shim::{CaptureMode, Config, Next, Shim};
use supervise_store::format::CHUNK_SIZE;
use supervise_store::{SnapshotReader, Store};

use crate::outln;

/// One measured figure.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// What was measured: "full", "1% changed", ...
    pub scenario: String,
    /// Which figure: "pause", "durable", "written", "restore".
    pub metric: &'static str,
    /// Ours.
    pub ours: f64,
    /// What the machine's limits allow, from the limits measured in the same run.
    pub limit: Option<f64>,
    /// The naive way, measured in the same run.
    pub naive: Option<f64>,
    /// Unit of the three figures.
    pub unit: &'static str,
}

/// The machine's limits, measured.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Limits {
    /// memcpy, bytes/s.
    pub memcpy: f64,
    /// blake3 on 64 KiB chunks, all cores, bytes/s.
    pub blake3: f64,
    /// zstd level 1 of byte-shuffled chunks, all cores, bytes/s of input.
    pub zstd: f64,
    /// zstd compression ratio on the field (raw / stored).
    pub ratio: f64,
    /// Sequential write + fsync, bytes/s (the faster of buffered and O_DIRECT).
    pub write: f64,
    /// Sequential read, bytes/s: the best of three (cold if the page cache could be dropped).
    pub read: f64,
    /// Whether the page cache could be dropped for the read and restore figures.
    pub cold: bool,
    /// First touch of fresh memory (a new mapping on huge pages, written on all cores),
    /// bytes/s: what a restore pays to fill memory the program has never used.
    pub first_touch: f64,
    /// Decoding stored chunks as a restore does (zstd, unshuffle, blake3 to verify), all
    /// cores, into memory already touched, bytes/s of output.
    pub decode: f64,
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// A smooth field, like a simulation's temperature or pressure.
fn field(n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| (i as f64 * 1e-6).sin() * 300.0 + (i as f64 * 3e-3).cos())
        .collect()
}

/// Changes `fraction` of the 64 KiB blocks of `data` (distinct, pseudo-random, aligned).
fn change(data: &mut [f64], fraction: f64, seed: u64) -> u64 {
    let per = CHUNK_SIZE / 8;
    let blocks = data.len() / per;
    let want = ((blocks as f64) * fraction).round().max(1.0) as usize;
    let mut picked = vec![false; blocks];
    let mut x = seed | 1;
    let mut done = 0;
    while done < want {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = (x as usize) % blocks;
        if !std::mem::replace(&mut picked[b], true) {
            for v in &mut data[b * per..(b + 1) * per] {
                *v += 1e-3;
            }
            done += 1;
        }
    }
    (done * CHUNK_SIZE) as u64
}

fn best_of<F: FnMut() -> Duration>(runs: usize, mut f: F) -> Duration {
    (0..runs).map(|_| f()).min().unwrap_or_default()
}

/// Drops the page cache (needs root); says whether it could.
fn drop_caches() -> bool {
    nix::unistd::sync();
    fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// Resets the process's peak resident memory to what it holds now (`5` to
/// `/proc/self/clear_refs`); says whether it could.
fn reset_peak() -> bool {
    fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// A `kB` line of `/proc/self/status` (`VmRSS`, `VmHWM`), in bytes.
fn status_bytes(field: &str) -> Result<u64> {
    let status = fs::read_to_string("/proc/self/status")?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .with_context(|| format!("no {field} in /proc/self/status"))?;
    Ok(kib * 1024)
}

fn measure_limits(dir: &Path, data: &[u8]) -> Result<Limits> {
    let size = data.len() as f64;
    // A destination already faulted in (vec![1; n] writes every page), and a copy the
    // optimiser cannot drop.
    let mut dst = vec![1u8; data.len()];
    let memcpy = size
        / best_of(3, || {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(data));
            std::hint::black_box(&mut dst);
            t.elapsed()
        })
        .as_secs_f64();
    drop(dst);

    let per_thread = data.len().div_ceil(threads());
    let blake3 = size
        / best_of(2, || {
            let t = Instant::now();
            std::thread::scope(|s| {
                for part in data.chunks(per_thread) {
                    s.spawn(move || {
                        for chunk in part.chunks(CHUNK_SIZE) {
                            std::hint::black_box(blake3::hash(chunk));
                        }
                    });
                }
            });
            t.elapsed()
        })
        .as_secs_f64();

    // zstd on (at most) 256 MiB of the field, shuffled as the shim does; the best of three,
    // as for every limit below that a VM's neighbours can slow (a limit is what the machine
    // can do: one sample of the write or the read varied by 2x from minute to minute).
    let sample = &data[..data.len().min(256 << 20)];
    let per_thread = sample.len().div_ceil(threads());
    let mut stored = 0;
    let zstd_time = best_of(3, || {
        let t = Instant::now();
        stored = std::thread::scope(|s| {
            let handles: Vec<_> = sample
                .chunks(per_thread)
                .map(|part| {
                    s.spawn(move || {
                        let mut shuffled = Vec::new();
                        let mut total = 0;
                        for chunk in part.chunks(CHUNK_SIZE) {
                            supervise_store::codec::shuffle(chunk, 8, &mut shuffled);
                            total += zstd::bulk::compress(
                                &shuffled,
                                supervise_store::codec::ZSTD_LEVEL_SHUFFLED,
                            )
                            .map_or(chunk.len(), |c| c.len());
                        }
                        total
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        t.elapsed()
    });
    let zstd = sample.len() as f64 / zstd_time.as_secs_f64();
    let ratio = sample.len() as f64 / stored.max(1) as f64;
    let decode = decode_speed(sample)?;

    let path = dir.join("limits.tmp");
    let mut buffered = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let mut file =
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        for block in data.chunks(4 << 20) {
            file.write_all(block)?;
        }
        file.sync_all()?;
        buffered = buffered.max(size / t.elapsed().as_secs_f64());
    }
    // The same with O_DIRECT (whole aligned 4 MiB blocks), as supervise writes its packs;
    // the faster of the two is the limit.
    let direct = (0..3)
        .filter_map(|_| direct_write_speed(&dir.join("limits-direct.tmp"), data))
        .fold(0.0, f64::max);
    let write = buffered.max(direct);
    // The best of three cold reads.
    let mut cold = true;
    let mut read = 0f64;
    let mut buf = vec![0u8; 4 << 20];
    for _ in 0..3 {
        cold &= drop_caches();
        let t = Instant::now();
        let mut file = File::open(&path)?;
        while file.read(&mut buf)? > 0 {}
        read = read.max(size / t.elapsed().as_secs_f64());
    }
    fs::remove_file(&path)?;
    Ok(Limits {
        memcpy,
        blake3,
        zstd,
        ratio,
        write,
        read,
        cold,
        first_touch: (0..3)
            .map(|_| first_touch_speed(data.len()))
            .fold(0.0, f64::max),
        decode,
    })
}

/// Bytes per second at which all cores decode `sample`'s chunks as a restore does: each
/// chunk's record (made first, untimed, as the writer makes it) is decompressed, unshuffled
/// and verified against its hash into memory already touched.
fn decode_speed(sample: &[u8]) -> Result<f64> {
    use supervise_store::codec::{Decoder, Encoder};
    let per_thread = sample
        .len()
        .div_ceil(threads())
        .next_multiple_of(CHUNK_SIZE);
    let parts: Vec<(&[u8], Vec<supervise_store::codec::Encoded>)> = std::thread::scope(|s| {
        let handles: Vec<_> = sample
            .chunks(per_thread)
            .map(|part| {
                s.spawn(move || -> std::io::Result<_> {
                    let mut encoder = Encoder::new()?;
                    let records = part
                        .chunks(CHUNK_SIZE)
                        .map(|c| encoder.encode(c, *blake3::hash(c).as_bytes(), 8))
                        .collect::<std::io::Result<Vec<_>>>()?;
                    Ok((part, records))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("encode thread"))
            .collect::<std::io::Result<_>>()
    })?;
    // Destinations touched before the clock starts: first touch has its own figure.
    let mut outs: Vec<Vec<u8>> = parts.iter().map(|(p, _)| vec![1u8; p.len()]).collect();
    let path = Path::new("bench");
    let t = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = parts
            .iter()
            .zip(outs.iter_mut())
            .map(|((_, records), out)| {
                s.spawn(move || -> Result<()> {
                    let mut decoder = Decoder::new()?;
                    for (record, dest) in records.iter().zip(out.chunks_mut(CHUNK_SIZE)) {
                        decoder.decode(&record.header, &record.data, dest, path)?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("decode thread"))
    })?;
    let speed = sample.len() as f64 / t.elapsed().as_secs_f64();
    if parts.iter().zip(&outs).any(|((p, _), o)| p != o) {
        bail!("the decode limit does not round-trip");
    }
    Ok(speed)
}

/// Bytes per second at which fresh memory is first written: a new anonymous mapping of `len`
/// bytes on transparent huge pages (as the shim maps regions), written on all cores. The kernel
/// zeroes each page as it is first touched; on a VM the host may back it only then.
fn first_touch_speed(len: usize) -> f64 {
    const HUGE: usize = 2 << 20;
    let mapped = len + HUGE;
    // SAFETY: a new private anonymous mapping with no address hint; checked for failure, and
    // unmapped below after the threads that write it have ended.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            mapped,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return f64::NAN;
    }
    // 2 MiB-aligned inside the mapping, as the shim maps regions.
    let ptr = ((base as usize).next_multiple_of(HUGE)) as *mut libc::c_void;
    // SAFETY: advice on `len` bytes inside the mapping just made (backing only), then those
    // bytes as one slice, written by the threads below on disjoint parts.
    let mem = unsafe {
        libc::madvise(ptr, len, libc::MADV_HUGEPAGE);
        std::slice::from_raw_parts_mut(ptr.cast::<u8>(), len)
    };
    let per_thread = len.div_ceil(threads());
    let t = Instant::now();
    std::thread::scope(|s| {
        for part in mem.chunks_mut(per_thread) {
            s.spawn(move || part.fill(1));
        }
    });
    let speed = len as f64 / t.elapsed().as_secs_f64();
    // SAFETY: unmapping the mapping made above; `mem` is not used after this.
    unsafe { libc::munmap(base, mapped) };
    speed
}

/// Writes `data` with O_DIRECT in aligned 4 MiB blocks and fsyncs; bytes per second, or
/// `None` where the filesystem refuses O_DIRECT.
fn direct_write_speed(path: &Path, data: &[u8]) -> Option<f64> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    const BLOCK: usize = 4 << 20;
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
        .open(path)
        .ok()?;
    let mut backing = vec![0u8; BLOCK + 4096];
    let align = backing.as_ptr().align_offset(4096);
    let t = Instant::now();
    let mut written = 0u64;
    for block in data.chunks_exact(BLOCK) {
        backing[align..align + BLOCK].copy_from_slice(block);
        file.write_all_at(&backing[align..align + BLOCK], written)
            .ok()?;
        written += BLOCK as u64;
    }
    file.sync_all().ok()?;
    let speed = written as f64 / t.elapsed().as_secs_f64();
    drop(file);
    let _ = fs::remove_file(path);
    (written > 0).then_some(speed)
}

/// The naive way: compress everything (all cores), write a new file, fsync, rename, fsync the
/// directory. Returns (seconds, bytes written, restore seconds, the peak resident memory of
/// the snapshot, if it could be measured).
fn naive(dir: &Path, data: &[u8]) -> Result<(f64, u64, f64, Option<u64>)> {
    let peaks = reset_peak();
    let t = Instant::now();
    let per_thread = data.len().div_ceil(threads());
    let parts: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = data
            .chunks(per_thread)
            .map(|part| s.spawn(move || zstd::bulk::compress(part, 1)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("compress thread"))
            .collect::<std::io::Result<_>>()
    })?;
    let tmp = dir.join("naive.tmp");
    let dst = dir.join("naive.ckpt");
    let mut file = File::create(&tmp)?;
    let mut written = 0u64;
    for part in &parts {
        file.write_all(&(part.len() as u64).to_le_bytes())?;
        file.write_all(part)?;
        written += 8 + part.len() as u64;
    }
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, &dst)?;
    File::open(dir)?.sync_all()?;
    let secs = t.elapsed().as_secs_f64();
    let peak = peaks.then(|| status_bytes("VmHWM")).transpose()?;
    drop(parts);

    drop_caches();
    let t = Instant::now();
    let bytes = fs::read(&dst)?;
    let mut out = vec![0u8; data.len()];
    let mut at = 0;
    let mut pos = 0;
    while at < bytes.len() {
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into()?) as usize;
        let n = zstd::bulk::decompress_to_buffer(&bytes[at + 8..at + 8 + len], &mut out[pos..])?;
        pos += n;
        at += 8 + len;
    }
    let restore = t.elapsed().as_secs_f64();
    if out != data {
        bail!("the naive restore does not round-trip");
    }
    fs::remove_file(&dst)?;
    Ok((secs, written, restore, peak))
}

/// What one snapshot of ours cost.
struct Taken {
    pause: f64,
    durable: f64,
    written: u64,
    seq: u64,
}

fn take(shim: &mut Shim, tag: &str) -> Result<Taken> {
    let captured = match shim.snapshot(Some(tag), |_| Ok(()))? {
        Next::Continue(captured) => captured.context("the shim is not active")?,
        Next::Stop => bail!("asked to stop"),
    };
    let report = shim.wait_durable()?.context("no snapshot was written")?;
    Ok(Taken {
        pause: captured.pause.as_secs_f64(),
        durable: report.duration_ms as f64 / 1000.0,
        written: report.bytes_written,
        seq: report.seq,
    })
}

fn shim(store: &Path, job: &str, capture: CaptureMode, track_writes: bool) -> Result<Shim> {
    let mut config = Config::local(store, job);
    config.capture = capture;
    config.track_writes = track_writes;
    config.restore = supervise_store::config::RestoreFrom::Nothing;
    Ok(Shim::open(config)?)
}

/// The first snapshot of a new `job` in `store` whose one region holds `state`.
fn take_first(store: &Path, job: &str, state: &[f64]) -> Result<Taken> {
    let mut shim = shim(store, job, CaptureMode::Auto, true)?;
    let mut region = shim.region::<f64>("field", state.len())?;
    region.copy_from_slice(state);
    take(&mut shim, "full")
}

/// Adds the three rows of one snapshot (pause in ms, durable in s, written in MiB) with the
/// limits `[pause ms, durable s, written bytes]` and the naive way's `(seconds, bytes)`; a
/// limit that is not finite is left out.
fn snapshot_rows(
    rows: &mut Vec<Row>,
    scenario: &str,
    t: &Taken,
    limits: [f64; 3],
    naive: (f64, f64),
) {
    let mib = |b: f64| b / 1048576.0;
    let figures = [
        ("pause", t.pause * 1000.0, limits[0], naive.0 * 1000.0, "ms"),
        ("durable", t.durable, limits[1], naive.0, "s"),
        (
            "written",
            mib(t.written as f64),
            mib(limits[2]),
            mib(naive.1),
            "MiB",
        ),
    ];
    for (metric, ours, limit, naive, unit) in figures {
        rows.push(Row {
            scenario: scenario.to_owned(),
            metric,
            ours,
            limit: Some(limit).filter(|l| l.is_finite()),
            naive: Some(naive),
            unit,
        });
    }
}

/// Runs the benchmark on `size` bytes of state in `store`; returns the limits and the rows.
pub fn run(
    store: &Path,
    size: u64,
    say: &dyn Fn(&str),
) -> Result<(Limits, Vec<Row>, &'static str)> {
    let n = (size as usize / CHUNK_SIZE).max(1) * CHUNK_SIZE / 8;
    let size = (n * 8) as f64;
    let dir: PathBuf = store.join(format!("bench-{}", std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let result = run_in(&dir, n, size, say);
    let _ = fs::remove_dir_all(&dir);
    result
}

fn run_in(
    dir: &Path,
    n: usize,
    size: f64,
    say: &dyn Fn(&str),
) -> Result<(Limits, Vec<Row>, &'static str)> {
    say(&format!(
        "preparing a smooth f64 field of {}",
        ByteSize(size as u64).display().iec()
    ));
    let base = field(n);
    let raw: &[u8] = bytemuck::cast_slice(&base);
    say("measuring the machine: memcpy, blake3, zstd, write + fsync, read");
    let lim = measure_limits(dir, raw)?;
    say("measuring the naive way: zstd everything, write a new file, fsync");
    let before_naive = status_bytes("VmRSS")?;
    let (naive_s, naive_bytes, naive_restore, naive_peak) = naive(dir, raw)?;
    // What the naive snapshot holds besides the state: its compressed copy.
    let naive_memory = naive_peak.map(|peak| peak.saturating_sub(before_naive));
    let peaks = naive_peak.is_some();
    // Only the region holds the state from here on, as in a real program (a fork's cost
    // grows with all the memory the process has).
    drop(base);

    say("measuring supervise");
    let store = dir.join("store");
    let mut ours = shim(&store, "dirty", CaptureMode::Auto, true)?;
    let mode = ours.capture_mode();
    let mut region = ours.region::<f64>("field", n)?;
    region.copy_from_slice(&field(n));
    // The program alone with its state: what the memory rows count from.
    let alone = status_bytes("VmRSS")?;
    let full = take(&mut ours, "full")?;
    // Limits for a snapshot of `changed` raw bytes: copy them; hash what must be hashed and
    // compress what changed, on the same cores (so the two add up); write what they compress
    // to, on the disk at the same time.
    let pause_limit = |copied: f64| copied / lim.memcpy * 1000.0;
    let durable_limit = |hashed: f64, changed: f64| {
        let cpu = hashed / lim.blake3 + changed / lim.zstd;
        cpu.max(changed / lim.ratio / lim.write)
    };
    let naive_rows = (naive_s, naive_bytes as f64);
    let mut rows = Vec::new();
    let mut last = full.seq;
    // Two snapshots at each rate of change first, then three, the median: the first captures
    // after a full snapshot (or at a new rate) copy into fresh buffer memory, which this VM
    // backs slowly (3-40 ms for the first 1% capture, and up to 8 ms for the two after it, in
    // loops of twelve); a long run is made of the later ones, as the memory rows' steady
    // state below is.
    for (label, fraction, rounds) in [("1% changed", 0.01, 3u64), ("10% changed", 0.10, 3)] {
        for round in 0..2 {
            change(&mut region, fraction, 5 + round * 1000);
            take(&mut ours, "warm-up")?;
        }
        let mut runs = Vec::new();
        let mut changed = 0.0;
        for round in 0..rounds {
            changed = change(&mut region, fraction, 7 + round * 1000) as f64;
            runs.push(take(&mut ours, label)?);
        }
        last = runs.iter().map(|r| r.seq).max().unwrap_or(last);
        runs.sort_by(|a, b| a.pause.total_cmp(&b.pause));
        let median = &runs[runs.len() / 2];
        let hashed = if mode == "dirty" { changed } else { size };
        let limits = [
            pause_limit(changed),
            durable_limit(hashed, changed),
            changed / lim.ratio,
        ];
        snapshot_rows(&mut rows, label, median, limits, naive_rows);
    }

    // Memory: a program that changes a share of its state between snapshots takes one and
    // changes as much again while it is written. The row is the peak resident memory over the
    // program alone with its state; the limit is the changed bytes (1% and 10%: what a capture
    // copies) or the capture memory budget (100%).
    if peaks {
        say("measuring supervise: memory while snapshots are written");
        let budget = supervise_store::config::CaptureMemory::default()
            .bytes(size as u64, supervise_store::config::memory_available())
            as f64;
        for (label, fraction) in [
            ("1% changed, memory", 0.01),
            ("10% changed, memory", 0.10),
            ("100% changed, memory", 1.0),
        ] {
            // Two snapshots at this rate first: the steady state of a program that changes
            // this much between snapshots.
            for seed in [21, 22] {
                change(&mut region, fraction, seed);
                take(&mut ours, "warm-up")?;
            }
            let changed = change(&mut region, fraction, 11) as f64;
            reset_peak();
            let captured = match ours.snapshot(Some(label), |_| Ok(()))? {
                Next::Continue(captured) => captured.context("the shim is not active")?,
                Next::Stop => bail!("asked to stop"),
            };
            change(&mut region, fraction, 13);
            let report = ours.wait_durable()?.context("no snapshot was written")?;
            let extra = status_bytes("VmHWM")?.saturating_sub(alone) as f64;
            let t = Taken {
                pause: captured.pause.as_secs_f64(),
                durable: report.duration_ms as f64 / 1000.0,
                written: report.bytes_written,
                seq: report.seq,
            };
            if fraction >= 1.0 {
                let limits = [
                    pause_limit(changed),
                    durable_limit(changed, changed),
                    changed / lim.ratio,
                ];
                snapshot_rows(&mut rows, "100% changed", &t, limits, naive_rows);
            }
            let mib = |b: f64| b / 1048576.0;
            rows.push(Row {
                scenario: label.into(),
                metric: "memory",
                ours: mib(extra),
                limit: Some(mib(if fraction >= 1.0 { budget } else { changed })),
                naive: naive_memory.map(|m| mib(m as f64)),
                unit: "MiB",
            });
            // The changes made during the write go into a snapshot of their own.
            last = take(&mut ours, "settle")?.seq;
        }
    }

    // A job's first snapshot three times, the row the median of them: one sample on a shared
    // machine varied by a fifth from run to run, where each limit is the best of three. The
    // other two are taken here, after the memory rows (the allocator keeps some of what they
    // free), in jobs of their own (nothing to deduplicate against), of the field as the rows
    // above left it (every value moved by a few thousandths: it compresses alike), beside
    // the first job's region. All three are said, to see whether the later ones differ.
    let mut fulls = vec![full];
    for job in ["full-b", "full-c"] {
        fulls.push(take_first(&store, job, &region)?);
    }
    say(&format!(
        "full snapshot, durable in {} s (first, then the two later jobs)",
        fulls
            .iter()
            .map(|t| format!("{:.3}", t.durable))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    fulls.sort_by(|a, b| a.durable.total_cmp(&b.durable));
    let limits = [
        pause_limit(size),
        durable_limit(size, size),
        size / lim.ratio,
    ];
    let mut full_rows = Vec::new();
    snapshot_rows(&mut full_rows, "full", &fulls[1], limits, naive_rows);
    rows.splice(0..0, full_rows);

    let expected: Vec<f64> = region.to_vec();
    drop(region);
    drop(ours);
    // Without dirty tracking (kernels before 6.7): every chunk is hashed again.
    for (capture, label, job) in [
        (CaptureMode::Copy, "1% changed, copy, no tracking", "copy"),
        (CaptureMode::Fork, "1% changed, fork, no tracking", "fork"),
    ] {
        say(&format!("measuring supervise: {label}"));
        let mut other = shim(&store, job, capture, false)?;
        let mut plain = other.region::<f64>("field", n)?;
        plain.copy_from_slice(&expected);
        take(&mut other, "full")?;
        let changed = change(&mut plain, 0.01, 7) as f64;
        let t = take(&mut other, label)?;
        // A fork's pause has no measured limit here (NaN: none in the row).
        let pause = if capture == CaptureMode::Copy {
            pause_limit(size)
        } else {
            f64::NAN
        };
        let limits = [pause, durable_limit(size, changed), changed / lim.ratio];
        snapshot_rows(&mut rows, label, &t, limits, naive_rows);
    }

    // The restore a program does at start: the shim opens the store, verifies the snapshot
    // and fills the region the program asks for.
    // The median of three, each from a cold page cache.
    say("measuring restore");
    let mut restores = Vec::new();
    for _ in 0..3 {
        drop_caches();
        let t = Instant::now();
        let mut config = Config::local(&store, "dirty");
        config.restore = supervise_store::config::RestoreFrom::Exact(last);
        let mut back = Shim::open(config)?;
        let region = back.region::<f64>("field", n)?;
        restores.push(t.elapsed().as_secs_f64());
        if region[..] != expected[..] {
            bail!("the restore does not give back the state");
        }
    }
    restores.sort_by(f64::total_cmp);
    let restore = restores[1];
    let stored: u64 = SnapshotReader::open(&Store::open(&store)?.job("dirty")?, last)?
        .manifest()
        .entries
        .iter()
        .flat_map(|e| &e.chunks)
        .map(|c| u64::from(c.stored_len))
        .sum();
    // The limit: a cold read of the packs. A restore also decodes and verifies every chunk
    // and fills memory the program never used, on the same cores (so the two add up), while
    // the disk reads: the second row's limit is whichever of the two is longer.
    let read = stored as f64 / lim.read;
    let work = size / lim.decode + size / lim.first_touch;
    for (scenario, limit) in [
        ("restore", read),
        ("restore, read or decode", read.max(work)),
    ] {
        rows.push(Row {
            scenario: scenario.into(),
            metric: "time",
            ours: restore,
            limit: Some(limit),
            naive: Some(naive_restore),
            unit: "s",
        });
    }
    Ok((lim, rows, mode))
}

/// Prints the human table.
pub fn print_table(size: u64, lim: &Limits, rows: &[Row], mode: &str) -> std::io::Result<()> {
    let gib = |b: f64| b / (1u64 << 30) as f64;
    outln!(
        "machine: memcpy {:.1} GiB/s, blake3 {:.1} GiB/s ({} threads), zstd {:.1} GiB/s at ratio {:.2}, decode {:.1} GiB/s, write+fsync {:.2} GiB/s, read {:.2} GiB/s ({}), first touch of memory {:.2} GiB/s",
        gib(lim.memcpy),
        gib(lim.blake3),
        threads(),
        gib(lim.zstd),
        lim.ratio,
        gib(lim.decode),
        gib(lim.write),
        gib(lim.read),
        if lim.cold {
            "cold"
        } else {
            "page cache could not be dropped: warm"
        },
        gib(lim.first_touch)
    )?;
    outln!(
        "state: {} of smooth f64; capture: {mode}",
        ByteSize(size).display().iec()
    )?;
    outln!()?;
    outln!(
        "{:<30} {:<8} {:>10} {:>10} {:>10} {:>9} {:>10}",
        "scenario",
        "metric",
        "ours",
        "limit",
        "naive",
        "ours/lim",
        "naive/ours"
    )?;
    for r in rows {
        let cell = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.3}"));
        let ratio = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}x"));
        outln!(
            "{:<30} {:<8} {:>10} {:>10} {:>10} {:>9} {:>10}",
            r.scenario,
            r.metric,
            format!("{:.3} {}", r.ours, r.unit),
            cell(r.limit),
            cell(r.naive),
            ratio(r.limit.map(|l| r.ours / l)),
            ratio(r.naive.map(|n| n / r.ours))
        )?;
    }
    Ok(())
}
