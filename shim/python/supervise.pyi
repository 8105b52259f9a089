"""Snapshots of numpy simulations, taken at a safe point without stopping them and restored
when they start again under `supervise`."""

from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

EXIT_STOPPED: int
"""The exit code of a program that stopped on request after its final snapshot (75)."""

class SuperviseError(RuntimeError):
    """A snapshot, a restore or the store failed; the message names the entry or path."""

class StopRequested(SystemExit):
    """Raised by `snapshot()` with `init(stop="raise")` when the program was asked to stop and
    that final snapshot is durable; its code is 75 (`EXIT_STOPPED`)."""

class Shim:
    """The shim of this process: restore at start, snapshots at safe points."""

    @property
    def resumed_from(self) -> Optional[int]:
        """The snapshot this run resumed from (its number), or None for a fresh start."""

    def array(
        self, name: str, shape: Union[int, Sequence[int]], dtype: npt.DTypeLike
    ) -> np.ndarray:
        """A numpy array in memory the shim owns, named `name` in the snapshots: restored from
        the snapshot this run resumed from (if it has the entry), else zeros. Change it in
        place (`u[...] = ...`, `u += 1`): a name bound to a new array (`u = u + 1`) is no
        longer the snapshotted one (the next snapshot warns)."""

    def load(self, name: str, default: Any = None) -> Any:
        """The JSON value named `name` in the snapshot this run resumed from, or `default`."""

    def load_array(self, name: str, default: Any = None) -> Any:
        """The array `snapshot(arrays=...)` took as `name` (its dtype and shape) in the snapshot
        this run resumed from, in new memory; or `default`."""

    def due(self) -> bool:
        """Whether a snapshot is due: call it once per step."""

    def snapshot(
        self,
        tag: Optional[str] = None,
        values: Optional[Mapping[str, Any]] = None,
        arrays: Optional[Mapping[str, Any]] = None,
    ) -> bool:
        """Takes a snapshot at this safe point: every array from `array()`, each of `values`
        (JSON-able) and each of `arrays` (buffer protocol, copied with dtype and shape). Returns
        True when the program was asked to stop and this was its final snapshot (with
        `init(stop="raise")` it raises `StopRequested`)."""

    def finish(self) -> None:
        """Waits for the last snapshot to be durable and tells the supervisor the program
        finished."""

    @staticmethod
    def stopped() -> int:
        """The exit code after a requested stop (75): `sys.exit(shim.stopped())`."""

def init(name: Optional[str] = None, *, stop: str = "return") -> Shim:
    """Starts the shim (restoring the newest complete snapshot under supervise); `name` is
    the job's name when run alone (default: the script's file name); `stop` is "return"
    (`snapshot()` returns True on a stop) or "raise" (it raises `StopRequested`)."""
