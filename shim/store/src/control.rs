//! The control channel between the supervisor and the program's shim: a Unix stream socket
//! (one end of a socketpair the supervisor creates; the child inherits the other end and finds
//! its number in `SUPERVISE_CONTROL_FD`). Each message is one line of JSON.
//!
//! Supervisor to program: [`Request`]. Program to supervisor: [`Event`]. The channel closing
//! tells the program that its supervisor is gone.
//!
//! The ranks of a job of many processes (an MPI job, see [`crate::epoch`]) connect instead to
//! the endpoint named in `SUPERVISE_ENDPOINT` (a Unix socket or TCP), since launchers pass on
//! environment variables but not descriptors. The supervisor speaks first
//! ([`Request::Challenge`]); the rank answers [`Event::Join`] with a proof that it knows the
//! job's secret ([`proof`]); the supervisor answers [`Request::Welcome`] with its own proof and
//! what to restore, or [`Request::Refused`]. Then the same lines flow as on the inherited
//! socket, plus the epoch protocol: [`Request::EpochBegin`] (every rank's control thread
//! reports at once how many safe points its program passed, [`Event::EpochAt`], and holds the
//! program at its next one), [`Request::EpochTarget`] (the safe point every rank captures at:
//! one past the largest reported, which no rank can have passed), and [`Request::EpochEnd`].
//! While writing its part, a rank settles which rank stores the chunks they hold in common
//! ([`Event::ChunkClaims`], [`Request::ClaimAnswer`], [`Event::ChunksStored`],
//! [`Request::ChunksAt`]; see [`crate::claims`]).

use serde::{Deserialize, Serialize};

use crate::claims::ChunkAt;
use crate::writer::SnapshotReport;

/// Sent by the supervisor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Take a snapshot at the next safe point.
    Snapshot,
    /// Take a final snapshot at the next safe point; the program then ends with
    /// exit code 75 (`EXIT_STOPPED`, a clean stop).
    Stop,
    /// To a rank that connected: prove you know the job's secret, with this nonce (hex).
    Challenge {
        /// 16 random bytes, hex.
        nonce: String,
    },
    /// To a rank whose proof held: the supervisor's own proof, and what to restore.
    Welcome {
        /// [`proof`] of the server side.
        proof: String,
        /// The epoch the job resumes from, if any.
        epoch: Option<u64>,
        /// This rank's part of it: the snapshot to restore.
        seq: Option<u64>,
        /// The safe points the program had passed at that epoch (its count goes on from there).
        step: u64,
    },
    /// To a rank that may not join (bad proof, a rank out of range, a second copy of a rank).
    Refused {
        /// Why.
        why: String,
    },
    /// Report how many safe points the program passed (now, from the control thread), and
    /// hold the program at its next safe point until the target is known.
    EpochBegin {
        /// The epoch being taken.
        epoch: u64,
        /// A final epoch: the program stops after it (said to ranks that agree on the safe
        /// point themselves; others learn it with the target).
        #[serde(default)]
        stop: bool,
    },
    /// Capture this rank's part of `epoch` at safe point `step`; with `stop`, stop after it.
    EpochTarget {
        /// The epoch.
        epoch: u64,
        /// The safe point (counted from the job's start) every rank captures at.
        step: u64,
        /// The program stops after this epoch (a final snapshot).
        stop: bool,
    },
    /// The answer to [`Event::ChunkClaims`]: which of the hashes other ranks store.
    ClaimAnswer {
        /// The epoch.
        epoch: u64,
        /// The claim answered.
        id: u64,
        /// Indices into the claim's hashes of the chunks another rank stores.
        theirs: Vec<u32>,
    },
    /// Where chunks that other ranks store lie (see [`crate::claims`]).
    ChunksAt {
        /// The epoch.
        epoch: u64,
        /// The locations.
        chunks: Vec<ChunkAt>,
    },
    /// How the epoch ended: `published` false means it never completed, and this rank's part
    /// of it is not a base for the next (the next capture copies regions whole).
    EpochEnd {
        /// The epoch.
        epoch: u64,
        /// Every part was durable and the epoch was published.
        published: bool,
    },
}

