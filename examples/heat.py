"""Heat diffusion on an N x N grid with numpy, made restartable with the supervise shim: the
same physics and the same checksum as examples/heat.rs.

    pip install ./shim/python blake3
    supervise --every 30s -- python examples/heat.py --n 2048 --steps 5400

The grid lives in memory the shim owns (`shim.array`), so a snapshot copies only what changed
since the last one, without stopping the loop for the rest; the step is a JSON value beside
it. Killed and started again (by supervise, or by running the same command again), it resumes
from its newest snapshot and prints the checksum an uninterrupted run prints: blake3 of the
final grid's bytes.
"""

import argparse
import sys
import time

import blake3
import numpy as np

import supervise


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048, help="grid size (at least 3)")
    parser.add_argument("--steps", type=int, default=5400, help="steps to compute")
    parser.add_argument(
        "--step-ms", type=float, default=0, help="sleep this long after each step (tests)"
    )
    args = parser.parse_args()
    n, steps, alpha = args.n, args.steps, 0.2
    if n < 3:
        parser.error("--n must be at least 3")

    # 1. Start the shim: under supervise this restores the newest complete snapshot.
    shim = supervise.init()
    grid = shim.array("grid", (n, n), np.float64)
    params = shim.load("params")
    if params is None:
        grid[0, :] = 100.0
        step = 0
    elif params["n"] != n:
        sys.exit(f"heat.py: the snapshot is for --n {params['n']}, not --n {n}")
    else:
        step = params["step"]
    if shim.resumed_from is not None:
        print(f"heat.py: resumed from snapshot {shim.resumed_from} at step {step}", file=sys.stderr)

    nxt = grid.copy()
    while step < steps:
        mid = grid[1:-1, 1:-1]
        # The order of heat.rs's sum, so that the result is the same to the bit.
        nxt[1:-1, 1:-1] = mid + alpha * (
            grid[:-2, 1:-1] + grid[2:, 1:-1] + grid[1:-1, :-2] + grid[1:-1, 2:] - 4.0 * mid
        )
        # In place: `grid` stays the array the shim snapshots.
        grid[...] = nxt
        step += 1
        if args.step_ms:
            time.sleep(args.step_ms / 1000)
        # 2. At a safe point: one atomic load unless a snapshot is due.
        if shim.due():
            values = {"params": {"n": n, "steps": steps, "step": step}}
            if shim.snapshot(tag=f"step {step}", values=values):
                # Asked to stop: the final snapshot is taken.
                sys.exit(shim.stopped())
    shim.finish()
    print(f"checksum {blake3.blake3(grid.tobytes()).hexdigest()}")


if __name__ == "__main__":
    main()
