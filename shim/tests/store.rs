//! The snapshot store through the shim's API: round trips, dedup, incremental cost,
//! retention, damage detection and name checks.

use std::fs;
use std::path::Path;

use supervise_shim::Next;
use supervise_store::format::CHUNK_SIZE;
use supervise_store::{JobStore, SnapshotReader, SnapshotWriter, Store};

fn job(dir: &Path) -> JobStore {
    Store::open(dir.join("store")).unwrap().job("j").unwrap()
}

/// A smooth field like a simulation's, deterministic.
fn field(n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| (i as f64 * 1e-4).sin() * 300.0 + 20.0)
        .collect()
}

#[test]
fn values_and_slices_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let mut writer = SnapshotWriter::open(job.clone(), 0).unwrap();
    let grid = field(300_001);
    let ints: Vec<i32> = (0..5000).collect();
    let mut b = writer.begin(Some("step 7"));
    b.value("params", &(7u64, "abc", vec![1.5f64, f64::MIN_POSITIVE]))
        .unwrap();
    b.slice("grid", &grid).unwrap();
    b.slice("ints", &ints).unwrap();
    b.slice("empty", &[] as &[f32]).unwrap();
    let report = b.commit().unwrap();
    assert_eq!(report.seq, 1);
    assert_eq!(report.bytes_total, report.bytes_new);

    let reader = SnapshotReader::open(&job, 1).unwrap();
    assert_eq!(reader.manifest().tag.as_deref(), Some("step 7"));
    let v: (u64, String, Vec<f64>) =
        serde_json::from_slice(&reader.value_bytes("params").unwrap().unwrap()).unwrap();
    assert_eq!(v, (7, "abc".into(), vec![1.5, f64::MIN_POSITIVE]));
    let mut back = vec![0.0f64; grid.len()];
    assert!(
        reader
            .slice_into("grid", "f64", bytemuck::cast_slice_mut(&mut back))
            .unwrap()
    );
    assert_eq!(back, grid);
    let mut back_ints = vec![0i32; ints.len()];
    assert!(
        reader
            .slice_into("ints", "i32", bytemuck::cast_slice_mut(&mut back_ints))
            .unwrap()
    );
    assert_eq!(back_ints, ints);
    assert!(!reader.slice_into("absent", "f64", &mut []).unwrap());
    reader.verify().unwrap();

    let err = reader
        .slice_into("grid", "f64", &mut [0u8; 16])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("2400008 bytes") && err.contains("16 bytes"),
        "{err}"
    );
    let err = reader
        .slice_into("grid", "f32", &mut [0u8; 16])
        .unwrap_err()
        .to_string();
    assert!(err.contains("[f64] slice"), "{err}");
}

#[test]
fn a_smooth_field_compresses_and_identical_chunks_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let mut writer = SnapshotWriter::open(job, 0).unwrap();
    let grid = field(4 << 20 >> 3);
    let zeros = vec![0.0f64; 4 << 20 >> 3];
    let mut b = writer.begin(None);
    b.slice("grid", &grid).unwrap();
    b.slice("zeros", &zeros).unwrap();
    let r = b.commit().unwrap();
    let raw = 4u64 << 20;
    // The zero array is one 64 KiB chunk stored once; the field shrinks after byte-shuffle.
    assert!(r.bytes_new <= raw + CHUNK_SIZE as u64, "{r:?}");
    assert!(r.bytes_written < raw * 8 / 10, "{r:?}");
}

#[test]
fn changing_one_percent_writes_about_one_percent() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let mut writer = SnapshotWriter::open(job, 0).unwrap();
    let n = (64 << 20) / 8; // 64 MiB of f64
    let mut grid = field(n);
    let mut b = writer.begin(None);
    b.slice("grid", &grid).unwrap();
    b.commit().unwrap();

    // 1% of the array, in scattered 64 KiB blocks.
    let per_block = CHUNK_SIZE / 8;
    let blocks = n / per_block;
    let changed = blocks / 100;
    for k in 0..changed {
        let block = (k * 97 + 13) % blocks;
        for x in &mut grid[block * per_block..(block + 1) * per_block] {
            *x += 1e-3;
        }
    }
    let mut b = writer.begin(None);
    b.slice("grid", &grid).unwrap();
    let r = b.commit().unwrap();
    let changed_bytes = (changed * CHUNK_SIZE) as u64;
    assert_eq!(r.bytes_new, changed_bytes, "{r:?}");
    assert!(r.bytes_written <= changed_bytes * 11 / 10, "{r:?}");
    assert!(
        r.bytes_written >= changed_bytes / 4,
        "suspiciously small: {r:?}"
    );
}

