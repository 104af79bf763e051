"""Helpers of the loop tests: the `mstar` command in a subprocess, workdirs rewound to an earlier stage, and the
comparison of two runs' outputs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


# One persistent compilation cache for every `mstar` process of a test session: a resumed run then loads the
# executables the first run compiled (the same code, so the same bits) instead of compiling them again, which
# is most of a restart's cost on CPU.
JAX_CACHE = os.environ.setdefault("MSTAR_TEST_JAX_CACHE", tempfile.mkdtemp(prefix="mstar-test-jax-cache-"))


def mstar_env(**extra_env) -> dict:
    """The environment of an `mstar` subprocess: the source tree, CPU, the shared compilation cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("MSTAR_KILL_AT", "MSTAR_KILL_LOG")}
    if "XLA_FLAGS" in extra_env:  # added to the session's flags (conftest.TEST_XLA_FLAGS), not replacing them
        extra_env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {extra_env['XLA_FLAGS']}".strip()
    env.update({"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": JAX_CACHE,
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
                **extra_env})
    return env


def mstar(*args, timeout=600, **extra_env):
    """Run `mstar ARGS` from the source tree; extra keyword arguments are environment variables."""
    env = mstar_env(**extra_env)
    return subprocess.run([sys.executable, "-m", "mstar_jax.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _remove_final_plots(workdir: Path) -> None:
    """The dynamics plots, which the end of a run writes (earlier stages' plots, e.g. the PRM's, stay)."""
    from mstar_jax.reporting import DYNAMICS_METRICS

    for metric in DYNAMICS_METRICS:
        (workdir / "plots" / f"{metric.replace('@', '_at_').replace('-', '_minus_')}.png").unlink(missing_ok=True)


def copy_after_warmup(reference: Path, dst: Path) -> Path:
    """The reference workdir as it was when the stages before self-evolving had finished (every self-evolving
    output removed)."""
    shutil.copytree(reference, dst)
    for name in ("checkpoints", "export", "tensorboard"):
        shutil.rmtree(dst / name)
    _remove_final_plots(dst)
    for path in [dst / "report.md", dst / "metrics.jsonl", dst / "results" / "final.json",
                 *(dst / "rollouts").glob("iter_*.jsonl")]:
        path.unlink()
    return dst


def copy_after_iteration(reference: Path, dst: Path, iteration: int) -> Path:
    """The reference workdir as it was right after `iteration`'s checkpoint (later outputs removed)."""
    shutil.copytree(reference, dst)
    for step in (dst / "checkpoints").iterdir():
        if step.name.isdigit() and int(step.name) > iteration:
            shutil.rmtree(step)
    for name in ("export", "tensorboard"):
        shutil.rmtree(dst / name)
    _remove_final_plots(dst)
    for path in [dst / "report.md", dst / "results" / "final.json",
                 *(p for p in (dst / "rollouts").glob("iter_*.jsonl") if int(p.stem[5:9]) >= iteration)]:
        path.unlink()
    return dst


# TensorBoard events hold wall-clock times; Orbax directories (any holding _CHECKPOINT_METADATA) their own
# metadata and randomly named data files. The weights are compared through the HF exports instead, the
# optimizer's path through the losses in metrics.jsonl.
NOT_COMPARED = ("tensorboard",)


def differing_outputs(run: Path, reference: Path) -> list[str]:
    """Files (not hidden, not under NOT_COMPARED or an Orbax directory) that differ in bytes, or exist in only one
    of the two runs."""
    def files(root):
        out = set()
        for p in root.rglob("*"):
            rel = p.relative_to(root)
            if not p.is_file() or any(part.startswith(".") or part in NOT_COMPARED for part in rel.parts):
                continue
            if any((root / Path(*rel.parts[:i]) / "_CHECKPOINT_METADATA").exists() for i in range(1, len(rel.parts))):
                continue
            out.add(rel.as_posix())
        return out

    a, b = files(run), files(reference)
    return sorted((a ^ b) | {f for f in a & b if (run / f).read_bytes() != (reference / f).read_bytes()})


def _close_json(a, b, where: str, out: list[str], rtol: float, atol: float) -> None:
    """Differences between two JSON values: floats beyond the tolerance, anything else that is not equal."""
    import math

    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            out.append(f"{where}: keys {sorted(a.keys() ^ b.keys())} in only one run")
        for k in sorted(a.keys() & b.keys()):
            _close_json(a[k], b[k], f"{where}.{k}", out, rtol, atol)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: {len(a)} vs {len(b)} entries")
        for i, (x, y) in enumerate(zip(a, b)):
            _close_json(x, y, f"{where}[{i}]", out, rtol, atol)
    elif isinstance(a, float) and isinstance(b, float):
        if not (math.isnan(a) and math.isnan(b)) and not math.isclose(a, b, rel_tol=rtol, abs_tol=atol):
            out.append(f"{where}: {a!r} vs {b!r}")
    elif type(a) is not type(b) or a != b:
        out.append(f"{where}: {a!r} vs {b!r}"[:400])


def outputs_within(run: Path, reference: Path, rtol: float, atol: float) -> tuple[list[str], int]:
    """(differences, number of files compared) of two runs whose floats may differ by rounding (another device
    layout): JSON/JSONL values must be equal but for floats within rtol/atol, safetensors within atol, the rest
    byte-identical."""
    import json

    import numpy as np
    from safetensors.numpy import load_file

    out: list[str] = []
    for f in differing_outputs(run, reference):
        a, b = reference / f, run / f
        if not (a.is_file() and b.is_file()):
            out.append(f"{f}: in only one run")
        elif f.endswith(".safetensors"):
            x, y = load_file(a), load_file(b)
            if x.keys() != y.keys():
                out.append(f"{f}: tensors {sorted(x.keys() ^ y.keys())} in only one run")
            for k in sorted(x.keys() & y.keys()):
                if x[k].shape != y[k].shape or not np.allclose(x[k], y[k], rtol=0, atol=atol):
                    out.append(f"{f}: {k} differs beyond {atol}")
        elif f.endswith((".json", ".jsonl")):
            load = (lambda p: [json.loads(x) for x in p.read_text().splitlines()]) if f.endswith("l") else (
                lambda p: json.loads(p.read_text()))
            _close_json(load(a), load(b), f, out, rtol, atol)
        else:
            out.append(f"{f}: bytes differ")
    compared = sum(1 for p in run.rglob("*") if p.is_file())
    return out, compared
