"""Helpers of the loop tests: the `mstar` command in a subprocess, and a workdir rewound to after the warm-up."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def mstar(*args, timeout=600, **extra_env):
    """Run `mstar ARGS` from the source tree; extra keyword arguments are environment variables."""
    env = {k: v for k, v in os.environ.items() if k != "MSTAR_KILL_AT"}
    env.update({"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **extra_env})
    return subprocess.run([sys.executable, "-m", "mstar_jax.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def copy_after_warmup(reference: Path, dst: Path) -> Path:
    """The reference workdir as it was when the warm-up had finished (every self-evolving output removed)."""
    shutil.copytree(reference, dst)
    for name in ("checkpoints", "export", "plots", "tensorboard"):
        shutil.rmtree(dst / name)
    for path in [dst / "report.md", dst / "metrics.jsonl", dst / "results" / "final.json",
                 *(dst / "rollouts").glob("iter_*.jsonl")]:
        path.unlink()
    return dst