#[test]
fn retention_keeps_the_newest_and_frees_unreferenced_packs() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let mut writer = SnapshotWriter::open(job.clone(), 0).unwrap();
    let mut grid = field(200_000);
    for round in 0..6 {
        for x in &mut grid {
            *x += 1.0; // every chunk changes: each snapshot has packs of its own
        }
        let mut b = writer.begin(Some(&format!("round {round}")));
        b.slice("grid", &grid).unwrap();
        b.value("round", &round).unwrap();
        b.commit().unwrap();
        writer.apply_retention(2).unwrap();
    }
    assert_eq!(job.snapshot_seqs().unwrap(), vec![5, 6]);
    let present: std::collections::BTreeSet<String> =
        job.pack_names().unwrap().into_iter().collect();
    assert_eq!(present, job.referenced_packs().unwrap());
    for seq in [5, 6] {
        SnapshotReader::open(&job, seq).unwrap().verify().unwrap();
    }
}

#[test]
fn packs_an_interrupted_retention_left_behind_are_removed_when_the_writer_opens() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let mut writer = SnapshotWriter::open(job.clone(), 0).unwrap();
    let mut grid = field(50_000);
    for _ in 0..3 {
        for x in &mut grid {
            *x += 1.0;
        }
        let mut b = writer.begin(None);
        b.slice("grid", &grid).unwrap();
        b.commit().unwrap();
    }
    drop(writer);
    let packs_of = |seq: u64| job.read_manifest(seq).unwrap().packs;
    let (first, second) = (packs_of(1), packs_of(2));
    // Retention killed after removing manifest 1, before its packs; snapshot 2 set aside as
    // damaged (its packs stay: `verify --repair` may put it back).
    std::fs::remove_file(job.manifest_path(1)).unwrap();
    job.quarantine(2).unwrap();
    SnapshotWriter::open(job.clone(), 1).unwrap();
    let present: std::collections::BTreeSet<String> =
        job.pack_names().unwrap().into_iter().collect();
    assert!(first.iter().all(|p| !present.contains(p)), "{present:?}");
    assert!(second.iter().all(|p| present.contains(p)), "{present:?}");
    assert_eq!(job.snapshot_seqs().unwrap(), vec![3]);
    SnapshotReader::open(&job, 3).unwrap().verify().unwrap();
}

#[test]
fn retention_after_stepping_back_keeps_the_good_snapshots_and_the_suspects_until_newer_work() {
    use supervise_store::store::Retention;
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let mut writer = SnapshotWriter::open(job.clone(), 0).unwrap();
    let commit = |writer: &mut SnapshotWriter, round: u64| {
        let mut b = writer.begin(Some(&format!("round {round}")));
        b.slice("grid", &field(20_000 + round as usize)).unwrap();
        b.commit().unwrap();
    };
    for round in 1..=6 {
        commit(&mut writer, round);
    }
    // The supervisor stepped back past 5 and 6 and restored 4.
    let stepped_back = Retention {
        keep: 2,
        within: None,
        suspect: vec![(5, 6)],
    };
    writer.apply_retention(stepped_back.clone()).unwrap();
    assert_eq!(
        job.snapshot_seqs().unwrap(),
        vec![3, 4, 5, 6],
        "the two newest good ones and the suspects, the newest work there is"
    );
    // A snapshot taken after the restore of 4: the suspects go, the good ones stay.
    commit(&mut writer, 7);
    writer.apply_retention(stepped_back).unwrap();
    assert_eq!(job.snapshot_seqs().unwrap(), vec![4, 7]);
    let present: std::collections::BTreeSet<String> =
        job.pack_names().unwrap().into_iter().collect();
    assert_eq!(present, job.referenced_packs().unwrap());
    for seq in [4, 7] {
        SnapshotReader::open(&job, seq).unwrap().verify().unwrap();
    }
}

