//! Running inside a Slurm batch job: who the job is (`SLURM_JOB_ID`, `SLURM_RESTART_COUNT`),
//! when it ends (its time left, from `squeue`, refreshed in the background), and requeueing it
//! (`scontrol requeue`) after its final snapshot, so that a time limit or a preemption costs at
//! most the steps after that snapshot. Slurm does not requeue a job that reached its time
//! limit by itself, even one submitted with `--requeue`: the job has to ask before the limit.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

/// How long a Slurm command may take before it is given up on (Slurm's own message timeout
/// is 10 s by default).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// What the supervisor does inside a Slurm batch job.
#[derive(Clone, Debug)]
pub struct SlurmConfig {
    /// The job.
    pub job: SlurmJob,
    /// How long before the job's end its final snapshot must be safe, beyond twice the
    /// slowest recent snapshot (`--requeue-margin`).
    pub margin: Duration,
    /// Requeue no more than this many times (`--max-requeues`, against `SLURM_RESTART_COUNT`).
    pub max_requeues: u32,
}

/// The Slurm batch job this supervisor runs in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlurmJob {
    /// `SLURM_JOB_ID`.
    pub id: String,
    /// `SLURM_RESTART_COUNT`: how many times the job was requeued before this run (0 when
    /// unset, as on the first run).
    pub restart_count: u32,
}

