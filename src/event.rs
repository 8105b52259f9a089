//! What the supervisor tells about a job, as typed events: each has a kind (`spawned`, `died`,
//! `snapshot`, ...), fields, and one English sentence. [`crate::log::Log`] prints the sentence
//! and appends kind, sentence and fields to the job's history, where `supervise log --json`
//! and tests read them.

use std::fmt;

use serde::Serialize;

use crate::child::Ended;
use crate::human;
use supervise_store::clock::millis;
use supervise_store::control::MismatchDetail;

/// How a job's run (one supervisor's) ended: the `end` record's `outcome`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The command finished with exit code 0.
    Finished,
    /// Stopped by a signal to the supervisor; run the command again to resume.
    Stopped,
    /// Too many failures without progress.
    GaveUp,
    /// The program failed at once, several times, before it reached the shim (or, from a
    /// fresh start, before its first snapshot), or its entries do not fit the snapshot: a
    /// configuration error (wrong path, arguments, missing library, a script's error after
    /// `init`), not a crash to recover from.
    ConfigError,
    /// The job had completed (while this supervisor waited for it, or before).
    AlreadyDone,
    /// The job's lease on its durable tier was lost; the program was stopped.
    LeaseLost,
    /// The batch job was about to end: the program stopped after a final snapshot and the
    /// job was put back in the queue, to resume from it.
    Requeued,
}

/// Why a batch job was not requeued.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum NotRequeuedReason {
    /// `SLURM_RESTART_COUNT` reached `--max-requeues`.
    MaxRequeues,
    /// The run took no snapshot: a requeued run would start where it did.
    NoSnapshot,
    /// `scontrol requeue` failed.
    ScontrolFailed,
}

/// Where a life of the program starts.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct From(pub Option<u64>);

impl fmt::Display for From {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(seq) => write!(f, "from snapshot {seq}"),
            None => f.write_str("fresh start"),
        }
    }
}

/// The job's totals when it ends: from the first start of the job (across supervisors, as the
/// history tells) to now.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Totals {
    /// From the job's first start to its end.
    pub elapsed_ms: u64,
    /// Lives of the program (spawns), in every run of the job.
    pub lives: u64,
    /// Restarts after a failure (spawns that were not the first of a supervisor).
    pub restarts: u64,
    /// Supervisors that ran the job (reruns after a stop or a loss count).
    pub runs: u64,
    /// Time the restarts cost: each failed life's time since its last snapshot (the work
    /// redone) plus the waits before restarting.
    pub lost_ms: u64,
}

impl fmt::Display for Totals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} since the job first started, {} {}, {} {}",
            human::duration(std::time::Duration::from_millis(self.elapsed_ms)),
            self.runs,
            if self.runs == 1 { "run" } else { "runs" },
            self.restarts,
            if self.restarts == 1 {
                "restart"
            } else {
                "restarts"
            },
        )?;
        if self.restarts > 0 {
            write!(
                f,
                ", about {} lost to restarts",
                human::duration(std::time::Duration::from_millis(self.lost_ms))
            )?;
        }
        Ok(())
    }
}

