//! Dirty tracking is exact: every page written between snapshots is in the next one,
//! including writes that race with the capture.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use supervise_shim::{CaptureMode, Config};
use supervise_shim::{Next, Shim};
use supervise_store::{SnapshotReader, Store};

fn shim(dir: &std::path::Path, capture: CaptureMode) -> Option<Shim> {
    let mut config = Config::local(dir.join("store"), "dirty");
    config.capture = capture;
    let shim = Shim::open(config).unwrap();
    if shim.capture_mode() != "dirty" && capture == CaptureMode::Dirty {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI's kernel must offer userfaultfd write-protect"
        );
        eprintln!("skipped: no dirty tracking on this kernel");
        return None;
    }
    Some(shim)
}

fn restored(dir: &std::path::Path, seq: u64, len: usize) -> Vec<u64> {
    let job = Store::open(dir.join("store"))
        .unwrap()
        .job("dirty")
        .unwrap();
    let mut out = vec![0u64; len];
    SnapshotReader::open(&job, seq)
        .unwrap()
        .slice_into("r", "u64", bytemuck::cast_slice_mut(&mut out))
        .unwrap();
    out
}

#[test]
fn only_written_chunks_are_stored_and_the_restore_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut shim) = shim(dir.path(), CaptureMode::Dirty) else {
        return;
    };
    let len = (8 << 20) / 8; // 8 MiB: 128 chunks of 64 KiB
    let mut r = shim.region::<u64>("r", len).unwrap();
    for (i, v) in r.iter_mut().enumerate() {
        *v = i as u64;
    }
    assert!(matches!(
        shim.snapshot(None, |_| Ok(())).unwrap(),
        Next::Continue(_)
    ));
    let first = shim.wait_durable().unwrap().unwrap();
    assert_eq!(first.bytes_total, 8 << 20);
    for round in 1..=5u64 {
        // One word in each of three chunks, and a whole chunk.
        for chunk in [3usize, 40 + round as usize, 127] {
            r[chunk * 8192 + 17] = round * 1000 + chunk as u64;
        }
        for v in &mut r[60 * 8192..61 * 8192] {
            *v = v.wrapping_mul(31).wrapping_add(round);
        }
        assert!(matches!(
            shim.snapshot(None, |_| Ok(())).unwrap(),
            Next::Continue(_)
        ));
        let report = shim.wait_durable().unwrap().unwrap();
        assert_eq!(report.bytes_new, 4 * 65536, "round {round}: {report:?}");
        assert_eq!(
            restored(dir.path(), report.seq, len),
            &r[..],
            "round {round}"
        );
    }
}

/// Starts a thread that writes random words of `words` (atomically) until `stop`; it returns
/// how many writes it made.
///
/// # Safety
/// `words` must stay mapped until the thread is joined.
unsafe fn race(words: &mut [u64], stop: &Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let (at, len) = (words.as_mut_ptr() as usize, words.len());
    let stop = Arc::clone(stop);
    std::thread::spawn(move || {
        // SAFETY: mapped until the join (the caller's promise); every access is atomic.
        let cells = unsafe { std::slice::from_raw_parts(at as *const AtomicU64, len) };
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            n += 1;
            cells[(x as usize) % len].store(n, Ordering::Relaxed);
        }
        n
    })
}

#[test]
fn writes_racing_with_the_capture_are_never_lost() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut shim) = shim(dir.path(), CaptureMode::Dirty) else {
        return;
    };
    let len = (4 << 20) / 8;
    let mut r = shim.region::<u64>("r", len).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // SAFETY (test): the region outlives the racer (joined below); the capture's reads may
    // see a write or not, and the final, quiet snapshot must have them all.
    let racer = unsafe { race(&mut r, &stop) };
    let mut taken = 0;
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(3));
        assert!(matches!(
            shim.snapshot(None, |_| Ok(())).unwrap(),
            Next::Continue(_)
        ));
        taken += 1;
    }
    stop.store(true, Ordering::SeqCst);
    let writes = racer.join().unwrap();
    assert!(writes > 10_000, "the racer wrote {writes} times");
    assert!(matches!(
        shim.snapshot(None, |_| Ok(())).unwrap(),
        Next::Continue(_)
    ));
    let last = shim.wait_durable().unwrap().unwrap();
    assert!(last.seq as usize >= taken, "{last:?}");
    assert_eq!(
        restored(dir.path(), last.seq, len),
        &r[..],
        "a racing write was lost"
    );
}

