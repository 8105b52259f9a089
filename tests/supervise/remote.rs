//! End-to-end tests of the durable tiers (issue 12) against a real S3-compatible server on
//! loopback (moto, started per test on a free port) and real directories: node loss at random
//! moments with resume from an empty cache, two nodes racing for one job, the server going
//! away and coming back, damaged and deleted remote objects, several directories with one
//! full, and sealed (encrypted) objects.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::s3_server::S3Server;
use crate::support::*;
use nix::sys::signal::Signal;

/// The heat run every test here uses: long enough for several snapshots, seconds in all.
const ARGS: [&str; 4] = ["--n", "256", "--steps", "30000"];
/// A heat run that outlasts any test: it is stopped by the test.
const ENDLESS: [&str; 4] = ["--n", "256", "--steps", "3000000"];

/// `supervise --store CACHE --store s3://... <options> -- heat`, with the server's credentials.
fn start(s3: &S3Server, cache: &Path, prefix: &str, options: &[&str], command: &[OsString]) -> Run {
    let url = s3.url(prefix);
    let mut all = vec![
        "--store",
        url.as_str(),
        "--s3-endpoint",
        s3.endpoint.as_str(),
    ];
    all.extend_from_slice(options);
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Run::start(cache, &all, command, &env)
}

/// Every process below `pid`, deepest last.
fn descendants(pid: u32) -> Vec<u32> {
    let mut all = Vec::new();
    let mut next = vec![pid];
    while let Some(p) = next.pop() {
        for child in children_of(p) {
            all.push(child);
            next.push(child);
        }
    }
    all
}

/// The node dies: the supervisor, its lifeline helper and the program, all at once.
fn lose_node(run: &Run) {
    let below = descendants(run.pid());
    sigkill(run.pid());
    for pid in below {
        sigkill(pid);
    }
}

/// Names the test credentials' owner (moto checks no signature, but keeps objects private to
/// the account that wrote them).
const AUTH: &str = "Authorization: AWS4-HMAC-SHA256 Credential=test/20261203/us-east-1/s3/\
                    aws4_request, SignedHeaders=host, Signature=00";

/// A plain HTTP request to the server as the test account: (status, body).
fn http(s3: &S3Server, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let host = s3.endpoint.trim_start_matches("http://");
    let mut stream = TcpStream::connect(host).expect("connect to the S3 server");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n{AUTH}\r\nConnection: \
         close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP response");
    let status = String::from_utf8_lossy(&response[9..12]).parse().unwrap();
    let head = String::from_utf8_lossy(&response[..split]).to_lowercase();
    let mut body = response[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    (status, body)
}

fn dechunk(mut bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = bytes.windows(2).position(|w| w == b"\r\n").unwrap();
        let len =
            usize::from_str_radix(String::from_utf8_lossy(&bytes[..line_end]).trim(), 16).unwrap();
        if len == 0 {
            return out;
        }
        out.extend_from_slice(&bytes[line_end + 2..line_end + 2 + len]);
        bytes = &bytes[line_end + 4 + len..];
    }
}

