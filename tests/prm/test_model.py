"""The PRM backbone + head: initialisation, the MSE objective against PyTorch, and freezing in the shared step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mstar_jax.prm import model as M
from mstar_jax.prm.encode import encode
from mstar_jax.prm.steps import split_steps
from mstar_jax.sft_batch import pad_examples
from tests.conftest import random_images

RESPONSES = ["The left die shows 3. The right die shows 5. 3 + 5 = 8. The answer is 8.",
             "Count the dots. The answer is 4."]
LABELS = [[1.0, 0.75, 0.5, 0.25], [0.125, 0.0]]


@pytest.fixture(scope="module")
def policy(tiny_models):
    import mstar_jax

    return mstar_jax.load(tiny_models["clip_llama"][0])


def _batch(processor):
    rows = []
    for i, (resp, labels) in enumerate(zip(RESPONSES, LABELS)):
        spans = split_steps(resp, "sentences")
        row = encode(processor, f"question {i}?", random_images(i, [(30 + i, 40)])[0], resp, spans, labels)
        rows.append({k: v for k, v in row.items() if k not in ("ends", "num_steps")})
    return pad_examples(rows, pad_id=0, padding_side="right")


def test_head_starts_at_the_mean_embedding(policy):
    head = M.init_head(policy.graphdef, policy.params)
    table = np.asarray(policy.params[("language_model", "embed_tokens")])
    # The mean of the rows, up to float32 summation order.
    np.testing.assert_allclose(np.asarray(head[M.HEAD_W]), table.astype(np.float64).mean(axis=0), rtol=1e-6,
                               atol=1e-9)
    assert float(head[M.HEAD_B]) == 0.0


def test_targets_cover_each_steps_tokens(policy):
    batch = _batch(policy.processor)
    for row, labels in enumerate(LABELS):
        scored = batch["targets"][row][batch["loss_mask"][row] == 1]
        # Labels appear in step order, each over a run of tokens, and only on response tokens.
        runs = [scored[0]] + [x for a, x in zip(scored[:-1], scored[1:]) if x != a]
        assert runs == labels
        assert batch["loss_mask"][row].sum() > len(labels)


def test_mse_loss_and_gradients_match_pytorch(policy, tiny_models):
    import torch

    from mstar_jax.training import accumulate_grads

    batch = _batch(policy.processor)
    params = M.with_head(policy.params, M.init_head(policy.graphdef, policy.params))
    device = {k: jnp.asarray(v)[None] for k, v in batch.items()}
    loss, grads, _ = accumulate_grads(policy.graphdef, params, device, 1, objective=M.PRM_MSE)

    model = tiny_models["clip_llama"][1].float()
    model.zero_grad()
    mask = batch["attention_mask"]
    pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 0)
    out = model.model(input_ids=torch.tensor(batch["input_ids"]).long(), attention_mask=torch.tensor(mask),
                      pixel_values=torch.tensor(batch["pixel_values"]), position_ids=torch.tensor(pos))
    w = model.get_input_embeddings().weight.detach().mean(0).clone().requires_grad_(True)
    b = torch.zeros((), requires_grad=True)
    scores = out.last_hidden_state @ w + b
    lm = torch.tensor(batch["loss_mask"]).float()
    ref = (lm * (scores - torch.tensor(batch["targets"])) ** 2).sum() / lm.sum()
    ref.backward()
    np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grads[M.HEAD_W]), w.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(grads[M.HEAD_B]), b.grad.item(), rtol=1e-4, atol=1e-7)
    lm_layers = model.model.language_model.layers
    pairs = {("language_model", "layers", 0, "mlp", "down_proj", "kernel"): lm_layers[0].mlp.down_proj.weight.grad.T,
             ("language_model", "layers", 1, "self_attn", "k_proj", "kernel"):
                 lm_layers[1].self_attn.k_proj.weight.grad.T,
             ("multi_modal_projector", "linear_1", "kernel"):
                 model.model.multi_modal_projector.linear_1.weight.grad.T,
             ("vision_tower", "layers", 0, "fc1", "kernel"):
                 model.model.vision_tower.encoder.layers[0].mlp.fc1.weight.grad.T}
    for path, ref_grad in pairs.items():
        g = np.asarray(grads[path])
        scale = np.abs(ref_grad.numpy()).max()
        assert scale > 0
        np.testing.assert_allclose(g, ref_grad.numpy(), rtol=1e-3, atol=1e-4 * scale, err_msg=str(path))
    model.zero_grad()


def test_frozen_vision_stays_bitwise_while_the_rest_trains(policy):
    from mstar_jax.optim import OptimConfig
    from mstar_jax.training import create_train_state, make_train_step

    params = M.with_head({p: jnp.copy(a) for p, a in policy.params.items()},
                         M.init_head(policy.graphdef, policy.params))
    before = {p: np.asarray(a).copy() for p, a in params.items()}
    optim = OptimConfig(lr=1e-2, total_steps=4, warmup_ratio=0.0, freeze_vision_tower=True)
    step = make_train_step(policy.graphdef, optim, objective=M.PRM_MSE, micro_batch=1)
    state = create_train_state(params, step.tx)
    state, metrics = step(state, _batch(policy.processor))
    assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
    after = jax.device_get(state.params)
    for p, a in after.items():
        if p[0] == "vision_tower":
            np.testing.assert_array_equal(np.asarray(a), before[p], err_msg=str(p))
    assert not np.array_equal(np.asarray(after[M.HEAD_W]), before[M.HEAD_W])
    assert not np.array_equal(np.asarray(after[("multi_modal_projector", "linear_1", "kernel")]),
                              before[("multi_modal_projector", "linear_1", "kernel")])