#[test]
fn copy_and_sync_modes_restore_the_same_bytes() {
    for mode in [CaptureMode::Copy, CaptureMode::Sync] {
        let dir = tempfile::tempdir().unwrap();
        let mut shim = shim(dir.path(), mode).unwrap();
        assert_eq!(
            shim.capture_mode(),
            if mode == CaptureMode::Copy {
                "copy"
            } else {
                "sync"
            }
        );
        let mut r = shim.region::<u64>("r", 100_000).unwrap();
        for round in 0..3u64 {
            for (i, v) in r.iter_mut().enumerate().step_by(997) {
                *v = i as u64 ^ round;
            }
            assert!(matches!(
                shim.snapshot(None, |s| s.value("round", &round)).unwrap(),
                Next::Continue(_)
            ));
            let report = shim.wait_durable().unwrap().unwrap();
            assert_eq!(
                restored(dir.path(), report.seq, r.len()),
                &r[..],
                "{mode:?}"
            );
        }
    }
}

#[test]
fn a_region_is_restored_at_start_and_the_next_snapshot_builds_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let len = (2 << 20) / 8;
    let saved: Vec<u64> = {
        let mut shim = shim(dir.path(), CaptureMode::Auto).unwrap();
        let mut r = shim.region::<u64>("r", len).unwrap();
        for (i, v) in r.iter_mut().enumerate() {
            *v = (i as u64).wrapping_mul(7);
        }
        assert!(matches!(
            shim.snapshot(None, |_| Ok(())).unwrap(),
            Next::Continue(_)
        ));
        shim.wait_durable().unwrap();
        r.to_vec()
    };
    let mut shim = shim(dir.path(), CaptureMode::Auto).unwrap();
    assert!(matches!(
        shim.start(),
        supervise_shim::Start::Resumed { seq: 1, .. }
    ));
    let mut r = shim.region::<u64>("r", len).unwrap();
    assert_eq!(&r[..], &saved[..]);
    r[5] = 1;
    assert!(matches!(
        shim.snapshot(None, |_| Ok(())).unwrap(),
        Next::Continue(_)
    ));
    let report = shim.wait_durable().unwrap().unwrap();
    assert_eq!(
        report.bytes_new, 65536,
        "only the written chunk is new: {report:?}"
    );
    assert_eq!(restored(dir.path(), report.seq, len), &r[..]);
    let err = shim.region::<u64>("r", 8).err().unwrap().to_string();
    assert!(err.contains("added twice"), "{err}");
}

#[test]
fn clean_chunks_in_mostly_dead_packs_are_copied_over_by_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::local(dir.path().join("store"), "dirty");
    config.capture = CaptureMode::Dirty;
    config.keep = 2;
    let mut shim = Shim::open(config).unwrap();
    if shim.capture_mode() != "dirty" {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI's kernel must offer userfaultfd write-protect"
        );
        return;
    }
    let per_chunk = 8192; // u64 per 64 KiB chunk
    let mut r = shim.region::<u64>("r", 100 * per_chunk).unwrap();
    let snap = |shim: &mut Shim| {
        assert!(matches!(
            shim.snapshot(None, |_| Ok(())).unwrap(),
            Next::Continue(_)
        ));
        shim.wait_durable().unwrap().unwrap()
    };
    for (i, v) in r.iter_mut().enumerate() {
        *v = i as u64;
    }
    let first = snap(&mut shim);
    let job = Store::open(dir.path().join("store"))
        .unwrap()
        .job("dirty")
        .unwrap();
    let first_pack = job.read_manifest(first.seq).unwrap().packs[0].clone();
    for round in 1..=2u64 {
        for v in &mut r[..60 * per_chunk] {
            *v += round;
        }
        snap(&mut shim);
    }
    // Kept: 2 and 3, using 40 of the first pack's 100 chunks; nothing written since.
    let r4 = snap(&mut shim);
    assert_eq!(
        (r4.bytes_new, r4.bytes_compacted),
        (0, 40 * 65536),
        "{r4:?}"
    );
    let r5 = snap(&mut shim);
    assert_eq!(r5.bytes_compacted, 0, "{r5:?}");
    assert!(
        !job.pack_names().unwrap().contains(&first_pack),
        "the sparse pack is gone"
    );
    assert_eq!(restored(dir.path(), r5.seq, r.len()), &r[..]);
}

