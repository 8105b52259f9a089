//! The exit codes of the supervisor and of a supervised program: one home for the numbers the
//! two sides, scripts and batch systems read, each with its meaning.

/// The job finished: the command exited with code 0, or it completed while this supervisor
/// waited for it (`--wait`).
pub const SUCCESS: i32 = 0;

/// An error: a bad store, a bad job name, a command that cannot be started, ...
pub const ERROR: i32 = 1;

/// A bad command line.
pub const USAGE: i32 = 2;

/// The supervisor gave up: too many failures without progress, a configuration error (the
/// program failed at once several times before reaching the shim), or the program's entries
/// do not fit the snapshot.
pub const GAVE_UP: i32 = 3;

/// The job is held by another supervisor, or by the program a lost one started (without
/// `--wait`).
pub const HELD: i32 = 4;

/// `supervise verify` found damage.
pub const DAMAGED: i32 = 5;

/// Stopped by SIGINT/SIGTERM after a final snapshot that is on the local tier only: it did
/// not reach every durable tier (`--store s3://...`, several directories) within
/// `--stop-timeout`. Running the command again on this node resumes from it; on another node,
/// from the newest snapshot that did reach them.
pub const STOPPED_NOT_OFF_NODE: i32 = 6;

/// The job's lease on its durable tier was lost (another supervisor took it over, or it could
/// not be renewed in time): the program was stopped so that two copies never run.
pub const LEASE_LOST: i32 = 7;

/// A supervised program that stopped on request (supervisor stop, SIGTERM, or supervisor
/// lost) after its final snapshot: the job is not finished and can be resumed. Also the
/// supervisor's, in file mode, when the code stopped by itself after a checkpoint (a SIGTERM
/// sent to it directly, `mdrun -maxh`).
/// And the supervisor's in a Slurm job stopped before its end to be requeued.
pub const STOPPED: i32 = 75;

/// The supervisor's exit code when it was stopped by `signal` (SIGINT, SIGTERM) after a final
/// snapshot: 128 plus the signal number, as a shell reports it.
pub const fn stopped_by(signal: i32) -> i32 {
    128 + signal
}

/// The supervisor's exit codes with their meanings, in order, for its help text: (codes as
/// shown, meaning).
pub const SUPERVISOR: &[(&str, &str)] = &[
    (
        "0",
        "the command finished with exit code 0 (the job is complete), or it completed \
         while this supervisor waited for it (--wait)",
    ),
    (
        "1",
        "error: bad store, bad job name, command cannot be started, ...",
    ),
    ("2", "bad command line"),
    (
        "3",
        "gave up: the command failed more than --max-restarts times within \
         --restart-window without making progress (a restart after a new snapshot resets \
         the count), or a configuration error: it failed at once 3 times in a row before \
         reaching the shim (its last stderr lines are shown), or its entries do not fit the \
         snapshot",
    ),
    (
        "4",
        "the job is held by another supervisor, or by the program a lost one started \
         (without --wait)",
    ),
    ("5", "verify found damage (`supervise verify`)"),
    (
        "6",
        "stopped by SIGINT/SIGTERM after a final snapshot that did not reach every durable \
         tier within --stop-timeout (it is in the local cache)",
    ),
    (
        "7",
        "the job's lease on its durable tier was lost (taken over, or not renewed in time): \
         the program was stopped so that two copies never run",
    ),
    (
        "75",
        "file mode: the code stopped by itself after a checkpoint (a SIGTERM sent to it \
         directly, as batch systems do, or a limit of its own such as mdrun -maxh); run the \
         same command to resume. In a Slurm job: stopped before the job's end after a final \
         snapshot, and the job requeued (or not, said why: --max-requeues, no snapshot \
         taken, scontrol failed)",
    ),
    (
        "130/143",
        "stopped by SIGINT/SIGTERM after a final snapshot; run the same command to resume",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_help_table_lists_every_supervisor_code_once() {
        let shown: Vec<&str> = SUPERVISOR.iter().map(|(codes, _)| *codes).collect();
        let codes = [
            SUCCESS,
            ERROR,
            USAGE,
            GAVE_UP,
            HELD,
            DAMAGED,
            STOPPED_NOT_OFF_NODE,
            LEASE_LOST,
            STOPPED,
        ]
        .map(|c| c.to_string());
        for code in &codes {
            assert_eq!(shown.iter().filter(|s| *s == code).count(), 1, "{code}");
        }
        let stops = format!("{}/{}", stopped_by(2), stopped_by(15));
        assert!(shown.contains(&stops.as_str()), "{shown:?}");
    }
}
