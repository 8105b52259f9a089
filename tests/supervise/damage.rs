//! End-to-end tests of bad bytes on disk through the real binary: a store or history damaged
//! in ways a checksum does not catch (a flipped codec byte, a crafted manifest with a valid
//! checksum, garbage in `events.log`) is reported as damage or skipped, never a panic or an
//! abort; `restore --to` writes only inside its directory, never through a planted symlink.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::support::*;
use serde_json::Value;
use supervise_store::JobStore;
use supervise_store::format::{ChunkRef, Manifest, entry_root};
const ARGS: [&str; 4] = ["--n", "256", "--steps", "40000"];

/// heat under supervise until a few snapshots exist, then stopped with SIGTERM.
fn stopped_heat(store: &Path) -> JobStore {
    stopped_job_with_snapshots(store, &ARGS)
}

/// The previous and the newest snapshot.
fn last_two(job: &JobStore) -> (u64, u64) {
    let seqs = job.snapshot_seqs().unwrap();
    (seqs[seqs.len() - 2], seqs[seqs.len() - 1])
}

/// Replaces snapshot `seq`'s manifest by `edit` of it, re-encoded with a valid checksum.
fn rewrite_manifest(job: &JobStore, seq: u64, edit: impl FnOnce(&mut Manifest)) {
    let mut m = job.read_manifest(seq).unwrap();
    edit(&mut m);
    fs::write(job.manifest_path(seq), m.encode()).unwrap();
}

/// `verify --json` exits 5 and names snapshot `seq` as not ok; returns its error text.
fn verify_says_damaged(store: &Path, seq: u64) -> String {
    let (code, out, err) = cmd(store, &["verify", "--json"]);
    assert_eq!(code, 5, "verify: {out} {err}");
    let verdicts: Value = serde_json::from_str(&out).unwrap();
    let verdict = verdicts
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["snapshot"] == seq)
        .unwrap_or_else(|| panic!("no verdict for {seq}: {verdicts}"));
    assert_eq!(verdict["ok"], false, "{verdicts}");
    verdict["error"].as_str().unwrap().to_owned()
}

/// Runs heat again on the damaged store: it completes as an uninterrupted run would, from
/// `prev`, and `newest` is set aside as damaged.
fn resume_sets_aside(store: &Path, job: &JobStore, prev: u64, newest: u64) -> Finished {
    let fin = Run::start(store, &["--every", "1h"], &heat(&ARGS), &[]).wait(LONG);
    fin.assert_completed(&reference_checksum(&ARGS));
    let instead = events_of(store, "resumed-instead");
    assert_eq!(
        instead.last().map(|e| &e["from"]),
        Some(&prev.into()),
        "{instead:?}"
    );
    assert!(
        job.damaged_seqs().unwrap().contains(&newest),
        "snapshot {newest} is not set aside: {}",
        fin.stderr
    );
    fin
}

#[test]
fn a_flipped_codec_byte_is_damage_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let job = stopped_heat(&store);
    let (prev, newest) = last_two(&job);
    let known: Vec<_> = job
        .read_manifest(prev)
        .unwrap()
        .entries
        .iter()
        .flat_map(|e| e.chunks.iter().map(|c| c.hash))
        .collect();
    let m = job.read_manifest(newest).unwrap();
    // A zstd record only the newest snapshot has: its codec byte 1 (zstd) becomes 0 (raw).
    let (pack, at) = m
        .entry("grid")
        .unwrap()
        .chunks
        .iter()
        .filter(|c| !known.contains(&c.hash))
        .find_map(|c| {
            let pack = job.pack_path(&m.packs[c.pack as usize]);
            let at = c.offset as usize + 40;
            (fs::read(&pack).unwrap()[at] == 1).then_some((pack, at))
        })
        .expect("a zstd chunk only the newest snapshot has");
    let mut bytes = fs::read(&pack).unwrap();
    bytes[at] = 0;
    fs::write(&pack, bytes).unwrap();
    let pack_name = pack.file_name().unwrap().to_str().unwrap();

    let error = verify_says_damaged(&store, newest);
    assert!(error.contains(pack_name), "{error}");
    let out = dir.path().join("out");
    let (code, _, err) = cmd(
        &store,
        &[
            "restore",
            &newest.to_string(),
            "--to",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(pack_name), "{err}");

    resume_sets_aside(&store, &job, prev, newest);
}

#[test]
fn huge_chunk_lengths_with_a_valid_checksum_are_damage_not_an_abort() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let job = stopped_heat(&store);
    let (prev, newest) = last_two(&job);
    rewrite_manifest(&job, newest, |m| {
        let params = m.entries.iter_mut().find(|e| e.name == "params").unwrap();
        let chunk = ChunkRef {
            raw_len: u32::MAX,
            ..params.chunks[0]
        };
        params.chunks = vec![chunk; 4096];
        params.len = 4096 * u64::from(u32::MAX);
        params.root = entry_root(params.len, params.chunks.iter().map(|c| c.hash));
    });
    let manifest = job.manifest_path(newest);
    let manifest = manifest.to_str().unwrap();

    let error = verify_says_damaged(&store, newest);
    assert!(error.contains(manifest), "{error}");
    for args in [vec!["show", "latest"], vec!["restore", "latest", "--to"]] {
        let mut args = args.clone();
        let out = dir.path().join("out");
        if args[0] == "restore" {
            args.push(out.to_str().unwrap());
        }
        let (code, _, err) = cmd(&store, &args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains(manifest), "{args:?}: {err}");
        assert!(!out.join("params.json").exists());
    }

    resume_sets_aside(&store, &job, prev, newest);
}