/// Every key in the bucket under `prefix`.
fn keys(s3: &S3Server, prefix: &str) -> Vec<String> {
    let (status, body) = http(s3, "GET", &format!("/{}?prefix={prefix}", s3.bucket), b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let text = String::from_utf8_lossy(&body);
    text.split("<Key>")
        .skip(1)
        .filter_map(|rest| rest.split_once("</Key>").map(|(k, _)| k.to_owned()))
        .collect()
}

fn object(s3: &S3Server, key: &str) -> Vec<u8> {
    let (status, body) = http(s3, "GET", &format!("/{}/{key}", s3.bucket), b"");
    assert_eq!(status, 200, "{key}");
    body
}

fn put_object(s3: &S3Server, key: &str, bytes: &[u8]) {
    let (status, body) = http(s3, "PUT", &format!("/{}/{key}", s3.bucket), bytes);
    assert_eq!(status, 200, "{key}: {}", String::from_utf8_lossy(&body));
}

fn delete_object(s3: &S3Server, key: &str) {
    let (status, _) = http(s3, "DELETE", &format!("/{}/{key}", s3.bucket), b"");
    assert!(status == 204 || status == 200, "{key}: {status}");
}

/// The manifests on the server under `prefix`, as (generation, seq, key), oldest first.
fn remote_manifests(s3: &S3Server, prefix: &str) -> Vec<(u64, u64, String)> {
    let mut found: Vec<(u64, u64, String)> = keys(s3, prefix)
        .into_iter()
        .filter_map(|key| {
            let name = key.rsplit('/').next()?.strip_suffix(".snap")?.to_owned();
            let (generation, seq) = name.split_once('-')?;
            Some((generation.parse().ok()?, seq.parse().ok()?, key))
        })
        .collect();
    found.sort();
    found
}

fn spawned_from_of(run: &Run) -> Vec<Option<u64>> {
    run.events_of("spawned")
        .iter()
        .map(|e| e["from"].as_u64())
        .collect()
}

#[test]
fn node_loss_at_random_moments_resumes_from_the_newest_snapshot_safe_off_node() {
    let s3 = S3Server::start();
    let reference = reference_checksum(&ARGS);
    let dir = tempfile::tempdir().unwrap();
    let options = ["--every", "150ms", "--lease-ttl", "3s"];
    fastrand::seed(12);
    let mut fetched_rounds = 0;
    for round in 0..10 {
        let cache = dir.path().join(format!("cache-{round}"));
        let run = start(&s3, &cache, "jobs", &options, &heat(&ARGS));
        // The lost node's supervisor is dead but its program could run on (in a cache this
        // node does not see) for a fifth of the ttl: the lease is taken after a quarter.
        if round > 0 {
            let taken = run.wait_for_event("lease-taken", 1, |_| true);
            assert!(taken["generation"].as_u64() > Some(1), "{taken}");
        }
        // At random moments: before the first snapshot, during uploads, between them.
        std::thread::sleep(Duration::from_millis(fastrand::u64(200..1200)));
        let fetched = run.events_of("fetched");
        let safe: Vec<u64> = run
            .events_of("safe-off-node")
            .iter()
            .filter_map(|e| e["seq"].as_u64())
            .collect();
        if let Some(f) = fetched.first() {
            fetched_rounds += 1;
            // It resumed from the snapshot it fetched, not from scratch.
            assert_eq!(
                spawned_from_of(&run).first().copied().flatten(),
                f["seq"].as_u64(),
                "{}",
                run.stderr()
            );
        }
        if run.ended() {
            // A fast machine finished the job within the rounds: from a fetched snapshot,
            // with the checksum of an uninterrupted run.
            let fin = run.wait(LONG);
            fin.assert_completed(&reference);
            assert!(
                round > 0 && !fetched.is_empty() && fetched_rounds >= 3,
                "round {round}, {fetched_rounds} rounds resumed from the server:\n{}",
                fin.stderr
            );
            return;
        }
        lose_node(&run);
        let _ = run.wait(LONG);
        // The node's disk is gone with it.
        std::fs::remove_dir_all(&cache).unwrap();
        // What reached the server is at least what the supervisor called safe.
        if let Some(&newest) = safe.iter().max() {
            let on_server = remote_manifests(&s3, "jobs");
            assert!(
                on_server.iter().any(|(_, seq, _)| *seq >= newest),
                "snapshot {newest} was called safe off-node but is not there: {on_server:?}"
            );
        }
    }
    assert!(
        fetched_rounds >= 3,
        "only {fetched_rounds} rounds resumed from the server"
    );
    let cache = dir.path().join("cache-final");
    let run = start(&s3, &cache, "jobs", &options, &heat(&ARGS));
    let from = {
        let spawned = run.wait_for_event("spawned", 1, |_| true);
        spawned["from"].as_u64()
    };
    let fin = run.wait(LONG);
    fin.assert_completed(&reference);
    assert!(
        from.is_some_and(|seq| seq > 0),
        "the last run did not resume from a fetched snapshot:\n{}",
        fin.stderr
    );
}

#[test]
fn two_nodes_started_together_never_run_two_copies() {
    let s3 = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let (mark, two) = (dir.path().join("mark"), dir.path().join("two"));
    let script = format!(
        "exec 9>>'{}'; flock -n 9 || {{ echo two copies >> '{}'; exit 99; }}; exec \"$0\" \"$@\"",
        mark.display(),
        two.display()
    );
    let mut command: Vec<OsString> = vec!["/bin/sh".into(), "-c".into(), script.into()];
    command.extend(heat(&["--n", "64", "--steps", "2000000"]));
    for round in 0..6 {
        let a = start(
            &s3,
            &dir.path().join(format!("a{round}")),
            "race",
            &["--every", "200ms"],
            &command,
        );
        let b = start(
            &s3,
            &dir.path().join(format!("b{round}")),
            "race",
            &["--every", "200ms"],
            &command,
        );
        // One of them exits 4 at once, naming the holder; the other runs.
        let until = std::time::Instant::now() + LONG;
        while alive(a.pid()) && alive(b.pid()) {
            assert!(std::time::Instant::now() < until);
            std::thread::sleep(Duration::from_millis(20));
        }
        let (loser, winner) = if alive(b.pid()) { (a, b) } else { (b, a) };
        let lost = loser.wait(LONG);
        assert_eq!(
            lost.code,
            Some(4),
            "round {round}: {}\nthe other: {}",
            lost.stderr,
            winner.stderr()
        );
        assert!(alive(winner.pid()), "{}", winner.stderr());
        winner.signal(Signal::SIGTERM);
        let stopped = winner.wait(LONG);
        assert_eq!(stopped.code, Some(143), "{}", stopped.stderr);
    }
    assert!(!two.exists(), "two copies ran at once");
}

#[test]
fn a_stop_flushes_the_final_snapshot_off_node_and_a_fresh_node_resumes_from_it() {
    let s3 = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let args = ENDLESS;
    let run = start(
        &s3,
        &dir.path().join("a"),
        "stop",
        &["--every", "10m"],
        &heat(&args),
    );
    run.wait_for_event("lease-taken", 1, |_| true);
    std::thread::sleep(Duration::from_millis(500));
    run.signal(Signal::SIGTERM);
    let stopped = run.wait(LONG);
    assert_eq!(stopped.code, Some(143), "{}", stopped.stderr);
    // The final snapshot is the one on the server.
    let history = history(&dir.path().join("a"));
    let safe: Vec<u64> = history
        .iter()
        .filter(|r| r["kind"] == "safe-off-node")
        .filter_map(|r| r["data"]["seq"].as_u64())
        .collect();
    let done: Vec<u64> = history
        .iter()
        .filter(|r| r["kind"] == "snapshot")
        .filter_map(|r| r["data"]["seq"].as_u64())
        .collect();
    assert_eq!(safe.last(), done.last(), "{}", stopped.stderr);
    let newest = *done.last().expect("a final snapshot");
    // `ls` says so.
    let ls = json(
        &dir.path().join("a"),
        &["ls", "--job", only_job(&dir.path().join("a")).name()],
    );
    let row = ls
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["snapshot"] == newest)
        .cloned()
        .unwrap();
    assert_eq!(row["durability"], "off-node", "{ls}");
    // A fresh node (empty cache) resumes from it.
    let run = start(
        &s3,
        &dir.path().join("b"),
        "stop",
        &["--every", "10m"],
        &heat(&args),
    );
    let fetched = run.wait_for_event("fetched", 1, |_| true);
    assert_eq!(fetched["seq"], newest);
    let spawned = run.wait_for_event("spawned", 1, |_| true);
    assert_eq!(spawned["from"], newest);
    run.signal(Signal::SIGTERM);
    assert_eq!(run.wait(LONG).code, Some(143));
}

