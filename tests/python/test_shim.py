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
    except ValueError as e:
        assert 'array "u" exists already' in str(e), e
    else:
        raise AssertionError("a second array named u was taken")
    try:
        shim.snapshot(values={{"energy": float("nan")}})
    except ValueError as e:
        assert 'value "energy"' in str(e) and "NaN" in str(e), e
    else:
        raise AssertionError("a NaN was taken")
    try:
        shim.snapshot(arrays={{"l": [1, 2]}})
    except ValueError as e:
        assert 'arrays entry "l" has no buffer' in str(e), e
    else:
        raise AssertionError("a list was taken as a buffer")
    rec = np.zeros(2, dtype=[("x", "<f8"), ("y", "<i4")])
    try:
        shim.snapshot(arrays={{"rec": rec}})
    except ValueError as e:
        assert 'arrays entry "rec"' in str(e) and "fields" in str(e), e
    else:
        raise AssertionError("a structured array was taken")
    try:
        supervise.init("x", stop="later")
    except ValueError as e:
        assert 'stop="later"' in str(e), e
    else:
        raise AssertionError("stop=later was taken")
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
    assert issubclass(supervise.StopRequested, SystemExit)
    assert supervise.Shim.load_array.__doc__ and "dtype" in supervise.Shim.load_array.__doc__
    assert supervise.init.__doc__ and "snapshot" in supervise.init.__doc__
    assert supervise.Shim.snapshot.__doc__ and "True" in supervise.Shim.snapshot.__doc__
    assert supervise.EXIT_STOPPED == 75


def test_copied_arrays_come_back_with_dtype_and_shape_and_restore_to_writes_npy(tmp_path):
    """snapshot(arrays=...) takes any buffer with its dtype and shape; load_array() gives it
    back; `supervise restore --to` writes every array as a .npy that np.load opens, and values
    keep their numbers (a Generator's 128-bit state) as written."""
    script = """
import sys, array, numpy as np, supervise
shim = supervise.init("copied")
u = shim.array("u", (3, 4), np.float64)
g = np.random.default_rng(7)
arrays = {
    "c": np.arange(6, dtype=np.complex128).reshape(2, 3) * 1j,
    "b": np.array([[True, False], [False, True]]),
    "m": memoryview(b"hello"),
    "a": array.array("d", [1.0, 2.0]),
    "big": np.arange(12, dtype=">f8").reshape(3, 4)[:, 1:3],
    "s": np.float32(3.5),
    "t": np.arange(24, dtype=np.int16).reshape(2, 3, 4),
    "d": np.array(["2020-01-01", "2021-06-01"], dtype="datetime64[ns]"),
    "w": np.array(["ab", "cde"]),
}
if sys.argv[1] == "first":
    u[...] = np.arange(12).reshape(3, 4)
    shim.snapshot(tag="one", arrays=arrays, values={"rng": g.bit_generator.state})
else:
    for name, want in arrays.items():
        want = np.asarray(want)
        got = shim.load_array(name)
        assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, got.shape)
        assert (got == want).all() and got.flags.writeable, name
    assert shim.load_array("missing", default=5) == 5
    try:
        shim.load_array("rng")
    except ValueError as e:
        assert "is a value" in str(e), e
    else:
        raise AssertionError("a value was loaded as an array")
    assert (u == np.arange(12).reshape(3, 4)).all()
shim.finish()
print("ok")
"""
    store = tmp_path / "s"
    env = clean_env(SUPERVISE_STORE=str(store))
    for phase in ["first", "second"]:
        out = subprocess.run([sys.executable, "-c", script, phase], capture_output=True, text=True, env=env)
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    to = tmp_path / "restored"
    out = subprocess.run(
        [SUPERVISE, "restore", "1", "--to", str(to), "--store", str(store), "--json"],
        capture_output=True, text=True, env=clean_env(),
    )
    assert out.returncode == 0, out.stderr
    index = {e["name"]: e for e in json.loads(out.stdout)["entries"]}
    expected = {
        "u": np.arange(12, dtype=np.float64).reshape(3, 4),
        "c": np.arange(6, dtype=np.complex128).reshape(2, 3) * 1j,
        "b": np.array([[True, False], [False, True]]),
        "m": np.frombuffer(b"hello", dtype=np.uint8),
        "a": np.array([1.0, 2.0]),
        "big": np.arange(12, dtype=">f8").reshape(3, 4)[:, 1:3],
        "s": np.array(3.5, dtype=np.float32),
        "t": np.arange(24, dtype=np.int16).reshape(2, 3, 4),
        "d": np.array(["2020-01-01", "2021-06-01"], dtype="datetime64[ns]"),
        "w": np.array(["ab", "cde"]),
    }
    for name, want in expected.items():
        assert index[name]["file"] == f"{name}.npy", index[name]
        assert index[name]["dtype"] == want.dtype.str and index[name]["shape"] == list(want.shape)
        got = np.load(to / f"{name}.npy")
        assert got.dtype == want.dtype and got.shape == want.shape and (got == want).all(), name
    # The Generator's state as written: set back, it draws what the original draws.
    state = json.loads((to / "rng.json").read_text())
    g, h = np.random.default_rng(7), np.random.default_rng()
    h.bit_generator.state = state
    assert g.random(3).tolist() == h.random(3).tolist()


