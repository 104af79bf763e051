"""The peak memory a candidate's train step really takes, to hold `mstar plan` to it.

    python -m mstar_jax.memory.measured '<Request as JSON>'    # prints {"measured_peak": bytes, ...}

It builds the step as the planner does, on this process's first devices, runs it twice on a real batch (zero
weights, random tokens and pixels) and reads the peak: `memory_stats()["peak_bytes_in_use"]` on a GPU or TPU;
on CPU, which keeps no such count, the process's peak resident memory (VmHWM, reset after compiling) over the
resident memory before the state was placed, shared by the devices. On CPU run it with `planner.worker_env`'s
XLA flags, so that the program executed is the one planned, and MALLOC_MMAP_THRESHOLD_ fixed (`CPU_ENV`), so
that every buffer is mapped on allocation and unmapped when freed and the resident memory follows the buffers.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import jax
import numpy as np

from mstar_jax import sharding as shd


# glibc otherwise raises its mmap threshold as buffers are freed, and keeps later ones in a heap it never returns.
CPU_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def proc_status_bytes(field: str) -> int:
    """A byte count of this process from /proc/self/status (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _malloc_trim() -> None:
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _concrete(abstract, seed: int, high: int | None = None):
    """A device array laid out like `abstract`: zeros for floats (weights), random ids below `high` for ints."""
    if np.issubdtype(abstract.dtype, np.floating) or high is None:
        host = np.zeros(abstract.shape, abstract.dtype)
    else:
        host = np.random.default_rng(seed).integers(0, high, abstract.shape).astype(abstract.dtype)
    return jax.device_put(host, abstract.sharding)


def measure_peak(req) -> dict:
    """{"measured_peak": bytes per device, "method": ..., "compiled_peak": the memory analysis of this very
    compile} for a planner Request, measured on this process's devices."""
    from mstar_jax.memory.families import find_preset
    from mstar_jax.memory.footprint import compile_step
    from mstar_jax.memory.planner import candidate

    cand = candidate(req)
    family, cfg = find_preset(req.preset)
    c = compile_step(family, cfg, cand)  # the plan's compile, on this process's backend
    ma = c.executable.memory_analysis()
    compiled_peak = ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes
    cpu = jax.devices()[0].platform == "cpu"
    vocab = cfg.text.vocab_size if hasattr(cfg, "text") else None

    def inputs():
        batch = {k: _concrete(a, 1, vocab if k == "input_ids" else None) for k, a in c.batch.items()}
        batch["attention_mask"] = jax.device_put(np.ones(c.batch["attention_mask"].shape, np.int32),
                                                 c.batch["attention_mask"].sharding)
        batch["loss_mask"] = jax.device_put(c.loss_mask, c.batch["loss_mask"].sharding)
        return jax.tree.map(lambda a: _concrete(a, 0), c.state), batch

    if cpu:
        # One run first, so the runtime's one-time allocations (thread pools, kernel tables) are not counted;
        # everything it allocated is freed and handed back to the system before the measured run.
        jax.block_until_ready(c.executable(*inputs()))
        gc.collect()
        _malloc_trim()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        base = proc_status_bytes("VmRSS")
    live, batch = inputs()
    for _ in range(2):
        live, metrics = c.executable(live, batch)
        jax.block_until_ready((live, metrics))
    if cpu:
        peak, method = (proc_status_bytes("VmHWM") - base) // cand.devices, "resident memory (VmHWM)"
    else:
        peak, method = max(d.memory_stats()["peak_bytes_in_use"] for d in c.mesh.devices.flat), "memory_stats"
    return {"measured_peak": int(peak), "method": method, "device_kind": jax.devices()[0].device_kind,
            "compiled_peak": int(compiled_peak), "loss": float(metrics["loss"])}


def main() -> int:
    """Measure the Request given as JSON in argv[1]; print the result as one JSON line."""
    from mstar_jax.memory.planner import Request

    raw = json.loads(sys.argv[1])
    raw["mesh"] = tuple(raw["mesh"])
    print(json.dumps(measure_peak(Request(**raw))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