/// The proof one side of a rank's connection gives that it knows the job's secret: a keyed
/// blake3 over the side, both nonces and the rank. The rank proves `side` "rank", the
/// supervisor "supervisor"; each checks the other's with the same function.
pub fn proof(
    secret: &[u8; 32],
    side: &str,
    server_nonce: &str,
    rank_nonce: &str,
    rank: u32,
) -> String {
    let mut h = blake3::Hasher::new_keyed(secret);
    h.update(b"supervise rank link v1\0");
    h.update(side.as_bytes());
    h.update(b"\0");
    h.update(server_nonce.as_bytes());
    h.update(b"\0");
    h.update(rank_nonce.as_bytes());
    h.update(&rank.to_le_bytes());
    h.finalize().to_hex().to_string()
}

/// The side the supervisor proves in [`Request::Welcome`]: what it answers is bound to the
/// proof, so a welcome cannot be altered on the way.
pub fn welcome_side(epoch: Option<u64>, seq: Option<u64>, step: u64) -> String {
    format!("supervisor {epoch:?} {seq:?} {step}")
}

/// Compares two proofs without a timing leak of where they differ.
pub fn proofs_equal(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// A snapshot that was found damaged at start and set aside.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DamagedSnapshot {
    /// Its sequence number.
    pub seq: u64,
    /// What was wrong.
    pub why: String,
}

/// Damaged records the scrub found in one pack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DamagedPack {
    /// The pack's name.
    pub pack: String,
    /// How many of its records are damaged.
    pub records: u64,
    /// Offset of the first one.
    pub first_offset: u64,
}

/// What a [`Event::Warning`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WarningKind {
    /// `SUPERVISE_CAPTURE=dirty` was asked for, but the kernel cannot track writes: regions
    /// are copied whole.
    NoDirtyTracking,
    /// Writes to one region cannot be tracked (or tracking failed or could not be reset): it
    /// is copied whole.
    RegionUntracked,
    /// A snapshot is durable, but applying retention after it failed.
    RetentionFailed,
    /// The scrub found damaged records but could not set aside the snapshots that use them.
    SetAsideFailed,
    /// The shim got a control message it does not understand (ignored).
    BadControlMessage,
    /// The final snapshot before a stop failed; the program stops anyway.
    FinalSnapshotFailed,
    /// A connection to a job's rank endpoint was refused (a wrong secret, a rank out of
    /// range or twice), or the epoch to resume from could not be chosen.
    RankRefused,
}

