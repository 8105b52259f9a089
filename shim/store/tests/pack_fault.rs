//! A pack whose write failed stays failed: a snapshot builder used on after the error never
//! commits records that were not written. Its own test binary, as the fault injection is
//! process-wide.

use supervise_store::fsops::crash::{self, Fault};
use supervise_store::reader::SnapshotReader;
use supervise_store::store::Store;
use supervise_store::writer::SnapshotWriter;

/// `len` bytes zstd cannot shrink, so that they fill several pack blocks.
fn noise(seed: u64, len: usize) -> Vec<f64> {
    let mut x = seed | 1;
    (0..len / 8)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            f64::from_bits(x >> 2)
        })
        .collect()
}

#[test]
fn a_builder_used_on_after_a_failed_write_commits_only_what_was_written() {
    let (a, b) = (noise(1, 12 << 20), noise(2, 12 << 20));
    for n in 1.. {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("stash")).unwrap();
        let job = Store::open(root.join("store")).unwrap().job("j").unwrap();
        let mut writer = SnapshotWriter::open(job.clone(), 0).unwrap();
        crash::arm(n, Fault::Error, &root.join("stash")).unwrap();
        let mut builder = writer.begin(None);
        // Every error is ignored on purpose: the caller goes on as a careless one would.
        let first = builder.slice("a", &a);
        let second = builder.slice("b", &b);
        let committed = builder.commit();
        let outcome = crash::disarm();
        crash::forget();
        if !outcome.fired {
            assert!(first.is_ok() && second.is_ok() && committed.is_ok());
            assert!(n > 10, "only {} operations were failed", n - 1);
            break;
        }
        let Ok(report) = committed else { continue };
        // A snapshot that was committed holds what was given, byte for byte, in every entry it
        // names.
        let reader = SnapshotReader::open(&job, report.seq)
            .unwrap_or_else(|e| panic!("fault at operation {n}: committed, then {e}"));
        for (name, data) in [("a", &a), ("b", &b)] {
            let Some(entry) = reader.manifest().entry(name) else {
                continue;
            };
            let mut back = vec![0f64; data.len()];
            reader
                .fill(entry, bytemuck::cast_slice_mut(&mut back))
                .unwrap_or_else(|e| panic!("fault at operation {n}: entry {name}: {e}"));
            assert!(
                back.iter()
                    .zip(data.iter())
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "fault at operation {n}: entry {name} differs"
            );
        }
    }
}
