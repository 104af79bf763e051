"""Crash injection for the resume tests, exactly like a preempted VM or an OOM kill (SIGKILL: no handlers run).

    MSTAR_KILL_AT=POINT[:N]       SIGKILL the N-th time (default 1st) this process reaches `kill_point(POINT)`
    MSTAR_KILL_AT=POINT@LABEL     SIGKILL at the first visit of POINT whose label is LABEL
    MSTAR_KILL_LOG=FILE           append one line `POINT<TAB>LABEL` per visit (what a fault campaign samples from)

A label names the moment in terms that do not depend on how the process started (a fresh run or a resume):
the sampling chunk, the SFT step, the iteration, the file and its content hash. So a moment of an uninterrupted
run can be hit again in a run that resumed before it. Every point is listed in `KILL_POINTS`; the fault
campaign (tests/loop/test_fault_campaign.py) draws from all of them, so a new point is covered once listed.
"""

from __future__ import annotations

import os
import signal

# name -> where it is (every `kill_point` call names one of these; tests/test_faults.py checks the source).
KILL_POINTS = {
    "sampling": "after a chunk of an evaluation's or the warm-up's sampling",
    "rollouts": "after a chunk of a self-evolving iteration's rollout sampling",
    "train_step": "after an SFT update (pre-training, warm-up or an iteration)",
    "checkpoint_write": "while an iteration's Orbax checkpoint is being written (the async save in flight)",
    "atomic_write": "a file written under its temporary name, not yet renamed (rollouts, results, report, ...)",
    "prm_samples": "after a chunk of the sampling that the process reward model's labels are made from",
    "prm_label_chunk": "a chunk of PRM labels appended to its file, not yet recorded as complete",
}

_reached: dict[str, int] = {}


def kill_point(point: str, label: str = "") -> None:
    """SIGKILL this process if `MSTAR_KILL_AT` names this visit of `point` (see the module docstring)."""
    spec, log = os.environ.get("MSTAR_KILL_AT"), os.environ.get("MSTAR_KILL_LOG")
    if not spec and not log:
        return
    if point not in KILL_POINTS:
        raise ValueError(f"kill point {point!r} is not listed in mstar_jax.faults.KILL_POINTS")
    if log:
        with open(log, "a") as f:
            f.write(f"{point}\t{label}\n")
    if not spec:
        return
    if "@" in spec:
        name, _, want = spec.partition("@")
        hit = name == point and want == label
    else:
        name, _, count = spec.partition(":")
        if name != point:
            return
        _reached[point] = _reached.get(point, 0) + 1
        hit = _reached[point] == int(count or 1)
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)