#[test]
fn a_flipped_byte_in_a_chunk_is_reported_with_its_pack() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let mut writer = SnapshotWriter::open(job.clone(), 0).unwrap();
    let grid = field(100_000);
    let mut b = writer.begin(None);
    b.slice("grid", &grid).unwrap();
    b.commit().unwrap();
    let m = job.read_manifest(1).unwrap();
    let c = m.entries[0].chunks[3];
    let pack = job.pack_path(&m.packs[c.pack as usize]);
    let mut bytes = fs::read(&pack).unwrap();
    bytes[c.offset as usize + 44 + 10] ^= 0x01;
    fs::write(&pack, bytes).unwrap();
    let err = SnapshotReader::open(&job, 1).unwrap().verify().unwrap_err();
    assert!(err.is_corruption(), "{err}");
    assert!(err.to_string().contains(&m.packs[0]), "{err}");
}

#[test]
fn missing_and_truncated_packs_are_found_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let mut writer = SnapshotWriter::open(job.clone(), 0).unwrap();
    for round in 0..2 {
        let mut b = writer.begin(None);
        b.slice("grid", &field(50_000 + round)).unwrap();
        b.commit().unwrap();
    }
    let p1 = job.pack_path(&job.read_manifest(1).unwrap().packs[0]);
    let p2 = job.pack_path(&job.read_manifest(2).unwrap().packs[0]);
    let len = fs::metadata(&p1).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&p1)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    let err = SnapshotReader::open(&job, 1).err().unwrap().to_string();
    assert!(err.contains("truncated"), "{err}");
    fs::remove_file(&p2).unwrap();
    let err = SnapshotReader::open(&job, 2).err().unwrap().to_string();
    assert!(err.contains("missing"), "{err}");
}

#[test]
fn bad_names_are_refused_and_the_earlier_snapshot_stays() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    for bad in ["a/b", "..", "x\0y", ""] {
        let err = store.job(bad).unwrap_err().to_string();
        assert!(err.starts_with("invalid job name"), "{err}");
    }
    let job = store.job("j").unwrap();
    let mut writer = SnapshotWriter::open(job.clone(), 0).unwrap();
    let mut b = writer.begin(None);
    b.value("ok", &1).unwrap();
    b.commit().unwrap();
    let mut b = writer.begin(None);
    b.value("ok", &2).unwrap();
    let err = b.slice("../escape", &[1.0f64]).unwrap_err().to_string();
    assert!(err.contains("invalid entry name \"../escape\""), "{err}");
    let err = b.value("ok", &3).unwrap_err().to_string();
    assert!(err.contains("added twice"), "{err}");
    drop(b);
    assert_eq!(job.snapshot_seqs().unwrap(), vec![1]);
    assert!(job.pack_names().unwrap().len() == 1);
    // The abandoned snapshot left no temporary files and its number is not reused.
    let mut b = writer.begin(None);
    b.value("ok", &4).unwrap();
    assert_eq!(b.commit().unwrap().seq, 3);
}

#[test]
fn the_store_is_private_directories_0700_files_0600() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let mut writer = SnapshotWriter::open(job.clone(), 0).unwrap();
    let mut b = writer.begin(None);
    b.slice("grid", &field(10_000)).unwrap();
    b.commit().unwrap();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let root = dir.path().join("store");
    for d in [
        root.clone(),
        job.dir().to_owned(),
        job.dir().join("snapshots"),
        job.dir().join("packs"),
    ] {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }
    assert_eq!(mode(&job.manifest_path(1)), 0o600);
    for pack in job.pack_names().unwrap() {
        assert_eq!(mode(&job.pack_path(&pack)), 0o600);
    }
}

