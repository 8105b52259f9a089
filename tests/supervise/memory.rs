//! `--capture-memory`: a capture larger than the budget makes the program wait instead of
//! growing its memory, checked through the program's peak resident memory.

use std::process::Command;

use crate::support::{checksum_of, events_of, example_bin, example_checksum, supervise_bin};

const MIB: u64 = 1 << 20;

/// Runs sparse (256 MiB, about all of it changed each round, a snapshot every round) under
/// supervise with `budget`: (its peak RSS, its checksum, the snapshots' pauses in us).
fn sparse_under(budget: &str, sparse: &[&str]) -> (u64, String, Vec<u64>) {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let out = Command::new(supervise_bin())
        .arg("--store")
        .arg(&store)
        .args(["--every", "1h", "--capture-memory", budget, "--"])
        .arg(example_bin("sparse"))
        .args(sparse)
        .output()
        .expect("run supervise");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let peak = stdout
        .lines()
        .find_map(|l| l.strip_prefix("peak-rss "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no peak-rss line: {stdout}"));
    let pauses = events_of(&store, "snapshot")
        .iter()
        .map(|e| e["pause_us"].as_u64().unwrap())
        .collect();
    (peak, checksum_of(&stdout).unwrap(), pauses)
}

#[test]
fn a_capture_larger_than_the_budget_waits_instead_of_growing_memory() {
    let sparse = [
        "--mib",
        "256",
        "--percent",
        "100",
        "--rounds",
        "4",
        "--report-memory",
    ];
    let state = 256 * MIB;
    let uninterrupted = example_checksum("sparse", &sparse);
    // The program alone: its state and a few MiB of its own.
    let alone = {
        let out = Command::new(example_bin("sparse"))
            .args(sparse)
            .env_clear()
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("peak-rss "))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap()
    };
    assert!(alone < state + 32 * MIB, "alone: {alone}");
    // 32 MiB of capture memory: every snapshot after the first changes about 160 MiB, and
    // copying it at once would need that much. Within the budget, what is left over the
    // program alone is the budget and the writer's own working memory (its pack blocks, its
    // compressors), under 40 MiB.
    let (bounded, sum, pauses) = sparse_under("32MiB", &sparse);
    assert_eq!(sum, uninterrupted);
    assert_eq!(pauses.len(), 4, "{pauses:?}");
    assert!(
        bounded <= alone + 32 * MIB + 40 * MIB,
        "with a 32 MiB budget the peak was {} MiB, alone {} MiB",
        bounded / MIB,
        alone / MIB
    );
    // With room for it, a capture copies everything it needs at once: the same run holds
    // more than half the state again.
    let (roomy, sum, _) = sparse_under("1GiB", &sparse);
    assert_eq!(sum, uninterrupted);
    assert!(
        roomy >= alone + state / 2,
        "with a 1 GiB budget the peak was {} MiB, alone {} MiB",
        roomy / MIB,
        alone / MIB
    );
}

#[test]
fn a_bad_capture_memory_is_refused_with_a_clear_error() {
    for bad in ["0", "0%", "101%", "lots", "-5MiB"] {
        let (code, _, err) = crate::support::bare(&["--capture-memory", bad, "--", "true"]);
        assert_eq!(code, 2, "{bad}: {err}");
        assert!(err.contains("--capture-memory"), "{bad}: {err}");
        assert!(err.contains("percentage"), "{bad}: {err}");
    }
}
