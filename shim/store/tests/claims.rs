//! Ranks writing parts of one epoch side by side store a chunk they hold in common once
//! (`supervise_store::claims`): each rank's part writer runs on its own thread, and a
//! coordinator built on the supervisor's `ClaimTable` answers them, as the supervisor does
//! over the ranks' sockets.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use supervise_store::claims::{ChunkAt, ChunkClaims, ClaimTable};
use supervise_store::epoch::part_seq;
use supervise_store::format::Hash;
use supervise_store::{Error, Result, SnapshotReader, SnapshotWriter, Store};

/// The supervisor's side, in memory: one table, and what each rank was told lies where.
#[derive(Default)]
struct Coordinator {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    table: ClaimTable,
    told: HashMap<u32, Vec<ChunkAt>>,
    /// The epoch failed: every wait ends.
    failed: bool,
}

fn rank_of(seq: u64) -> u32 {
    supervise_store::epoch::part_of(seq).expect("a part").1
}

impl ChunkClaims for Coordinator {
    fn claim(&self, seq: u64, hashes: &[Hash]) -> Result<Vec<usize>> {
        let mut st = self.state.lock().unwrap();
        let (theirs, known) = st.table.claim(rank_of(seq), hashes);
        st.told.entry(rank_of(seq)).or_default().extend(known);
        Ok(theirs.into_iter().map(|i| i as usize).collect())
    }

    fn stored(&self, seq: u64, chunks: &[ChunkAt]) -> Result<()> {
        let mut st = self.state.lock().unwrap();
        for (rank, at) in st.table.stored(rank_of(seq), chunks.to_vec()).unwrap() {
            st.told.entry(rank).or_default().extend(at);
        }
        self.changed.notify_all();
        Ok(())
    }

    fn locate(&self, seq: u64, hashes: &[Hash]) -> Result<Vec<ChunkAt>> {
        let mut st = self.state.lock().unwrap();
        loop {
            let told = st.told.get(&rank_of(seq)).cloned().unwrap_or_default();
            let all = hashes
                .iter()
                .all(|h| told.iter().any(|at| at.hash() == Some(*h)));
            if all {
                return Ok(told);
            }
            if st.failed {
                return Err(Error::SharedChunks {
                    seq,
                    why: "the epoch failed".into(),
                });
            }
            st = self
                .changed
                .wait_timeout(st, Duration::from_secs(30))
                .unwrap()
                .0;
        }
    }
}

/// Bytes that do not compress: a chunk stored twice costs twice.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn pack_bytes(root: &Path) -> u64 {
    std::fs::read_dir(root.join("j/packs"))
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

/// The table: 320 chunks (more than one claim's batch), its second half a copy of its first
/// (each chunk twice in one part).
const SHARED: usize = 20 << 20;
const OWN: usize = 1 << 20;

/// Rank `rank`'s part of `epoch`: the shared table, then its own rows.
fn write_part(
    root: &Path,
    claims: Arc<dyn ChunkClaims>,
    epoch: u64,
    rank: u32,
    shared: &[u8],
) -> Result<u64> {
    let job = Store::open(root)?.job("j")?;
    let mut writer = SnapshotWriter::open_part(job, 0, None)?;
    writer.set_claims(claims);
    let seq = part_seq(epoch, rank);
    writer.prepare_part(seq)?;
    let mut b = writer.begin(Some("step 10"));
    b.slice("table", shared)?;
    b.slice("rows", &noise(100 + u64::from(rank), OWN))?;
    b.value("rank", &rank)?;
    b.commit()?;
    Ok(seq)
}

#[test]
fn a_chunk_every_rank_holds_for_the_first_time_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let half = noise(7, SHARED / 2);
    let shared = [half.as_slice(), half.as_slice()].concat();
    let coordinator = Arc::new(Coordinator::default());
    let ranks = 4u32;
    let seqs: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..ranks)
            .map(|rank| {
                let claims: Arc<dyn ChunkClaims> = coordinator.clone();
                let (root, shared) = (&root, &shared);
                s.spawn(move || write_part(root, claims, 1, rank, shared))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    });
    // One copy of the table's distinct chunks and each rank's own rows: not one table per
    // rank, nor each repeated chunk twice.
    let packed = pack_bytes(&root);
    let one_copy = (SHARED / 2 + ranks as usize * OWN) as u64;
    assert!(
        packed >= one_copy && packed < one_copy + (1 << 20),
        "packs hold {packed} bytes; one copy of everything is {one_copy}"
    );
    let job = Store::open(&root).unwrap().job("j").unwrap();
    let mut new_bytes = 0;
    for (rank, seq) in seqs.iter().enumerate() {
        let reader = SnapshotReader::open(&job, *seq).unwrap();
        reader.verify().unwrap();
        let mut table = vec![0u8; SHARED];
        assert!(reader.slice_into("table", "u8", &mut table).unwrap());
        assert!(table == shared, "rank {rank}'s table reads back");
        let mut rows = vec![0u8; OWN];
        assert!(reader.slice_into("rows", "u8", &mut rows).unwrap());
        assert!(rows == noise(100 + rank as u64, OWN));
        new_bytes += reader.manifest().stats.bytes_new;
    }
    // The ranks' new bytes add up to what the epoch stored.
    assert_eq!(
        new_bytes,
        one_copy + 4,
        "the four rank values (a digit each) are new too"
    );
}

#[test]
fn a_part_waiting_for_a_rank_that_fails_fails_and_leaves_no_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let shared = noise(9, SHARED);
    let coordinator = Arc::new(Coordinator::default());
    // Rank 0 claims the table first and then dies before its packs are durable.
    let hashes: Vec<Hash> = shared
        .chunks(supervise_store::format::CHUNK_SIZE)
        .map(|c| *blake3::hash(c).as_bytes())
        .collect();
    assert!(
        coordinator
            .claim(part_seq(1, 0), &hashes)
            .unwrap()
            .is_empty()
    );
    let waiter = {
        let claims: Arc<dyn ChunkClaims> = coordinator.clone();
        let (root, shared) = (root.clone(), shared.clone());
        std::thread::spawn(move || write_part(&root, claims, 1, 1, &shared))
    };
    std::thread::sleep(Duration::from_millis(200));
    assert!(!waiter.is_finished(), "rank 1 waits for rank 0's chunks");
    coordinator.state.lock().unwrap().failed = true;
    coordinator.changed.notify_all();
    let err = waiter.join().unwrap().unwrap_err();
    assert!(matches!(err, Error::SharedChunks { .. }), "{err}");
    let job = Store::open(&root).unwrap().job("j").unwrap();
    assert!(
        job.snapshot_seqs().unwrap().is_empty(),
        "no part is visible"
    );
}
