//! How often the supervisor asks for a snapshot: a fixed `--every`, or `--every auto`, which
//! chooses the interval from what the job measures. A snapshot costs the program its pause
//! plus the CPU time its writer takes while the program computes on; a failure costs the work
//! since the last snapshot. Young's first-order optimum, `T = sqrt(2 x MTBF x C)` (Daly's
//! refinement changes it by less than the noise of `C` while `C` is far below the MTBF), balances
//! the two. The interval is then kept where snapshots cost at most `--max-overhead` of the run
//! (`T >= C / overhead`), and within `[EVERY_MIN, --every-max]`.
//!
//! - `C` is the mean of the last [`COSTS`] snapshots' costs: the pause the shim measured (the
//!   wait for the previous snapshot's writer included) plus the writer's CPU time. That counts
//!   every CPU second of the writer as taken from the program: exact when the program keeps
//!   the node's cores busy, an upper bound (so a longer interval) when cores are idle. A
//!   report without those figures (an older shim, an MPI epoch) counts its whole duration.
//! - The MTBF is `(run time + prior) / (failures + 1)`: the lives this supervisor saw, their
//!   deaths (crashes, kills, hangs; not stops), and `--mtbf` as one failure's worth of prior
//!   belief, so that a job that has not failed yet is not snapshotted as if it never will.
//! - A life's first snapshot stores whole what a fresh start has (and copies whole what is
//!   not tracked yet): its cost is an upper bound of the steady one, used only until a later
//!   snapshot's is known, so that a large state is not snapshotted again at once just to
//!   measure. Before any snapshot the interval is [`FIRST`].

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;

/// `--every`: a fixed interval, or `auto`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EverySpec {
    /// This interval.
    Fixed(Duration),
    /// Chosen from the job's measurements, within these bounds.
    Auto(AutoConfig),
}

impl EverySpec {
    /// The interval the program's own timer keeps when it runs on without its supervisor
    /// (`--orphan continue`): the fixed one, or for `auto` ten minutes (at most `--every-max`).
    pub fn alone(&self) -> Duration {
        match self {
            EverySpec::Fixed(every) => *every,
            EverySpec::Auto(cfg) => cfg.every_max.min(Duration::from_secs(600)),
        }
    }
}

/// The bounds of `--every auto`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AutoConfig {
    /// `--max-overhead`: the largest share of the run snapshots may cost (0.02 = 2%).
    pub max_overhead: f64,
    /// `--every-max`: the longest interval, whatever the figures say.
    pub every_max: Duration,
    /// `--mtbf`: the mean time between failures believed before the job has failed.
    pub mtbf_prior: Duration,
}

/// The shortest interval `--every auto` chooses.
pub const EVERY_MIN: Duration = Duration::from_secs(1);
/// The interval until the first snapshot's cost is known (at most `--every-max`).
pub const FIRST: Duration = Duration::from_secs(1);
/// How many recent snapshot costs the estimate averages.
pub const COSTS: usize = 3;

/// Why `--every auto` chose its interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Why {
    /// No snapshot cost is known yet.
    Measuring,
    /// Young/Daly's optimum for the measured cost and MTBF.
    YoungDaly,
    /// The optimum would cost more than `--max-overhead`: as often as the budget allows.
    OverheadBudget,
    /// Capped at `--every-max`.
    EveryMax,
    /// Raised to the shortest interval, [`EVERY_MIN`].
    EveryMin,
}

impl Why {
    /// Its name in the history and in `status`.
    pub fn name(self) -> &'static str {
        match self {
            Why::Measuring => "measuring",
            Why::YoungDaly => "young-daly",
            Why::OverheadBudget => "overhead-budget",
            Why::EveryMax => "every-max",
            Why::EveryMin => "every-min",
        }
    }

    /// In words, for log lines.
    pub fn describe(self) -> &'static str {
        match self {
            Why::Measuring => "until a snapshot's cost is measured",
            Why::YoungDaly => "the Young/Daly optimum",
            Why::OverheadBudget => "the overhead budget (--max-overhead)",
            Why::EveryMax => "capped at --every-max",
            Why::EveryMin => "the shortest interval",
        }
    }
}

/// An interval `--every auto` chose, and what it was chosen from.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Choice {
    /// The interval, in milliseconds.
    pub every_ms: u64,
    /// Why this one.
    pub why: Why,
    /// The snapshot cost it assumed (mean of the recent ones), in microseconds.
    pub cost_us: u64,
    /// The mean time between failures it assumed, in seconds.
    pub mtbf_s: u64,
    /// The failures seen (the prior aside).
    pub failures: u32,
}

/// The snapshot schedule of a running job: the interval now, and for `--every auto` what it
/// is chosen from.
#[derive(Debug)]
pub struct Schedule {
    spec: EverySpec,
    costs: VecDeque<Duration>,
    /// The cost of the first snapshot seen, until a steady one is known.
    first_cost: Option<Duration>,
    run_time: Duration,
    failures: u32,
    /// The last choice announced.
    chosen: Option<Choice>,
}