/// One event of a job.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum JobEvent {
    /// A supervisor took the job and starts running it.
    Start {
        /// The supervisor's pid.
        supervisor_pid: u32,
        /// The command line.
        command: String,
    },
    /// The supervisor's run of the job ended (always the last record of a run).
    End {
        /// How.
        outcome: Outcome,
        /// The exit code the supervisor returns.
        exit_code: i32,
        /// The whole sentence (it depends on the outcome).
        detail: String,
        /// The job's totals, when it finished.
        #[serde(skip_serializing_if = "Option::is_none")]
        totals: Option<Totals>,
    },
    /// Another supervisor holds the job; this one exits (or waits, with --wait).
    Held {
        /// Who holds it.
        holder: String,
        /// This supervisor waits for it.
        waiting: bool,
    },
    /// The program was started.
    Spawned {
        /// Its pid.
        pid: u32,
        /// The snapshot it restores, if any.
        from: From,
    },
    /// The program ended without being asked to.
    Died {
        /// How (`exit code N` or `signal NAME (N)`).
        how: String,
        /// How long it ran.
        after_ms: u64,
        /// It had connected to the shim.
        shim: bool,
    },
    /// It will be started again.
    Restarting {
        /// After this delay.
        delay_ms: u64,
        /// From this snapshot.
        from: From,
    },
    /// A snapshot is skipped from now on: the deaths after restoring it point at it.
    Suspect {
        /// The snapshot.
        seq: u64,
        /// The evidence.
        why: String,
        /// --rollback-after.
        rollback_after: u32,
        /// Where the next life starts.
        back_to: From,
    },
    /// A snapshot became durable.
    Snapshot {
        /// Its number.
        seq: u64,
        /// The program's tag.
        #[serde(skip_serializing_if = "Option::is_none")]
        tag: Option<String>,
        /// The state's size.
        bytes_total: u64,
        /// Bytes of chunks not stored before.
        bytes_new: u64,
        /// Bytes written (compressed), compaction included.
        bytes_written: u64,
        /// Bytes of live chunks moved out of mostly dead packs.
        bytes_compacted: u64,
        /// From the request to durable.
        duration_ms: u64,
        /// How long the program was paused for it (0: not measured).
        pause_us: u64,
        /// CPU time its writer took while the program computed on (0: not measured).
        writer_cpu_us: u64,
    },
    /// A snapshot could not be taken; earlier ones are intact.
    SnapshotFailed {
        /// Why.
        error: String,
    },
    /// The program could not be asked for a snapshot: it has not initialised the shim.
    NoSnapshotWithoutShim,
    /// The program ran for a while and never initialised the shim: nothing can be snapshotted.
    NoShim {
        /// How long it has run without the shim.
        after_ms: u64,
        /// --hang-timeout was given (and cannot work without the shim).
        hang_timeout: bool,
    },
    /// Something the shim could not do as asked, which does not stop the program (e.g. no
    /// dirty-page tracking here, retention failed after a durable snapshot).
    ShimWarning {
        /// What it is about.
        warning: supervise_store::control::WarningKind,
        /// The shim's words for it.
        message: String,
    },
    /// The shim found a damaged snapshot at start and set it aside.
    SnapshotSetAside {
        /// The snapshot.
        seq: u64,
        /// What is wrong with it.
        why: String,
    },
    /// The scrub found damaged records.
    RecordsDamaged {
        /// What was found, where.
        found: String,
        /// Why they are damaged.
        why: String,
        /// Snapshots set aside because they use them.
        set_aside: Vec<u64>,
    },
    /// The program restored another snapshot than the one the supervisor expected.
    ResumedInstead {
        /// What it restored.
        from: From,
    },
    /// The snapshot to restore was taken by another program, build or argument list than the
    /// one now run (a rebuilt program is normal: it resumes anyway).
    OriginChanged {
        /// The snapshot.
        seq: u64,
        /// What differs: `executable` (same path, other contents), `program` (another path),
        /// `arguments`.
        changed: Vec<String>,
        /// The program now run.
        program: String,
    },
    /// The program's entries do not fit the snapshot (its parameters changed).
    RestoreMismatch {
        /// The snapshot.
        seq: u64,
        /// The entry.
        entry: String,
        /// Its size in the snapshot.
        stored_bytes: u64,
        /// The size the program asked for.
        wanted_bytes: u64,
        /// What differs when the sizes do not say it: an array's shape or the element type.
        #[serde(skip_serializing_if = "Option::is_none")]
        detail: Option<MismatchDetail>,
    },
    /// `--every auto` chose a new interval, and from what.
    Interval(crate::interval::Choice),
    /// The program reached no safe point for --hang-timeout.
    Hung {
        /// --hang-timeout.
        timeout_ms: u64,
    },
    /// Escalating a stop: a signal sent to the program's process group.
    Signalled {
        /// The signal.
        signal: String,
        /// Why.
        why: String,
    },
    /// The supervisor was told to stop: it asks for a final snapshot, then stops the program.
    Stopping {
        /// The signal the supervisor got, or `end-time` (its batch job ends soon).
        signal: String,
        /// The batch job is requeued after the final snapshot.
        requeue: bool,
        /// The program uses the shim (a final snapshot is asked for).
        shim: bool,
        /// How long it waits.
        timeout_ms: u64,
    },
    /// The supervisor runs inside a Slurm batch job: how it keeps the job from being lost to
    /// its time limit or a preemption.
    Slurm {
        /// `SLURM_JOB_ID`.
        job_id: String,
        /// `SLURM_RESTART_COUNT`: requeues before this run.
        restart_count: u32,
        /// The signal that means "the job ends soon" (`--requeue-signal`).
        requeue_signal: String,
        /// Time left to the job's end, if it has one and squeue said.
        #[serde(skip_serializing_if = "Option::is_none")]
        ends_in_ms: Option<u64>,
        /// How long before the end its final snapshot is asked for, at first.
        lead_ms: u64,
        /// Why the end time is not known, if squeue failed.
        #[serde(skip_serializing_if = "Option::is_none")]
        unknown: Option<String>,
    },
    /// The job's end time could not be read (the one known before, if any, stays in use).
    SlurmEndUnknown {
        /// Why.
        error: String,
    },
    /// The batch job was put back in the queue after the final snapshot.
    Requeued {
        /// `SLURM_JOB_ID`.
        job_id: String,
        /// The `SLURM_RESTART_COUNT` its next run will have.
        restart_count: u32,
        /// The snapshot it resumes from.
        from: From,
    },
    /// The batch job was not requeued after its final snapshot.
    NotRequeued {
        /// `SLURM_JOB_ID`.
        job_id: String,
        /// Why, as a kind.
        reason: NotRequeuedReason,
        /// Why, in words (with scontrol's error when it failed).
        why: String,
    },
    /// How this run starts, decided from the options and the job's history.
    Resume {
        /// Why this start (`from`, `fresh`, `after-loss`).
        reason: String,
        /// The sentence.
        detail: String,
    },
    /// The job's history had damaged lines, skipped.
    HistoryDamaged {
        /// The sentence.
        detail: String,
    },
    /// The command runs a code with a preset, without it: restarts would start from scratch.
    PresetHint {
        /// The preset (`gromacs`, `lammps`).
        preset: String,
    },
    /// A job of many ranks (MPI): where its ranks join, and that its snapshots are epochs.
    Ranks {
        /// The endpoint (`unix:/path` or `tcp:host:port`).
        endpoint: String,
        /// Why ranks are expected (`--mpi`, `--rank-endpoint`, or the launcher's name).
        because: String,
    },
    /// A job of many ranks is started from an epoch: each rank restores its part, and goes on
    /// from the safe point every rank captured at.
    EpochResumed {
        /// The epoch.
        epoch: u64,
        /// The safe point (counted from the job's start) the parts were captured at.
        step: u64,
        /// How many ranks it has.
        ranks: u32,
        /// Rank 0's tag.
        #[serde(skip_serializing_if = "Option::is_none")]
        tag: Option<String>,
    },
    /// Ranks of a life that ended were still there after the grace period: killed, so that
    /// no rank outlives its life.
    RanksKilled {
        /// The ranks.
        ranks: Vec<u32>,
    },
    /// File mode: the program writes its own checkpoint files, which the supervisor captures.
    FileMode {
        /// The preset (`gromacs`, `lammps`), if any.
        #[serde(skip_serializing_if = "Option::is_none")]
        preset: Option<String>,
        /// The checkpoint file patterns.
        checkpoints: String,
        /// How a stop is asked for.
        stop: String,
        /// Things the user should know (a missing -reprod, an option without effect).
        advice: Vec<String>,
    },
    /// File mode: a life starts from a stored checkpoint, put back in the run directory.
    CheckpointResumed {
        /// The snapshot.
        seq: u64,
        /// The code's step in it, when known.
        #[serde(skip_serializing_if = "Option::is_none")]
        step: Option<u64>,
        /// The checkpoint file.
        checkpoint: String,
        /// Files written anew (missing or different in the run directory).
        written: Vec<String>,
        /// Files cut back to their stored length (they had grown past it).
        cut: Vec<String>,
    },
    /// File mode: the first checkpoint after a resume is not past the one put back: the code
    /// did not resume from it (it started over).
    ResumeIgnored {
        /// The step put back.
        resumed_step: u64,
        /// The step of the code's first checkpoint after it.
        step: u64,
    },
    /// File mode: a checkpoint file that is not complete or valid was not stored.
    CheckpointRefused {
        /// The file, relative to the run directory.
        path: String,
        /// Why.
        why: String,
    },
    /// This supervisor holds the job's lease on its durable tier.
    LeaseTaken {
        /// The tier the lease lives on.
        tier: String,
        /// Its generation: every snapshot published under it carries it.
        generation: u64,
        /// Its time-to-live (`--lease-ttl`).
        ttl_ms: u64,
    },
    /// The lease was lost: the program is stopped so that two copies never run.
    LeaseLost {
        /// The tier.
        tier: String,
        /// Why (taken over by whom, or not renewed in time).
        why: String,
    },
    /// A snapshot newer than the local tier's was brought in from a durable tier.
    Fetched {
        /// Its number.
        seq: u64,
        /// The lease generation it was published under.
        generation: u64,
        /// The tier its manifest came from.
        tier: String,
        /// Bytes copied.
        bytes: u64,
        /// Packs copied.
        packs: u64,
        /// How long it took.
        duration_ms: u64,
    },
    /// A durable tier could not be read, or a snapshot on it was passed over (damaged,
    /// incomplete).
    TierTrouble {
        /// The tier.
        tier: String,
        /// The snapshot concerned, if any.
        #[serde(skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
        /// What went wrong.
        why: String,
    },
    /// A snapshot is on a durable tier: its manifest is published and names nothing missing.
    SafeOffNode {
        /// Its number.
        seq: u64,
        /// The tier.
        tier: String,
        /// Bytes sent for it.
        bytes_sent: u64,
        /// From the start of its upload to the manifest's publication.
        duration_ms: u64,
    },
    /// Copying a snapshot to a durable tier failed; it is retried.
    UploadFailed {
        /// The snapshot.
        seq: u64,
        /// The tier.
        tier: String,
        /// Why.
        error: String,
        /// When the next attempt is made (sooner when a new snapshot arrives).
        retry_in_ms: u64,
    },
}

