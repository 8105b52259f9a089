"""The Python shim (shim/python, `import supervise`), end to end: examples/heat.py under the
real supervise, killed at random moments, resumes past step 0 and ends with heat.rs's
checksum; arrays come back restored; bad input is a clear error. scripts/test runs this file
with pytest from its venv after installing the package, and tells it where the binaries are
(SUPERVISE_BIN, SUPERVISE_HEAT_BIN)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import supervise

ROOT = Path(__file__).resolve().parents[2]
SUPERVISE = os.environ.get("SUPERVISE_BIN", str(ROOT / "target/debug/supervise"))
HEAT_RS = os.environ.get("SUPERVISE_HEAT_BIN", str(ROOT / "target/debug/examples/heat"))
HEAT_PY = str(ROOT / "examples/heat.py")


def clean_env(**extra):
    """The environment of a program run by a test: no supervise or batch variables of ours."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SUPERVISE_") and k not in ("SLURM_JOB_ID", "NOTIFY_SOCKET")
    }
    env.update(extra)
    return env


def reference(args):
    out = subprocess.run([HEAT_RS, *args], capture_output=True, text=True, env=clean_env(), check=True)
    return out.stdout.split()[-1]


def history(store):
    """The typed events of the store's only job."""
    (job,) = [p for p in Path(store).iterdir() if p.is_dir()]
    events = []
    for line in (job / "events.log").read_text().splitlines():
        record = json.loads(line)
        if record.get("data"):
            events.append(record["data"])
    return job.name, events


def test_heat_py_killed_at_random_moments_resumes_and_matches_heat_rs(tmp_path):
    args = ["--n", "96", "--steps", "1500", "--step-ms", "2"]
    store = tmp_path / "store"
    run = subprocess.Popen(
        [SUPERVISE, "--store", str(store), "--every", "200ms", "--", sys.executable, HEAT_PY, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    rng = random.Random()
    print("random seed state", rng.getstate()[1][0])
    kills = 0
    for life in range(1, 4):
        # After a snapshot of this life (the life-th), at a random moment.
        pid = None
        deadline = time.time() + 60
        while time.time() < deadline and run.poll() is None:
            _, events = history(store) if store.exists() and any(store.iterdir()) else (None, [])
            lives = [i for i, e in enumerate(events) if e["kind"] == "spawned"]
            if len(lives) == life and any(e["kind"] == "snapshot" for e in events[lives[-1]:]):
                pid = events[lives[-1]]["pid"]
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.4))
        if run.poll() is not None or pid is None:
            break
        os.kill(pid, signal.SIGKILL)
        kills += 1
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert kills >= 2, f"only {kills} kills landed: make the job longer\n{err}"
    assert out.split()[-1] == reference(args[:4]), err
    name, events = history(store)
    # Named after the script, not the interpreter.
    assert name.startswith("heat-"), name
    resumed = [line for line in err.splitlines() if line.startswith("heat.py: resumed from snapshot")]
    assert len(resumed) == kills, err
    steps = [int(line.split()[-1]) for line in resumed]
    assert all(s > 0 for s in steps) and steps == sorted(steps), steps
    spawned = [e["from"] for e in events if e["kind"] == "spawned"]
    assert spawned[0] is None and all(f is not None for f in spawned[1:]), spawned


def test_arrays_and_values_come_back_and_bad_input_is_a_clear_error(tmp_path):
    env_store = str(tmp_path / "alone")
    script = f"""
import sys, numpy as np, supervise
shim = supervise.init("alone")
u = shim.array("u", (3, 4), np.float32)
k = shim.array("k", 5, "int64")
state = shim.load("state", default={{"step": 0}})
if sys.argv[1] == "first":
    assert shim.resumed_from is None and state == {{"step": 0}}
    u += 1.5
    k[:] = np.arange(5)
    assert not shim.snapshot(tag="one", values={{"state": {{"step": 7, "rng": [1, 2]}}}})
    shim.finish()
else:
    assert shim.resumed_from == 1, shim.resumed_from
    assert state == {{"step": 7, "rng": [1, 2]}}, state
    assert u.dtype == np.float32 and u.shape == (3, 4) and (u == 1.5).all()
    assert (k == np.arange(5)).all()
    try:
        shim.snapshot(values={{"bad": object()}})
    except ValueError as e:
        assert 'value "bad" is not JSON-able' in str(e), e
    else:
        raise AssertionError("a non-JSON value was taken")
    try:
        shim.array("c", 2, np.complex128)
    except ValueError as e:
        assert "dtype complex128" in str(e), e
    else:
        raise AssertionError("complex128 was taken")
    try:
        shim.array("u", (3, 4), np.float32)
    except supervise.SuperviseError as e:
        assert "u" in str(e), e
    else:
        raise AssertionError("a second array named u was taken")
    shim.finish()
print("ok")
"""
    for phase in ["first", "second"]:
        out = subprocess.run(
            [sys.executable, "-c", script, phase],
            capture_output=True,
            text=True,
            env=clean_env(SUPERVISE_STORE=env_store),
        )
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_a_numpy_generators_state_round_trips_exactly(tmp_path):
    script = """
import sys, numpy as np, supervise
shim = supervise.init("rng")
g = np.random.default_rng(12345)
state = shim.load("rng")
if state is None:
    g.random(1000)
    shim.snapshot(values={"rng": g.bit_generator.state})
else:
    g.bit_generator.state = state
print(repr(g.random(3).tolist()))
shim.finish()
"""
    env = clean_env(SUPERVISE_STORE=str(tmp_path / "s"))
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    resumed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert first.returncode == 0 and resumed.returncode == 0, first.stderr + resumed.stderr
    # The numbers after the restored state are the ones the first run drew after its snapshot.
    assert resumed.stdout == first.stdout, (first.stdout, resumed.stdout)


def test_a_changed_shape_on_resume_is_an_error_naming_the_entry(tmp_path):
    script = """
import sys, numpy as np, supervise
shim = supervise.init("shape")
u = shim.array("u", int(sys.argv[1]), np.float64)
u[:] = 1.0
shim.snapshot()
shim.finish()
"""
    env = clean_env(SUPERVISE_STORE=str(tmp_path / "s"))
    first = subprocess.run([sys.executable, "-c", script, "8"], capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    second = subprocess.run([sys.executable, "-c", script, "9"], capture_output=True, text=True, env=env)
    assert second.returncode != 0
    assert "SuperviseError" in second.stderr and '"u"' in second.stderr, second.stderr


def test_the_module_says_what_it_is():
    assert "numpy" in supervise.__doc__
    assert supervise.init.__doc__ and "snapshot" in supervise.init.__doc__
    assert supervise.Shim.snapshot.__doc__ and "True" in supervise.Shim.snapshot.__doc__
    assert supervise.EXIT_STOPPED == 75
