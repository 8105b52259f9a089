//! Chunks the ranks of one epoch hold in common are stored once.
//!
//! Ranks index every committed manifest before each part, so a chunk stored in an earlier
//! epoch is referenced, not written again. What that leaves is a chunk several ranks hold for
//! the first time in the same epoch (replicated tables, a grid initialised the same on every
//! rank): each would write its own copy. Claims settle it, through the supervisor:
//!
//! 1. Before compressing, a rank's writer claims the chunks that are new to it
//!    ([`ChunkClaims::claim`]). The first rank to claim a hash in the epoch stores it; the
//!    others are told which rank does ([`ClaimTable::claim`]).
//! 2. Once its packs are durable (renamed into place, directory synced) and before its
//!    manifest, a rank reports where the chunks it stored lie ([`ChunkClaims::stored`]).
//! 3. Then it waits for where the chunks others store lie ([`ChunkClaims::locate`]), and its
//!    manifest references them in the other ranks' packs.
//!
//! No rank waits before it reported its own chunks, so no two ranks wait on each other. A
//! rank that fails or dies before reporting fails the epoch, which ends every wait (the
//! epoch's parts are removed before the next one; a part never references a pack that is not
//! durable). The answers travel as [`crate::control`] lines: hashes as hex, locations as
//! [`ChunkAt`], at most [`MAX_BATCH`] to a line.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::format::Hash;

/// The most hashes or locations in one control line (hashes: about 16 KiB; locations: about
/// 48 KiB).
pub const MAX_BATCH: usize = 256;

/// Where a stored chunk lies: its pack, the record's offset and lengths.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkAt {
    /// blake3 of the chunk's bytes, 64 lower-case hex digits.
    pub hash: String,
    /// The pack's name.
    pub pack: String,
    /// The record's offset in the pack.
    pub offset: u64,
    /// The record's stored (compressed) length.
    pub stored_len: u32,
    /// The chunk's length.
    pub raw_len: u32,
}

impl ChunkAt {
    /// The chunk's hash; `None` if [`ChunkAt::hash`] is not 64 hex digits.
    pub fn hash(&self) -> Option<Hash> {
        match hashes_from_hex(&self.hash)?.as_slice() {
            [hash] => Some(*hash),
            _ => None,
        }
    }
}

/// The writer's side of claims: how a rank's part learns which rank stores a chunk the
/// epoch's ranks hold in common (see the module's documentation). `seq` is the part's
/// snapshot number, which names its epoch and rank.
pub trait ChunkClaims: Send + Sync {
    /// Claims `hashes` (new to this part, each once); returns the indices of those another
    /// rank stores. The rest this part stores.
    fn claim(&self, seq: u64, hashes: &[Hash]) -> Result<Vec<usize>>;
    /// This part's packs are durable: `chunks` are where the chunks it stored lie.
    fn stored(&self, seq: u64, chunks: &[ChunkAt]) -> Result<()>;
    /// Waits until the ranks that store `hashes` reported where they lie; returns one
    /// location for each hash, in any order.
    fn locate(&self, seq: u64, hashes: &[Hash]) -> Result<Vec<ChunkAt>>;
}

/// Hex of a hash.
pub fn hash_hex(hash: &Hash) -> String {
    hashes_hex(std::slice::from_ref(hash))
}