impl JobEvent {
    /// The record's kind (`spawned`, `died`, ...), as `supervise log --kind` filters it.
    pub fn kind(&self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(str::to_owned))
            .unwrap_or_else(|| "event".to_owned())
    }

    /// Shown even with `-q`: the job's start and end, and what stops it from running.
    pub fn always_shown(&self) -> bool {
        matches!(
            self,
            JobEvent::Start { .. }
                | JobEvent::End { .. }
                | JobEvent::Held { .. }
                | JobEvent::LeaseLost { .. }
        )
    }

    /// A died event.
    pub fn died(how: Ended, after: std::time::Duration, shim: bool) -> Self {
        JobEvent::Died {
            how: how.to_string(),
            after_ms: millis(after),
            shim,
        }
    }
}

impl fmt::Display for JobEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use std::time::Duration;
        let dur = |ms: u64| human::duration(Duration::from_millis(ms));
        match self {
            JobEvent::Start {
                supervisor_pid,
                command,
            } => write!(f, "supervisor pid {supervisor_pid} started: {command}"),
            JobEvent::End { detail, .. } => f.write_str(detail),
            JobEvent::Held { holder, waiting } => {
                if *waiting {
                    write!(f, "--wait: job held by {holder}; waiting for it to end")
                } else {
                    write!(
                        f,
                        "the job is already running: {holder}. Two copies of one job must \
                         never run; wait for it with --wait, or stop it first"
                    )
                }
            }
            JobEvent::Spawned { pid, from } => write!(f, "spawned pid {pid} ({from})"),
            JobEvent::Died { how, after_ms, .. } => {
                write!(f, "child died: {how} after {}", dur(*after_ms))
            }
            JobEvent::Restarting { delay_ms, from } => {
                write!(f, "restarting in {} ({from})", dur(*delay_ms))
            }
            JobEvent::Suspect {
                seq,
                why,
                rollback_after,
                back_to,
            } => {
                let back = match back_to.0 {
                    Some(b) => format!("snapshot {b}"),
                    None => "a fresh start (no older snapshot)".into(),
                };
                write!(
                    f,
                    "snapshot {seq} is suspect: {why} (--rollback-after {rollback_after}); going \
                     back to {back} (retention keeps snapshot {seq} until a newer good one exists)"
                )
            }
            JobEvent::Snapshot {
                seq,
                tag,
                bytes_total,
                bytes_new,
                bytes_written,
                bytes_compacted,
                duration_ms,
                ..
            } => {
                let tag = tag.as_ref().map(|t| format!(" [{t}]")).unwrap_or_default();
                let compacted = match bytes_compacted {
                    0 => String::new(),
                    n => format!(" (+{} compacted)", human::bytes(*n)),
                };
                write!(
                    f,
                    "snapshot {seq} done{tag}: {} total, {} new{compacted}, {} written, {duration_ms} ms",
                    human::bytes(*bytes_total),
                    human::bytes(*bytes_new),
                    human::bytes(*bytes_written),
                )
            }
            JobEvent::SnapshotFailed { error } => {
                write!(f, "snapshot failed: {error} (earlier snapshots are intact)")
            }
            JobEvent::NoSnapshotWithoutShim => {
                f.write_str("cannot take a snapshot: the program has not initialised the shim")
            }
            JobEvent::NoShim {
                after_ms,
                hang_timeout,
            } => {
                write!(
                    f,
                    "the program has run {} without initialising the supervise shim: it cannot be \
                     snapshotted, and a restart starts it from scratch. Link the shim (README: \
                     \"Use it from Rust\", \"Use it from C\", \"Use it from Python\": `import \
                     supervise`) so that it resumes where it was; \
                     a code that writes its own checkpoint files (GROMACS, LAMMPS, ...) is run \
                     with --preset or --checkpoint (README: \"Codes you cannot relink\")",
                    dur(*after_ms)
                )?;
                if *hang_timeout {
                    f.write_str(
                        "; --hang-timeout needs the shim's safe points and does nothing for it",
                    )?;
                }
                Ok(())
            }
            JobEvent::ShimWarning { message, .. } => write!(f, "shim: {message}"),
            JobEvent::SnapshotSetAside { seq, why } => {
                write!(f, "snapshot {seq} is damaged and was set aside: {why}")
            }
            JobEvent::RecordsDamaged {
                found,
                why,
                set_aside,
            } => write!(
                f,
                "scrub: damaged records: {found} ({why}); snapshots {set_aside:?} use them and \
                 were set aside; the next snapshot stores fresh copies (supervise verify --repair \
                 mends older ones where a good copy exists)"
            ),
            JobEvent::ResumedInstead { from } => write!(f, "child resumed {from} instead"),
            JobEvent::OriginChanged {
                seq,
                changed,
                program,
            } => {
                let what: Vec<&str> = changed
                    .iter()
                    .map(|c| match c.as_str() {
                        "executable" => "the executable was rebuilt or replaced",
                        "program" => "it was taken by another program",
                        _ => "the arguments differ",
                    })
                    .collect();
                write!(
                    f,
                    "snapshot {seq} was not taken by this {program}: {}; resuming from it anyway",
                    what.join(", ")
                )
            }
            JobEvent::RestoreMismatch {
                seq,
                entry,
                stored_bytes,
                wanted_bytes,
                detail,
            } => {
                match detail {
                    Some(detail) => write!(f, "entry {entry:?} of snapshot {seq}: {detail}")?,
                    None => write!(
                        f,
                        "entry {entry:?} of snapshot {seq} holds {stored_bytes} bytes but the \
                         program asks for {wanted_bytes}"
                    )?,
                }
                write!(
                    f,
                    ": its parameters changed since the snapshot. Run with --fresh to start \
                     over, or with the parameters the snapshot was taken with (`supervise show \
                     {seq}`); the snapshot is not damaged"
                )
            }
            JobEvent::Interval(c) => {
                let cost = match c.cost_us {
                    us if us < 10_000 => format!("{:.1} ms", us as f64 / 1000.0),
                    us => dur(us / 1000),
                };
                write!(
                    f,
                    "--every auto: a snapshot every {} ({}; each costs the program {cost}, \
                     failures expected every {} from {} seen)",
                    dur(c.every_ms),
                    c.why.describe(),
                    dur(c.mtbf_s.saturating_mul(1000)),
                    c.failures
                )
            }
            JobEvent::Hung { timeout_ms } => write!(
                f,
                "the program reached no safe point for {} (--hang-timeout): asking for a \
                 snapshot, then stopping it",
                dur(*timeout_ms)
            ),
            JobEvent::Signalled { signal, why } => write!(f, "{why}: sending {signal}"),
            JobEvent::Stopping {
                signal,
                requeue,
                shim,
                timeout_ms,
            } => {
                let (why, then) = match (signal.as_str(), requeue) {
                    ("end-time", _) => ("the batch job ends soon".to_owned(), ", then requeueing"),
                    (_, true) => (
                        format!("{signal} (the batch job ends soon)"),
                        ", then requeueing",
                    ),
                    _ => (signal.clone(), ""),
                };
                if *shim {
                    write!(
                        f,
                        "{why}: asking for a final snapshot, then stopping{then} (up to {})",
                        dur(*timeout_ms)
                    )
                } else {
                    write!(
                        f,
                        "{why}: the program has no shim connected; sending it SIGTERM"
                    )
                }
            }
            JobEvent::Slurm {
                job_id,
                restart_count,
                requeue_signal,
                ends_in_ms,
                lead_ms,
                unknown,
            } => {
                write!(f, "Slurm job {job_id}")?;
                if *restart_count > 0 {
                    write!(f, " (requeued {restart_count} times before)")?;
                }
                write!(f, ": on {requeue_signal}")?;
                match (ends_in_ms, unknown) {
                    (Some(left), _) => write!(
                        f,
                        ", or {} before its end (in {}), ",
                        dur(*lead_ms),
                        dur(*left)
                    )?,
                    (None, Some(why)) => write!(f, " (its end time is not known: {why}), ")?,
                    (None, None) => f.write_str(" (it has no time limit), ")?,
                }
                f.write_str("it takes a final snapshot and requeues the job")
            }
            JobEvent::SlurmEndUnknown { error } => write!(
                f,
                "cannot read the Slurm job's end time ({error}): the one known before stays in use"
            ),
            JobEvent::Requeued {
                job_id,
                restart_count,
                from,
            } => write!(
                f,
                "Slurm job {job_id} requeued: its next run (SLURM_RESTART_COUNT={restart_count}) \
                 resumes {from}"
            ),
            JobEvent::NotRequeued { job_id, why, .. } => {
                write!(f, "Slurm job {job_id} not requeued: {why}")
            }
            JobEvent::Resume { detail, .. } | JobEvent::HistoryDamaged { detail } => {
                f.write_str(detail)
            }
            JobEvent::PresetHint { preset } => write!(
                f,
                "this runs {preset}, which does not use the supervise shim: without file mode a \
                 restart starts it from scratch. It writes checkpoint files of its own, which \
                 supervise stores and resumes from with --preset {preset} (README: \"Codes you \
                 cannot relink\")"
            ),
            JobEvent::Ranks { endpoint, because } => write!(
                f,
                "a job of many ranks ({because}): each rank's shim joins at {endpoint}, and a \
                 snapshot is an epoch of every rank's part at the same safe point"
            ),
            JobEvent::EpochResumed {
                epoch,
                step,
                ranks,
                tag,
            } => write!(
                f,
                "resuming {ranks} ranks from epoch {epoch}, at safe point {step}{}",
                tag.as_ref().map(|t| format!(" [{t}]")).unwrap_or_default()
            ),
            JobEvent::RanksKilled { ranks } => write!(
                f,
                "ranks {ranks:?} were still running after their launcher ended: killed"
            ),
            JobEvent::FileMode {
                preset,
                checkpoints,
                stop,
                advice,
            } => {
                let preset = preset
                    .as_ref()
                    .map(|p| format!(" (--preset {p})"))
                    .unwrap_or_default();
                write!(
                    f,
                    "file mode{preset}: the program writes its own checkpoints ({checkpoints}); \
                     each complete one is stored as a snapshot, a stop is asked for by {stop}, \
                     and a restart resumes from the newest"
                )?;
                for a in advice {
                    write!(f, ". Note: {a}")?;
                }
                Ok(())
            }
            JobEvent::CheckpointResumed {
                seq,
                step,
                checkpoint,
                written,
                cut,
            } => {
                let step = step.map(|s| format!(" at step {s}")).unwrap_or_default();
                write!(
                    f,
                    "resuming from checkpoint {checkpoint}{step} (snapshot {seq})"
                )?;
                if !written.is_empty() {
                    write!(f, "; put back: {}", written.join(", "))?;
                }
                if !cut.is_empty() {
                    write!(f, "; cut back to the checkpoint: {}", cut.join(", "))?;
                }
                Ok(())
            }
            JobEvent::ResumeIgnored { resumed_step, step } => write!(
                f,
                "the program was resumed from a checkpoint at step {resumed_step} but wrote its \
                 next one at step {step}: it started over instead of resuming. Check that its \
                 resume arguments (--resume-args, --resume-command) or its input (README: \
                 \"LAMMPS\") make it read the checkpoint"
            ),
            JobEvent::CheckpointRefused { path, why } => {
                write!(f, "checkpoint file {path} not stored: {why}")
            }
            JobEvent::LeaseTaken {
                tier,
                generation,
                ttl_ms,
            } => write!(
                f,
                "holding the job's lease on {tier} (generation {generation}, renewed every {})",
                dur(ttl_ms / 3)
            ),
            JobEvent::LeaseLost { tier, why } => write!(
                f,
                "lost the job's lease on {tier}: {why}; the program is stopped so that two \
                 copies never run"
            ),
            JobEvent::Fetched {
                seq,
                generation,
                tier,
                bytes,
                packs,
                duration_ms,
            } => write!(
                f,
                "fetched snapshot {seq} (generation {generation}) from {tier}: {} in {packs} \
                 packs, every chunk verified, {}",
                human::bytes(*bytes),
                dur(*duration_ms)
            ),
            JobEvent::TierTrouble { tier, seq, why } => match seq {
                Some(seq) => write!(f, "{tier}: snapshot {seq} passed over: {why}"),
                None => write!(f, "{tier}: {why}"),
            },
            JobEvent::SafeOffNode {
                seq,
                tier,
                bytes_sent,
                duration_ms,
            } => write!(
                f,
                "snapshot {seq} safe off-node ({tier}, {} sent, {})",
                human::bytes(*bytes_sent),
                dur(*duration_ms)
            ),
            JobEvent::UploadFailed {
                seq,
                tier,
                error,
                retry_in_ms,
            } => write!(
                f,
                "snapshot {seq} not yet on {tier}: {error}; retrying in {} (snapshots go on \
                 locally)",
                dur(*retry_in_ms)
            ),
        }
    }
}