def test_a_freed_array_warns_once_and_is_in_no_later_snapshot(tmp_path):
    """`w = w + 1` binds the name to a new array: the shim's one is freed, and the next
    snapshot warns (RuntimeWarning, naming it and the in-place fix) and no longer holds it."""
    script = """
import warnings, numpy as np, supervise
shim = supervise.init("freed")
u = shim.array("u", 4, np.float64)
w = shim.array("w", 4, np.float64)
u += 1
w += 1
with warnings.catch_warnings(record=True) as got:
    warnings.simplefilter("always")
    shim.snapshot()
    assert not got, [str(x.message) for x in got]
    w = w + 1
    x = shim.array("x", 4, np.float64)  # another array between: the warning still comes
    shim.snapshot()
    shim.snapshot()
    messages = [str(x.message) for x in got if issubclass(x.category, RuntimeWarning)]
assert len(messages) == 1 and 'array "w"' in messages[0] and "w += 1" in messages[0], messages
# Its name is free again.
w2 = shim.array("w", 4, np.float64)
shim.finish()
print("ok")
"""
    store = tmp_path / "s"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=clean_env(SUPERVISE_STORE=str(store)))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    shown = subprocess.run([SUPERVISE, "show", "2", "--store", str(store), "--json"],
                           capture_output=True, text=True, env=clean_env())
    assert shown.returncode == 0, shown.stderr
    entries = {e["name"] for e in json.loads(shown.stdout)["entries"]}
    assert "u" in entries and "w" not in entries, entries


LOOP = """
import sys, time, numpy as np, supervise
shim = supervise.init("loop", stop=sys.argv[1])
u = shim.array("u", 1000, np.float64)
state = shim.load("state", {"step": 0})
print("start", state["step"], shim.resumed_from, flush=True)
try:
    while state["step"] < 100000:
        u += 1
        state["step"] += 1
        time.sleep(0.005)
        if shim.due():
            if shim.snapshot(tag=f"step {state['step']}", values={"state": state}):
                print("returned", state["step"], flush=True)
                sys.exit(shim.stopped())
except supervise.StopRequested:
    print("raised", state["step"], flush=True)
    raise
finally:
    print("cleanup", state["step"], flush=True)
"""