impl Schedule {
    /// The schedule of `spec`, before anything is measured.
    pub fn new(spec: EverySpec) -> Self {
        Schedule {
            spec,
            costs: VecDeque::with_capacity(COSTS),
            first_cost: None,
            run_time: Duration::ZERO,
            failures: 0,
            chosen: None,
        }
    }

    /// The interval now.
    pub fn every(&self) -> Duration {
        match self.spec {
            EverySpec::Fixed(every) => every,
            EverySpec::Auto(_) => Duration::from_millis(self.choose().map_or(0, |c| c.every_ms)),
        }
    }

    /// What `--every auto` chooses now (`None` for a fixed interval).
    pub fn choose(&self) -> Option<Choice> {
        let EverySpec::Auto(cfg) = self.spec else {
            return None;
        };
        let mtbf = (self.run_time + cfg.mtbf_prior) / (self.failures + 1);
        let mtbf_s = mtbf.as_secs();
        let Some(cost) = self.cost() else {
            let every = FIRST.min(cfg.every_max);
            return Some(Choice {
                every_ms: millis(every),
                why: Why::Measuring,
                cost_us: 0,
                mtbf_s,
                failures: self.failures,
            });
        };
        let c = cost.as_secs_f64();
        let mut every = (2.0 * mtbf.as_secs_f64() * c).sqrt();
        let mut why = Why::YoungDaly;
        let budget = c / cfg.max_overhead;
        if budget > every {
            (every, why) = (budget, Why::OverheadBudget);
        }
        let max = cfg.every_max.as_secs_f64();
        let min = EVERY_MIN.as_secs_f64().min(max);
        if every > max {
            (every, why) = (max, Why::EveryMax);
        } else if every < min {
            (every, why) = (min, Why::EveryMin);
        }
        Some(Choice {
            every_ms: (every * 1000.0).round() as u64,
            why,
            cost_us: u64::try_from(cost.as_micros()).unwrap_or(u64::MAX),
            mtbf_s,
            failures: self.failures,
        })
    }

    /// The mean of the recent snapshot costs, or until one is known the first snapshot's.
    fn cost(&self) -> Option<Duration> {
        match u32::try_from(self.costs.len()).ok().filter(|&n| n > 0) {
            Some(n) => Some(self.costs.iter().sum::<Duration>() / n),
            None => self.first_cost,
        }
    }

    /// Notes what a life's first snapshot cost: the estimate until a later one's is known
    /// (ignored once one is). Returns the choice to announce, as
    /// [`note_cost`](Self::note_cost).
    pub fn note_first_cost(&mut self, cost: Duration) -> Option<Choice> {
        if !self.costs.is_empty() || self.first_cost.is_some() {
            return None;
        }
        self.first_cost = Some(cost);
        self.announce()
    }

    /// Notes what a snapshot cost the program. Returns the new choice when it should be
    /// announced: the first one from a measured cost, or one whose interval moved by more
    /// than a quarter or whose reason changed.
    pub fn note_cost(&mut self, cost: Duration) -> Option<Choice> {
        if self.costs.len() == COSTS {
            self.costs.pop_front();
        }
        self.costs.push_back(cost);
        self.announce()
    }

    /// Notes a life of the program that ran `ran` and ended in a failure (`failed`: a crash, a
    /// kill or a hang; not a stop or a finish). Returns the new choice to announce, as
    /// [`note_cost`](Self::note_cost).
    pub fn note_life(&mut self, ran: Duration, failed: bool) -> Option<Choice> {
        self.run_time += ran;
        self.failures += u32::from(failed);
        self.announce()
    }

    fn announce(&mut self) -> Option<Choice> {
        let now = self.choose()?;
        let moved = match self.chosen {
            None => true,
            Some(was) => {
                was.why != now.why || now.every_ms.abs_diff(was.every_ms) * 4 > was.every_ms.max(1)
            }
        };
        if moved && now.why != Why::Measuring {
            self.chosen = Some(now);
            return Some(now);
        }
        None
    }
}

/// What a snapshot cost the program, from its report: its pause plus its writer's CPU time,
/// or its whole duration when the report has neither.
pub fn cost_of(report: &supervise_store::writer::SnapshotReport) -> Duration {
    let measured = report.pause_us.saturating_add(report.writer_cpu_us);
    if measured > 0 {
        Duration::from_micros(measured)
    } else {
        Duration::from_millis(report.duration_ms)
    }
}

