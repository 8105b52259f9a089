//! Crash consistency at every step: each snapshot cycle (commit, retention, compaction,
//! quarantine, temp cleanup) is run again and again with the store's file-system layer armed
//! to fail, or to "crash" (that operation and every later one fail, as if the process died),
//! at its N-th operation, for every N until a cycle runs without reaching N. After a crash the
//! store is reopened either as the process left it (a kill) or with everything not yet durable
//! undone (a power cut: unsynced file data cut back, unsynced renames, creations and removals
//! reverted). Then: every visible snapshot verifies and holds what was written, the newest
//! committed one is there, no kept snapshot references a missing pack, nothing outside the
//! store changed, sequence numbers only grew, and a next snapshot works and leaves the store
//! clean.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use supervise_store::format::CHUNK_SIZE;
use supervise_store::fsops::crash::{self, Fault};
use supervise_store::{JobStore, Result, SnapshotReader, SnapshotReport, SnapshotWriter, Store};

/// The layer's test mode is process-global: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const PER_CHUNK: usize = CHUNK_SIZE / 8;
const CHUNKS: usize = 8;

/// The grid of generation `g`: chunks below `changed` are generation `g`'s, the others
/// generation 1's.
fn grid(g: u64, changed: usize) -> Vec<f64> {
    (0..CHUNKS * PER_CHUNK)
        .map(|i| {
            let shift = if i / PER_CHUNK < changed {
                g as f64
            } else {
                1.0
            };
            (i as f64 * 1e-3).sin() * 100.0 + shift
        })
        .collect()
}

fn open_job(root: &Path) -> Result<JobStore> {
    Store::open(root.join("store"))?.job("j")
}

/// What a test run expects of the store: the content of every snapshot number written.
#[derive(Default)]
struct Expect {
    grids: HashMap<u64, Vec<f64>>,
    /// Snapshots committed (commit returned) and not removed on purpose.
    committed: Vec<u64>,
    /// A snapshot damaged on purpose (it may stay visible, damaged).
    damaged: Option<u64>,
    /// The highest sequence number handed out.
    highest: u64,
}

/// Commits a whole snapshot of `grid` and records it.
fn snapshot(writer: &mut SnapshotWriter, exp: &mut Expect, grid: Vec<f64>) -> Result<u64> {
    Ok(snapshot_report(writer, exp, grid)?.seq)
}

fn snapshot_report(
    writer: &mut SnapshotWriter,
    exp: &mut Expect,
    grid: Vec<f64>,
) -> Result<SnapshotReport> {
    let mut b = writer.begin(None);
    let seq = b.seq();
    exp.highest = exp.highest.max(seq);
    b.value("seq", &seq)?;
    b.slice("grid", &grid)?;
    exp.grids.insert(seq, grid);
    let report = b.commit()?;
    exp.committed.push(seq);
    Ok(report)
}

/// Commits a delta of `grid` on snapshot `base`, whose chunks below `changed` are dirty.
fn delta(
    writer: &mut SnapshotWriter,
    exp: &mut Expect,
    base: u64,
    grid: Vec<f64>,
    changed: usize,
) -> Result<u64> {
    let mut b = writer.begin(None);
    let seq = b.seq();
    exp.highest = exp.highest.max(seq);
    let base = b.manifest_of(base)?;
    let base = base.entry("grid").expect("grid entry").clone();
    let dirty: Vec<usize> = (0..changed).collect();
    let bytes: &[u8] = bytemuck::cast_slice(&grid[..changed * PER_CHUNK]);
    b.value("seq", &seq)?;
    b.add_delta("grid", &base, &dirty, bytes, 8)?;
    exp.grids.insert(seq, grid);
    b.commit()?;
    exp.committed.push(seq);
    Ok(seq)
}

/// One shape of cycle: `setup` builds the store before (not armed), `cycle` is what runs
/// armed.
struct Shape {
    name: &'static str,
    setup: fn(&Path, &mut Expect),
    cycle: fn(&Path, &mut Expect) -> Result<()>,
}

