"""The SFT step: parity with PyTorch, accumulation, continuity across iterations, freezing, sharding, guards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mstar_jax
from mstar_jax.errors import TrainingError
from mstar_jax.models.llava.tiny import TinySpec, make_tiny_llava
from mstar_jax.optim import OptimConfig, make_schedule
from mstar_jax.sft_batch import sft_batch
from mstar_jax.training import (create_train_state, make_train_step, reset_optimizer, reset_schedule,
                                schedule_position)
from tests.conftest import SPECS, random_images
from tests.train_mesh_worker import LENGTH, OPTIM, run as mesh_run, sft_examples

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The smallest LLaVA (2+2 layers, 4 image tokens): HF dir and loaded policy."""
    path = tmp_path_factory.mktemp("train_tiny")
    make_tiny_llava(path, TinySpec())
    return path, mstar_jax.load(path)


def copy(tree):
    """A private copy (train steps donate their input state)."""
    return jax.tree.map(jnp.copy, tree)


def host(params):
    return {p: np.asarray(a) for p, a in params.items()}


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30))


def batch_of(policy, n, seed=0, length=LENGTH):
    """n examples padded to one fixed length, so every step in a test shares one compiled shape."""
    q, r, im = sft_examples(n, seed)
    return sft_batch(policy.processor, q, r, im, length=length)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_loss_and_every_gradient_match_pytorch(tiny_models, name):
    """Every trained tensor's gradient, for every family (CLIP/SigLIP towers; Llama, Qwen2, Phi-3 decoders)."""
    import torch

    from mstar_jax.conversion import hf_tensors, merge
    from mstar_jax.training import num_targets_bound, response_loss_sum

    path, hf = tiny_models[name]
    policy = mstar_jax.load(path)
    questions = ["How many circles are there in the picture? Count them carefully.", "Which bar?"]
    responses = ["Let's think step by step. First, count the red shapes. The answer is 3.", "B"]
    images = random_images(1, [(40, 52), (33, 30)])
    right = sft_batch(policy.processor, questions, responses, images, padding_side="right")
    left = sft_batch(policy.processor, questions, responses, images, padding_side="left")
    assert right["loss_mask"].sum(1).tolist() == [int(m.sum()) for m in left["loss_mask"]]
    assert right["loss_mask"][1].sum() == len(policy.processor.tokenizer("B", add_special_tokens=False)["input_ids"]) + 1

    def loss_fn(params, batch, num_targets):
        b = {k: jnp.asarray(v) for k, v in batch.items()}
        return response_loss_sum(merge(policy.graphdef, params), b, num_targets) / batch["loss_mask"][:, 1:].sum()

    grad_fn = jax.jit(jax.value_and_grad(loss_fn), static_argnums=2)
    loss, grads = grad_fn(policy.params, right, num_targets_bound(right["loss_mask"]))
    loss_left, _ = grad_fn(policy.params, left, num_targets_bound(left["loss_mask"]))

    hf.zero_grad()
    labels = np.where(right["loss_mask"] > 0, right["input_ids"], -100)
    out = hf(input_ids=torch.tensor(right["input_ids"]).long(), attention_mask=torch.tensor(right["attention_mask"]),
             pixel_values=torch.tensor(right["pixel_values"]), labels=torch.tensor(labels).long())
    out.loss.backward()
    ref = {k: p.grad.numpy() for k, p in hf.named_parameters() if p.grad is not None}
    hf.zero_grad()

    assert abs(float(loss) - out.loss.item()) <= 1e-4 * out.loss.item()
    assert abs(float(loss_left) - float(loss)) <= 1e-4 * float(loss)
    # Our gradients in torch's names and layouts (transposed kernels, fused qkv / gate_up for Phi-3), through
    # the same key map that exports checkpoints; the layout is the one `named_parameters` uses.
    ours = hf_tensors(policy.config, grads, {}, "transformers-5-state-dict")
    assert set(ours) == set(ref), sorted(set(ours) ^ set(ref))
    # A ViT's key bias adds the same q.b to every score of a query, which softmax ignores: its true gradient is
    # 0 and both sides hold float noise there; such tensors must stay at that noise level on our side too.
    noise = 1e-6 * max(np.linalg.norm(r) for r in ref.values())
    exact_zero = {k for k in ref if k.endswith("k_proj.bias") and "vision_tower" in k}
    for k, r in ref.items():
        if k in exact_zero:
            assert np.linalg.norm(r) < noise and np.linalg.norm(ours[k]) < noise, k
        else:
            assert np.linalg.norm(r) > 100 * noise, k  # a real gradient, so the comparison means something
            assert rel(ours[k], r) < 1e-4, (k, rel(ours[k], r))