#[test]
fn mostly_dead_packs_are_compacted_and_then_removed() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let mut writer = SnapshotWriter::open(job.clone(), 0).unwrap();
    let per_chunk = CHUNK_SIZE / 8;
    let mut data = field(100 * per_chunk);
    let snap = |data: &[f64], writer: &mut SnapshotWriter| {
        let mut b = writer.begin(None);
        b.slice("data", data).unwrap();
        let r = b.commit().unwrap();
        writer.apply_retention(2).unwrap();
        r
    };
    let first = snap(&data, &mut writer);
    let first_pack = job.read_manifest(first.seq).unwrap().packs[0].clone();
    for round in 0..2 {
        for x in &mut data[..60 * per_chunk] {
            *x += 1.0 + f64::from(round);
        }
        snap(&data, &mut writer);
    }
    // Kept: snapshots 2 and 3, which use 40 of the first pack's 100 chunks: it is sparse.
    assert!(job.pack_names().unwrap().contains(&first_pack));
    let r = snap(&data, &mut writer);
    assert_eq!(r.bytes_new, 0, "nothing changed: {r:?}");
    assert_eq!(r.bytes_compacted, 40 * CHUNK_SIZE as u64, "{r:?}");
    let r = snap(&data, &mut writer);
    assert_eq!(r.bytes_compacted, 0, "compacted once: {r:?}");
    assert!(
        !job.pack_names().unwrap().contains(&first_pack),
        "the sparse pack is gone"
    );
    for seq in job.snapshot_seqs().unwrap() {
        SnapshotReader::open(&job, seq).unwrap().verify().unwrap();
    }
    let mut back = vec![0.0f64; data.len()];
    let newest = *job.snapshot_seqs().unwrap().last().unwrap();
    SnapshotReader::open(&job, newest)
        .unwrap()
        .slice_into("data", "f64", bytemuck::cast_slice_mut(&mut back))
        .unwrap();
    assert_eq!(back, data);
}

#[test]
fn the_scrub_paces_itself_and_finds_a_rotten_record() {
    use std::time::Duration;
    use supervise_store::scrub::Scrubber;
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let mut writer = SnapshotWriter::open(job.clone(), 0).unwrap();
    let mut b = writer.begin(None);
    b.slice("grid", &field(200_000)).unwrap();
    b.commit().unwrap();
    let records = job.read_manifest(1).unwrap().entries[0].chunks.len() as u64;

    // A clean store: one whole pass, nothing found, and then a rest until the period is over.
    let mut scrub = Scrubber::new(Duration::from_millis(1));
    std::thread::sleep(Duration::from_millis(5));
    let mut found = Vec::new();
    while scrub.passes == 0 {
        found.extend(scrub.run_due(&job));
        std::thread::sleep(scrub.due_in(std::time::Instant::now()));
    }
    assert!(found.is_empty(), "{found:?}");
    // Every record once per pass (the next pass may have begun in the same call).
    assert!(
        scrub.verified_records >= records && scrub.verified_records.is_multiple_of(records),
        "{} records verified, {records} stored",
        scrub.verified_records
    );

    // With a period of an hour, a slice is followed by a rest (the store is read over the hour).
    let mut slow = Scrubber::new(Duration::from_secs(3600));
    assert!(
        slow.run_due(&job).is_empty(),
        "not due before its first rest"
    );
    assert!(slow.due_in(std::time::Instant::now()) > Duration::from_secs(1));

    // One flipped byte in a record's stored bytes is found and named.
    let manifest = job.read_manifest(1).unwrap();
    let chunk = manifest.entries[0].chunks[3];
    let path = job.pack_path(&manifest.packs[0]);
    let mut bytes = fs::read(&path).unwrap();
    bytes[chunk.offset as usize + 44 + 10] ^= 1;
    fs::write(&path, bytes).unwrap();
    let mut scrub = Scrubber::new(Duration::from_millis(1));
    std::thread::sleep(Duration::from_millis(5));
    let found = scrub.run_due(&job);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!((found[0].offset, found[0].hash), (chunk.offset, chunk.hash));
    assert_eq!(found[0].snapshots, vec![1]);
}

/// Flips one stored byte of the record of `chunk` in `pack`.
fn rot(job: &JobStore, pack: &str, chunk: &supervise_store::format::ChunkRef) {
    let path = job.pack_path(pack);
    let mut bytes = fs::read(&path).unwrap();
    bytes[chunk.offset as usize + 44 + chunk.stored_len as usize - 1] ^= 0x21;
    fs::write(&path, bytes).unwrap();
}

