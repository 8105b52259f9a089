//! `supervise bench --remote URL`: what the durable tier costs, measured side by side in one
//! run against the same server: a full snapshot's upload and a 1%-changed one's, against a
//! plain PUT of the same bytes (the limit) and against the naive way (the whole state sent
//! each time); and a fresh-node restore (fetch, verify, read into memory) against a plain GET
//! of the same bytes. The targets are checked and printed: bytes sent after a 1%
//! change <= [`DELTA_TARGET`] x the changed bytes, a fresh-node restore <= [`RESTORE_TARGET`] x
//! the plain GET. The restore and the plain GET are each measured twice, alternately, and the
//! faster of each kept (a shared machine's noise falls on both alike).

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use supervise_store::{SnapshotReader, SnapshotWriter, Store};

use super::upload::{Fence, Report, UploadConfig, Uploads};
use super::{Tier, fetch};
use crate::human;

/// The target for a fresh-node restore: at most this many times a plain GET of the
/// same bytes.
pub const RESTORE_TARGET: f64 = 1.5;

/// The target for an upload after a 1% change: at most this many times the bytes
/// changed.
pub const DELTA_TARGET: f64 = 1.1;

/// How many times the restore and the plain GET are each measured (the fastest kept).
const ROUNDS: usize = 2;

/// One run's figures.
#[derive(Debug, Serialize)]
pub struct Figures {
    /// The state's size.
    pub state_bytes: u64,
    /// Bytes changed for the second snapshot (1% of the state, in 64 KiB blocks).
    pub changed_bytes: u64,
    /// Bytes the first upload sent, and its time.
    pub full_sent_bytes: u64,
    /// Seconds.
    pub full_upload_s: f64,
    /// A plain PUT of `full_sent_bytes`: the limit.
    pub plain_put_s: f64,
    /// Bytes the upload after a 1% change sent, and its time.
    pub delta_sent_bytes: u64,
    /// Seconds.
    pub delta_upload_s: f64,
    /// The naive way after a 1% change: the whole state again (a plain PUT of it).
    pub naive_delta_s: f64,
    /// A fresh node: fetch (download, verify, publish) and read the state into memory (the
    /// program's, allocated and touched before).
    pub fresh_restore_s: f64,
    /// Of which the fetch (download, verify, publish in the local store).
    pub fetch_s: f64,
    /// Of which reading the state from the local store into memory, as the program does.
    pub read_s: f64,
    /// Bytes the fetch downloaded.
    pub fetched_bytes: u64,
    /// A plain GET of the bytes the fetch downloaded: the limit.
    pub plain_get_s: f64,
    /// `full_upload_s / plain_put_s`.
    pub upload_ratio: f64,
    /// `delta_sent_bytes / changed_bytes`.
    pub delta_ratio: f64,
    /// [`DELTA_TARGET`].
    pub delta_target: f64,
    /// `delta_ratio <= delta_target`.
    pub delta_ok: bool,
    /// `fresh_restore_s / plain_get_s`.
    pub restore_ratio: f64,
    /// `fetch_s / plain_get_s`.
    pub fetch_ratio: f64,
    /// [`RESTORE_TARGET`].
    pub restore_target: f64,
    /// `restore_ratio <= restore_target`.
    pub restore_ok: bool,
}

/// "ok", or what says the target is missed.
fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "NOT MET" }
}

/// Runs the benchmark on `tier` with a state of `size` bytes; prints a table (or JSON).
pub fn run(tier: Arc<dyn Tier>, size: u64, json: bool) -> Result<i32> {
    if size < 1 << 20 {
        bail!("--size must be at least 1 MiB");
    }
    let scratch =
        std::env::temp_dir().join(format!("supervise-bench-remote-{}", std::process::id()));
    let result = measure(&tier, size, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    let figures = result?;
    if json {
        println!("{}", serde_json::to_string_pretty(&figures)?);
        return Ok(0);
    }
    let f = &figures;
    let rate =
        |bytes: u64, s: f64| format!("{}/s", human::bytes((bytes as f64 / s.max(1e-9)) as u64));
    println!(
        "durable tier {} , state {}",
        tier.describe(),
        human::bytes(f.state_bytes)
    );
    println!(
        "full snapshot upload   {:>8.3} s  {:>10}  plain PUT of the same bytes {:.3} s ({}): {:.2}x",
        f.full_upload_s,
        human::bytes(f.full_sent_bytes),
        f.plain_put_s,
        rate(f.full_sent_bytes, f.plain_put_s),
        f.upload_ratio
    );
    println!(
        "1% changed upload      {:>8.3} s  {:>10}  naive (whole state) {:.3} s: {:.1}x faster",
        f.delta_upload_s,
        human::bytes(f.delta_sent_bytes),
        f.naive_delta_s,
        f.naive_delta_s / f.delta_upload_s.max(1e-9)
    );
    println!(
        "                       sent {:.2}x the changed bytes (target <= {}x): {}",
        f.delta_ratio,
        f.delta_target,
        verdict(f.delta_ok)
    );
    println!(
        "fresh-node restore     {:>8.3} s              fetch {:.3} s + read {:.3} s; plain GET of the same bytes {:.3} s ({})",
        f.fresh_restore_s,
        f.fetch_s,
        f.read_s,
        f.plain_get_s,
        rate(f.fetched_bytes, f.plain_get_s)
    );
    println!(
        "                       restore {:.2}x plain GET (target <= {}x): {}; the fetch alone {:.2}x",
        f.restore_ratio,
        f.restore_target,
        verdict(f.restore_ok),
        f.fetch_ratio
    );
    Ok(0)
}

/// `a / b` (b at least a nanosecond).
fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

/// A deterministic, incompressible state (xorshift).
fn state(size: u64) -> Vec<u64> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..size / 8)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        })
        .collect()
}