#[test]
fn the_server_going_away_and_coming_back_costs_no_snapshot_and_only_the_newest_is_sent() {
    let s3 = S3Server::start();
    let relay = Relay::start(&s3.endpoint);
    let reference = reference_checksum(&ARGS);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let url = s3.url("away");
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let options = [
        "--store",
        url.as_str(),
        "--s3-endpoint",
        relay.endpoint.as_str(),
        "--every",
        "100ms",
        "--lease-ttl",
        "60s",
    ];
    let run = Run::start(&cache, &options, &heat(&ARGS), &env);
    run.wait_for_event("safe-off-node", 1, |_| true);
    // The server goes away (connections refused and cut): snapshots go on locally.
    relay.cut();
    let before = run.events_of("snapshot").len();
    run.wait_for_event("upload-failed", 1, |_| true);
    run.wait_for_event("snapshot", before + 3, |_| true);
    let failed_at = run.events_of("snapshot").len();
    // It comes back: the backlog drains.
    relay.heal();
    let fin = run.wait(LONG);
    fin.assert_completed(&reference);
    let history = history(&cache);
    let seqs = |kind: &str| -> Vec<u64> {
        history
            .iter()
            .filter(|r| r["kind"] == kind)
            .filter_map(|r| r["data"]["seq"].as_u64())
            .collect()
    };
    let (snapshots, sent) = (seqs("snapshot"), seqs("safe-off-node"));
    assert!(
        sent.len() < snapshots.len(),
        "superseded snapshots were sent: {sent:?} of {snapshots:?}"
    );
    assert!(failed_at >= before + 3);
    // The newest snapshot reached the server after it came back.
    let newest = *snapshots.iter().max().unwrap();
    assert_eq!(sent.iter().max(), Some(&newest), "{}", fin.stderr);
    assert!(
        remote_manifests(&s3, "away")
            .iter()
            .any(|(_, seq, _)| *seq == newest),
        "{}",
        fin.stderr
    );
}