#[test]
fn repair_points_damaged_snapshots_at_good_copies_and_puts_them_back() {
    use supervise_store::repair::repair;
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let mut writer = SnapshotWriter::open(job.clone(), 0).unwrap();
    let grid = field(100_000);
    for _ in 0..2 {
        let mut b = writer.begin(None);
        b.slice("grid", &grid).unwrap();
        b.commit().unwrap();
    }
    // Snapshot 2 is all dedup: its chunks live in snapshot 1's pack. One record rots.
    let m = job.read_manifest(1).unwrap();
    let chunk = m.entries[0].chunks[2];
    rot(&job, &m.packs[0], &chunk);
    // As the scrub does: set aside what uses it; the next snapshot stores a fresh copy.
    let set_aside = writer
        .distrust(&[(m.packs[0].clone(), chunk.offset, chunk.hash)])
        .unwrap();
    assert_eq!(set_aside, vec![1, 2]);
    let mut b = writer.begin(None);
    b.slice("grid", &grid).unwrap();
    let report = b.commit().unwrap();
    assert_eq!(
        report.bytes_new, chunk.raw_len as u64,
        "only the rotten chunk anew"
    );
    drop(writer);

    let done = repair(&job).unwrap();
    assert_eq!(done.repaired, vec![1, 2]);
    assert_eq!(done.put_back, vec![1, 2]);
    assert!(done.unrepairable.is_empty(), "{:?}", done.unrepairable);
    assert_eq!(job.snapshot_seqs().unwrap(), vec![1, 2, 3]);
    for seq in [1, 2, 3] {
        SnapshotReader::open(&job, seq).unwrap().verify().unwrap();
    }
    // A second repair has nothing to do.
    assert_eq!(repair(&job).unwrap(), Default::default());

    // A record with no good copy anywhere stays damaged, and says so.
    let m = job.read_manifest(3).unwrap();
    let other = m.entries[0].chunks[5];
    rot(&job, &m.packs[m.entries[0].chunks[5].pack as usize], &other);
    let done = repair(&job).unwrap();
    assert!(done.repaired.is_empty());
    let seqs: Vec<u64> = done.unrepairable.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    assert!(
        done.unrepairable[0].1.contains("no good copy"),
        "{:?}",
        done.unrepairable
    );
}

/// A local shim on `dir/store`, job "j", with `edit` applied to its configuration.
fn local_shim(
    dir: &Path,
    edit: impl FnOnce(&mut supervise_store::config::Config),
) -> supervise_store::Result<supervise_shim::Shim> {
    let mut config = supervise_store::config::Config::local(dir.join("store"), "j");
    config.scrub = None;
    edit(&mut config);
    supervise_shim::Shim::open(config)
}

#[test]
fn a_restore_of_another_size_names_entry_sizes_and_snapshot_and_tells_the_supervisor() {
    use std::io::{BufRead, BufReader};
    use std::os::fd::IntoRawFd;
    use std::os::unix::net::UnixStream;
    let dir = tempfile::tempdir().unwrap();
    {
        let mut shim = local_shim(dir.path(), |_| {}).unwrap();
        let mut r = shim.region::<u64>("r", 100).unwrap();
        r.fill(7);
        assert!(matches!(
            shim.snapshot(None, |s| s.slice("s", &[1.0f64; 10]))
                .unwrap(),
            Next::Continue(_)
        ));
        assert_eq!(shim.wait_durable().unwrap().unwrap().seq, 1);
    }
    // Resumed under a "supervisor" (this test, at the other end of the control socket) with a
    // region and a slice of other sizes.
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut shim = local_shim(dir.path(), |c| {
        c.mode = supervise_store::config::Mode::Supervised(theirs.into_raw_fd());
        c.orphan = supervise_store::config::OrphanMode::Continue;
        c.every = Some(std::time::Duration::from_secs(3600));
    })
    .unwrap();
    let err = shim.region::<u64>("r", 101).err().unwrap().to_string();
    for part in ["\"r\"", "snapshot 1", "800", "808"] {
        assert!(err.contains(part), "{part} in {err}");
    }
    let mut slice = [0.0f64; 11];
    let err = shim.load_slice("s", &mut slice).unwrap_err().to_string();
    for part in ["\"s\"", "snapshot 1", "80", "88"] {
        assert!(err.contains(part), "{part} in {err}");
    }
    ours.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut events = Vec::new();
    for line in BufReader::new(&ours).lines() {
        // The mismatch events among the others (hello, beats).
        let line = line.unwrap();
        if let Ok(event @ supervise_store::control::Event::RestoreMismatch { .. }) =
            serde_json::from_str::<supervise_store::control::Event>(&line)
        {
            events.push(event);
            if events.len() == 2 {
                break;
            }
        }
    }
    use supervise_store::control::Event::RestoreMismatch;
    assert_eq!(
        events,
        [
            RestoreMismatch {
                seq: 1,
                entry: "r".into(),
                stored_bytes: 800,
                wanted_bytes: 808,
                detail: None,
            },
            RestoreMismatch {
                seq: 1,
                entry: "s".into(),
                stored_bytes: 80,
                wanted_bytes: 88,
                detail: None,
            }
        ]
    );
}