/// Sent by the program's shim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Event {
    /// The shim is ready; says what the program resumed from.
    Hello {
        /// The program's pid.
        pid: u32,
        /// The snapshot restored, or `None` for a fresh start.
        resumed_from: Option<u64>,
        /// Its progress tag.
        tag: Option<String>,
        /// Snapshots found damaged and skipped.
        damaged: Vec<DamagedSnapshot>,
        /// How snapshots are captured: "dirty", "copy", "fork" or "sync".
        #[serde(default)]
        capture: String,
    },
    /// A rank asks to join the job (the answer to [`Request::Challenge`]).
    Join {
        /// Its rank, 0 to size-1.
        rank: u32,
        /// How many ranks the job has.
        size: u32,
        /// Its pid.
        pid: u32,
        /// The host it runs on.
        host: String,
        /// 16 random bytes, hex, for the supervisor's proof.
        nonce: String,
        /// [`proof`] of the rank side.
        proof: String,
        /// The program agrees on the safe point of an epoch through its own communicator
        /// (`supervise_mpi.h`): the supervisor offers epochs and names no target.
        #[serde(default)]
        agree: bool,
    },
    /// This rank writes no part of `epoch`: the epoch ended before its program reached the
    /// target, or the program did not take the snapshot when it was due.
    PartSkipped {
        /// The epoch.
        epoch: u64,
    },
    /// A rank's part claims chunks new to it (see [`crate::claims`]).
    ChunkClaims {
        /// The epoch.
        epoch: u64,
        /// Numbers the claim, for its answer.
        id: u64,
        /// The hashes, 64 hex digits each, one after another.
        hashes: String,
    },
    /// A rank's packs are durable: where the chunks it claimed and stored lie.
    ChunksStored {
        /// The epoch.
        epoch: u64,
        /// The locations.
        chunks: Vec<ChunkAt>,
    },
    /// The program passed `step` safe points when [`Request::EpochBegin`] arrived.
    EpochAt {
        /// The epoch.
        epoch: u64,
        /// Safe points passed since the job's start.
        step: u64,
    },
    /// The program reached safe points `count` times since the start (a liveness beat).
    Progress {
        /// Safe-point beats seen so far.
        count: u64,
    },
    /// A snapshot is durable.
    SnapshotDone(SnapshotReport),
    /// A snapshot failed; earlier snapshots are untouched.
    SnapshotFailed {
        /// Why.
        error: String,
    },
    /// The scrub found stored records damaged; the snapshots that used them were set aside and
    /// the next snapshot stores those chunks anew.
    RecordsDamaged {
        /// Damaged records found, per pack.
        packs: Vec<DamagedPack>,
        /// What is wrong with the first one.
        why: String,
        /// The snapshots set aside because they use one.
        set_aside: Vec<u64>,
    },
    /// Something the supervisor should show: the shim itself prints nothing.
    Warning {
        /// What happened.
        kind: WarningKind,
        /// The details, for people.
        message: String,
    },
    /// The snapshot the program resumed from turned out to be damaged after the program was
    /// given data from it: it was set aside, and the program ends with an error so that it is
    /// started again from an older one.
    RestoreDamaged {
        /// The snapshot set aside.
        seq: u64,
        /// What is damaged.
        why: String,
    },
    /// A restore failed because an entry of the snapshot has another size than the program's
    /// (its parameters changed): older snapshots would not fit either, so this says nothing
    /// against the snapshot. Sent before the program gets the error.
    RestoreMismatch {
        /// The snapshot restored.
        seq: u64,
        /// The entry.
        entry: String,
        /// Its size in the snapshot.
        stored_bytes: u64,
        /// The size of the program's region, slice or block.
        wanted_bytes: u64,
        /// What differs when the sizes do not say it (absent before it was added).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<MismatchDetail>,
    },
}

/// What differs between an entry of the restored snapshot and what the program asks for, beside
/// the size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "what", rename_all = "snake_case")]
pub enum MismatchDetail {
    /// An array's shape (its size may be the same).
    Shape {
        /// The shape in the snapshot.
        stored: Vec<u64>,
        /// The shape the program asks for.
        wanted: Vec<u64>,
    },
    /// The kind of entry or element type (`[f64] slice`, `value`).
    Kind {
        /// What the snapshot holds.
        stored: String,
        /// What the program asks for.
        wanted: String,
    },
}

impl std::fmt::Display for MismatchDetail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MismatchDetail::Shape { stored, wanted } => {
                write!(f, "shape {stored:?} in the snapshot, {wanted:?} asked for")
            }
            MismatchDetail::Kind { stored, wanted } => {
                write!(f, "a {stored} in the snapshot, a {wanted} asked for")
            }
        }
    }
}

impl Event {
    /// Encodes as one JSON line.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).expect("events serialize");
        s.push('\n');
        s
    }
}

impl Request {
    /// Encodes as one JSON line.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).expect("requests serialize");
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        let ev = Event::SnapshotDone(SnapshotReport {
            seq: 4,
            tag: Some("step 9".into()),
            bytes_total: 10,
            bytes_new: 5,
            bytes_compacted: 0,
            bytes_written: 3,
            duration_ms: 2,
            removed: vec![1],
            pause_us: 1500,
            writer_cpu_us: 2500,
        });
        let line = ev.to_line();
        assert!(
            line.starts_with(r#"{"ev":"snapshot_done","seq":4"#),
            "{line}"
        );
        assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), ev);
        assert_eq!(Request::Stop.to_line(), "{\"op\":\"stop\"}\n");
        let ev = Event::RestoreMismatch {
            seq: 3,
            entry: "grid".into(),
            stored_bytes: 32768,
            wanted_bytes: 33800,
            detail: None,
        };
        assert_eq!(
            ev.to_line(),
            "{\"ev\":\"restore_mismatch\",\"seq\":3,\"entry\":\"grid\",\"stored_bytes\":32768,\"wanted_bytes\":33800}\n"
        );
    }
}