#[test]
fn a_damaged_remote_pack_or_a_deleted_manifest_makes_the_fresh_node_walk_back() {
    let s3 = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let args = ENDLESS;
    let run = start(
        &s3,
        &dir.path().join("a"),
        "dmg",
        &["--every", "150ms", "--keep", "5"],
        &heat(&args),
    );
    run.wait_for_event("safe-off-node", 4, |_| true);
    run.signal(Signal::SIGTERM);
    assert_eq!(run.wait(LONG).code, Some(143));
    let manifests = remote_manifests(&s3, "dmg");
    assert!(manifests.len() >= 3, "{manifests:?}");
    // The newest manifest is deleted; the packs written by the one before are damaged (a
    // pack's name starts with the seq of the snapshot that wrote it).
    let (_, newest, newest_key) = manifests[manifests.len() - 1].clone();
    let (_, second, _) = manifests[manifests.len() - 2].clone();
    delete_object(&s3, &newest_key);
    let prefix = format!("{second:020}-");
    let damaged: Vec<String> = keys(&s3, "dmg")
        .into_iter()
        .filter(|k| k.contains("/packs/") && k.rsplit('/').next().unwrap().starts_with(&prefix))
        .collect();
    assert!(!damaged.is_empty(), "snapshot {second} wrote no pack");
    for key in &damaged {
        let mut bytes = object(&s3, key);
        let at = bytes.len() / 2;
        bytes[at] ^= 0x40;
        put_object(&s3, key, &bytes);
    }
    let run = start(
        &s3,
        &dir.path().join("b"),
        "dmg",
        &["--every", "10m"],
        &heat(&args),
    );
    let fetched = run.wait_for_event("fetched", 1, |_| true);
    let seq = fetched["seq"].as_u64().unwrap();
    assert!(
        seq < second && seq > 0,
        "fetched {seq}; newest {newest}, damaged {second}"
    );
    let trouble = run.wait_for_event("tier-trouble", 1, |e| e["seq"] == second);
    assert!(
        trouble["why"].as_str().unwrap().contains("pack"),
        "{trouble}"
    );
    let spawned = run.wait_for_event("spawned", 1, |_| true);
    assert_eq!(spawned["from"], seq);
    run.signal(Signal::SIGTERM);
    assert_eq!(run.wait(LONG).code, Some(143));
}