#[test]
fn restore_refuses_entry_names_that_escape_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let job = stopped_heat(&store);
    let (prev, newest) = last_two(&job);
    let absolute = dir.path().join("absolute");
    for (seq, name) in [
        (newest, "../../../escaped".to_owned()),
        (prev, absolute.to_str().unwrap().to_owned()),
    ] {
        rewrite_manifest(&job, seq, |m| {
            m.entries
                .iter_mut()
                .find(|e| e.name == "params")
                .unwrap()
                .name = name.clone();
        });
        let error = verify_says_damaged(&store, seq);
        assert!(
            error.contains(job.manifest_path(seq).to_str().unwrap()),
            "{error}"
        );
        let out = dir.path().join("a/b/c");
        let (code, _, err) = cmd(
            &store,
            &["restore", &seq.to_string(), "--to", out.to_str().unwrap()],
        );
        assert_eq!(code, 1, "{name}: {err}");
        assert!(!dir.path().join("escaped.json").exists(), "{name}");
        assert!(!dir.path().join("absolute.json").exists(), "{name}");
        assert!(!out.exists(), "{name}: nothing written");
    }
}

#[test]
fn restore_never_follows_a_planted_symlink_and_keeps_files_private() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let job = stopped_heat(&store);
    let (_, newest) = last_two(&job);
    let newest = newest.to_string();

    // A symlink planted where a restored file goes, pointing at a victim file.
    let victim = dir.path().join("victim");
    fs::write(&victim, b"victim").unwrap();
    let trap = dir.path().join("trap");
    fs::create_dir(&trap).unwrap();
    std::os::unix::fs::symlink(&victim, trap.join("grid.f64")).unwrap();
    let (code, _, err) = cmd(
        &store,
        &["restore", &newest, "--to", trap.to_str().unwrap()],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(trap.join("grid.f64").to_str().unwrap()),
        "{err}"
    );
    assert_eq!(fs::read(&victim).unwrap(), b"victim");

    // Restored files keep the store's privacy.
    let out = dir.path().join("out");
    let (code, _, err) = cmd(&store, &["restore", &newest, "--to", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&out), 0o700);
    for file in ["grid.f64", "params.json", "snapshot.json"] {
        assert_eq!(mode(&out.join(file)), 0o600, "{file}");
    }
    // Unless asked to share them (as far as the umask lets).
    let shared = dir.path().join("shared");
    let (code, _, err) = cmd(
        &store,
        &[
            "restore",
            &newest,
            "--to",
            shared.to_str().unwrap(),
            "--shared",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let umask = status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .map(|m| u32::from_str_radix(m.trim(), 8).unwrap())
        .unwrap();
    assert_eq!(mode(&shared), 0o755 & !umask);
    assert_eq!(mode(&shared.join("grid.f64")), 0o644 & !umask);

    // A regular file as the target: the error names it.
    let (code, _, err) = cmd(
        &store,
        &["restore", &newest, "--to", victim.to_str().unwrap()],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(victim.to_str().unwrap()), "{err}");
    assert_eq!(fs::read(&victim).unwrap(), b"victim");
}

#[test]
fn garbage_in_the_history_is_skipped_and_the_job_completes() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let job = stopped_heat(&store);
    let log = job.dir().join("events.log");
    let mut bytes = fs::read(&log).unwrap();
    bytes.extend_from_slice(b"\xff\xfe\x00binary\x80garbage\n{\"not\": \"a record\"}\n");
    bytes.extend(std::iter::repeat_n(b'x', 200_000));
    bytes.extend_from_slice(b"\n\xc3\x28\n");
    fs::write(&log, bytes).unwrap();

    let (code, out, err) = cmd(&store, &["log", "--json"]);
    assert_eq!(code, 0, "{err}");
    let records: Value = serde_json::from_str(&out).unwrap();
    assert!(!records.as_array().unwrap().is_empty(), "{records}");

    let fin = Run::start(&store, &["--every", "1h"], &heat(&ARGS), &[]).wait(LONG);
    fin.assert_completed(&reference_checksum(&ARGS));
    fin.assert_said("skipped 4 damaged lines");
    let (code, out, err) = cmd(&store, &["log", "--json"]);
    assert_eq!(code, 0, "{err}");
    let records: Value = serde_json::from_str(&out).unwrap();
    let last = records.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["kind"], "end", "{records}");
    assert_eq!(last["completed"], true, "{records}");
}

#[test]
fn a_torn_last_history_line_does_not_swallow_the_next_run_s_first_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let job = stopped_heat(&store);
    let log = job.dir().join("events.log");
    let mut bytes = fs::read(&log).unwrap();
    // A supervisor killed in the middle of writing a record.
    bytes.extend_from_slice(br#"{"unix_ms":1,"pid":1,"kind":"ev"#);
    fs::write(&log, bytes).unwrap();
    let fin = Run::start(&store, &["--every", "1h"], &heat(&ARGS), &[]).wait(LONG);
    fin.assert_completed(&reference_checksum(&ARGS));
    let (code, out, err) = cmd(&store, &["log", "--json"]);
    assert_eq!(code, 0, "{err}");
    let records: Value = serde_json::from_str(&out).unwrap();
    let kinds: Vec<&str> = records
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    // Two runs: each has its start record and its end record.
    assert_eq!(
        kinds.iter().filter(|k| **k == "start").count(),
        2,
        "{records}"
    );
    assert_eq!(kinds.last(), Some(&"end"), "{records}");
}