#[test]
fn the_origin_from_the_configuration_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let origin = supervise_store::format::Origin {
        program: "/opt/sim/bin/heat".into(),
        exe_blake3: Some("0f".repeat(32)),
        args: vec!["--n".into(), "64".into()],
    };
    let mut shim = local_shim(dir.path(), |c| c.origin = Some(origin.clone())).unwrap();
    assert!(matches!(
        shim.snapshot(None, |s| s.value("v", &1)).unwrap(),
        Next::Continue(_)
    ));
    shim.wait_durable().unwrap();
    let m = job(dir.path()).read_manifest(1).unwrap();
    assert_eq!(m.origin, Some(origin));
    assert!(m.outputs.is_empty());
}

#[test]
fn an_output_file_is_cut_back_to_the_length_the_restored_snapshot_recorded() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.txt");
    fs::write(&path, "left over from an earlier run\n").unwrap();
    {
        let mut shim = local_shim(dir.path(), |_| {}).unwrap();
        let mut out = shim.output(&path).unwrap();
        // A fresh start begins with an empty file, as the uninterrupted run would.
        assert_eq!(fs::read(&path).unwrap(), b"");
        // Buffered: nothing reaches the file before a snapshot (or a flush).
        writeln!(out, "step 1").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"");
        assert!(matches!(
            shim.snapshot(Some("step 1"), |_| Ok(())).unwrap(),
            Next::Continue(_)
        ));
        assert_eq!(fs::read(&path).unwrap(), b"step 1\n");
        writeln!(out, "step 2").unwrap();
        assert!(matches!(
            shim.snapshot(Some("step 2"), |_| Ok(())).unwrap(),
            Next::Continue(_)
        ));
        shim.wait_durable().unwrap();
        writeln!(out, "step 3 (after the last snapshot)").unwrap();
        out.flush().unwrap();
        assert!(
            shim.output(&path).is_err(),
            "a file open already is refused"
        );
        // The program dies here (its Output and shim dropped without another snapshot).
    }
    let m = job(dir.path()).read_manifest(2).unwrap();
    let abs = fs::canonicalize(dir.path()).unwrap().join("out.txt");
    assert_eq!(
        m.outputs,
        [supervise_store::format::OutputMark {
            path: abs.to_str().unwrap().into(),
            len: 14
        }]
    );
    // Resumed from snapshot 2: the file is cut to what it held then; the run goes on.
    {
        let mut shim = local_shim(dir.path(), |_| {}).unwrap();
        // The relative path from the same directory names the same file.
        let cwd = std::env::current_dir().unwrap();
        std::env::set_current_dir(dir.path()).unwrap();
        let out = shim.output("out.txt");
        std::env::set_current_dir(cwd).unwrap();
        let mut out = out.unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"step 1\nstep 2\n");
        writeln!(out, "step 3").unwrap();
        drop(out);
        assert_eq!(fs::read(&path).unwrap(), b"step 1\nstep 2\nstep 3\n");
        // Opened again in the same run, it goes on where it ended.
        let mut out = shim.output(&path).unwrap();
        writeln!(out, "step 4").unwrap();
        assert!(matches!(
            shim.snapshot(None, |_| Ok(())).unwrap(),
            Next::Continue(_)
        ));
        shim.wait_durable().unwrap();
        assert_eq!(job(dir.path()).read_manifest(3).unwrap().outputs[0].len, 28);
    }
    // A run that resumes and snapshots before it opens the file again keeps its mark.
    {
        let mut shim = local_shim(dir.path(), |_| {}).unwrap();
        assert!(matches!(
            shim.snapshot(None, |_| Ok(())).unwrap(),
            Next::Continue(_)
        ));
        shim.wait_durable().unwrap();
        assert_eq!(job(dir.path()).read_manifest(4).unwrap().outputs[0].len, 28);
    }
    // A file shorter than the snapshot recorded is an error naming it and both lengths.
    fs::write(&path, "step 1\n").unwrap();
    let mut shim = local_shim(dir.path(), |_| {}).unwrap();
    let err = shim.output(&path).err().unwrap();
    assert!(
        matches!(err, supervise_store::Error::OutputShorter { .. }),
        "{err}"
    );
    let msg = err.to_string();
    for part in ["out.txt", "28", "7 bytes", "snapshot 4"] {
        assert!(msg.contains(part), "{part} in {msg}");
    }
    assert_eq!(fs::read(&path).unwrap(), b"step 1\n", "left as it was");
}