#[test]
fn sealed_objects_hide_the_state_detect_tampering_and_refuse_a_wrong_key() {
    let s3 = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    let wrong = dir.path().join("wrong");
    for k in [&key, &wrong] {
        let out = Command::new(supervise_bin())
            .arg("keygen")
            .arg(k)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let args = ENDLESS;
    let sealed = ["--every", "150ms", "--encrypt-key"];
    let with_key = |k: &Path| -> Vec<String> {
        let mut o: Vec<String> = sealed.iter().map(|s| s.to_string()).collect();
        o.push(k.display().to_string());
        o
    };
    let options = with_key(&key);
    let options: Vec<&str> = options.iter().map(String::as_str).collect();
    let run = start(&s3, &dir.path().join("a"), "sealed", &options, &heat(&args));
    run.wait_for_event("safe-off-node", 2, |_| true);
    run.signal(Signal::SIGTERM);
    assert_eq!(run.wait(LONG).code, Some(143));
    // Nothing in the bucket shows the entries' names, the job's values or the file formats:
    // each as it appears in a plain store (a manifest's length-prefixed entry name, a value's
    // JSON key), at least 5 bytes long: ciphertext holds a given 4 bytes by chance often
    // enough to fail a run now and then (a CI run found "grid" in a sealed pack).
    for k in keys(&s3, "sealed") {
        let bytes = object(&s3, &k);
        for plain in [&b"SVPACK"[..], b"SVSNAP", b"\x04grid", b"\"step\""] {
            assert!(
                !bytes.windows(plain.len()).any(|w| w == plain),
                "{k} holds {:?} in the clear",
                String::from_utf8_lossy(plain)
            );
        }
    }
    // A wrong key is a clear error, never a fresh start.
    let options = with_key(&wrong);
    let options: Vec<&str> = options.iter().map(String::as_str).collect();
    let fin = start(&s3, &dir.path().join("b"), "sealed", &options, &heat(&args)).wait(LONG);
    assert_eq!(fin.code, Some(1), "{}", fin.stderr);
    assert!(fin.stderr.contains("another key"), "{}", fin.stderr);
    assert!(
        job_events(&dir.path().join("b"))
            .iter()
            .all(|e| e["kind"] != "spawned"),
        "{}",
        fin.stderr
    );
    // A flipped byte in the newest manifest is detected: the fetch walks back past it.
    let manifests = remote_manifests(&s3, "sealed");
    let (_, newest, newest_key) = manifests.last().cloned().unwrap();
    let mut bytes = object(&s3, &newest_key);
    let at = bytes.len() - 20;
    bytes[at] ^= 1;
    put_object(&s3, &newest_key, &bytes);
    let options = with_key(&key);
    let options: Vec<&str> = options.iter().map(String::as_str).collect();
    let run = start(&s3, &dir.path().join("c"), "sealed", &options, &heat(&args));
    let trouble = run.wait_for_event("tier-trouble", 1, |e| e["seq"] == newest);
    assert!(
        trouble["why"].as_str().unwrap().contains("damaged"),
        "{trouble}"
    );
    let fetched = run.wait_for_event("fetched", 1, |_| true);
    assert!(fetched["seq"].as_u64().unwrap() < newest);
    run.signal(Signal::SIGTERM);
    assert_eq!(run.wait(LONG).code, Some(143));
}

#[test]
fn several_directories_one_full_one_read_only_one_missing_then_back_each_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let reference = reference_checksum(&ARGS);
    let cache = dir.path().join("cache");
    let good = dir.path().join("good");
    std::fs::create_dir(&good).unwrap();
    let small = dir.path().join("small");
    let Some(_tmpfs) = Tmpfs::mount(&small, "64k") else {
        panic!("these tests run as root (they mount a small tmpfs)");
    };
    // One refuses writes (read-only even for root), one is missing (not mounted yet).
    let read_only = dir.path().join("read-only");
    let _ro_tmpfs = Tmpfs::mount(&read_only, "64m").unwrap();
    let remount = |at: &Path, how: &str| {
        let done = Command::new("mount")
            .args(["-o", how])
            .arg(at)
            .status()
            .unwrap();
        assert!(done.success(), "mount -o {how} {}", at.display());
    };
    remount(&read_only, "remount,ro");
    let missing = dir.path().join("missing");
    let tier = |p: &Path| p.to_str().unwrap().to_owned();
    let run = Run::start(
        &cache,
        &[
            "--store",
            &tier(&good),
            "--store",
            &tier(&small),
            "--store",
            &tier(&read_only),
            "--store",
            &tier(&missing),
            "--every",
            "150ms",
        ],
        &heat(&ARGS),
        &[],
    );
    // Each failing one fails and is retried; the good one goes on.
    for bad in [&small, &read_only, &missing] {
        run.wait_for_event("upload-failed", 1, |e| e["tier"] == tier(bad));
    }
    run.wait_for_event("safe-off-node", 2, |e| e["tier"] == tier(&good));
    // More room, writable, there: each catches up.
    remount(&small, "remount,size=64m");
    remount(&read_only, "remount,rw");
    std::fs::create_dir(&missing).unwrap();
    for back in [&small, &read_only, &missing] {
        run.wait_for_event("safe-off-node", 1, |e| e["tier"] == tier(back));
    }
    run.wait(LONG).assert_completed(&reference);
}

