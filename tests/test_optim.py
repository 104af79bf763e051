"""The SFT optimizer is torch.optim.AdamW + the transformers LR schedules, step for step (not only its first step)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mstar_jax.optim import OptimConfig, make_optimizer, make_schedule

STEPS, LR, DECAY, CLIP = 24, 3e-2, 0.1, 2.0
SHAPES = {("w1",): (8, 16), ("b1",): (16,), ("w2",): (16, 4), ("scale",): (4,)}  # 1-D ones: not decayed


def init_params(seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(size=s) * 0.5 + (1.0 if k == ("scale",) else 0.0)).astype(np.float32)
            for k, s in SHAPES.items()}


def batches(seed=1) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(32, 8)).astype(np.float32), rng.normal(size=(32, 4)).astype(np.float32))
            for _ in range(STEPS)]


def forward(p, x, tanh):
    """The same small network in both frameworks (`tanh` is jnp.tanh or torch.tanh)."""
    return (tanh(x @ p[("w1",)] + p[("b1",)]) @ p[("w2",)]) * p[("scale",)]


def run_ours(schedule: str, weight_decay: float = DECAY, clip: float | None = CLIP):
    """Params after every step and the LR of every step, with mstar_jax.optim."""
    cfg = OptimConfig(lr=LR, total_steps=STEPS, warmup_ratio=0.2, schedule=schedule, weight_decay=weight_decay,
                      max_grad_norm=clip)
    tx, sched = make_optimizer(cfg), make_schedule(cfg)
    params = {k: jnp.asarray(v) for k, v in init_params().items()}
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(lambda p: jnp.mean((forward(p, x, jnp.tanh) - y) ** 2))(params)
        updates, state = tx.update(grads, state, params)
        return {k: params[k] + updates[k] for k in params}, state

    out, lrs = [], []
    for i, (x, y) in enumerate(batches()):
        lrs.append(float(sched(i)))
        params, state = step(params, state, x, y)
        out.append({k: np.asarray(v) for k, v in params.items()})
    return out, lrs


def run_torch(schedule: str):
    """The same with torch.optim.AdamW (decay on >= 2-D params only), clip_grad_norm_ and the HF schedule."""
    import torch
    import transformers

    params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in init_params().items()}
    groups = [{"params": [p for p in params.values() if p.ndim >= 2], "weight_decay": DECAY},
              {"params": [p for p in params.values() if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), eps=1e-8)
    warm = int(np.ceil(STEPS * 0.2))
    sched = (transformers.get_constant_schedule_with_warmup(opt, warm) if schedule == "constant" else
             transformers.get_cosine_schedule_with_warmup(opt, warm, STEPS))
    out, lrs, norms = [], [], []
    for x, y in batches():
        opt.zero_grad()
        loss = torch.mean((forward(params, torch.tensor(x), torch.tanh) - torch.tensor(y)) ** 2)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(params.values()), CLIP)))
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        out.append({k: p.detach().numpy().copy() for k, p in params.items()})
    return out, lrs, norms


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_adamw_clipping_decay_and_schedule_match_torch_for_every_step(schedule):
    ours, our_lrs = run_ours(schedule)
    theirs, their_lrs, norms = run_torch(schedule)
    np.testing.assert_allclose(our_lrs, their_lrs, rtol=1e-5, atol=1e-12)  # ours is float32
    assert their_lrs[0] == 0.0 and max(their_lrs) == pytest.approx(LR)
    if schedule == "cosine":
        assert their_lrs[-1] < 0.05 * LR  # decayed, not constant
    # Clipping must have acted (and not always), or the comparison would not cover it.
    assert any(n > CLIP for n in norms) and any(n < CLIP for n in norms), norms
    for i, (a, b) in enumerate(zip(ours, theirs)):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-5, err_msg=f"step {i + 1} {k}")
    # Weight decay and clipping each move the params by far more than the tolerance (so the test sees them).
    for other in (run_ours(schedule, weight_decay=0.0)[0], run_ours(schedule, clip=None)[0]):
        assert max(np.abs(other[-1][k] - ours[-1][k]).max() for k in SHAPES) > 1e-3
