//! A rank's side of claims on the chunks the epoch's ranks hold in common (see
//! [`supervise_store::claims`]): the background writer asks through the rank's connection and
//! waits; the control thread files the supervisor's answers here and wakes it.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use supervise_store::claims::{ChunkAt, ChunkClaims, MAX_BATCH, hashes_hex};
use supervise_store::control::{Event, Request};
use supervise_store::epoch::part_of;
use supervise_store::error::{Error, Result};
use supervise_store::format::Hash;

use crate::channel::Shared;

/// What the supervisor answered, kept until the writer takes it.
#[derive(Default)]
pub(crate) struct ClaimBox {
    inner: Mutex<Answers>,
    changed: Condvar,
}

#[derive(Default)]
struct Answers {
    next_id: u64,
    /// Claim number: the indices of its hashes another rank stores.
    answers: HashMap<u64, Vec<u32>>,
    /// The epoch `located` is of.
    epoch: u64,
    /// Where chunks other ranks store lie.
    located: HashMap<Hash, ChunkAt>,
    /// The newest epoch that ended: its waits end.
    ended: u64,
    /// The supervisor is gone.
    gone: bool,
}

impl Answers {
    /// Why no answer for `epoch` will come, if none will.
    fn over(&self, epoch: u64) -> Option<String> {
        if self.gone {
            Some("the supervisor is gone".to_owned())
        } else if self.ended >= epoch {
            Some(format!(
                "epoch {epoch} ended before the other ranks' chunks were durable"
            ))
        } else {
            None
        }
    }
}

impl ClaimBox {
    fn lock(&self) -> MutexGuard<'_, Answers> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The control thread: files a [`Request::ClaimAnswer`] or [`Request::ChunksAt`].
    pub(crate) fn file(&self, request: Request) {
        let mut a = self.lock();
        match request {
            Request::ClaimAnswer { id, theirs, .. } => {
                a.answers.insert(id, theirs);
            }
            Request::ChunksAt { epoch, chunks } => {
                if epoch < a.epoch {
                    return;
                }
                if epoch > a.epoch {
                    a.epoch = epoch;
                    a.located.clear();
                }
                for at in chunks {
                    if let Some(hash) = at.hash() {
                        a.located.insert(hash, at);
                    }
                }
            }
            _ => return,
        }
        self.changed.notify_all();
    }

    /// The control thread: `epoch` ended (no answer for it will come; what it answered is
    /// of no more use).
    pub(crate) fn ended(&self, epoch: u64) {
        let mut a = self.lock();
        a.ended = a.ended.max(epoch);
        a.answers.clear();
        if a.epoch <= epoch {
            a.located.clear();
        }
        self.changed.notify_all();
    }

    /// The control thread: the supervisor is gone.
    pub(crate) fn gone(&self) {
        self.lock().gone = true;
        self.changed.notify_all();
    }