/// A TCP relay to the S3 server that can be cut, as a network partition cuts one node off.
struct Relay {
    endpoint: String,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    streams: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
    /// Milliseconds waited before passing on each 16 KiB (0: full speed).
    slow_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Relay {
    fn start(target: &str) -> Relay {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let target = target.trim_start_matches("http://").to_owned();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let streams = std::sync::Arc::new(std::sync::Mutex::new(Vec::<TcpStream>::new()));
        let slow_ms = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (c, s, slow) = (cut.clone(), streams.clone(), slow_ms.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if c.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let mut held = s.lock().unwrap();
                held.push(client.try_clone().unwrap());
                held.push(server.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let slow = slow.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 16 << 10];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            let ms = slow.load(Ordering::SeqCst);
                            if ms > 0 {
                                std::thread::sleep(Duration::from_millis(ms));
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Relay {
            endpoint,
            cut,
            streams,
            slow_ms,
        }
    }

    /// Waits `ms` before passing on each 16 KiB (0: full speed again).
    fn slow(&self, ms: u64) {
        self.slow_ms.store(ms, std::sync::atomic::Ordering::SeqCst);
    }

    /// Lets connections through again.
    fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Cuts every connection, and refuses new ones.
    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for stream in self.streams.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[test]
fn a_node_cut_off_from_the_store_stops_its_program_before_another_takes_over() {
    let s3 = S3Server::start();
    let relay = Relay::start(&s3.endpoint);
    let dir = tempfile::tempdir().unwrap();
    let (mark, two) = (dir.path().join("mark"), dir.path().join("two"));
    let args = ["--n", "256", "--steps", "60000"];
    let reference = reference_checksum(&args);
    let script = format!(
        "exec 9>>'{}'; flock -n 9 || {{ echo two copies >> '{}'; exit 99; }}; exec \"$0\" \"$@\"",
        mark.display(),
        two.display()
    );
    let mut command: Vec<OsString> = vec!["/bin/sh".into(), "-c".into(), script.into()];
    command.extend(heat(&args));
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let url = s3.url("cut");
    let node = |cache: &str, endpoint: &str, extra: &[&str]| {
        let mut options = vec![
            "--store",
            url.as_str(),
            "--s3-endpoint",
            endpoint,
            "--every",
            "150ms",
            "--lease-ttl",
            "4s",
        ];
        options.extend_from_slice(extra);
        Run::start(&dir.path().join(cache), &options, &command, &env)
    };
    let a = node("a", &relay.endpoint, &[]);
    a.wait_for_event("safe-off-node", 2, |_| true);
    relay.cut();
    let b = node("b", &s3.endpoint, &["--wait"]);
    let lost = a.wait(LONG);
    assert_eq!(lost.code, Some(7), "{}", lost.stderr);
    let fin = b.wait(LONG);
    fin.assert_completed(&reference);
    let b_events = job_events(&dir.path().join("b"));
    let fetched = b_events
        .iter()
        .find(|e| e["kind"] == "fetched")
        .expect("b fetched");
    assert!(fetched["seq"].as_u64().unwrap() > 0);
    let taken = b_events
        .iter()
        .find(|e| e["kind"] == "lease-taken")
        .unwrap();
    assert!(taken["generation"].as_u64().unwrap() >= 2, "{taken}");
    assert!(
        !two.exists(),
        "two copies ran at once: A {}\nB {}",
        lost.stderr,
        fin.stderr
    );
}

#[test]
fn durable_tiers_refuse_orphan_continue_and_a_replica_that_is_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let replica = dir.path().join("replica");
    let replica = replica.to_str().unwrap();
    // A program left running without its supervisor cannot keep the lease.
    let run = Run::start(
        &cache,
        &["--store", replica, "--orphan", "continue"],
        &heat(&ARGS),
        &[],
    );
    let out = run.wait(LONG);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("--orphan continue"), "{}", out.stderr);
    // A replica that is the cache, inside it, or holding it would write into the local store.
    let inside = cache.join("sub");
    for tier in [cache.as_path(), inside.as_path(), dir.path()] {
        let tier = tier.to_str().unwrap();
        let run = Run::start(&cache, &["--store", tier], &heat(&ARGS), &[]);
        let out = run.wait(LONG);
        assert_eq!(out.code, Some(1), "{tier}: {}", out.stderr);
        assert!(out.stderr.contains(tier), "{}", out.stderr);
    }
    assert!(!replica_has_objects(Path::new(replica)));
    assert!(
        !cache.exists() || std::fs::read_dir(&cache).unwrap().next().is_none(),
        "nothing is written when the options are refused"
    );
}

fn replica_has_objects(dir: &Path) -> bool {
    dir.exists() && std::fs::read_dir(dir).unwrap().next().is_some()
}

#[test]
fn a_holder_whose_lease_was_taken_over_stops_its_program_at_once() {
    let s3 = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let args = ENDLESS;
    let run = start(
        &s3,
        &dir.path().join("a"),
        "over",
        &["--every", "150ms", "--lease-ttl", "60s"],
        &heat(&args),
    );
    run.wait_for_event("safe-off-node", 1, |_| true);
    // Another holder's record replaces ours (what a takeover after a partition looks like).
    let key = keys(&s3, "over")
        .into_iter()
        .find(|k| k.ends_with("/lease"))
        .expect("a lease object");
    let mut record: serde_json::Value = serde_json::from_slice(&object(&s3, &key)).unwrap();
    record["generation"] = (record["generation"].as_u64().unwrap() + 1).into();
    record["holder"]["host"] = "another-node".into();
    record["holder"]["pid"] = 4242.into();
    put_object(&s3, &key, &serde_json::to_vec(&record).unwrap());
    let started = std::time::Instant::now();
    let fin = run.wait(LONG);
    // Found at the next renewal (every tenth of a minute), not when the ttl runs out.
    assert_eq!(fin.code, Some(7), "{}", fin.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    let events = job_events(&dir.path().join("a"));
    let lost = events
        .iter()
        .find(|e| e["kind"] == "lease-lost")
        .expect("a lease-lost event");
    assert!(lost.to_string().contains("another-node"), "{lost}");
    let end = events.iter().rev().find(|e| e["kind"] == "end").unwrap();
    assert_eq!(end["exit_code"], 7, "{end}");
    // The record is the taker's still: a holder that lost the lease does not release it.
    let now: serde_json::Value = serde_json::from_slice(&object(&s3, &key)).unwrap();
    assert_eq!(now, record);
}

#[test]
fn on_success_delete_removes_the_snapshots_from_the_durable_tiers_too() {
    let s3 = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let reference = reference_checksum(&ARGS);
    let run = start(
        &s3,
        &dir.path().join("a"),
        "done",
        &["--every", "150ms", "--on-success", "delete"],
        &heat(&ARGS),
    );
    run.wait_for_event("safe-off-node", 1, |_| true);
    run.wait(LONG).assert_completed(&reference);
    let left = keys(&s3, "done");
    assert!(
        left.iter().all(|k| k.ends_with("/lease")),
        "left on the server: {left:?}"
    );
    let end = job_events(&dir.path().join("a"))
        .into_iter()
        .rev()
        .find(|e| e["kind"] == "end")
        .unwrap();
    assert_eq!(end["exit_code"], 0, "{end}");
}

#[test]
fn a_store_that_refuses_writes_costs_no_snapshot_and_catches_up_when_it_takes_them_again() {
    let s3 = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("a");
    let run = start(
        &s3,
        &cache,
        "refuse",
        &["--every", "150ms", "--lease-ttl", "60s"],
        &heat(&ENDLESS),
    );
    run.wait_for_event("safe-off-node", 1, |_| true);
    // The bucket's policy now refuses (403) every write and removal of snapshots and packs;
    // the lease stays writable, as an operator's retention lock on the data would leave it.
    let denied: Vec<String> = ["snapshots", "packs"]
        .iter()
        .map(|d| format!("arn:aws:s3:::{}/refuse/*/{d}/*", s3.bucket))
        .collect();
    let policy = serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Deny",
            "Principal": "*",
            "Action": ["s3:PutObject", "s3:DeleteObject"],
            "Resource": denied,
        }],
    });
    let path = format!("/{}?policy", s3.bucket);
    let (status, body) = http(&s3, "PUT", &path, policy.to_string().as_bytes());
    assert!(
        status / 100 == 2,
        "{status}: {}",
        String::from_utf8_lossy(&body)
    );
    let published = remote_manifests(&s3, "refuse").len();
    let before = run.events_of("snapshot").len();
    run.wait_for_event("upload-failed", 1, |_| true);
    // Snapshots go on locally; nothing new reaches the server.
    run.wait_for_event("snapshot", before + 4, |_| true);
    assert!(!run.ended(), "{}", run.stderr());
    assert!(remote_manifests(&s3, "refuse").len() <= published);
    let refused_up_to = run
        .events_of("snapshot")
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .max()
        .unwrap();
    // Writes allowed again: the newest snapshot goes, and the job stops with it off-node.
    let (status, _) = http(&s3, "DELETE", &path, b"");
    assert!(status / 100 == 2, "{status}");
    run.wait_for_event("safe-off-node", 1, |e| {
        e["seq"].as_u64().is_some_and(|s| s > refused_up_to)
    });
    run.signal(Signal::SIGTERM);
    assert_eq!(run.wait(LONG).code, Some(143));
    let newest_local = *only_job(&cache).snapshot_seqs().unwrap().last().unwrap();
    let on_server = remote_manifests(&s3, "refuse");
    assert!(
        on_server.iter().any(|(_, seq, _)| *seq == newest_local),
        "{newest_local} not in {on_server:?}"
    );
}

