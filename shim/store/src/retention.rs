//! Which snapshots retention keeps. The choice is a pure function of the committed sequence
//! numbers, their ages and the policy, so it is tested apart from the files it removes.
//!
//! Snapshots the supervisor suspects (it stepped back past them after crashes that pointed at
//! them) neither count toward `keep` nor push good snapshots out: retention counts from the
//! newest snapshot that is not suspect, and keeps a suspect one until a newer good one exists.
//! Stepping back therefore never lets retention delete the good snapshot it stepped back to,
//! nor the suspect ones while they are still the newest work the job has.

use std::time::Duration;

/// Which snapshots retention keeps: the newest `keep` good ones (at least one), every snapshot
/// younger than `within` when set, and suspect ones until a newer good one exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Keep this many newest snapshots that are not suspect.
    pub keep: usize,
    /// Also keep the snapshots taken within this long before now.
    pub within: Option<Duration>,
    /// Snapshots the supervisor suspects, as inclusive ranges of sequence numbers.
    pub suspect: Vec<(u64, u64)>,
}

impl From<usize> for Retention {
    fn from(keep: usize) -> Self {
        Self {
            keep,
            within: None,
            suspect: Vec::new(),
        }
    }
}

impl Retention {
    /// True when `seq` lies in one of the suspect ranges.
    pub fn is_suspect(&self, seq: u64) -> bool {
        self.suspect.iter().any(|(a, b)| (*a..=*b).contains(&seq))
    }

    /// Splits the committed snapshots `seqs` (oldest first) into those to remove and those to
    /// keep, both oldest first. `young(seq)` tells whether a snapshot was taken within
    /// `within` (it is asked only when `within` is set; an unreadable manifest should answer
    /// true: its age is unknown, so it is kept).
    pub fn choose(&self, seqs: &[u64], mut young: impl FnMut(u64) -> bool) -> (Vec<u64>, Vec<u64>) {
        let good: Vec<u64> = seqs
            .iter()
            .copied()
            .filter(|s| !self.is_suspect(*s))
            .collect();
        let newest_good = good.last().copied();
        let first_kept_good = good.len().saturating_sub(self.keep.max(1));
        let kept_good = &good[first_kept_good..];
        let mut keep = Vec::new();
        let mut remove = Vec::new();
        for &seq in seqs {
            let kept = if self.is_suspect(seq) {
                newest_good.is_none_or(|g| g < seq)
            } else {
                kept_good.contains(&seq)
            };
            if kept || (self.within.is_some() && young(seq)) {
                keep.push(seq);
            } else {
                remove.push(seq);
            }
        }
        (remove, keep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(keep: usize, suspect: &[(u64, u64)]) -> Retention {
        Retention {
            keep,
            within: None,
            suspect: suspect.to_vec(),
        }
    }

    #[test]
    fn keeps_the_newest_without_suspects() {
        let (remove, keep) = policy(3, &[]).choose(&[1, 2, 3, 4, 5], |_| false);
        assert_eq!(remove, [1, 2]);
        assert_eq!(keep, [3, 4, 5]);
        let (remove, keep) = policy(0, &[]).choose(&[1, 2], |_| false);
        assert_eq!((remove, keep), (vec![1], vec![2]), "at least one is kept");
    }

    #[test]
    fn suspects_do_not_push_out_the_snapshot_stepped_back_to() {
        // Restored 6 after 7 and 8 were suspected; the program took 9.
        let (remove, keep) = policy(3, &[(7, 8)]).choose(&[4, 5, 6, 7, 8, 9], |_| false);
        assert_eq!(keep, [5, 6, 9], "three newest good ones");
        assert_eq!(
            remove,
            [4, 7, 8],
            "suspects go once a newer good one exists"
        );
    }

    #[test]
    fn suspects_stay_while_they_are_the_newest_work() {
        // Stepped back to 6; no new snapshot yet (or only a failed one).
        let (remove, keep) = policy(1, &[(7, 8)]).choose(&[5, 6, 7, 8], |_| false);
        assert_eq!(keep, [6, 7, 8]);
        assert_eq!(remove, [5]);
        // Everything suspect (stepped back to a fresh start), nothing new yet: all stay.
        let (remove, keep) = policy(2, &[(0, 8)]).choose(&[6, 7, 8], |_| false);
        assert!(remove.is_empty());
        assert_eq!(keep, [6, 7, 8]);
    }

    #[test]
    fn young_snapshots_are_kept_within_the_window() {
        let mut p = policy(1, &[]);
        p.within = Some(Duration::from_secs(60));
        let (remove, keep) = p.choose(&[1, 2, 3, 4], |s| s >= 3);
        assert_eq!(remove, [1, 2]);
        assert_eq!(keep, [3, 4]);
    }
}