#[test]
fn without_a_store_an_output_is_a_plain_append_file() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.txt");
    fs::write(&path, "before\n").unwrap();
    let mut shim = local_shim(dir.path(), |c| c.mode = supervise_store::config::Mode::Off).unwrap();
    let mut out = shim.output(&path).unwrap();
    writeln!(out, "after").unwrap();
    assert_eq!(
        shim.snapshot(None, |_| Ok(())).unwrap(),
        Next::Continue(None)
    );
    drop(out);
    assert_eq!(fs::read(&path).unwrap(), b"before\nafter\n");
    assert!(!dir.path().join("store").exists());
}

#[test]
fn large_entries_restore_into_a_region_or_a_load_and_mismatches_are_still_refused() {
    use supervise_shim::{Config, Error, Shim};
    let dir = tempfile::tempdir().unwrap();
    let open = || Shim::open(Config::local(dir.path().join("store"), "j")).unwrap();
    // 2 MiB each: large enough to be decoded at open, once, into memory of their own.
    let n = (2 << 20) / 8;
    let loaded = field(n);
    {
        let mut shim = open();
        let mut r = shim.region::<f64>("r", n).unwrap();
        r.copy_from_slice(&field(n + 1)[1..]);
        assert!(matches!(
            shim.snapshot(None, |s| s.slice("v", &loaded)).unwrap(),
            Next::Continue(Some(_))
        ));
        shim.wait_durable().unwrap().unwrap();
    }
    let mut shim = open();
    let mut v = vec![0.0f64; n];
    assert!(shim.load_slice("v", &mut v).unwrap());
    assert_eq!(v, loaded);
    // Asked for again, it is decoded from the store again.
    v.fill(0.0);
    assert!(shim.load_slice("v", &mut v).unwrap());
    assert_eq!(v, loaded);
    let r = shim.region::<f64>("r", n).unwrap();
    assert_eq!(&r[..], &field(n + 1)[1..]);
    drop(r);
    // Another length or element type is refused as before, staged or not.
    let mut shim = open();
    let err = shim.region::<f64>("r", n + 1).err().unwrap();
    assert!(matches!(err, Error::SizeMismatch { .. }), "{err}");
    let mut wrong = vec![0u64; n];
    let err = shim.load_slice("v", &mut wrong).unwrap_err();
    assert!(matches!(err, Error::WrongKind { .. }), "{err}");
    // And after a mismatch the entry still restores for a program that asks right.
    let r = shim.region::<f64>("r", n).unwrap();
    assert_eq!(&r[..], &field(n + 1)[1..]);
}