#[test]
fn a_replica_unmounted_mid_run_gets_nothing_and_catches_up_when_mounted_again() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    // The lease lives on the first directory in sorted order: not the one unmounted.
    let steady = dir.path().join("a-steady");
    std::fs::create_dir(&steady).unwrap();
    let replica = dir.path().join("replica");
    let Some(mounted) = Tmpfs::mount(&replica, "64m") else {
        panic!("these tests run as root (they mount a tmpfs)");
    };
    let tier = |p: &Path| p.to_str().unwrap().to_owned();
    let options = [
        "--store",
        &tier(&steady),
        "--store",
        &tier(&replica),
        "--every",
        "150ms",
    ];
    let run = Run::start(&cache, &options, &heat(&ENDLESS), &[]);
    run.wait_for_event("safe-off-node", 2, |e| e["tier"] == tier(&replica));
    // Unmounted under the job: it fails, and the bare mount point gets nothing.
    drop(mounted);
    let failed = run.events_of("upload-failed").len();
    run.wait_for_event("upload-failed", failed + 1, |e| e["tier"] == tier(&replica));
    assert!(
        !replica_has_objects(&replica),
        "written into the mount point"
    );
    // Mounted again, empty: it catches up with a newer snapshot, sent whole.
    let newest = |run: &Run| {
        run.events_of("snapshot")
            .iter()
            .filter_map(|e| e["seq"].as_u64())
            .max()
            .unwrap()
    };
    let before = newest(&run);
    let _again = Tmpfs::mount(&replica, "64m").unwrap();
    run.wait_for_event("safe-off-node", 1, |e| {
        e["tier"] == tier(&replica) && e["seq"].as_u64().is_some_and(|s| s > before)
    });
    run.signal(Signal::SIGTERM);
    assert_eq!(run.wait(LONG).code, Some(143));
    // A fresh node with only that replica resumes from it: its snapshot is whole.
    let fresh = dir.path().join("fresh");
    let run = Run::start(
        &fresh,
        &["--store", &tier(&replica), "--every", "1h"],
        &heat(&ENDLESS),
        &[],
    );
    let fetched = run.wait_for_event("fetched", 1, |_| true);
    assert!(fetched["seq"].as_u64().unwrap() > before, "{fetched}");
    let spawned = run.wait_for_event("spawned", 1, |_| true);
    assert_eq!(spawned["from"], fetched["seq"]);
    run.signal(Signal::SIGTERM);
    assert_eq!(run.wait(LONG).code, Some(143));
}