fn setup_none(_: &Path, _: &mut Expect) {}

fn first_snapshot(root: &Path, exp: &mut Expect) -> Result<()> {
    let mut w = SnapshotWriter::open(open_job(root)?, 0)?;
    snapshot(&mut w, exp, grid(1, CHUNKS))?;
    w.apply_retention(2)?;
    Ok(())
}

fn setup_three(root: &Path, exp: &mut Expect) {
    let mut w = SnapshotWriter::open(open_job(root).unwrap(), 0).unwrap();
    for g in 1..=3 {
        snapshot(&mut w, exp, grid(g, CHUNKS)).unwrap();
    }
}

/// A delta on snapshot 3, then retention keeping one: snapshots 1-3 go, and the packs of
/// 1 and 2 (3's pack still holds the delta's clean chunks).
fn delta_and_retention(root: &Path, exp: &mut Expect) -> Result<()> {
    let mut w = SnapshotWriter::open(open_job(root)?, 0)?;
    let base = w.newest().expect("setup made snapshots");
    let mut new = exp.grids[&base].clone();
    for x in &mut new[..2 * PER_CHUNK] {
        *x += 0.25;
    }
    delta(&mut w, exp, base, new, 2)?;
    let report = w.apply_retention(1)?;
    assert_eq!(report.removed_snapshots, [1, 2, 3], "the shape is as meant");
    assert_eq!(report.removed_packs.len(), 2, "the shape is as meant");
    for seq in report.removed_snapshots {
        exp.committed.retain(|s| *s != seq);
    }
    Ok(())
}

/// Snapshot 1, then 2 with 5 of 8 chunks changed, keeping one: 1's pack is sparse (3 of its
/// 8 chunks live).
fn setup_sparse(root: &Path, exp: &mut Expect) {
    let mut w = SnapshotWriter::open(open_job(root).unwrap(), 0).unwrap();
    snapshot(&mut w, exp, grid(1, CHUNKS)).unwrap();
    snapshot(&mut w, exp, grid(2, 5)).unwrap();
    w.apply_retention(1).unwrap();
    exp.committed.retain(|s| *s != 1);
}

/// The same data again: the 3 chunks living in the sparse pack are copied over, and retention
/// then removes snapshot 2 and the sparse pack.
fn compaction(root: &Path, exp: &mut Expect) -> Result<()> {
    let mut w = SnapshotWriter::open(open_job(root)?, 0)?;
    let made = snapshot_report(&mut w, exp, grid(2, 5))?;
    assert_eq!(
        made.bytes_compacted,
        3 * CHUNK_SIZE as u64,
        "the shape is as meant"
    );
    let report = w.apply_retention(1)?;
    assert_eq!(report.removed_snapshots, [2], "the shape is as meant");
    assert_eq!(report.removed_packs.len(), 1, "the sparse pack goes");
    for seq in report.removed_snapshots {
        exp.committed.retain(|s| *s != seq);
    }
    Ok(())
}

/// Two snapshots; the newest manifest is cut short (damaged).
fn setup_damaged(root: &Path, exp: &mut Expect) {
    let mut w = SnapshotWriter::open(open_job(root).unwrap(), 0).unwrap();
    snapshot(&mut w, exp, grid(1, CHUNKS)).unwrap();
    let seq = snapshot(&mut w, exp, grid(2, 4)).unwrap();
    let path = w.job().manifest_path(seq);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 7)
        .unwrap();
    exp.committed.retain(|s| *s != seq);
    exp.damaged = Some(seq);
}

/// What a restart does: the newest snapshot that verifies is chosen, damaged ones are set
/// aside; then a snapshot and retention.
fn quarantine(root: &Path, exp: &mut Expect) -> Result<()> {
    let job = open_job(root)?;
    for seq in job.snapshot_seqs()?.into_iter().rev() {
        match SnapshotReader::open(&job, seq).and_then(|r| r.verify()) {
            Ok(()) => break,
            Err(e) if e.is_corruption() => job.quarantine(seq)?,
            Err(e) => return Err(e),
        }
    }
    let mut w = SnapshotWriter::open(job, 1)?;
    snapshot(&mut w, exp, grid(3, 4))?;
    w.apply_retention(2)?;
    Ok(())
}