impl SlurmJob {
    /// The job from the environment Slurm gives a batch script, if any. `Err` when the
    /// variables are there but malformed.
    pub fn from_env() -> Result<Option<Self>, String> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Self::from_env`] with the variables looked up by `var`.
    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, String> {
        let Some(id) = var("SLURM_JOB_ID") else {
            return Ok(None);
        };
        // A job id (123), an array task's (123_4) or a het job's (123+0): never an option.
        if id.is_empty()
            || !id
                .chars()
                .all(|c| c.is_ascii_digit() || c == '_' || c == '+')
        {
            return Err(format!("SLURM_JOB_ID={id:?} is not a Slurm job id"));
        }
        let restart_count = match var("SLURM_RESTART_COUNT") {
            Some(n) => n
                .trim()
                .parse()
                .map_err(|_| format!("SLURM_RESTART_COUNT={n:?} is not a number"))?,
            None => 0,
        };
        Ok(Some(Self { id, restart_count }))
    }

    /// How long the job has left, as `squeue` says: `Ok(None)` when it has no limit.
    pub fn time_left(&self) -> Result<Option<Duration>, String> {
        let out = run(Command::new("squeue").args(["-h", "-j", &self.id, "-o", "%L"]))?;
        parse_time_left(out.trim())
    }

    /// Puts the job back in the queue (`scontrol requeue`); Slurm then ends this run of it.
    pub fn requeue(&self) -> Result<(), String> {
        run(Command::new("scontrol").args(["requeue", &self.id])).map(|_| ())
    }
}

/// Runs a Slurm command to its end (at most [`COMMAND_TIMEOUT`]): its standard output, or
/// what went wrong with its standard error.
fn run(cmd: &mut Command) -> Result<String, String> {
    let name = format!("{:?}", cmd.get_program());
    let words: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let what = words.join(" ");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {name}: {e}"))?;
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{what} did not answer within {} s",
                    COMMAND_TIMEOUT.as_secs()
                ));
            }
            Err(e) => return Err(format!("cannot wait for {what}: {e}")),
        }
    };
    // Slurm's commands print a line or two: the pipes hold that much while they run.
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    if status.success() {
        Ok(out)
    } else {
        Err(format!("{what} failed ({status}): {}", err.trim()))
    }
}

/// Parses `squeue`'s time left (`%L`): `[DAYS-][HOURS:]MINUTES:SECONDS`, `UNLIMITED` or
/// `NOT_SET` (no limit: `None`).
pub fn parse_time_left(text: &str) -> Result<Option<Duration>, String> {
    let bad = || format!("squeue printed {text:?} for the time left, not [D-][H:]M:S");
    match text {
        "UNLIMITED" | "NOT_SET" => return Ok(None),
        "" => return Err("squeue does not know the job (it printed nothing)".into()),
        _ => {}
    }
    let (days, clock) = match text.split_once('-') {
        Some((d, rest)) => (d.parse::<u64>().map_err(|_| bad())?, rest),
        None => (0, text),
    };
    let parts: Vec<u64> = clock
        .split(':')
        .map(|p| p.parse::<u64>().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let (h, m, s) = match parts[..] {
        [m, s] => (0, m, s),
        [h, m, s] => (h, m, s),
        _ => return Err(bad()),
    };
    if m >= 60 && parts.len() == 3 || s >= 60 {
        return Err(bad());
    }
    Ok(Some(Duration::from_secs(
        ((days * 24 + h) * 60 + m) * 60 + s,
    )))
}

/// Parses `--requeue-signal`: a signal name (`USR2`, `SIGURG`, ...) that is neither a stop
/// signal (INT, TERM, HUP), one that cannot be caught, nor SIGCHLD.
pub fn parse_requeue_signal(text: &str) -> Result<Signal, String> {
    let upper = text.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    let sig: Signal = name
        .parse()
        .map_err(|_| format!("{text:?} is not a signal name (e.g. USR2)"))?;
    use Signal::*;
    if matches!(
        sig,
        SIGINT
            | SIGTERM
            | SIGHUP
            | SIGKILL
            | SIGSTOP
            | SIGCHLD
            | SIGSEGV
            | SIGBUS
            | SIGILL
            | SIGFPE
    ) {
        return Err(format!(
            "{} cannot be the requeue signal: it already means something else to the \
             supervisor or cannot be caught (USR2 is the usual choice)",
            sig.as_str()
        ));
    }
    Ok(sig)
}

/// What the supervisor knows of the job's end: where it is (on this machine's monotonic
/// clock), refreshed by a background thread that asks `squeue` now and then, because an
/// administrator may change a job's limit while it runs.
pub struct EndTime {
    shared: Arc<Mutex<Known>>,
}

/// The latest answer.
#[derive(Clone, Debug, Default)]
struct Known {
    /// When the job ends (`None`: no limit, or not known).
    end: Option<Instant>,
    /// The last query's error, if it failed (the end known before stays).
    error: Option<String>,
    /// The time left at the first answer that told it (about when the supervisor started).
    first_left: Option<Duration>,
}

impl EndTime {
    /// Asks in the background while this lives; returns with the first answer (or why there
    /// is none, for the job's history) once it came, or after [`FIRST_ANSWER_WITHIN`]: a
    /// controller that does not answer does not hold the program back.
    pub fn watch(job: &SlurmJob) -> (Self, Result<Option<Duration>, String>) {
        let shared = Arc::new(Mutex::new(Known::default()));
        let weak = Arc::downgrade(&shared);
        let job = job.clone();
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("slurm-end-time".into())
            .spawn(move || refresh(&job, &weak, first_tx));
        let answer = match spawned {
            Err(e) => Err(format!("cannot start the thread that asks squeue: {e}")),
            Ok(_) => match first_rx.recv_timeout(FIRST_ANSWER_WITHIN) {
                Ok(answer) => {
                    // Its error is told with the start, not again.
                    if let Ok(mut k) = shared.lock() {
                        k.error = None;
                    }
                    answer
                }
                Err(_) => Err(format!(
                    "squeue did not answer within {} s (asked again in the background)",
                    FIRST_ANSWER_WITHIN.as_secs()
                )),
            },
        };
        (Self { shared }, answer)
    }

    /// How long before the end the final snapshot is asked for: [`lead`], but never more than
    /// half the time the job had when the supervisor started, so that a run always gets to
    /// work (else a margin longer than the time limit would requeue a job that never moves).
    pub fn lead(&self, margin: Duration, recent_ms: &[u64]) -> Duration {
        let lead = lead(margin, recent_ms);
        match self.shared.lock().ok().and_then(|k| k.first_left) {
            Some(left) => lead.min(left / 2),
            None => lead,
        }
    }

    /// The time left to the end when it is within the final snapshot's lead (`lead`
    /// computed as [`Self::lead`]): the job must stop and be requeued now.
    pub fn near(&self, margin: Duration, recent_ms: &[u64]) -> Option<Duration> {
        let end = self.end()?;
        let now = Instant::now();
        (now + self.lead(margin, recent_ms) >= end).then(|| end.saturating_duration_since(now))
    }

    /// Whether the end has come (within 2 s): a SIGTERM now is Slurm's at the time limit.
    pub fn past(&self) -> bool {
        self.end()
            .is_some_and(|end| Instant::now() + Duration::from_secs(2) >= end)
    }

    /// When the job ends, if known.
    pub fn end(&self) -> Option<Instant> {
        self.shared.lock().map(|k| k.end).unwrap_or(None)
    }

    /// The last query's error, taken (each is told once).
    pub fn take_error(&self) -> Option<String> {
        self.shared.lock().ok().and_then(|mut k| k.error.take())
    }
}

impl Known {
    /// One query: the new state from the old end, and the answer.
    fn ask(job: &SlurmJob, old: Option<Instant>) -> (Known, Result<Option<Duration>, String>) {
        let asked_at = Instant::now();
        let answer = job.time_left();
        let known = match &answer {
            // Counted from before the question: the end is never thought later than it is.
            Ok(left) => Known {
                end: left.map(|l| asked_at + l),
                error: None,
                first_left: None,
            },
            Err(e) => Known {
                end: old,
                error: Some(e.clone()),
                first_left: None,
            },
        };
        (known, answer)
    }
}

/// How long to wait before asking again, with `left` to go: often enough near the end to
/// see a changed limit in time, rarely far from it.
fn next_query(left: Option<Duration>) -> Duration {
    match left {
        Some(left) => (left / 8).clamp(Duration::from_secs(5), Duration::from_secs(300)),
        None => Duration::from_secs(300),
    }
}

/// Keeps the time left at the first answer that told one, for [`EndTime::lead`]'s cap.
fn remember_first_left(k: &mut Known) {
    if k.first_left.is_none() {
        k.first_left = k.end.map(|e| e.saturating_duration_since(Instant::now()));
    }
}

/// How long the supervisor waits for squeue's first answer before it starts the program.
const FIRST_ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// The background thread: asks at once (the answer goes to `first` too), then again and
/// again until the [`EndTime`] is dropped.
fn refresh(
    job: &SlurmJob,
    shared: &Weak<Mutex<Known>>,
    first: std::sync::mpsc::Sender<Result<Option<Duration>, String>>,
) {
    let (known, answer) = Known::ask(job, None);
    let Some(strong) = shared.upgrade() else {
        return;
    };
    if let Ok(mut k) = strong.lock() {
        *k = known;
        remember_first_left(&mut k);
    }
    drop(strong);
    // Told with the start when it comes in time (the error is then taken, not told twice);
    // else the watch loop tells it.
    let _ = first.send(answer);
    loop {
        let left = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let end = shared.lock().map(|k| k.end).unwrap_or(None);
            end.map(|e| e.saturating_duration_since(Instant::now()))
        };
        // Sleeps in short steps so that the thread ends soon after its owner.
        let wake = Instant::now() + next_query(left);
        while Instant::now() < wake {
            if shared.strong_count() == 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let old = shared.lock().map(|k| k.end).unwrap_or(None);
        let (known, _) = Known::ask(job, old);
        if let Ok(mut k) = shared.lock() {
            let first_left = k.first_left;
            *k = known;
            k.first_left = first_left;
            remember_first_left(&mut k);
        }
    }
}

/// How long before the job's end its final snapshot is asked for: the margin plus twice the
/// slowest of the recent snapshots (from the request to durable, and off the node with durable
/// tiers), so that a snapshot a little slower than the last ones still makes it.
pub fn lead(margin: Duration, recent_ms: &[u64]) -> Duration {
    let slowest = recent_ms.iter().copied().max().unwrap_or(0);
    margin + Duration::from_millis(slowest.saturating_mul(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_left_in_every_form_squeue_prints() {
        let s = |n| Ok(Some(Duration::from_secs(n)));
        assert_eq!(parse_time_left("0:45"), s(45));
        assert_eq!(parse_time_left("59:59"), s(3599));
        assert_eq!(parse_time_left("1:00:05"), s(3605));
        assert_eq!(
            parse_time_left("2-03:04:05"),
            s(2 * 86400 + 3 * 3600 + 4 * 60 + 5)
        );
        assert_eq!(parse_time_left("UNLIMITED"), Ok(None));
        assert_eq!(parse_time_left("NOT_SET"), Ok(None));
        for bad in ["", "INVALID", "12", "1:2:3:4", "a:b", "1:75", "-1:00", "1-"] {
            assert!(parse_time_left(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn requeue_signal_names() {
        assert_eq!(parse_requeue_signal("USR2"), Ok(Signal::SIGUSR2));
        assert_eq!(parse_requeue_signal("sigurg"), Ok(Signal::SIGURG));
        assert_eq!(parse_requeue_signal("USR1"), Ok(Signal::SIGUSR1));
        for bad in ["TERM", "INT", "HUP", "KILL", "CHLD", "NOPE", ""] {
            assert!(parse_requeue_signal(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_lead_grows_with_the_slowest_recent_snapshot() {
        let margin = Duration::from_secs(60);
        assert_eq!(lead(margin, &[]), margin);
        assert_eq!(lead(margin, &[100, 4000, 250]), Duration::from_secs(68));
    }

    #[test]
    fn queries_come_more_often_near_the_end() {
        assert_eq!(next_query(None), Duration::from_secs(300));
        assert_eq!(
            next_query(Some(Duration::from_secs(86400))),
            Duration::from_secs(300)
        );
        assert_eq!(
            next_query(Some(Duration::from_secs(400))),
            Duration::from_secs(50)
        );
        assert_eq!(
            next_query(Some(Duration::from_secs(10))),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn a_job_from_the_environment_is_checked() {
        let job = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            SlurmJob::from_vars(move |name| {
                vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
            })
        };
        assert_eq!(job(&[]), Ok(None));
        assert_eq!(
            job(&[("SLURM_JOB_ID", "4242")]),
            Ok(Some(SlurmJob {
                id: "4242".into(),
                restart_count: 0
            }))
        );
        let again = job(&[("SLURM_JOB_ID", "7_3"), ("SLURM_RESTART_COUNT", "3")]);
        assert_eq!(again.map(|j| j.map(|j| j.restart_count)), Ok(Some(3)));
        assert!(job(&[("SLURM_JOB_ID", "7"), ("SLURM_RESTART_COUNT", "x")]).is_err());
        assert!(job(&[("SLURM_JOB_ID", "--all")]).is_err());
        assert!(job(&[("SLURM_JOB_ID", "")]).is_err());
    }
}