    /// Waits until `ready` gives an answer; an error once `epoch` ended or the supervisor is
    /// gone.
    fn wait<T>(
        &self,
        seq: u64,
        epoch: u64,
        mut ready: impl FnMut(&mut Answers) -> Option<T>,
    ) -> Result<T> {
        let mut a = self.lock();
        loop {
            if let Some(answer) = ready(&mut a) {
                return Ok(answer);
            }
            match a.over(epoch) {
                Some(why) => return Err(Error::SharedChunks { seq, why }),
                None => a = self.changed.wait(a).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }
}

/// The background writer's [`ChunkClaims`], through the rank's connection.
pub(crate) struct RankClaims {
    pub(crate) shared: Arc<Shared>,
}

impl RankClaims {
    fn parts(&self, seq: u64) -> Result<(u64, &ClaimBox)> {
        let bad = |why: &str| Error::SharedChunks {
            seq,
            why: why.to_owned(),
        };
        let (epoch, _) = part_of(seq).ok_or_else(|| bad("not a part of an epoch"))?;
        let rank = self.shared.rank.as_ref().ok_or_else(|| bad("not a rank"))?;
        Ok((epoch, &rank.claims))
    }
}

impl ChunkClaims for RankClaims {
    fn claim(&self, seq: u64, hashes: &[Hash]) -> Result<Vec<usize>> {
        let (epoch, claims) = self.parts(seq)?;
        // An epoch that ended already: its part is of no use, and nobody would answer.
        if let Some(why) = claims.lock().over(epoch) {
            return Err(Error::SharedChunks { seq, why });
        }
        let id = {
            let mut a = claims.lock();
            a.next_id += 1;
            a.next_id
        };
        self.shared.send(&Event::ChunkClaims {
            epoch,
            id,
            hashes: hashes_hex(hashes),
        });
        let theirs = claims.wait(seq, epoch, |a| a.answers.remove(&id))?;
        Ok(theirs.into_iter().map(|i| i as usize).collect())
    }

    fn stored(&self, seq: u64, chunks: &[ChunkAt]) -> Result<()> {
        let (epoch, _) = self.parts(seq)?;
        for batch in chunks.chunks(MAX_BATCH) {
            self.shared.send(&Event::ChunksStored {
                epoch,
                chunks: batch.to_vec(),
            });
        }
        Ok(())
    }

    fn locate(&self, seq: u64, hashes: &[Hash]) -> Result<Vec<ChunkAt>> {
        let (epoch, claims) = self.parts(seq)?;
        claims.wait(seq, epoch, |a| {
            if a.epoch != epoch || !hashes.iter().all(|h| a.located.contains_key(h)) {
                return None;
            }
            Some(hashes.iter().filter_map(|h| a.located.remove(h)).collect())
        })
    }
}

/// Whether the rank's job has other ranks to share chunks with.
pub(crate) fn shared_with_others(shared: &Shared) -> bool {
    shared.rank.as_ref().is_some_and(|r| r.size > 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::RankState;
    use std::sync::atomic::{AtomicU32, AtomicU64};
    use supervise_store::claims::hash_hex;
    use supervise_store::epoch::part_seq;

    fn rank_claims() -> RankClaims {
        RankClaims {
            shared: Arc::new(Shared {
                pending: AtomicU32::new(0),
                beats: AtomicU64::new(0),
                available: AtomicU64::new(0),
                control: None,
                rank: Some(RankState::new(1, 4, 0, false)),
            }),
        }
    }

    fn box_of(c: &RankClaims) -> &ClaimBox {
        &c.shared.rank.as_ref().unwrap().claims
    }

    fn at(hash: &Hash) -> ChunkAt {
        ChunkAt {
            hash: hash_hex(hash),
            pack: "p".into(),
            offset: 1,
            stored_len: 2,
            raw_len: 3,
        }
    }

    #[test]
    fn a_claim_waits_for_its_answer_and_a_locate_for_every_location() {
        let claims = rank_claims();
        let seq = part_seq(5, 1);
        std::thread::scope(|s| {
            let asked = s.spawn(|| claims.claim(seq, &[[1; 32], [2; 32]]));
            while !asked.is_finished() {
                box_of(&claims).file(Request::ClaimAnswer {
                    epoch: 5,
                    id: 1,
                    theirs: vec![1],
                });
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            assert_eq!(asked.join().unwrap().unwrap(), vec![1]);
            let located = s.spawn(|| claims.locate(seq, &[[2; 32], [3; 32]]));
            box_of(&claims).file(Request::ChunksAt {
                epoch: 5,
                chunks: vec![at(&[2; 32])],
            });
            // Locations of an older epoch are not this one's.
            box_of(&claims).file(Request::ChunksAt {
                epoch: 4,
                chunks: vec![at(&[3; 32])],
            });
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!located.is_finished(), "one location is missing");
            box_of(&claims).file(Request::ChunksAt {
                epoch: 5,
                chunks: vec![at(&[3; 32])],
            });
            let mut got = located.join().unwrap().unwrap();
            got.sort_by(|a, b| a.hash.cmp(&b.hash));
            assert_eq!(got, vec![at(&[2; 32]), at(&[3; 32])]);
        });
    }

    #[test]
    fn the_epoch_ending_or_the_supervisor_going_ends_a_wait_with_an_error() {
        let claims = rank_claims();
        std::thread::scope(|s| {
            let waiting = s.spawn(|| claims.locate(part_seq(5, 1), &[[9; 32]]));
            // The end of an older epoch does not end this one's wait.
            box_of(&claims).ended(4);
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!waiting.is_finished());
            box_of(&claims).ended(5);
            let err = waiting.join().unwrap().unwrap_err();
            assert!(matches!(err, Error::SharedChunks { .. }), "{err}");
            assert!(err.to_string().contains("epoch 5 ended"), "{err}");
        });
        // A claim for an epoch that ended fails at once, without asking.
        let err = claims.claim(part_seq(5, 1), &[[1; 32]]).unwrap_err();
        assert!(err.to_string().contains("epoch 5 ended"), "{err}");
        let claims = rank_claims();
        std::thread::scope(|s| {
            let waiting = s.spawn(|| claims.claim(part_seq(6, 1), &[[9; 32]]));
            box_of(&claims).gone();
            let err = waiting.join().unwrap().unwrap_err();
            assert!(err.to_string().contains("supervisor is gone"), "{err}");
        });
    }
}
