//! The benchmark measures every scenario, against the limits and the naive way, and leaves
//! nothing behind.

use std::process::Command;

#[test]
fn bench_measures_every_scenario_against_the_limits_and_the_naive_way() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_supervise-bench"))
        .args(["--size", "16MiB", "--json", "--store"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let get = |scenario: &str, metric: &str| -> (f64, f64, f64) {
        let row = rows
            .iter()
            .find(|r| r["scenario"] == scenario && r["metric"] == metric)
            .unwrap_or_else(|| panic!("no row {scenario}/{metric}"));
        // A row without a measured limit has null there.
        let num = |k: &str| {
            row[k].as_f64().unwrap_or_else(|| {
                assert_eq!(k, "limit", "{k} missing in {row}");
                f64::NAN
            })
        };
        (num("ours"), num("limit"), num("naive"))
    };
    for scenario in [
        "full",
        "1% changed",
        "10% changed",
        "1% changed, copy, no tracking",
        "1% changed, fork, no tracking",
    ] {
        for metric in ["pause", "durable", "written"] {
            let (ours, limit, naive) = get(scenario, metric);
            // A fork's pause has no measured limit (null).
            let no_limit = scenario.contains("fork") && metric == "pause";
            assert!(
                ours > 0.0 && naive > 0.0 && (limit > 0.0 || no_limit),
                "{scenario}/{metric}"
            );
        }
    }
    let (restore, _, _) = get("restore", "time");
    assert!(restore > 0.0);
    // What must hold on any machine: incremental snapshots write a fraction of the naive bytes.
    let (written, limit, naive) = get("1% changed", "written");
    assert!(
        written < naive / 10.0,
        "1%: {written} MiB vs naive {naive} MiB"
    );
    assert!(
        written < limit * 1.5,
        "1%: {written} MiB vs limit {limit} MiB"
    );
    // The bench leaves nothing behind in the user's store.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
