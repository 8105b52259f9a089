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
    let (restore, read, _) = get("restore", "time");
    assert!(restore > 0.0 && read > 0.0);
    // The second restore row's limit is the read, or decoding and filling memory, whichever
    // is longer.
    let (again, floor, _) = get("restore, read or decode", "time");
    assert!(again == restore && floor >= read, "{floor} {read}");
    for metric in ["pause", "durable", "written"] {
        let (ours, limit, _) = get("100% changed", metric);
        assert!(ours > 0.0 && limit > 0.0, "100% changed/{metric}");
    }
    // Peak memory over the program alone: measured (root can reset the peak; CI runs as
    // root), and within the capture memory budget when everything changed.
    let (one, changed, _) = get("1% changed, memory", "memory");
    assert!(one >= 0.0 && changed > 0.0, "{one} {changed}");
    let (all, budget, _) = get("100% changed, memory", "memory");
    assert!(
        all <= budget,
        "100% changed: {all} MiB over a budget of {budget} MiB"
    );
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

#[test]
fn bench_every_runs_the_program_alone_and_under_both_schedules() {
    let bench = std::path::PathBuf::from(env!("CARGO_BIN_EXE_supervise-bench"));
    if !bench.with_file_name("supervise").is_file() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI builds the workspace: supervise is beside supervise-bench"
        );
        eprintln!("skipped: no supervise beside {}", bench.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(&bench)
        .args(["--every", "--size", "4MiB", "--json"])
        .args([
            "--worker-rounds",
            "12",
            "--worker-round-ms",
            "100",
            "--store",
        ])
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
    let runs: Vec<&str> = rows.iter().map(|r| r["run"].as_str().unwrap()).collect();
    assert_eq!(runs, ["alone", "--every 1s", "--every auto"]);
    // 1.2 s of rounds: a snapshot each second under --every 1s; auto chose and said why.
    assert!(rows[1]["snapshots"].as_u64().unwrap() >= 1, "{rows:?}");
    assert!(rows[2]["interval"][1].is_string(), "{rows:?}");
    for r in &rows {
        assert!(r["wall_s"].as_f64().unwrap() > 1.0, "{r}");
    }
    // Nothing is left behind but the store's own directories.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().ends_with(".events"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
