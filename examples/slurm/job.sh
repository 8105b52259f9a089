#!/bin/bash
# A Slurm batch script for a simulation that needs longer than its time limit. Two lines make
# it one (marked below): --requeue, and `exec supervise ... --` before the command.
#
#   sbatch examples/slurm/job.sh
#
# What happens: supervise reads the job's end time from squeue and asks the program for a
# final snapshot early enough before it (--requeue-margin, 1m by default, plus twice the
# slowest recent snapshot); once the snapshot is durable it stops the program and requeues
# the job (`scontrol requeue`: Slurm does not requeue a job that reached its time limit by
# itself, even with --requeue). The requeued job runs this script again, and the same
# command resumes from that snapshot. `supervise log` shows each run with its
# SLURM_RESTART_COUNT; --max-requeues (20) bounds the loop.
#
#SBATCH --job-name=heat
#SBATCH --time=02:00:00
#SBATCH --output=heat-%j.out
# A requeued run appends to the output instead of truncating it.
#SBATCH --open-mode=append
# Line 1 of 2: the job may be requeued.
#SBATCH --requeue
# Optional: Slurm also signals the batch shell 5 minutes before the limit (and at a
# preemption, with PreemptParameters=send_user_signal). USR2, not USR1: NCCL and other
# libraries catch USR1, and USR1 asks supervise for an ordinary snapshot. B: sends it to the
# batch shell only, which is supervise thanks to `exec`.
#SBATCH --signal=B:USR2@300

# The store must outlive the node when the requeued job may run on another: a shared file
# system, or an S3 bucket (--store s3://bucket/prefix with a node-local --cache).
store=${SUPERVISE_STORE:-$HOME/supervise-store}

# Line 2 of 2: run the command under supervise (exec: Slurm's signals reach it).
exec supervise --store "$store" --every 10m -- ./heat --n 2048 --steps 5400