/// One snapshot, and temporary files a dead writer left in both directories.
fn setup_leftovers(root: &Path, exp: &mut Expect) {
    let mut w = SnapshotWriter::open(open_job(root).unwrap(), 0).unwrap();
    snapshot(&mut w, exp, grid(1, CHUNKS)).unwrap();
    let job = w.job();
    let packs = job.dir().join("packs");
    std::fs::write(
        packs.join(".tmp-00000000000000000002-dead-000.pack"),
        [7u8; 5000],
    )
    .unwrap();
    std::fs::write(
        job.dir()
            .join("snapshots")
            .join(".tmp-1-00000000000000000002.snap"),
        [7u8; 100],
    )
    .unwrap();
}

/// The writer opening removes the leftovers, then a snapshot.
fn temp_cleanup(root: &Path, exp: &mut Expect) -> Result<()> {
    let mut w = SnapshotWriter::open(open_job(root)?, 0)?;
    snapshot(&mut w, exp, grid(2, 3))?;
    Ok(())
}

/// Every file outside the store (name, length, content hash).
fn outside(root: &Path) -> BTreeMap<PathBuf, (u64, blake3::Hash)> {
    let mut files = BTreeMap::new();
    let mut todo = vec![root.to_owned()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = e.path();
            let name = e.file_name();
            if dir == root && (name == "store" || name == "stash") {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                todo.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                files.insert(path, (bytes.len() as u64, blake3::hash(&bytes)));
            }
        }
    }
    files
}

/// The checks after a fault at operation `n` (described by `what`).
fn check(root: &Path, exp: &Expect, before: &Expect, what: &str) {
    let job = open_job(root).unwrap_or_else(|e| panic!("{what}: reopen: {e}"));
    let visible = job.snapshot_seqs().unwrap();
    // Every snapshot committed before the cycle or by it (and not removed by retention) is
    // there; a snapshot retention was removing may still be there.
    for seq in &exp.committed {
        if before.committed.contains(seq) || visible.contains(seq) {
            continue;
        }
        // Committed by this cycle (commit returned): must be durable.
        panic!("{what}: committed snapshot {seq} is gone (visible: {visible:?})");
    }
    let newest_before = before.committed.iter().max();
    if let Some(newest) = newest_before {
        assert!(
            visible.iter().any(|s| s >= newest),
            "{what}: nothing as new as snapshot {newest} (visible: {visible:?})"
        );
    }
    for &seq in &visible {
        if Some(seq) == exp.damaged {
            continue;
        }
        let reader = SnapshotReader::open(&job, seq)
            .unwrap_or_else(|e| panic!("{what}: snapshot {seq} does not open: {e}"));
        reader
            .verify()
            .unwrap_or_else(|e| panic!("{what}: snapshot {seq} does not verify: {e}"));
        let want = &exp.grids[&seq];
        let mut back = vec![0.0f64; want.len()];
        assert!(
            reader
                .slice_into("grid", "f64", bytemuck::cast_slice_mut(&mut back))
                .unwrap()
        );
        assert!(back == *want, "{what}: snapshot {seq} holds other data");
    }
    // The store works on: a restart sets the damaged aside, a next writer cleans up, numbers
    // grow past every number that is or was visible, garbage goes.
    if let Some(damaged) = exp.damaged.filter(|d| visible.contains(d)) {
        job.quarantine(damaged).unwrap();
    }
    let highest = visible
        .iter()
        .chain(&exp.committed)
        .chain(&exp.damaged)
        .max()
        .copied()
        .unwrap_or(0);
    let mut next = Expect::default();
    let mut w = SnapshotWriter::open(job.clone(), 9).unwrap();
    let seq = snapshot(&mut w, &mut next, grid(99, CHUNKS)).unwrap();
    assert!(
        seq > highest,
        "{what}: snapshot number {seq} reused (highest was {highest})"
    );
    job.collect_garbage().unwrap();
    SnapshotReader::open(&job, seq).unwrap().verify().unwrap();
    let referenced = job.referenced_packs().unwrap();
    let packs: std::collections::BTreeSet<String> = job.pack_names().unwrap().into_iter().collect();
    assert_eq!(packs, referenced, "{what}: packs left unreferenced");
    for sub in ["snapshots", "packs"] {
        for e in std::fs::read_dir(job.dir().join(sub)).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(!name.starts_with(".tmp-"), "{what}: {sub}/{name} left");
        }
    }
}