def test_micro_batches_equal_one_big_batch(tiny):
    _, policy = tiny
    batch = batch_of(policy, 128, seed=3)
    optim = OptimConfig(**OPTIM)
    results = []
    for micro in (128, 32):
        step = make_train_step(policy.graphdef, optim, policy.mesh, micro_batch=micro)
        state, metrics = step(create_train_state(copy(policy.params), step.tx), batch)
        results.append((metrics, host(state.params)))
    (m1, p1), (m4, p4) = results
    assert abs(m1["loss"] - m4["loss"]) <= 1e-5 * m1["loss"]
    assert abs(m1["grad_norm"] - m4["grad_norm"]) <= 1e-5 * m1["grad_norm"]
    assert m1["tokens"] == m4["tokens"] == batch["loss_mask"][:, 1:].sum()
    for p in p1:
        np.testing.assert_allclose(p4[p], p1[p], rtol=1e-5, atol=1e-6, err_msg=str(p))


def test_state_carries_across_iterations_and_resets(tiny):
    _, policy = tiny
    batches = [batch_of(policy, 8, seed=s) for s in range(4)]
    optim = OptimConfig(**OPTIM)
    step = make_train_step(policy.graphdef, optim, policy.mesh, micro_batch=4)
    state0 = create_train_state(copy(policy.params), step.tx)

    straight = copy(state0)
    lrs = []
    for b in batches:
        straight, m = step(straight, b)
        lrs.append(m["lr"])
    schedule = make_schedule(optim)
    np.testing.assert_allclose(lrs, [float(schedule(i)) for i in range(4)], rtol=1e-6)
    assert lrs[0] == 0.0 and lrs[1] > 0

    # Two "iterations", each with its own step object, the state round-tripped through the host between them.
    it = copy(state0)
    for b in batches[:2]:
        it, _ = step(it, b)
    it = jax.device_put(jax.tree.map(np.asarray, it), jax.tree.map(lambda a: a.sharding, it))
    step2 = make_train_step(policy.graphdef, optim, policy.mesh, micro_batch=4)
    for b in batches[2:]:
        it, m = step2(it, b)
    assert schedule_position(it) == schedule_position(straight) == 4 and int(it.step) == 4
    for p, a in host(straight.params).items():
        np.testing.assert_array_equal(np.asarray(it.params[p]), a, err_msg=str(p))

    # reset_optimizer: zero moments, schedule at 0, step kept; the next update equals a fresh state's.
    reset = reset_optimizer(copy(straight), step.tx)
    assert schedule_position(reset) == 0 and int(reset.step) == 4
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(reset.opt_state) if x.ndim)
    fresh = create_train_state(copy(straight.params), step.tx)
    a, _ = step(reset, batches[0])
    b, _ = step(fresh, batches[0])
    for p in a.params:
        np.testing.assert_array_equal(np.asarray(a.params[p]), np.asarray(b.params[p]))
    # reset_schedule keeps the moments; reset_optimizer(keep_schedule=True) keeps the position.
    rs = reset_schedule(copy(straight))
    assert schedule_position(rs) == 0
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(rs.opt_state) if x.ndim)
    assert schedule_position(reset_optimizer(copy(straight), step.tx, keep_schedule=True)) == 4