/// Hashes one after another, as hex.
pub fn hashes_hex(hashes: &[Hash]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(hashes.len() * 64);
    for b in hashes.iter().flatten() {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Reads hashes written by [`hashes_hex`]; `None` if `hex` is not whole hashes of hex digits.
pub fn hashes_from_hex(hex: &str) -> Option<Vec<Hash>> {
    let bytes = hex.as_bytes();
    if !bytes.len().is_multiple_of(64) {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    bytes
        .chunks_exact(64)
        .map(|h| {
            let mut hash = [0u8; 32];
            for (i, pair) in h.chunks_exact(2).enumerate() {
                hash[i] = digit(pair[0])? << 4 | digit(pair[1])?;
            }
            Some(hash)
        })
        .collect()
}

/// The supervisor's side of claims for one epoch: who stores each chunk, where the stored
/// ones lie, and which ranks wait for which.
#[derive(Default)]
pub struct ClaimTable {
    owner: HashMap<Hash, u32>,
    at: HashMap<Hash, ChunkAt>,
    waiting: HashMap<Hash, Vec<u32>>,
}

impl ClaimTable {
    /// Rank `rank` claims `hashes`: returns the indices of those another rank claimed first,
    /// and the locations already known of those (to send the rank at once).
    pub fn claim(&mut self, rank: u32, hashes: &[Hash]) -> (Vec<u32>, Vec<ChunkAt>) {
        let mut theirs = Vec::new();
        let mut known = Vec::new();
        for (i, hash) in hashes.iter().enumerate() {
            let owner = *self.owner.entry(*hash).or_insert(rank);
            if owner == rank {
                continue;
            }
            theirs.push(i as u32);
            match self.at.get(hash) {
                Some(at) => known.push(at.clone()),
                None => self.waiting.entry(*hash).or_default().push(rank),
            }
        }
        (theirs, known)
    }

    /// Rank `rank` stored `chunks`: returns, for each rank waiting for some of them, their
    /// locations. A location of a chunk the rank did not win is ignored; one whose hash is not
    /// a hash is an error (the rank's part cannot be trusted to say where its chunks lie).
    pub fn stored(
        &mut self,
        rank: u32,
        chunks: Vec<ChunkAt>,
    ) -> std::result::Result<HashMap<u32, Vec<ChunkAt>>, String> {
        let mut to: HashMap<u32, Vec<ChunkAt>> = HashMap::new();
        for at in chunks {
            let Some(hash) = at.hash() else {
                return Err(format!("rank {rank} reported a chunk with a bad hash"));
            };
            if self.owner.get(&hash) != Some(&rank) {
                continue;
            }
            for waiter in self.waiting.remove(&hash).unwrap_or_default() {
                to.entry(waiter).or_default().push(at.clone());
            }
            self.at.insert(hash, at);
        }
        Ok(to)
    }

    /// How many chunks were claimed.
    pub fn len(&self) -> usize {
        self.owner.len()
    }

    /// Whether nothing was claimed.
    pub fn is_empty(&self) -> bool {
        self.owner.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(hash: &Hash, pack: &str) -> ChunkAt {
        ChunkAt {
            hash: hash_hex(hash),
            pack: pack.into(),
            offset: 7,
            stored_len: 3,
            raw_len: 9,
        }
    }

    #[test]
    fn hashes_round_trip_through_hex_and_bad_hex_is_refused() {
        let hashes = [[1u8; 32], [0xab; 32]];
        let hex = hashes_hex(&hashes);
        assert_eq!(hex.len(), 128);
        assert_eq!(hashes_from_hex(&hex).unwrap(), hashes);
        assert_eq!(hashes_from_hex("").unwrap(), Vec::<Hash>::new());
        assert!(hashes_from_hex(&hex[1..]).is_none());
        assert!(hashes_from_hex(&hex.to_uppercase()).is_none());
        assert!(hashes_from_hex(&"zz".repeat(32)).is_none());
    }

    #[test]
    fn the_first_claim_wins_and_waiters_learn_the_location_once_stored() {
        let (a, b, c) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let mut table = ClaimTable::default();
        assert_eq!(table.claim(0, &[a, b]), (vec![], vec![]));
        // Rank 1 holds a and c: a is rank 0's, c its own.
        assert_eq!(table.claim(1, &[c, a]), (vec![1], vec![]));
        // Rank 2 holds a too.
        assert_eq!(table.claim(2, &[a]), (vec![0], vec![]));
        // A location reported by a rank that did not win the chunk is ignored.
        assert!(table.stored(1, vec![at(&a, "wrong")]).unwrap().is_empty());
        let mut bad = at(&a, "p0");
        bad.hash.pop();
        assert!(table.stored(0, vec![bad]).is_err());
        let to = table.stored(0, vec![at(&a, "p0"), at(&b, "p0")]).unwrap();
        assert_eq!(to.len(), 2);
        assert_eq!(to[&1], vec![at(&a, "p0")]);
        assert_eq!(to[&2], vec![at(&a, "p0")]);
        // A claim after the owner reported gets the location with the answer.
        assert_eq!(table.claim(3, &[b, c]), (vec![0, 1], vec![at(&b, "p0")]));
        let to = table.stored(1, vec![at(&c, "p1")]).unwrap();
        assert_eq!(to[&3], vec![at(&c, "p1")]);
        assert_eq!(table.len(), 3);
    }
}