/// Runs `shape` with each fault at every operation; returns the operations of one cycle.
fn every_step(shape: &Shape) -> u64 {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    let mut ops = 0;
    for (fault, lose) in [
        (Fault::Error, false),
        (Fault::Crash, false),
        (Fault::Crash, true),
    ] {
        let mut n = 1;
        loop {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path();
            std::fs::create_dir(root.join("stash")).unwrap();
            std::fs::create_dir(root.join("elsewhere")).unwrap();
            std::fs::write(
                root.join("elsewhere").join("victim.pack"),
                b"not the store's",
            )
            .unwrap();
            let mut before = Expect::default();
            (shape.setup)(root, &mut before);
            let mut exp = Expect {
                grids: before.grids.clone(),
                committed: before.committed.clone(),
                damaged: before.damaged,
                highest: before.highest,
            };
            let outside_before = outside(root);
            crash::arm(n, fault, &root.join("stash")).unwrap();
            let result = (shape.cycle)(root, &mut exp);
            let outcome = crash::disarm();
            if lose {
                crash::lose_unsynced().unwrap();
            } else {
                crash::forget();
            }
            let what = format!(
                "{}: {fault:?} (lose unsynced: {lose}) at operation {n}",
                shape.name
            );
            if !outcome.fired {
                result.unwrap_or_else(|e| panic!("{what}: unarmed cycle failed: {e}"));
                check(root, &exp, &before, &what);
                assert!(n > 1, "{what}: the cycle does no file-system operation");
                ops = n - 1;
                break;
            }
            assert!(result.is_err(), "{what}: the fault was not reported");
            if std::env::var_os("CRASH_TRACE").is_some() {
                eprintln!(
                    "{what}: {}",
                    result
                        .as_ref()
                        .err()
                        .map(ToString::to_string)
                        .unwrap_or_default()
                );
            }
            check(root, &exp, &before, &what);
            assert_eq!(
                outside(root),
                outside_before,
                "{what}: something outside the store changed"
            );
            n += 1;
        }
    }
    eprintln!(
        "{}: {ops} operations per cycle, {} faulted runs (error, kill, power cut at each), {:.1} s",
        shape.name,
        3 * ops,
        started.elapsed().as_secs_f64()
    );
    ops
}

#[test]
fn first_snapshot_survives_a_fault_at_every_step() {
    every_step(&Shape {
        name: "first snapshot",
        setup: setup_none,
        cycle: first_snapshot,
    });
}

#[test]
fn delta_with_retention_survives_a_fault_at_every_step() {
    every_step(&Shape {
        name: "delta + retention",
        setup: setup_three,
        cycle: delta_and_retention,
    });
}

#[test]
fn compaction_survives_a_fault_at_every_step() {
    every_step(&Shape {
        name: "compaction",
        setup: setup_sparse,
        cycle: compaction,
    });
}

#[test]
fn quarantine_survives_a_fault_at_every_step() {
    every_step(&Shape {
        name: "quarantine",
        setup: setup_damaged,
        cycle: quarantine,
    });
}

#[test]
fn temp_cleanup_survives_a_fault_at_every_step() {
    every_step(&Shape {
        name: "temp cleanup",
        setup: setup_leftovers,
        cycle: temp_cleanup,
    });
}