#[test]
fn a_slow_store_lags_without_holding_up_the_program_or_the_other_replica() {
    let s3 = S3Server::start();
    let relay = Relay::start(&s3.endpoint);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let replica = dir.path().join("replica");
    std::fs::create_dir(&replica).unwrap();
    let url = s3.url("slow");
    let replica_name = replica.to_str().unwrap().to_owned();
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let options = [
        "--store",
        url.as_str(),
        "--s3-endpoint",
        relay.endpoint.as_str(),
        "--store",
        replica_name.as_str(),
        "--every",
        "150ms",
        "--lease-ttl",
        "60s",
    ];
    let run = Run::start(&cache, &options, &heat(&ENDLESS), &env);
    run.wait_for_event("safe-off-node", 1, |e| e["tier"] == url.as_str());
    // The object store slows to about 300 KiB/s, less than the snapshots' rate.
    relay.slow(50);
    let safe_on = |tier: &str| -> Vec<u64> {
        run.events_of("safe-off-node")
            .iter()
            .filter(|e| e["tier"] == tier)
            .filter_map(|e| e["seq"].as_u64())
            .collect()
    };
    let s3_before = safe_on(&url).len();
    let snapshots_before = run.events_of("snapshot").len();
    // The program goes on snapshotting, and the replica keeps up with it.
    let eighth = run.wait_for_event("snapshot", snapshots_before + 8, |_| true);
    let eighth = eighth["seq"].as_u64().unwrap();
    run.wait_for_event("safe-off-node", 1, |e| {
        e["tier"] == replica_name.as_str() && e["seq"].as_u64().is_some_and(|s| s >= eighth)
    });
    let s3_during = safe_on(&url).len() - s3_before;
    assert!(
        s3_during < 8,
        "the slow store kept up ({s3_during} sent): the test did not slow it"
    );
    // Full speed again: it catches up with the newest snapshot, superseded ones skipped.
    relay.slow(0);
    let newest = run
        .events_of("snapshot")
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .max()
        .unwrap();
    run.wait_for_event("safe-off-node", 1, |e| {
        e["tier"] == url.as_str() && e["seq"].as_u64().is_some_and(|s| s >= newest)
    });
    run.signal(Signal::SIGTERM);
    assert_eq!(run.wait(LONG).code, Some(143));
}
