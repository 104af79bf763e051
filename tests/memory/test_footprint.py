"""Per-device bytes: the abstract state's bytes are the parameters', and remat shows in the compiled step only with
the planner's XLA:CPU flags."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mstar_jax.memory.families import find_preset
from mstar_jax.memory.footprint import Candidate, static_bytes
from mstar_jax.memory.planner import XLA_CPU_FLAGS, worker_env
from tests.loop.cli_helpers import ROOT


def test_static_bytes_are_the_parameters_the_adam_moments_and_the_gradients():
    family, cfg = find_preset("demo")
    _, shapes, _ = family.abstract(cfg)
    sizes = {p: int(np.prod(s.shape)) for p, s in shapes.items()}
    params = 4 * sum(sizes.values())
    vision = 4 * sum(n for p, n in sizes.items() if p[0] in ("vision_tower", "multi_modal_projector"))
    cand = Candidate("demo", (1, 1, 1), 8, 8, 256, 128)
    # fp32 params + two fp32 Adam moments + fp32 gradients, and a few scalar counters.
    assert 0 <= static_bytes(family, cfg, cand) - 4 * params < 1024
    frozen = Candidate("demo", (1, 1, 1), 8, 8, 256, 128, freeze_vision=True)
    assert 0 <= static_bytes(family, cfg, frozen) - (4 * params - 3 * vision) < 1024


MEASURE = """
import json, sys
from mstar_jax.memory.families import find_preset
from mstar_jax.memory.footprint import Candidate, measure
family, cfg = find_preset("demo")
print(json.dumps({r: measure(family, cfg, Candidate("demo", (1, 1, 1), 8, 8, 512, 256, remat=r, compute_dtype="float32"))
                  ["compiled_temp"] for r in sys.argv[1:]}))
"""


def _temps(env, *policies):
    proc = subprocess.run([sys.executable, "-c", MEASURE, *policies], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.slow
def test_remat_lowers_the_compiled_temporaries_only_with_the_planner_flags():
    planned = _temps(worker_env(1), "none", "dots", "full")
    assert planned["full"] < planned["dots"] < 0.6 * planned["none"]
    # Without the barrier flag XLA:CPU schedules each layer's recomputation back into the forward pass, where it
    # keeps what remat was to free: almost no saving.
    env = worker_env(1)
    env["XLA_FLAGS"] = " ".join(f for f in env["XLA_FLAGS"].split() if f != XLA_CPU_FLAGS[0])
    assert _temps(env, "full")["full"] > 0.9 * planned["none"]
