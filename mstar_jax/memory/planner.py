"""Check a plan request, measure it on simulated CPU devices, say whether it fits, and search for one that does.

The measuring runs in a child process (`python -m mstar_jax.memory.worker`) started with as many simulated CPU
devices as the largest mesh tried, and with the XLA:CPU settings that make its buffers those of the program:
- `--xla_disable_hlo_passes=cse_barrier_expander`: XLA:CPU otherwise drops the optimisation barriers that keep
  a rematerialised layer's recomputation in the backward pass, schedules it during the forward pass, and remat
  saves almost nothing (tests/memory/test_footprint.py);
- `--xla_cpu_experimental_ynn_fusion_type=`: YNNPACK kernels keep scratch memory outside XLA's buffers, which
  a TPU or GPU does not have.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from typing import Any

from mstar_jax.errors import ConfigError
from mstar_jax.memory.devices import device
from mstar_jax.memory.footprint import Candidate
from mstar_jax.remat import POLICIES, check_policy

XLA_CPU_FLAGS = ("--xla_disable_hlo_passes=cse_barrier_expander", "--xla_cpu_experimental_ynn_fusion_type=")
MESH_KEYS = ("data", "fsdp", "tensor")
GROWTH = (1, 2, 4, 8)  # device counts a proposal may grow to, as multiples of the request's


@dataclasses.dataclass(frozen=True)
class Request:
    """What `mstar plan` was asked (see `mstar plan --help`)."""

    preset: str
    mesh: tuple[int, int, int]
    global_batch: int
    seq_len: int
    device: str = "cpu"
    num_devices: int | None = None
    processes: int | None = None
    micro_batch: int | None = None
    response_len: int | None = None
    remat: str = "none"
    compute_dtype: str = "bfloat16"
    sampling_dtype: str = "bfloat16"
    rollout_batch: int | None = None
    freeze_vision: bool = False
    headroom: float = 0.1
    search: bool = True
    max_compiles: int = 6


def parse_mesh(text: str) -> tuple[int, int, int]:
    """`data=1,fsdp=8,tensor=1` (missing axes are 1) -> (1, 8, 1)."""
    sizes = dict.fromkeys(MESH_KEYS, 1)
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key not in sizes:
            raise ConfigError(f"--mesh {text!r}: unknown axis {key!r} (axes: {', '.join(MESH_KEYS)})")
        try:
            sizes[key] = int(value)
        except ValueError:
            raise ConfigError(f"--mesh {text!r}: {key}={value!r} is not a whole number") from None
        if sizes[key] < 1:
            raise ConfigError(f"--mesh {text!r}: {key}={sizes[key]} must be at least 1")
    return tuple(sizes[k] for k in MESH_KEYS)


def candidate(req: Request) -> Candidate:
    """The request as a Candidate, after checking that its numbers agree; errors name the values."""
    check_policy(req.remat)
    d, f, t = req.mesh
    n = math.prod(req.mesh)
    if req.num_devices is not None and req.num_devices != n:
        raise ConfigError(f"mesh data={d} x fsdp={f} x tensor={t} spans {n} devices, but there are "
                          f"{req.num_devices} (--num-devices); make the product {req.num_devices}")
    if req.global_batch < 1 or req.seq_len < 2:
        raise ConfigError(f"--global-batch {req.global_batch} and --seq-len {req.seq_len} must be >= 1 and >= 2")
    processes = req.processes or 1
    if req.global_batch % processes:
        raise ConfigError(f"global batch {req.global_batch} does not split over {processes} processes "
                          f"({req.global_batch} % {processes} = {req.global_batch % processes}); each process "
                          "feeds an equal share of every batch")
    if n % processes:
        raise ConfigError(f"{n} devices do not split over {processes} processes (each holds the same number)")
    micro = req.micro_batch or req.global_batch
    if req.global_batch % micro:
        raise ConfigError(f"global batch {req.global_batch} is not a multiple of the micro-batch {micro}")
    if micro % (d * f):
        raise ConfigError(f"micro-batch {micro} does not split over data x fsdp = {d * f} devices; use a "
                          f"multiple of {d * f}")
    response = req.response_len or req.seq_len // 2
    if not 1 <= response < req.seq_len:
        raise ConfigError(f"--response-len {response} must be in [1, --seq-len {req.seq_len})")
    return Candidate(req.preset, tuple(req.mesh), req.global_batch, micro, req.seq_len, response, req.remat,
                     req.compute_dtype, req.rollout_batch or req.global_batch, req.sampling_dtype, req.freeze_vision)


def usable_bytes(req: Request) -> int:
    """The bytes of one device a plan may use: its memory (on `cpu`, its share of the RAM the simulated devices
    split) less the headroom kept for the runtime."""
    dev = device(req.device)
    share = math.prod(req.mesh) if dev.name == "cpu" else 1
    return int(dev.hbm_bytes / share * (1.0 - req.headroom))


def fits(footprint: dict, usable: int) -> bool:
    """Both phases fit: the train step's peak and the rollouts' resident bytes."""
    return footprint["train_peak"] <= usable and footprint["rollout_peak"] <= usable


def _proposals(base: Candidate) -> list[Candidate]:
    """Candidates in the order they cost throughput: more devices last; per device count, pure fsdp without
    remat, then dots, then full remat, then smaller micro-batches, then tensor parallelism."""
    out, order = [], list(POLICIES)
    for growth in GROWTH:
        n = base.devices * growth
        for remat in POLICIES:
            if growth == 1 and order.index(remat) < order.index(base.remat):
                continue  # keeping more activations than the request on as many devices cannot need less
            out.append(dataclasses.replace(base, mesh=(1, n, 1), remat=remat))
        micro = base.micro_batch // 2
        while micro >= n and micro % n == 0 and base.global_batch % micro == 0:
            out.append(dataclasses.replace(base, mesh=(1, n, 1), remat="full", micro_batch=micro))
            micro //= 2
        for tensor in (2, 4, 8):
            if n % tensor == 0 and base.micro_batch % (n // tensor) == 0:
                out.append(dataclasses.replace(base, mesh=(1, n // tensor, tensor), remat="full"))
    seen, unique = set(), []
    for c in out:
        if c not in seen and c.micro_batch % (c.mesh[0] * c.mesh[1]) == 0:
            seen.add(c)
            unique.append(c)
    return unique


def run_plan(req: Request) -> dict[str, Any]:
    """The plan, computed in this process (which must have the devices: see `plan`)."""
    from mstar_jax.memory.families import find_preset
    from mstar_jax.memory.footprint import measure, static_bytes

    base = candidate(req)
    family, cfg = find_preset(req.preset)
    usable = usable_bytes(req)
    asked = measure(family, cfg, base)
    out = {"request": dataclasses.asdict(req), "model": family.describe(cfg), "usable_bytes": usable,
           "hbm_bytes": device(req.device).hbm_bytes, "candidate": dataclasses.asdict(base), "footprint": asked,
           "fits": fits(asked, usable), "proposal": None, "tried": []}
    if out["fits"] or not req.search:
        return out
    compiles = 1
    for cand in _proposals(base):
        if cand == base:
            continue
        static = static_bytes(family, cfg, cand)
        if static > usable:  # params + optimizer state + gradients alone: no compile needed to rule it out
            out["tried"].append({"candidate": cand.label(), "devices": cand.devices, "static_bytes": static})
            continue
        if compiles >= req.max_compiles:
            break
        footprint = measure(family, cfg, cand)
        compiles += 1
        out["tried"].append({"candidate": cand.label(), "devices": cand.devices,
                             "train_peak": footprint["train_peak"], "rollout_peak": footprint["rollout_peak"]})
        if fits(footprint, usable):
            out["proposal"] = {"candidate": dataclasses.asdict(cand), "label": cand.label(), "footprint": footprint}
            break
    return out


def worker_env(devices: int) -> dict[str, str]:
    """The environment of a planning process with `devices` simulated CPU devices."""
    env = dict(os.environ)
    kept = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*kept, f"--xla_force_host_platform_device_count={devices}", *XLA_CPU_FLAGS])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def plan(req: Request, timeout: float | None = None) -> dict[str, Any]:
    """Check the request here (bad input fails fast), then plan it in a child process with enough devices."""
    base = candidate(req)
    from mstar_jax.memory.families import find_preset

    find_preset(req.preset)
    device(req.device)
    devices = base.devices * (GROWTH[-1] if req.search else 1)
    proc = subprocess.run([sys.executable, "-m", "mstar_jax.memory.worker"], input=json.dumps(dataclasses.asdict(req)),
                          env=worker_env(devices), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"the planning process failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