/// Bytes that read as `len` zeros, for plain PUTs.
struct Zeros(u64);

impl Read for Zeros {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.0) as usize;
        buf[..n].fill(0);
        self.0 -= n as u64;
        Ok(n)
    }
}

fn upload_newest(uploads: &Uploads) -> Result<(u64, Duration)> {
    let started = Instant::now();
    uploads.nudge();
    match uploads.wait(Duration::from_secs(600)) {
        Some(Report::Safe { bytes_sent, .. }) => Ok((bytes_sent, started.elapsed())),
        Some(Report::Failed { error, .. }) => bail!("upload failed: {error}"),
        Some(Report::PruneFailed { error, .. }) => bail!("retention failed: {error}"),
        None => bail!("no upload report within 10 minutes"),
    }
}

fn measure(tier: &Arc<dyn Tier>, size: u64, scratch: &std::path::Path) -> Result<Figures> {
    let name = format!("bench-{}", std::process::id());
    let job = Store::open(scratch.join("node-a"))?.job(&name)?;
    let mut data = state(size);
    let mut writer = SnapshotWriter::open(job.clone(), 0)?;
    let mut b = writer.begin(None);
    b.slice("state", &data)?;
    b.commit()?;
    let uploads = Uploads::start(
        std::slice::from_ref(tier),
        &UploadConfig {
            job: job.clone(),
            generation: 1,
            keep: 2,
            fence: Fence::until(Instant::now() + Duration::from_secs(24 * 3600)),
        },
    )?;
    let (full_sent_bytes, full) = upload_newest(&uploads)?;
    let plain_key = format!("{name}/plain");
    let t = Instant::now();
    tier.put(&plain_key, &mut Zeros(full_sent_bytes), full_sent_bytes)?;
    let plain_put = t.elapsed();
    // 1% of the state, as 64 KiB blocks spread over it.
    let block = 64 * 1024 / 8;
    let blocks = (data.len() / block).max(1);
    let changed_blocks = (blocks / 100).max(1);
    for i in 0..changed_blocks {
        let at = (i * blocks / changed_blocks) * block;
        let end = (at + block).min(data.len());
        for v in &mut data[at..end] {
            *v = v.wrapping_mul(3).wrapping_add(1);
        }
    }
    let mut b = writer.begin(None);
    b.slice("state", &data)?;
    b.commit()?;
    let (delta_sent_bytes, delta) = upload_newest(&uploads)?;
    let t = Instant::now();
    tier.put(&plain_key, &mut Zeros(size), size)?;
    let naive_delta = t.elapsed();
    drop(uploads);
    // A fresh node, and a plain GET of the same bytes: each measured ROUNDS times,
    // alternately, the fastest kept.
    let (mut restore, mut fetch, mut read) = (Duration::MAX, Duration::ZERO, Duration::ZERO);
    let (mut plain_get, mut fetched_bytes) = (Duration::MAX, 0);
    for round in 0..ROUNDS {
        let node = scratch.join(format!("node-b{round}"));
        let fresh = Store::open(&node)?.job(&name)?;
        // The program's memory for its state exists before it restores: touched here, so
        // that its page faults are not counted as the restore's.
        let mut restored = vec![1u8; data.len() * 8];
        let t = Instant::now();
        let fetched = fetch::fetch_newer(std::slice::from_ref(tier), &fresh, 0, &mut Vec::new())?
            .context("the fresh node found nothing to fetch")?;
        let fetched_in = t.elapsed();
        let reader = SnapshotReader::open(&fresh, fetched.seq)?;
        reader.slice_into("state", "u64", &mut restored)?;
        let restored_in = t.elapsed();
        if restored != bytemuck::cast_slice::<u64, u8>(&data) {
            bail!("the restored state differs from the state written");
        }
        drop((restored, reader, fresh));
        let _ = std::fs::remove_dir_all(&node);
        if restored_in < restore {
            (restore, fetch, read) = (restored_in, fetched_in, restored_in - fetched_in);
        }
        if round == 0 {
            fetched_bytes = fetched.bytes;
            tier.put(&plain_key, &mut Zeros(fetched.bytes), fetched.bytes)?;
        }
        let t = Instant::now();
        tier.get(&plain_key, &mut std::io::sink(), u64::MAX)?;
        plain_get = plain_get.min(t.elapsed());
    }
    for object in tier.list(&format!("{name}/"))? {
        tier.delete(&object.key)?;
    }
    let changed_bytes = (changed_blocks * block * 8) as u64;
    let delta_ratio = delta_sent_bytes as f64 / changed_bytes.max(1) as f64;
    let restore_ratio = ratio(restore, plain_get);
    Ok(Figures {
        state_bytes: size,
        changed_bytes,
        full_sent_bytes,
        full_upload_s: full.as_secs_f64(),
        plain_put_s: plain_put.as_secs_f64(),
        delta_sent_bytes,
        delta_upload_s: delta.as_secs_f64(),
        naive_delta_s: naive_delta.as_secs_f64(),
        fresh_restore_s: restore.as_secs_f64(),
        fetch_s: fetch.as_secs_f64(),
        read_s: read.as_secs_f64(),
        fetched_bytes,
        plain_get_s: plain_get.as_secs_f64(),
        upload_ratio: ratio(full, plain_put),
        delta_ratio,
        delta_target: DELTA_TARGET,
        delta_ok: delta_ratio <= DELTA_TARGET,
        restore_ratio,
        fetch_ratio: ratio(fetch, plain_get),
        restore_target: RESTORE_TARGET,
        restore_ok: restore_ratio <= RESTORE_TARGET,
    })
}