def wait_for_snapshot(store, count=1, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if store.exists() and any(store.iterdir()):
            _, events = history(store)
            if sum(e["kind"] == "snapshot" for e in events) >= count:
                return events
        time.sleep(0.05)
    raise AssertionError("no snapshot")


def test_stop_requested_is_raised_or_returned_and_ctrl_c_stops_cleanly(tmp_path):
    """Ctrl-C (SIGINT to the whole foreground group) or SIGTERM to supervise: the final
    snapshot, then StopRequested (stop="raise": finally blocks run, exit 75) or True
    (stop="return"); the next run resumes at that very step. Alone, Ctrl-C is a
    KeyboardInterrupt at once."""
    (tmp_path / "loop.py").write_text(LOOP)
    store = tmp_path / "s"
    for mode, sig, code in [("raise", signal.SIGINT, 130), ("return", signal.SIGTERM, 143)]:
        run = subprocess.Popen(
            [SUPERVISE, "--store", str(store), "--every", "150ms", "--",
             sys.executable, str(tmp_path / "loop.py"), mode],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=clean_env(), start_new_session=True,
        )
        wait_for_snapshot(store, 2)
        if sig == signal.SIGINT:
            os.killpg(run.pid, sig)  # as a terminal's Ctrl-C
        else:
            run.send_signal(sig)
        out, err = run.communicate(timeout=60)
        assert run.returncode == code, (mode, out, err)
        lines = out.split()
        word = {"raise": "raised", "return": "returned"}[mode]
        stopped_at = int(lines[lines.index(word) + 1])
        assert int(lines[lines.index("cleanup") + 1]) == stopped_at, out
        _, events = history(store)
        assert events[-1]["kind"] == "end", events[-1]
        # The next run resumes at exactly that step.
        again = subprocess.Popen(
            [SUPERVISE, "--store", str(store), "--every", "150ms", "--",
             sys.executable, str(tmp_path / "loop.py"), mode],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
        )
        deadline = time.time() + 30
        first = ""
        while time.time() < deadline and not first:
            first = again.stdout.readline()
        again.send_signal(signal.SIGTERM)
        again.communicate(timeout=60)
        assert first.split()[:2] == ["start", str(stopped_at)] and stopped_at > 0, (first, stopped_at)
        store = tmp_path / "s2"
    # Alone, a Ctrl-C interrupts at once (the shim takes no SIGINT).
    alone = subprocess.Popen(
        [sys.executable, str(tmp_path / "loop.py"), "raise"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=clean_env(SUPERVISE_STORE=str(tmp_path / "alone"), SUPERVISE_EVERY="100ms"),
    )
    assert alone.stdout.readline().startswith("start")
    time.sleep(0.3)
    alone.send_signal(signal.SIGINT)
    out, err = alone.communicate(timeout=10)
    assert "KeyboardInterrupt" in err and "cleanup" in out, (out, err)


def test_a_resume_with_another_shape_or_dtype_gives_up_naming_the_array(tmp_path):
    """A resumed run that asks for the same bytes in another shape, or another dtype, is a
    clear error in the program, and supervise gives up (exit 3) with a typed record saying
    what differs, instead of restarting it in a loop."""
    script = """
import sys, time, numpy as np, supervise
shim = supervise.init("shape")
shape = tuple(int(d) for d in sys.argv[1].split("x"))
u = shim.array("u", shape, np.dtype(sys.argv[2]))
while True:
    u += 1
    time.sleep(0.01)
    if shim.due() and shim.snapshot():
        sys.exit(shim.stopped())
"""
    (tmp_path / "shape.py").write_text(script)
    for second, detail in [
        (["4x3", "float64"], {"what": "shape", "stored": [3, 4], "wanted": [4, 3]}),
        (["3x4", "int64"], {"what": "kind", "stored": "[f64] slice", "wanted": "[i64] slice"}),
    ]:
        store = tmp_path / f"s-{second[0]}-{second[1]}"
        def run(args):
            return subprocess.Popen(
                [SUPERVISE, "--store", str(store), "--every", "100ms", "--job", "shape", "--",
                 sys.executable, str(tmp_path / "shape.py"), *args],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
            )
        first = run(["3x4", "float64"])
        wait_for_snapshot(store)
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
        again = run(second)
        out, err = again.communicate(timeout=60)
        assert again.returncode == 3, err
        assert "SuperviseError" in err and '"u"' in err, err
        _, events = history(store)
        (mismatch,) = [e for e in events if e["kind"] == "restore-mismatch"]
        assert mismatch["detail"] == detail and mismatch["entry"] == "u", mismatch
        assert sum(e["kind"] == "spawned" for e in events) == 2, "restarted in a loop"


def test_a_script_that_never_calls_the_shim_is_told_how(tmp_path):
    """A Python program under supervise that never imports the shim: a typed no-shim record
    that points at `import supervise`."""
    store = tmp_path / "s"
    out = subprocess.run(
        [SUPERVISE, "--store", str(store), "--max-restarts", "0", "--",
         sys.executable, "-c", "import time, sys; time.sleep(1.3); sys.exit(1)"],
        capture_output=True, text=True, env=clean_env(),
    )
    assert out.returncode != 0
    _, events = history(store)
    assert any(e["kind"] == "no-shim" for e in events), events
    assert "import supervise" in out.stderr, out.stderr


def test_one_percent_of_a_1_gib_array_changed_in_place_stores_about_one_percent(tmp_path):
    """Dirty tracking through numpy: 1 GiB in shim.array, 1% of its 64 KiB chunks changed in
    place (`u[rows] += 0.5`), the next snapshot stores about 1% new bytes."""
    script = """
import json, numpy as np, supervise
shim = supervise.init("gib")
chunks = 16384  # of 64 KiB: 1 GiB
u = shim.array("u", (chunks, 8192), np.float64)
u[...] = np.arange(chunks, dtype=np.float64)[:, None]  # every chunk distinct
shim.snapshot(tag="whole")
rows = np.random.default_rng(1).choice(chunks, chunks // 100, replace=False)
u[rows] += 0.5
shim.snapshot(tag="one percent")
shim.finish()
print(json.dumps({"changed": int(len(rows)) * 65536, "mode": None}))
"""
    store = tmp_path / "s"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=clean_env(SUPERVISE_STORE=str(store)))
    assert out.returncode == 0, out.stderr
    changed = json.loads(out.stdout)["changed"]
    shown = subprocess.run([SUPERVISE, "show", "2", "--store", str(store), "--json"],
                           capture_output=True, text=True, env=clean_env())
    assert shown.returncode == 0, shown.stderr
    snap = json.loads(shown.stdout)
    new = snap["bytes_new"]
    total = 1 << 30
    assert snap["tag"] == "one percent"
    assert changed <= new <= changed * 1.1 + (1 << 20), (new, changed)
    print(f"1% of 1 GiB changed: {new} new bytes stored ({new / total:.2%} of the array)")


def test_the_due_benchmark_runs(tmp_path):
    """shim/python/bench/due.py (the figure is read on a quiet machine, not asserted here)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "shim/python/bench/due.py"), "--calls", "20000", "--repeat", "1"],
        capture_output=True, text=True,
        env=clean_env(SUPERVISE_STORE=str(tmp_path / "s"), SUPERVISE_EVERY="1h"),
    )
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout.splitlines()[-1])
    assert set(figures) == {"int.bit_length()", "lambda: None", "shim.due()"}, figures


def test_a_script_that_fails_at_once_after_init_is_a_configuration_error(tmp_path):
    """An error right after `supervise.init()` (a typo, a dtype the shim does not keep) on a
    fresh start, again and again: supervise gives up (exit 3) after three quick failures with
    a typed end record, instead of restarting the script with a growing backoff."""
    script = tmp_path / "typo.py"
    script.write_text(
        "import numpy as np, supervise\n"
        "shim = supervise.init()\n"
        "u = shim.array('u', 4, np.complex64)\n"
    )
    store = tmp_path / "s"
    start = time.time()
    out = subprocess.run(
        [SUPERVISE, "--store", str(store), "--", sys.executable, str(script)],
        capture_output=True, text=True, env=clean_env(), timeout=120,
    )
    assert out.returncode == 3, out.stderr
    _, events = history(store)
    end = events[-1]
    assert end["kind"] == "end" and end["outcome"] == "config-error", end
    assert sum(e["kind"] == "spawned" for e in events) == 3, events
    assert "what it wrote to stderr is above" in end["detail"], end
    assert "dtype complex64" in out.stderr, out.stderr  # the script's own error
    assert time.time() - start < 60