#[test]
fn a_forked_snapshot_holds_memory_as_it_was_at_the_fork() {
    let dir = tempfile::tempdir().unwrap();
    let mut shim = shim(dir.path(), CaptureMode::Fork).unwrap();
    assert_eq!(shim.capture_mode(), "fork");
    let len = (16 << 20) / 8;
    let mut r = shim.region::<u64>("r", len).unwrap();
    for (i, v) in r.iter_mut().enumerate() {
        *v = i as u64;
    }
    let before = r.to_vec();
    let step = 41u64;
    assert!(matches!(
        shim.snapshot(Some("first"), |s| s.value("step", &step))
            .unwrap(),
        Next::Continue(Some(_))
    ));
    // The program goes on at once, overwriting everything while the snapshot is written.
    for v in r.iter_mut() {
        *v = !*v;
    }
    let first = shim.wait_durable().unwrap().unwrap();
    assert_eq!(restored(dir.path(), first.seq, len), before);
    let job = Store::open(dir.path().join("store"))
        .unwrap()
        .job("dirty")
        .unwrap();
    let reader = SnapshotReader::open(&job, first.seq).unwrap();
    assert_eq!(reader.value_bytes("step").unwrap().unwrap(), b"41");
    // The second holds the overwritten state; a third, after one word changed, stores only
    // that chunk: forked snapshots build deltas on the last one.
    assert!(matches!(
        shim.snapshot(None, |_| Ok(())).unwrap(),
        Next::Continue(_)
    ));
    let second = shim.wait_durable().unwrap().unwrap();
    assert_eq!(restored(dir.path(), second.seq, len), &r[..]);
    r[12345] = 7;
    assert!(matches!(
        shim.snapshot(None, |_| Ok(())).unwrap(),
        Next::Continue(_)
    ));
    let third = shim.wait_durable().unwrap().unwrap();
    assert_eq!(restored(dir.path(), third.seq, len), &r[..]);
    assert_eq!(third.bytes_new, 65536, "{third:?}");
    shim.finish().unwrap();
}

#[test]
fn array_shapes_are_recorded_checked_on_resume_and_bad_ones_refused() {
    use supervise_shim::Error;
    let dir = tempfile::tempdir().unwrap();
    {
        let mut shim = shim(dir.path(), CaptureMode::Auto).unwrap();
        let mut u = shim.array::<f64>("u", &[3, 4]).unwrap();
        u[5] = 2.0;
        let next = shim
            .snapshot(None, |s| {
                s.array("v", &[1u32, 2, 3, 4, 5, 6], &[2, 3])?;
                s.array_bytes("c", &[0u8; 32], &[2], "<c16")?;
                s.array_bytes("d", &[0u8; 16], &[2], "<f8")?;
                // Refused: a shape that does not fit, a type that is not plain numpy, a name
                // taken. None of them stops the others.
                for bad in [
                    s.array("w", &[1u32, 2, 3], &[2, 2]),
                    s.array_bytes("x", &[0u8; 8], &[1], "O8"),
                    s.array_bytes("y", &[0u8; 8], &[1], "<V8[a,b]"),
                    s.array("v", &[1u32], &[1]),
                ] {
                    assert!(
                        matches!(
                            bad,
                            Err(Error::BadArray { .. } | Error::DuplicateEntry { .. })
                        ),
                        "{bad:?}"
                    );
                }
                Ok(())
            })
            .unwrap();
        assert!(matches!(next, Next::Continue(_)));
        shim.wait_durable().unwrap();
    }
    let job = Store::open(dir.path().join("store"))
        .unwrap()
        .job("dirty")
        .unwrap();
    let m = job.read_manifest(1).unwrap();
    let shape = |name: &str| {
        m.array_shape(name)
            .map(|a| (a.shape.clone(), a.dtype.clone()))
    };
    assert_eq!(shape("u"), Some((vec![3, 4], None)));
    assert_eq!(shape("v"), Some((vec![2, 3], None)));
    assert_eq!(shape("c"), Some((vec![2], Some("<c16".into()))));
    // A numpy type of a store element is stored as that element.
    assert_eq!(shape("d"), Some((vec![2], None)));
    assert!(
        matches!(&m.entry("d").unwrap().kind, supervise_store::format::EntryKind::Slice { elem, .. } if elem == "f64")
    );
    // Resumed: the same shape restores; the same bytes in another shape are refused.
    let mut shim = shim(dir.path(), CaptureMode::Auto).unwrap();
    let err = shim.array::<f64>("u", &[4, 3]).err().unwrap();
    assert!(
        matches!(&err, Error::ShapeMismatch { stored, wanted, .. } if stored == &[3, 4] && wanted == &[4, 3]),
        "{err:?}"
    );
    let u = shim.array::<f64>("u", &[3, 4]).unwrap();
    assert_eq!(u[5], 2.0);
    let mut c = [0u8; 32];
    assert!(shim.load_raw_into("c", "u8", &mut c).unwrap());
}

