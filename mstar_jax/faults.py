"""Crash injection for the resume tests: `MSTAR_KILL_AT=POINT[:N]` SIGKILLs the process the N-th time (default
1st) the code reaches `kill_point(POINT)`, exactly like a preempted VM or an OOM kill (no handlers run).

Points: `rollouts` (after a chunk of an iteration's sampling), `train_step` (after an SFT update),
`checkpoint_write` (while an iteration checkpoint is being written).
"""

from __future__ import annotations

import os
import signal

_reached: dict[str, int] = {}


def kill_point(point: str) -> None:
    """SIGKILL this process if `MSTAR_KILL_AT` names `point` and this is its N-th visit."""
    spec = os.environ.get("MSTAR_KILL_AT")
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name != point:
        return
    _reached[point] = _reached.get(point, 0) + 1
    if _reached[point] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