fn millis(d: Duration) -> u64 {
    supervise_store::clock::millis(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auto(mtbf: u64) -> Schedule {
        Schedule::new(EverySpec::Auto(AutoConfig {
            max_overhead: 0.02,
            every_max: Duration::from_secs(3600),
            mtbf_prior: Duration::from_secs(mtbf),
        }))
    }

    #[test]
    fn young_daly_within_the_budget_and_the_bounds() {
        let mut s = auto(86_400);
        assert_eq!(s.choose().unwrap().why, Why::Measuring);
        assert_eq!(s.every(), FIRST);
        // 10 ms a snapshot, a day between failures: sqrt(2 x 86400 x 0.01) = 41.6 s.
        let c = s.note_cost(Duration::from_millis(10)).unwrap();
        assert_eq!(
            (c.why, c.every_ms, c.cost_us, c.mtbf_s),
            (Why::YoungDaly, 41_569, 10_000, 86_400)
        );
        // The same cost again: nothing to announce.
        assert_eq!(s.note_cost(Duration::from_millis(10)), None);
        // 2 s a snapshot (all three recent ones): the optimum, 588 s, would cost 0.34%; fine.
        assert!(
            s.note_cost(Duration::from_secs(2)).is_some(),
            "a move of more than a quarter"
        );
        s.note_cost(Duration::from_secs(2));
        s.note_cost(Duration::from_secs(2));
        let c = s.choose().unwrap();
        assert_eq!((c.why, c.every_ms), (Why::YoungDaly, 587_878));
        // An MTBF of 100 s: the optimum, 20 s, would cost 10%; the budget says 100 s.
        let mut s = auto(100);
        let c = s.note_cost(Duration::from_secs(2)).unwrap();
        assert_eq!((c.why, c.every_ms), (Why::OverheadBudget, 100_000));
        // Tiny costs: the shortest interval.
        let mut s = auto(10);
        let c = s.note_cost(Duration::from_micros(500)).unwrap();
        assert_eq!((c.why, c.every_ms), (Why::EveryMin, 1_000));
        // Huge ones: --every-max.
        let mut s = auto(86_400);
        let c = s.note_cost(Duration::from_secs(600)).unwrap();
        assert_eq!((c.why, c.every_ms), (Why::EveryMax, 3_600_000));
    }

    #[test]
    fn failures_shorten_the_interval_and_run_time_without_them_lengthens_it() {
        let mut s = auto(3600);
        let first = s.note_cost(Duration::from_millis(50)).unwrap();
        // sqrt(2 x 3600 x 0.05) = 19 s.
        assert_eq!(first.every_ms, 18_974);
        // Two crashes in 10 minutes: MTBF (600 + 3600) / 3 = 1400 s.
        assert!(s.note_life(Duration::from_secs(300), true).is_some());
        s.note_life(Duration::from_secs(300), true);
        let c = s.choose().unwrap();
        assert_eq!((c.mtbf_s, c.failures), (1400, 2));
        assert!(c.every_ms < first.every_ms, "{c:?}");
        // A stop is no failure.
        s.note_life(Duration::from_secs(36_000), false);
        let c = s.choose().unwrap();
        assert_eq!(c.failures, 2);
        assert!(c.every_ms > first.every_ms, "{c:?}");
    }

    #[test]
    fn the_first_snapshot_counts_until_a_later_one_is_measured() {
        let mut s = auto(86_400);
        // A large fresh state: its first snapshot took 2 s, so the next is not taken at once.
        let c = s.note_first_cost(Duration::from_secs(2)).unwrap();
        assert_eq!((c.why, c.every_ms), (Why::YoungDaly, 587_878));
        assert_eq!(
            s.note_first_cost(Duration::from_secs(9)),
            None,
            "one first cost"
        );
        // The steady cost replaces it.
        let c = s.note_cost(Duration::from_millis(10)).unwrap();
        assert_eq!((c.every_ms, c.cost_us), (41_569, 10_000));
        // A later life's first snapshot does not count.
        assert_eq!(s.note_first_cost(Duration::from_secs(2)), None);
        assert_eq!(s.choose().unwrap().cost_us, 10_000);
    }

    #[test]
    fn a_fixed_interval_is_what_it_says() {
        let mut s = Schedule::new(EverySpec::Fixed(Duration::from_secs(5)));
        assert_eq!(s.note_cost(Duration::from_secs(9)), None);
        assert_eq!(s.choose(), None);
        assert_eq!(s.every(), Duration::from_secs(5));
    }

    #[test]
    fn the_cost_is_the_pause_and_the_writer_or_else_the_duration() {
        let mut r = supervise_store::writer::SnapshotReport {
            seq: 1,
            tag: None,
            bytes_total: 0,
            bytes_new: 0,
            bytes_compacted: 0,
            bytes_written: 0,
            duration_ms: 40,
            removed: Vec::new(),
            pause_us: 1_500,
            writer_cpu_us: 8_500,
        };
        assert_eq!(cost_of(&r), Duration::from_millis(10));
        (r.pause_us, r.writer_cpu_us) = (0, 0);
        assert_eq!(cost_of(&r), Duration::from_millis(40));
    }
}
