//! Writes the checked-in seed corpus of the fuzz targets (`shim/fuzz/seeds/<target>/`): valid
//! encodings of each decoder's input. Not part of a normal run:
//!
//! ```text
//! cargo test -p supervise-store --test fuzz_seeds -- --ignored
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use supervise_store::SnapshotReport;
use supervise_store::claims::{ChunkAt, hashes_hex};
use supervise_store::codec::Encoder;
use supervise_store::control::{DamagedSnapshot, Event, Request};
use supervise_store::format::{
    ArrayShape, ChunkRef, EntryKind, EntryMeta, Manifest, PACK_MAGIC, SnapshotStats, entry_root,
    file_header,
};
use supervise_store::history::Record;

fn seeds(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Chunks of every codec and shuffle width: (stored record = header + stored bytes).
fn records() -> Vec<Vec<u8>> {
    let mut enc = Encoder::new().unwrap();
    let smooth: Vec<f64> = (0..512).map(|i| (i as f64 * 1e-2).sin()).collect();
    let smooth: &[u8] = bytemuck::cast_slice(&smooth);
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let noise: Vec<u8> = (0..300)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect();
    let text = br#"{"n":256,"steps":40000,"step":1200,"alpha":0.2}"#.repeat(8);
    let mut out = Vec::new();
    for (raw, width) in [
        (smooth, 8),
        (smooth, 4),
        (smooth, 2),
        (smooth, 0),
        (&noise[..], 0),
        (&text[..], 0),
    ] {
        let e = enc
            .encode(raw, *blake3::hash(raw).as_bytes(), width)
            .unwrap();
        let mut record = e.header.encode().to_vec();
        record.extend_from_slice(&e.data);
        out.push(record);
    }
    out
}

fn manifest(entries: usize) -> Manifest {
    let kinds = [
        EntryKind::Value,
        EntryKind::Slice {
            elem: "f64".into(),
            elem_size: 8,
        },
        EntryKind::Slice {
            elem: "u8".into(),
            elem_size: 1,
        },
    ];
    let mut offset = 8;
    let entries = (0..entries)
        .map(|i| {
            let chunks: Vec<ChunkRef> = (0..3)
                .map(|c| {
                    let chunk = ChunkRef {
                        hash: *blake3::hash(&[i as u8, c as u8]).as_bytes(),
                        pack: c % 2,
                        offset,
                        stored_len: 1000 + c,
                        raw_len: 65536,
                    };
                    offset += 44 + u64::from(chunk.stored_len);
                    chunk
                })
                .collect();
            let len = 3 * 65536;
            EntryMeta {
                name: ["params", "grid", "bytes"][i % 3].to_owned() + &"x".repeat(i / 3),
                kind: kinds[i % 3].clone(),
                len,
                root: entry_root(len, chunks.iter().map(|c| c.hash)),
                chunks,
            }
        })
        .collect();
    Manifest {
        job: "heat-f0886495".into(),
        seq: 7,
        parent: Some(6),
        created_unix_ms: 1_764_670_000_000,
        attempt: 1,
        tag: Some("step 1200".into()),
        stats: SnapshotStats {
            bytes_total: 3 * 3 * 65536,
            bytes_new: 65536,
            bytes_packed: 3000,
            bytes_compacted: 0,
            duration_ms: 12,
        },
        packs: vec![
            "00000000000000000007-0123456789abcdef-000".into(),
            "00000000000000000006-fedcba9876543210-001".into(),
        ],
        entries,
        origin: None,
        outputs: Vec::new(),
        arrays: Vec::new(),
    }
}

#[test]
#[ignore = "writes the fuzz seed corpus; run by hand"]
fn write_fuzz_seeds() {
    let dir = seeds("manifest");
    for n in [0, 1, 3] {
        let mut m = manifest(n);
        if n >= 2 {
            // An array shape makes it a version 3 manifest, as the fuzz target frames a body.
            m.arrays.push(ArrayShape {
                entry: "grid".into(),
                shape: vec![3, 8192],
                dtype: None,
            });
        }
        let bytes = m.encode();
        Manifest::decode(&bytes, Path::new("m")).unwrap();
        // The body alone too (the target frames it with a valid checksum).
        fs::write(
            dir.join(format!("{n}-entries-body")),
            &bytes[16..bytes.len() - 32],
        )
        .unwrap();
        fs::write(dir.join(format!("{n}-entries")), bytes).unwrap();
    }

    let dir = seeds("record");
    for (i, r) in records().iter().enumerate() {
        fs::write(dir.join(format!("record-{i}")), r).unwrap();
    }

    let dir = seeds("pack");
    let mut pack = file_header(PACK_MAGIC).to_vec();
    for _ in 0..3 {
        for r in records() {
            pack.extend_from_slice(&r);
        }
    }
    supervise_store::pack_scan::scan_pack(&pack, Path::new("p")).unwrap();
    fs::write(dir.join("pack-3-of-each"), &pack).unwrap();
    fs::write(dir.join("pack-empty"), file_header(PACK_MAGIC)).unwrap();

    let dir = seeds("control");
    let chunk_at = ChunkAt {
        hash: hashes_hex(&[[9; 32]]),
        pack: "00000000000003145728-0123456789abcdef-000".into(),
        offset: 16,
        stored_len: 900,
        raw_len: 65536,
    };
    let report = SnapshotReport {
        seq: 4,
        tag: Some("step 9".into()),
        bytes_total: 10,
        bytes_new: 5,
        bytes_compacted: 0,
        bytes_written: 3,
        duration_ms: 2,
        removed: vec![1, 2],
        pause_us: 1500,
        writer_cpu_us: 2500,
    };
    let lines = [
        Event::Hello {
            pid: 1234,
            resumed_from: Some(3),
            tag: Some("step 9".into()),
            damaged: vec![DamagedSnapshot {
                seq: 4,
                why: "damaged: checksum".into(),
            }],
            capture: "dirty".into(),
        }
        .to_line(),
        Event::Progress { count: 99 }.to_line(),
        Event::SnapshotDone(report).to_line(),
        Event::SnapshotFailed {
            error: "disk full".into(),
        }
        .to_line(),
        Request::Snapshot.to_line(),
        Request::Stop.to_line(),
        Request::EpochBegin {
            epoch: 3,
            stop: false,
        }
        .to_line(),
        Event::EpochAt { epoch: 3, step: 41 }.to_line(),
        Event::ChunkClaims {
            epoch: 3,
            id: 1,
            hashes: hashes_hex(&[[7; 32], [9; 32]]),
        }
        .to_line(),
        Request::ClaimAnswer {
            epoch: 3,
            id: 1,
            theirs: vec![1],
        }
        .to_line(),
        Event::ChunksStored {
            epoch: 3,
            chunks: vec![chunk_at.clone()],
        }
        .to_line(),
        Request::ChunksAt {
            epoch: 3,
            chunks: vec![chunk_at],
        }
        .to_line(),
    ];
    for (i, line) in lines.iter().enumerate() {
        fs::write(dir.join(format!("line-{i}")), line).unwrap();
    }

    let dir = seeds("events");
    let records = [
        ("start", "supervisor pid 7 started: heat --n 256", false),
        ("event", "snapshot 1 done: 512 KiB, 12 ms", false),
        ("end", "the command finished", true),
    ];
    let mut log = String::new();
    for (i, (kind, message, completed)) in records.into_iter().enumerate() {
        let r = Record {
            unix_ms: 1_764_670_000_000 + i as u64,
            pid: 7,
            kind: kind.into(),
            message: message.into(),
            completed,
            data: None,
        };
        let line = serde_json::to_string(&r).unwrap() + "\n";
        fs::write(dir.join(format!("line-{i}")), &line).unwrap();
        log.push_str(&line);
    }
    fs::write(dir.join("log"), log).unwrap();
}
