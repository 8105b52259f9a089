//! The restart policy: exponential backoff between restarts (capped, reset after a healthy
//! run) and a limit on restarts within a sliding time window.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Settings of the restart policy.
#[derive(Clone, Debug)]
pub struct PolicyConfig {
    /// Give up after more than this many restarts within `window`.
    pub max_restarts: u32,
    /// The sliding window restarts are counted in.
    pub window: Duration,
    /// Delay before the first restart; doubles with each consecutive failure.
    pub backoff: Duration,
    /// Upper bound of the delay.
    pub backoff_max: Duration,
    /// A run at least this long counts as healthy and resets the backoff.
    pub healthy_after: Duration,
}

/// What to do after the child failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Restart after this delay.
    Restart {
        /// The delay.
        delay: Duration,
    },
    /// Too many restarts: stop trying.
    GiveUp {
        /// Failures counted in the window.
        failures: usize,
    },
}

/// How a failed life counts toward giving up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// It took a new snapshot: no work was wiped out; the count toward giving up starts over.
    Progressed,
    /// Something outside killed it while it was running (SIGKILL after a safe point): the
    /// restart is not the program's failure and does not count.
    Excused,
    /// A failure without progress: it counts.
    Counted,
}

/// The policy's state.
#[derive(Debug)]
pub struct RestartPolicy {
    config: PolicyConfig,
    failures: VecDeque<Instant>,
    consecutive: u32,
}

impl RestartPolicy {
    /// A policy with no failures yet.
    pub fn new(config: PolicyConfig) -> Self {
        Self {
            config,
            failures: VecDeque::new(),
            consecutive: 0,
        }
    }

    /// Records a failure at `now` of a run that lasted `ran_for`, and decides. A run that
    /// progressed (took a new snapshot) wiped out no work: it resets the count toward
    /// giving up, so only failures in a row without progress can exhaust `max_restarts`; an
    /// excused one is neither counted nor resets the count.
    pub fn on_failure(&mut self, now: Instant, ran_for: Duration, failure: Failure) -> Decision {
        if ran_for >= self.config.healthy_after {
            self.consecutive = 0;
        }
        match failure {
            Failure::Progressed => self.failures.clear(),
            Failure::Excused => {}
            Failure::Counted => self.failures.push_back(now),
        }
        while let Some(first) = self.failures.front() {
            if now.duration_since(*first) > self.config.window {
                self.failures.pop_front();
            } else {
                break;
            }
        }
        if self.failures.len() > self.config.max_restarts as usize {
            return Decision::GiveUp {
                failures: self.failures.len(),
            };
        }
        let factor = 2u32.saturating_pow(self.consecutive.min(31));
        let delay = self
            .config
            .backoff
            .saturating_mul(factor)
            .min(self.config.backoff_max);
        self.consecutive = self.consecutive.saturating_add(1);
        Decision::Restart { delay }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_restarts: u32) -> RestartPolicy {
        RestartPolicy::new(PolicyConfig {
            max_restarts,
            window: Duration::from_secs(60),
            backoff: Duration::from_secs(1),
            backoff_max: Duration::from_secs(5),
            healthy_after: Duration::from_secs(30),
        })
    }

    fn delay(d: Decision) -> u64 {
        match d {
            Decision::Restart { delay } => delay.as_secs(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_gives_up_past_the_limit() {
        let mut p = policy(3);
        let t = Instant::now();
        let short = Duration::from_secs(1);
        assert_eq!(delay(p.on_failure(t, short, Failure::Counted)), 1);
        assert_eq!(delay(p.on_failure(t + short, short, Failure::Counted)), 2);
        assert_eq!(
            delay(p.on_failure(t + 2 * short, short, Failure::Counted)),
            4
        );
        assert_eq!(
            p.on_failure(t + 3 * short, short, Failure::Counted),
            Decision::GiveUp { failures: 4 }
        );
    }

    #[test]
    fn a_healthy_run_resets_backoff_and_old_failures_leave_the_window() {
        let mut p = policy(4);
        let t = Instant::now();
        let short = Duration::from_secs(1);
        for i in 0..3 {
            p.on_failure(t + i * short, short, Failure::Counted);
        }
        // 100 s later: earlier failures are out of the window, and the run was healthy.
        let later = t + Duration::from_secs(100);
        assert_eq!(
            delay(p.on_failure(later, Duration::from_secs(40), Failure::Counted)),
            1
        );
        assert_eq!(delay(p.on_failure(later, short, Failure::Counted)), 2);
        assert_eq!(delay(p.on_failure(later, short, Failure::Counted)), 4);
        assert_eq!(
            delay(p.on_failure(later, short, Failure::Counted)),
            5,
            "capped"
        );
    }

    #[test]
    fn restarts_that_made_progress_do_not_exhaust_the_limit() {
        let mut p = policy(2);
        let t = Instant::now();
        let short = Duration::from_secs(1);
        for i in 0..10 {
            assert!(matches!(
                p.on_failure(t + i * short, short, Failure::Progressed),
                Decision::Restart { .. }
            ));
        }
        p.on_failure(t + 10 * short, short, Failure::Counted);
        p.on_failure(t + 11 * short, short, Failure::Counted);
        assert_eq!(
            p.on_failure(t + 12 * short, short, Failure::Counted),
            Decision::GiveUp { failures: 3 }
        );
    }

    #[test]
    fn excused_failures_neither_count_nor_clear() {
        let mut p = policy(2);
        let t = Instant::now();
        let short = Duration::from_secs(1);
        p.on_failure(t, short, Failure::Counted);
        p.on_failure(t + short, short, Failure::Counted);
        for i in 2..20 {
            assert!(matches!(
                p.on_failure(t + i * short, short, Failure::Excused),
                Decision::Restart { .. }
            ));
        }
        assert_eq!(
            p.on_failure(t + 20 * short, short, Failure::Counted),
            Decision::GiveUp { failures: 3 }
        );
    }
}
