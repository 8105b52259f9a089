//! Why 64 KiB chunks: for several chunk sizes, a full snapshot of a smooth f64 field and a
//! snapshot after 1% of it changed (in scattered 64 KiB blocks, and in scattered 4 KiB pages),
//! measured side by side on the same machine in one run.
//!
//! `cargo bench -p supervise-store --bench chunk_size [-- --mib 256]`

use std::time::Instant;

use supervise_store::{SnapshotWriter, Store};

fn field(n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| (i as f64 * 1e-5).sin() * 300.0 + (i as f64 * 3e-3).cos())
        .collect()
}

/// Adds a small amount to `fraction` of the array, in blocks of `block` bytes at pseudo-random
/// (unaligned) positions.
fn change(grid: &mut [f64], block: usize, fraction: f64, seed: u64) {
    let per = block / 8;
    let blocks = ((grid.len() as f64 * fraction) / per as f64).round() as usize;
    let mut x = seed | 1;
    for _ in 0..blocks {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let start = (x as usize) % (grid.len() - per);
        for v in &mut grid[start..start + per] {
            *v += 1e-3;
        }
    }
}

fn main() {
    let mut mib = 256usize;
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--mib") {
        mib = args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .expect("--mib N");
    }
    let n = (mib << 20) / 8;
    println!(
        "state: {mib} MiB smooth f64 field; 1% changed = {:.1} MiB",
        mib as f64 * 0.01
    );
    println!(
        "{:>6} | {:>9} {:>10} {:>9} | {:>22} | {:>22}",
        "chunk", "full s*", "written", "manifest", "1% as 64 KiB: written", "1% as 4 KiB: written"
    );
    // Warm-up (untimed): the first snapshot of a run pays for cold disk and allocator.
    {
        let dir = tempfile::tempdir_in(".").expect("temp dir");
        let job = Store::open(dir.path())
            .and_then(|s| s.job("warmup"))
            .expect("store");
        let mut writer = SnapshotWriter::open(job, 0).expect("writer");
        let mut b = writer.begin(None);
        b.slice("grid", &field(n)).expect("slice");
        b.commit().expect("commit");
    }
    for kib in [16usize, 32, 64, 128, 256] {
        let mut grid = field(n);
        // Full snapshot: the median of three, each into a fresh store (disk timings are noisy).
        let mut times = Vec::new();
        let mut kept = None;
        for _ in 0..3 {
            let dir = tempfile::tempdir_in(".").expect("temp dir");
            let job = Store::open(dir.path())
                .and_then(|s| s.job("bench"))
                .expect("store");
            let mut writer = SnapshotWriter::open(job.clone(), 0)
                .expect("writer")
                .with_chunk_size(kib << 10);
            let t = Instant::now();
            let mut b = writer.begin(None);
            b.slice("grid", &grid).expect("slice");
            let full = b.commit().expect("commit");
            times.push(t.elapsed().as_secs_f64());
            kept = Some((dir, job, writer, full));
        }
        times.sort_by(f64::total_cmp);
        let full_s = times[1];
        let (_dir, job, mut writer, full) = kept.expect("three runs");
        let manifest = std::fs::metadata(job.manifest_path(full.seq)).map_or(0, |m| m.len());

        let mut run = |block: usize, seed: u64| {
            change(&mut grid, block, 0.01, seed);
            let mut b = writer.begin(None);
            b.slice("grid", &grid).expect("slice");
            let r = b.commit().expect("commit");
            let changed = n as f64 * 8.0 * 0.01;
            format!(
                "{:>7.1} MiB ({:>4.1}x)",
                r.bytes_written as f64 / 1048576.0,
                r.bytes_written as f64 / changed
            )
        };
        let big = run(64 << 10, 7);
        let small = run(4 << 10, 11);
        println!(
            "{:>3} KiB | {:>9.2} {:>6.0} MiB {:>5.0} KiB | {:>22} | {:>22}",
            kib,
            full_s,
            full.bytes_written as f64 / 1048576.0,
            manifest as f64 / 1024.0,
            big,
            small
        );
    }
    println!("(* median of 3; x = bytes written / bytes changed, lower is better)");
}