/// A shim whose captures may hold at most `budget` bytes.
fn budgeted(dir: &std::path::Path, budget: u64) -> Shim {
    let mut config = Config::local(dir.join("store"), "dirty");
    config.capture = CaptureMode::Auto;
    config.capture_memory = supervise_store::config::CaptureMemory::Bytes(budget);
    Shim::open(config).unwrap()
}

/// Ends the test process if a capture in parts deadlocks, instead of hanging the run.
fn watchdog() {
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(120));
        eprintln!("a capture in parts did not finish within 120 s");
        std::process::abort();
    });
}

#[test]
fn captures_beyond_the_memory_budget_are_written_in_parts_and_restore_exactly() {
    watchdog();
    let dir = tempfile::tempdir().unwrap();
    // 50 MiB of capture memory, of which the writer's reserve (48 MiB) leaves 2 MiB for the
    // copies of 32 MiB of regions: every capture below but the third is given to the writer in
    // parts, read in place while the program waits.
    let mut shim = budgeted(dir.path(), 50 << 20);
    let (len, qlen) = ((24 << 20) / 8, (8 << 20) / 8);
    let mut r = shim.region::<u64>("r", len).unwrap();
    let mut q = shim.region::<u64>("q", qlen).unwrap();
    for (i, v) in r.iter_mut().enumerate() {
        *v = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    let fill = |q: &mut [u64], step: u64| {
        for (i, v) in q.iter_mut().enumerate() {
            *v = i as u64 + step * 1_000_000;
        }
    };
    fill(&mut q, 0);
    let job = || {
        Store::open(dir.path().join("store"))
            .unwrap()
            .job("dirty")
            .unwrap()
    };
    let check = |seq: u64, r: &[u64], q: &[u64], step: u64| {
        let reader = SnapshotReader::open(&job(), seq).unwrap();
        let mut out = vec![0u64; r.len()];
        reader
            .slice_into("r", "u64", bytemuck::cast_slice_mut(&mut out))
            .unwrap();
        assert_eq!(out, r, "snapshot {seq}: r");
        let mut out = vec![0u64; q.len()];
        reader
            .slice_into("q", "u64", bytemuck::cast_slice_mut(&mut out))
            .unwrap();
        assert_eq!(out, q, "snapshot {seq}: q");
        let value = reader.value_bytes("step").unwrap().unwrap();
        assert_eq!(value, step.to_string().into_bytes());
    };
    for step in 0..4u64 {
        match step {
            0 => {}
            // Half of r's chunks, and all of q: a delta in parts, and a region in parts
            // after it (each region's parts end before the next region's begin).
            1 => {
                for chunk in (0..384).step_by(2) {
                    r[chunk * 8192 + 5] ^= step;
                }
                fill(&mut q, 1);
            }
            // One chunk: this capture fits the budget and is copied at once, on the base a
            // capture in parts made.
            2 => r[7 * 8192] = 77,
            // Everything again.
            _ => {
                for v in r.iter_mut() {
                    *v = v.rotate_left(7);
                }
                fill(&mut q, 3);
            }
        }
        assert!(matches!(
            shim.snapshot(Some(&format!("{step}")), |s| s.value("step", &step))
                .unwrap(),
            Next::Continue(Some(_))
        ));
        let report = shim.wait_durable().unwrap().unwrap();
        let new_chunks = [384 + 128, 192 + 128, 1, 384 + 128][step as usize];
        if step != 0 {
            assert_eq!(
                report.bytes_new,
                new_chunks * 65536 + 1,
                "step {step}: only the written chunks (and the value) are new: {report:?}"
            );
        }
        check(report.seq, &r, &q, step);
    }
}

#[test]
fn a_writer_that_fails_during_a_capture_in_parts_does_not_stall_the_program() {
    watchdog();
    let dir = tempfile::tempdir().unwrap();
    let mut shim = budgeted(dir.path(), 2 << 20);
    let mut r = shim.region::<u64>("r", (16 << 20) / 8).unwrap();
    r.fill(1);
    // The packs' directory is gone: the writer's first part fails, and the program's
    // feeding of the rest must stop rather than wait for buffers that never come back.
    std::fs::remove_dir_all(dir.path().join("store/dirty/packs")).unwrap();
    assert!(matches!(
        shim.snapshot(None, |_| Ok(())).unwrap(),
        Next::Continue(Some(_))
    ));
    let failed = shim.wait_durable().unwrap_err().to_string();
    assert!(failed.contains("packs"), "{failed}");
}

#[test]
fn a_region_read_in_place_while_another_thread_writes_it_stores_records_that_verify() {
    watchdog();
    let dir = tempfile::tempdir().unwrap();
    // Beyond the budget: the writer reads the region in place while the program waits at its
    // safe point, and a second thread writes it meanwhile (as the C ABI allows for `sv_alloc`
    // memory). Every record must still hold what its hash says: a chunk hashed and then
    // compressed from bytes that changed in between would be a corrupt record.
    let mut shim = budgeted(dir.path(), 2 << 20);
    let len = (4 << 20) / 8;
    let mut r = shim.region::<u64>("r", len).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // SAFETY (test): the region outlives the racer (joined below, before any check).
    let racer = unsafe { race(&mut r, &stop) };
    let job = Store::open(dir.path().join("store"))
        .unwrap()
        .job("dirty")
        .unwrap();
    // Checked once the racer has stopped: a failure must not unmap the region under it.
    let mut checked = Vec::new();
    for _ in 0..20 {
        let taken = shim.snapshot(None, |_| Ok(())).map(|_| ());
        let durable = shim.wait_durable().map(|r| r.map(|r| r.seq));
        let verified = durable
            .as_ref()
            .ok()
            .and_then(|r| *r)
            .map(|seq| SnapshotReader::open(&job, seq).and_then(|s| s.verify()));
        checked.push((taken, durable, verified));
    }
    stop.store(true, Ordering::SeqCst);
    let writes = racer.join().unwrap();
    assert!(writes > 10_000, "the racer wrote {writes} times");
    for (taken, durable, verified) in checked {
        taken.unwrap();
        assert!(durable.unwrap().is_some());
        verified.unwrap().unwrap();
    }
    // Quiet now: the last snapshot is the region.
    let _ = shim.snapshot(None, |_| Ok(())).unwrap();
    let last = shim.wait_durable().unwrap().unwrap();
    assert_eq!(restored(dir.path(), last.seq, len), &r[..]);
}

#[test]
fn a_region_read_in_several_scan_pieces_gives_each_written_chunk_once() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut shim) = shim(dir.path(), CaptureMode::Dirty) else {
        return;
    };
    // 72 MiB: the scanner reads 32 MiB at a time, so three pieces, the last one short.
    let len = (72 << 20) / 8;
    let mut r = shim.region::<u64>("r", len).unwrap();
    for (i, v) in r.iter_mut().enumerate() {
        *v = i as u64;
    }
    assert!(matches!(
        shim.snapshot(None, |_| Ok(())).unwrap(),
        Next::Continue(_)
    ));
    shim.wait_durable().unwrap().unwrap();
    let (page, chunk) = (4096 / 8, 65536 / 8);
    for round in 1..=3u64 {
        let words = [
            0,                          // the first chunk
            5 * chunk + 3,              // two pages of one chunk with a clean page
            5 * chunk + 2 * page + 3,   // between them: two ranges, one chunk
            (32 << 20) / 8 - 1,         // the last word of the first piece and the first
            (32 << 20) / 8,             // of the second: one range across the two pieces
            (64 << 20) / 8 + 40 * page, // in the third piece
            len - 1,                    // the last word
        ];
        for (k, &w) in words.iter().enumerate() {
            r[w] = round * 1_000_000 + k as u64;
        }
        assert!(matches!(
            shim.snapshot(None, |_| Ok(())).unwrap(),
            Next::Continue(_)
        ));
        let report = shim.wait_durable().unwrap().unwrap();
        // Chunks 0, 5, 511, 512, 1026 and 1151: six.
        assert_eq!(report.bytes_new, 6 * 65536, "round {round}: {report:?}");
        assert_eq!(
            restored(dir.path(), report.seq, len),
            &r[..],
            "round {round}"
        );
    }
}

#[test]
fn a_region_written_inside_the_snapshot_closure_is_in_that_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut shim) = shim(dir.path(), CaptureMode::Dirty) else {
        return;
    };
    let len = (8 << 20) / 8;
    let mut r = shim.region::<u64>("r", len).unwrap();
    for (i, v) in r.iter_mut().enumerate() {
        *v = i as u64;
    }
    let _ = shim.snapshot(None, |_| Ok(())).unwrap();
    shim.wait_durable().unwrap().unwrap();
    for round in 1..=3u64 {
        r[3 * 8192] = round;
        let _ = shim
            .snapshot(None, |s| {
                // Long enough for a scan started before the closure to be over.
                std::thread::sleep(Duration::from_millis(30));
                r[100 * 8192 + 5] = round * 7;
                s.value("round", &round)
            })
            .unwrap();
        let report = shim.wait_durable().unwrap().unwrap();
        assert_eq!(
            restored(dir.path(), report.seq, len),
            &r[..],
            "round {round}: the closure's write is missing"
        );
    }
}
