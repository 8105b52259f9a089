//! Deciding when a snapshot is to blame for the program's deaths, so the supervisor steps back
//! past it only on evidence that points at it.
//!
//! A death after restoring snapshot S points at S when the life took no new snapshot and
//! either ended before the program reached its first safe point after the restore (or hung
//! there), or ended the same way (the same exit code or signal) as the deaths before it. A
//! SIGKILL from outside never points at a snapshot: the OOM killer and operators send it, and
//! it says nothing about the restored state. After `needed` deaths in a row that point at S,
//! S is suspect.

use std::collections::HashMap;

use nix::sys::signal::Signal;

use crate::child::Ended;

/// What the supervisor knows about one life of the program that ended in failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Death {
    /// How it ended.
    pub how: Ended,
    /// The program reached a safe point after its restore.
    pub reached_safe_point: bool,
    /// The supervisor stopped it because it reached no safe point for `--hang-timeout`.
    pub hung: bool,
    /// The life took a new snapshot.
    pub progressed: bool,
}

impl Death {
    /// True when something outside the program killed it with SIGKILL (not the supervisor's
    /// own escalation of a hang).
    pub fn killed_from_outside(&self) -> bool {
        !self.hung && self.how == Ended::Signaled(Signal::SIGKILL as i32)
    }
}

/// What one death says about the snapshot the life restored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing points at the snapshot; why not.
    Innocent(&'static str),
    /// The death points at the snapshot: `count` in a row so far, of `needed`.
    Pointing {
        /// Deaths in a row that point at it.
        count: u32,
        /// How many make it suspect.
        needed: u32,
    },
    /// The snapshot is suspect: the reason, for the log.
    Suspect(String),
}

#[derive(Debug, Default)]
struct Streak {
    count: u32,
    how: Option<Ended>,
}

/// The deaths counted against each snapshot.
#[derive(Debug)]
pub struct Blame {
    needed: u32,
    streaks: HashMap<u64, Streak>,
}

impl Blame {
    /// Suspect a snapshot after `needed` (at least 1) deaths in a row that point at it.
    pub fn new(needed: u32) -> Self {
        Self {
            needed: needed.max(1),
            streaks: HashMap::new(),
        }
    }

    /// Weighs a death of a life that restored snapshot `seq`.
    pub fn weigh(&mut self, seq: u64, death: &Death) -> Verdict {
        if death.progressed {
            self.streaks.remove(&seq);
            return Verdict::Innocent("the program took a new snapshot after restoring it");
        }
        if death.killed_from_outside() {
            // Neither counts nor breaks a streak: it says nothing either way.
            return Verdict::Innocent(
                "SIGKILL from outside (the OOM killer or an operator) says nothing about it",
            );
        }
        let streak = self.streaks.entry(seq).or_default();
        let early = !death.reached_safe_point;
        let same = streak.how == Some(death.how);
        if early || same {
            streak.count += 1;
        } else {
            // Died in another way after running: a new streak of this way starts here.
            streak.count = 1;
        }
        streak.how = Some(death.how);
        if streak.count < self.needed {
            return Verdict::Pointing {
                count: streak.count,
                needed: self.needed,
            };
        }
        let count = streak.count;
        self.streaks.remove(&seq);
        let way = match (death.hung, early) {
            (true, _) => "hung before reaching its first safe point".to_owned(),
            (false, true) => format!("died ({}) before reaching its first safe point", death.how),
            (false, false) => format!("died the same way ({}) before its next snapshot", death.how),
        };
        Verdict::Suspect(format!(
            "after restoring it the program {way}, {count} times in a row"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KILL: Ended = Ended::Signaled(9);
    const ABORT: Ended = Ended::Signaled(6);

    fn death(how: Ended, reached_safe_point: bool) -> Death {
        Death {
            how,
            reached_safe_point,
            hung: false,
            progressed: false,
        }
    }

    #[test]
    fn sigkill_from_outside_never_makes_a_snapshot_suspect() {
        let mut b = Blame::new(3);
        for reached in [false, true, false, true, false, true, false] {
            assert!(matches!(
                b.weigh(8, &death(KILL, reached)),
                Verdict::Innocent(_)
            ));
        }
    }

    #[test]
    fn dying_before_the_first_safe_point_points_at_the_snapshot() {
        let mut b = Blame::new(3);
        assert_eq!(
            b.weigh(8, &death(ABORT, false)),
            Verdict::Pointing {
                count: 1,
                needed: 3
            }
        );
        // A SIGKILL between does not break the streak.
        assert!(matches!(
            b.weigh(8, &death(KILL, false)),
            Verdict::Innocent(_)
        ));
        assert!(matches!(
            b.weigh(8, &death(Ended::Exited(1), false)),
            Verdict::Pointing { count: 2, .. }
        ));
        let Verdict::Suspect(why) = b.weigh(8, &death(ABORT, false)) else {
            panic!("third early death")
        };
        assert!(why.contains("first safe point"), "{why}");
    }

    #[test]
    fn deaths_after_running_point_only_when_they_repeat_the_same_way() {
        let mut b = Blame::new(3);
        assert!(matches!(
            b.weigh(8, &death(Ended::Exited(1), true)),
            Verdict::Pointing { count: 1, .. }
        ));
        assert!(matches!(
            b.weigh(8, &death(Ended::Exited(2), true)),
            Verdict::Pointing { count: 1, .. }
        ));
        assert!(matches!(
            b.weigh(8, &death(Ended::Exited(2), true)),
            Verdict::Pointing { count: 2, .. }
        ));
        assert!(matches!(
            b.weigh(8, &death(Ended::Exited(2), true)),
            Verdict::Suspect(_)
        ));
    }

    #[test]
    fn a_new_snapshot_clears_the_count_and_hangs_before_a_safe_point_count() {
        let mut b = Blame::new(2);
        b.weigh(8, &death(ABORT, false));
        let mut d = death(ABORT, true);
        d.progressed = true;
        assert!(matches!(b.weigh(8, &d), Verdict::Innocent(_)));
        let hung = Death {
            how: KILL,
            reached_safe_point: false,
            hung: true,
            progressed: false,
        };
        assert!(matches!(
            b.weigh(8, &hung),
            Verdict::Pointing { count: 1, .. }
        ));
        let Verdict::Suspect(why) = b.weigh(8, &hung) else {
            panic!("second hang")
        };
        assert!(why.contains("hung"), "{why}");
    }
}