def test_frozen_vision_tower_and_projector(tiny):
    _, policy = tiny
    optim = OptimConfig(lr=1e-2, total_steps=4, warmup_ratio=0.0, weight_decay=0.1, freeze_vision_tower=True,
                        freeze_projector=True)
    step = make_train_step(policy.graphdef, optim, policy.mesh, micro_batch=4)
    before = host(policy.params)
    state = create_train_state(copy(policy.params), step.tx)
    n_trainable = sum(not optim.is_frozen(p) for p in before)
    n_moments = sum(x.ndim > 0 for x in jax.tree.leaves(state.opt_state))
    assert n_moments == 2 * n_trainable  # Adam mu and nu only for trainable params
    for s in range(2):
        state, _ = step(state, batch_of(policy, 8, seed=s))
    frozen = [p for p in before if optim.is_frozen(p)]
    assert any(p[0] == "vision_tower" for p in frozen) and any(p[0] == "multi_modal_projector" for p in frozen)
    for p, a in before.items():
        after = np.asarray(state.params[p])
        if optim.is_frozen(p):
            assert after.tobytes() == a.tobytes(), p
        else:
            assert not np.array_equal(after, a), p


def test_one_device_equals_eight_simulated_devices(tiny, tmp_path):
    path, _ = tiny
    ours = mesh_run(str(path), 1, 1, 1)
    out = tmp_path / "mesh8.npz"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "tests.train_mesh_worker", str(path), str(out), "2", "2", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = dict(np.load(out))
    assert int(theirs["devices"]) == 8 and int(theirs["sharded_params"]) > 0
    for k, v in ours.items():
        if k in ("devices", "sharded_params"):
            continue
        np.testing.assert_allclose(theirs[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_non_finite_loss_raises_and_keeps_state(tiny):
    _, policy = tiny
    step = make_train_step(policy.graphdef, OptimConfig(**OPTIM), policy.mesh, micro_batch=4)
    params = copy(policy.params)
    key = ("lm_head", "kernel")
    params[key] = params[key].at[0, 0].set(jnp.inf)
    state = create_train_state(params, step.tx)
    expected = host(state.params)
    with pytest.raises(TrainingError, match=r"step 0: non-finite loss") as info:
        step(state, batch_of(policy, 8))
    kept = info.value.state
    assert int(kept.step) == 0 and schedule_position(kept) == 0
    for p, a in expected.items():
        assert np.asarray(kept.params[p]).tobytes() == a.tobytes(), p


def test_nan_in_the_batch_is_refused_before_the_step(tiny):
    """A NaN input (e.g. an image decoded wrong) names its row; the state is untouched and trains on."""
    _, policy = tiny
    step = make_train_step(policy.graphdef, OptimConfig(**OPTIM), policy.mesh, micro_batch=4)
    state = create_train_state(copy(policy.params), step.tx)
    expected = host(state.params)
    batch = batch_of(policy, 8)
    bad = {**batch, "pixel_values": batch["pixel_values"].copy()}
    bad["pixel_values"][3, 0, 5, 5] = np.nan
    with pytest.raises(TrainingError, match=r"batch 'pixel_values' holds NaN/inf in row\(s\) \[3\]; no update"):
        step(state, bad)
    for p, a in expected.items():  # not donated, not changed
        assert np.asarray(state.params[p]).tobytes() == a.tobytes(), p
    state, m = step(state, batch)
    assert int(state.step) == 1 and np.isfinite(m["loss"])


def test_bf16_compute_with_fp32_master(tiny):
    """compute_dtype=bfloat16 really multiplies in bf16 (read from the lowered step), while params, gradients'
    accumulation and Adam moments stay fp32; the loss moves by a bf16-sized amount, not 0 and not more."""
    import re

    _, policy = tiny
    batch = batch_of(policy, 8)
    optim = OptimConfig(**OPTIM)
    losses, dots = {}, {}
    for dtype in ("float32", "bfloat16"):
        step = make_train_step(policy.graphdef, optim, policy.mesh, micro_batch=4, compute_dtype=dtype)
        state = create_train_state(copy(policy.params), step.tx)
        device_batch, num_targets, groups = step.put_batch(batch)
        hlo = step._update_fn(state).lower(state, device_batch, num_targets, groups).as_text()
        # Operand element types of every matmul: "... : (tensor<16x64xbf16>, tensor<64x128xbf16>) -> ...".
        dots[dtype] = [(a.rsplit("x", 1)[-1], b.rsplit("x", 1)[-1]) for a, b in re.findall(
            r"stablehlo\.dot_general[^\n]*: \((tensor<[^>]*)>, (tensor<[^>]*)>\) ->", hlo)]
        state, m = step(state, batch)
        losses[dtype] = m["loss"]
        assert all(a.dtype == jnp.float32 for a in state.params.values())
        floats = [x for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert floats and all(x.dtype == jnp.float32 for x in floats)
        assert np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
    assert len(dots["float32"]) == len(dots["bfloat16"]) > 50  # forward and backward of every layer
    assert all(d == ("f32", "f32") for d in dots["float32"])
    bf16 = sum(d == ("bf16", "bf16") for d in dots["bfloat16"])
    assert bf16 >= 0.9 * len(dots["bfloat16"]), dots["bfloat16"]
    gap = abs(losses["bfloat16"] - losses["float32"]) / losses["float32"]
    # Above fp32 rounding (1e-7) since bf16 keeps 8 mantissa bits; far below them since the mean over tokens
    # averages the per-token errors (measured: 6e-6 here).
    assert 1e-6 < gap < 1e-3, gap


def test_low_precision_master_weights_lose_small_updates_and_are_refused(tiny):
    """Why bf16 master weights are refused: at the paper's lr one AdamW step changes (almost) no bf16 weight."""
    _, policy = tiny
    batch = batch_of(policy, 8)
    step = make_train_step(policy.graphdef, OptimConfig(lr=1e-6, total_steps=10, warmup_ratio=0.0), policy.mesh,
                           micro_batch=4, compute_dtype="bfloat16")
    key = ("language_model", "layers", 0, "mlp", "down_proj", "kernel")
    changed = {}
    for dtype in ("float32", "bfloat16"):
        params = {p: jnp.asarray(a, dtype) for p, a in copy(policy.params).items()}
        before = np.asarray(params[key]).astype(np.float32)
        state = create_train_state(params, step.tx, allow_low_precision=dtype != "float32")
        state, _ = step(state, batch)
        changed[dtype] = float(np.mean(np.asarray(state.params[key]).astype(np.float32) != before))
    assert changed["float32"] > 0.9 and changed["bfloat16"] < 0.1, changed
    bf16 = {p: a.astype(jnp.bfloat16) for p, a in policy.params.items()}
    with pytest.raises(TrainingError, match=r"below float32 \(e\.g\. .*bfloat16\).*compute_dtype='bfloat16'"):
        create_train_state(bf16, step.tx)


def test_target_bound_buckets_are_coarse_and_cover_the_targets():
    """Steps whose response-token counts differ by tens share a bucket (each new bucket recompiles)."""
    from mstar_jax.training import num_targets_bound

    def bound(n, rows=4, t=2048):
        m = np.zeros((rows, t), np.int32)
        m[0, 1:n + 1] = 1
        return num_targets_bound(m)

    counts = range(300, 501)
    assert all(bound(n) >= n for n in range(1, 1200))
    assert len({bound(n) for n in counts}) == 2  # 384 and 512
    assert max(bound(n) / n for n in range(64, 1200)) <= 1.5
    full = np.ones((2, 1024), np.int32)  # 2 x 1023 targets: the bucket (2048) is capped at the positions there are
    assert num_targets_bound(full) == 2 * 1023
