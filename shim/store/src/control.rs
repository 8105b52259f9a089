//! The control channel between the supervisor and the program's shim: a Unix stream socket
//! (one end of a socketpair the supervisor creates; the child inherits the other end and finds
//! its number in `SUPERVISE_CONTROL_FD`). Each message is one line of JSON.
//!
//! Supervisor to program: [`Request`]. Program to supervisor: [`Event`]. The channel closing
//! tells the program that its supervisor is gone.

use serde::{Deserialize, Serialize};

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
    },
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
        };
        assert_eq!(
            ev.to_line(),
            "{\"ev\":\"restore_mismatch\",\"seq\":3,\"entry\":\"grid\",\"stored_bytes\":32768,\"wanted_bytes\":33800}\n"
        );
    }
}
