"""The cost of `shim.due()` when nothing is due (issue 16's target: under 100 ns), side by side
with the loop alone and with a call of a built-in method that does nothing much, in one run.
A benchmark, not a test: run it on a quiet machine and compare the columns.

    SUPERVISE_STORE=$(mktemp -d) SUPERVISE_EVERY=1h python shim/python/bench/due.py [--calls N]
"""

import argparse
import json
import timeit

import supervise


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2_000_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    shim = supervise.init("bench-due")
    due = shim.due
    assert not due(), "a snapshot is due: run with SUPERVISE_EVERY=1h"
    n = 7
    cases = {
        "loop alone": ("for _ in r: pass", None),
        "int.bit_length()": ("for _ in r: f()", n.bit_length),
        "lambda: None": ("for _ in r: f()", lambda: None),
        "shim.due()": ("for _ in r: f()", due),
    }
    ns = {}
    for name, (loop, call) in cases.items():
        best = min(
            timeit.repeat(loop, globals={"r": range(args.calls), "f": call},
                          number=1, repeat=args.repeat)
        )
        ns[name] = best / args.calls * 1e9
    shim.finish()
    base = ns["loop alone"]
    for name, v in ns.items():
        extra = "" if name == "loop alone" else f", {v - base:5.1f} ns over the loop alone"
        print(f"{name:>18}: {v:5.1f} ns per iteration{extra} (best of {args.repeat} x {args.calls})")
    print(json.dumps({k: round(v - base, 2) for k, v in ns.items() if k != "loop alone"}))


if __name__ == "__main__":
    main()
