"""Run two SFT steps on a mesh and save loss, grad norms and the final params (for the 1 vs 8 device test).

Usage: python -m tests.train_mesh_worker HF_DIR OUT.npz DATA FSDP TENSOR
(run with XLA_FLAGS=--xla_force_host_platform_device_count=8 for a simulated 8-device mesh).
"""

from __future__ import annotations

import sys

import numpy as np


def sft_examples(n: int, seed: int = 0):
    """n (question, response, image) triples of varied lengths."""
    from tests.conftest import random_images

    words = "the answer is three because we count the red circles and then add two more".split()
    rng = np.random.default_rng(seed)
    questions = [" ".join(rng.choice(words, size=rng.integers(2, 7))) + "?" for _ in range(n)]
    responses = [" ".join(rng.choice(words, size=rng.integers(1, 9))) for _ in range(n)]
    images = random_images(seed, [(24 + (i % 5) * 3, 30 - (i % 4) * 2) for i in range(n)])
    return questions, responses, images


# Shared with tests/test_training.py so that its steps reuse one compiled update (CPU compiles are slow).
# Adam's first step is ~lr * sign(g): rounding noise in mathematically-zero grads (e.g. key biases) would
# become lr-sized differences between equivalent runs; eps 1e-4 keeps such comparisons well-conditioned.
OPTIM = dict(lr=1e-3, total_steps=8, warmup_ratio=0.25, schedule="cosine", weight_decay=0.1, eps=1e-4)
LENGTH = 64  # every batch padded to this many tokens: one compiled shape


def run(hf_dir: str, data: int, fsdp: int, tensor: int, global_batch: int = 8, micro_batch: int = 4) -> dict:
    """Load on a (data, fsdp, tensor) mesh, take two accumulated steps, return host numpy results."""
    import jax

    import mstar_jax
    from mstar_jax import sharding
    from mstar_jax.optim import OptimConfig
    from mstar_jax.sft_batch import sft_batch
    from mstar_jax.training import create_train_state, make_train_step

    mesh = sharding.make_mesh(data, fsdp, tensor)
    policy = mstar_jax.load(hf_dir, mesh=mesh)
    q, r, im = sft_examples(2 * global_batch)
    batches = [sft_batch(policy.processor, q[i:i + global_batch], r[i:i + global_batch], im[i:i + global_batch],
                         length=LENGTH) for i in (0, global_batch)]
    step = make_train_step(policy.graphdef, OptimConfig(**OPTIM), mesh, micro_batch=micro_batch)
    state = create_train_state(policy.params, step.tx)
    out = {}
    for i, b in enumerate(batches):
        state, m = step(state, b)
        out[f"loss{i}"], out[f"grad_norm{i}"] = m["loss"], m["grad_norm"]
    specs = {p: a.sharding.spec for p, a in state.params.items()}
    for p, a in state.params.items():
        out["param:" + ".".join(map(str, p))] = np.asarray(jax.device_get(a))
    out["devices"] = jax.device_count()
    out["sharded_params"] = sum(any(s is not None for s in spec) for spec in specs.values())
    return out


def main() -> None:
    hf_dir, out, data, fsdp, tensor = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    np.savez(out, **run(hf_dir, data, fsdp, tensor))


if __name__ == "__main__":
    main()
