"""InternVL through every command: `mstar sample` and `mstar eval` (both formats), the PRM (its loss and gradients
against PyTorch on rows with different tile counts, a training step, batched scoring), presets, and the planner."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mstar_jax
from mstar_jax.cli import main
from mstar_jax.prm import model as M
from mstar_jax.prm.encode import encode
from mstar_jax.prm.steps import split_steps
from mstar_jax.sft_batch import pad_examples
from tests.conftest import random_images
from tests.models.internvl_helpers import build

RESPONSES = ["The left die shows 3. The right die shows 5. 3 + 5 = 8. The answer is 8.",
             "Count the dots. The answer is 4."]
LABELS = [[1.0, 0.75, 0.5, 0.25], [0.125, 0.0]]
SIZES = [(60, 125), (120, 110)]  # 3 and 5 tiles


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{"hf": (dir, torch model), "chat": release-layout dir converted from it}."""
    root = tmp_path_factory.mktemp("internvl_cmd")
    path, model = build(root, "llama")
    assert main(["convert", "hf-to-flax", str(path), str(root / "flax")]) == 0
    assert main(["convert", "flax-to-hf", str(root / "flax"), str(root / "chat"), "--layout", "internvl_chat"]) == 0
    return {"hf": (path, model), "chat": root / "chat", "root": root}


@pytest.fixture(scope="module")
def policy(tiny):
    return mstar_jax.load(tiny["hf"][0])


@pytest.mark.parametrize("fmt", ["hf", "chat"])
def test_cli_sample_prints_json(tiny, tmp_path, capsys, fmt):
    img = tmp_path / "img.png"
    random_images(1, [(40, 90)])[0].save(img)
    path = tiny["hf"][0] if fmt == "hf" else tiny["chat"]
    assert main(["sample", str(path), "--image", str(img), "--prompt", "Which bar?", "--n", "3",
                 "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["samples"]) == 3 and all(1 <= len(s["token_ids"]) <= 4 for s in out["samples"])


def test_cli_eval_on_synthetic_items(tiny, tmp_path):
    from mstar_jax.data.synth import SynthConfig, generate

    generate(tmp_path / "synth", SynthConfig(seed=3, sizes={"test_ood": 6}, image_size=40, workers=1))
    out = tmp_path / "out"
    assert main(["eval", str(tiny["chat"]), "--benchmark", "synthetic", "--data", str(tmp_path / "synth" /
                 "test_ood.json"), "--n", "2", "--temperature", "1.0", "--max-new-tokens", "6", "--batch-size", "6",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    lines = [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]
    rows = json.loads((tmp_path / "synth" / "test_ood.json").read_text())  # MathVista rows by pid
    assert results["n"] == 6 and len(lines) == 6 and all(len(x["responses"]) == 3 for x in lines)
    greedy = [mstar_jax.check_answer(x["responses"][0], rows[x["id"]]) for x in lines]
    assert results["greedy_accuracy"] == pytest.approx(100 * sum(greedy) / 6)


# ------------------------------------------------------------------------------------------------- PRM


def _prm_batch(policy):
    rows = []
    for i, (resp, labels) in enumerate(zip(RESPONSES, LABELS)):
        image = random_images(i, [SIZES[i]])[0]
        row = encode(policy.processor, f"question {i}?", image, resp, split_steps(resp, "sentences"), labels,
                     inputs=policy.loaded.family.inputs)
        rows.append({k: v for k, v in row.items() if k not in ("ends", "num_steps")})
    return pad_examples(rows, pad_id=0, padding_side="right", inputs=policy.loaded.family.inputs)


def test_prm_loss_and_gradients_match_pytorch_on_rows_of_different_tile_counts(policy, tiny):
    import torch

    from mstar_jax.training import accumulate_grads

    batch = _prm_batch(policy)
    px = batch["pixel_values"]
    assert px.shape[:2] == (2, 8)  # 3 and 5 tiles, padded per row to a power of two
    tiles = [3, 5]
    params = M.with_head(policy.params, M.init_head(policy.graphdef, policy.params))
    device = {k: jnp.asarray(v)[None] for k, v in batch.items()}
    loss, grads, _ = accumulate_grads(policy.graphdef, params, device, 1, objective=M.PRM_MSE)

    model = tiny["hf"][1].float()
    model.zero_grad()
    mask = batch["attention_mask"]
    pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 0)
    flat = np.concatenate([px[i, :n] for i, n in enumerate(tiles)])  # the processor's order: row by row
    out = model.model(input_ids=torch.tensor(batch["input_ids"]).long(), attention_mask=torch.tensor(mask),
                      pixel_values=torch.tensor(flat), position_ids=torch.tensor(pos))
    w = model.get_input_embeddings().weight.detach().mean(0).clone().requires_grad_(True)
    b = torch.zeros((), requires_grad=True)
    scores = out.last_hidden_state @ w + b
    lm = torch.tensor(batch["loss_mask"]).float()
    ref = (lm * (scores - torch.tensor(batch["targets"])) ** 2).sum() / lm.sum()
    ref.backward()
    np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grads[M.HEAD_W]), w.grad.numpy(), rtol=1e-4, atol=1e-6)
    inner = model.model
    pairs = {("language_model", "layers", 1, "self_attn", "k_proj", "kernel"):
             inner.language_model.layers[1].self_attn.k_proj.weight.grad.T,
             ("multi_modal_projector", "linear_1", "kernel"): inner.multi_modal_projector.linear_1.weight.grad.T,
             ("vision_tower", "layers", 0, "fc1", "kernel"): inner.vision_tower.encoder.layer[0].mlp.fc1.weight.grad.T,
             ("vision_tower", "layers", 1, "lambda_1"): inner.vision_tower.encoder.layer[1].lambda_1.grad}
    for path, ref_grad in pairs.items():
        g, r = np.asarray(grads[path]), ref_grad.numpy()
        scale = np.abs(r).max()
        assert scale > 0
        np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-4 * scale, err_msg=str(path))
    model.zero_grad()


def test_prm_trains_and_scores(policy):
    from mstar_jax.optim import OptimConfig
    from mstar_jax.prm.score import ProcessRewardModel
    from mstar_jax.training import create_train_state, make_train_step

    params = M.with_head({p: jnp.copy(a) for p, a in policy.params.items()},
                         M.init_head(policy.graphdef, policy.params))
    before = {p: np.asarray(a).copy() for p, a in params.items()}
    step = make_train_step(policy.graphdef, OptimConfig(lr=1e-2, total_steps=4, warmup_ratio=0.0),
                           objective=M.PRM_MSE, micro_batch=1, image_keys=policy.loaded.family.inputs.batch_keys)
    state = create_train_state(params, step.tx)
    state, first = step(state, _prm_batch(policy))
    state, second = step(state, _prm_batch(policy))
    assert math.isfinite(first["loss"]) and second["loss"] < first["loss"]
    after = jax.device_get(state.params)
    for path in (("vision_tower", "layers", 0, "q_proj", "kernel"), M.HEAD_W):
        assert not np.array_equal(np.asarray(after[path]), before[path])
    head = {p: state.params[p] for p in M.HEAD_PATHS}
    prm = ProcessRewardModel(policy.loaded.with_params(M.backbone(state.params)), head, policy.processor,
                             step_rule="sentences", batch_rows=2, prompt_fn=lambda item: item["query"])
    imgs = random_images(3, SIZES)
    items = [{"query": "What is the sum?", "image": imgs[0]}, {"query": "How many dots?", "image": imgs[1]}]
    batched = prm.step_scores(items, [RESPONSES, RESPONSES[1:]])
    assert [len(s) for s in batched[0]] == [4, 2]
    for item, rs, got in zip(items, [RESPONSES, RESPONSES[1:]], batched):
        for r, g in zip(rs, got):
            np.testing.assert_allclose(g, prm.score_rows([item["query"]], [item["image"]], [r])[0], rtol=1e-5,
                                       atol=1e-6)


# --------------------------------------------------------------------------------------- presets, plan


def test_presets_have_the_published_sizes_and_shard_without_weights():
    import math as m

    from jax.sharding import AbstractMesh

    from mstar_jax import sharding as shd
    from mstar_jax.conversion import model_skeleton
    from mstar_jax.models.internvl.config import PRESETS

    mesh = AbstractMesh((1, 8, 1), ("data", "fsdp", "tensor"))
    # Parameter counts the model cards give, rounded to 0.1 B.
    published = {"internvl2-2b": 2.2, "internvl2.5-2b": 2.2, "internvl3-2b": 2.1}
    for name, cfg in PRESETS.items():
        _, shapes, axes = model_skeleton(cfg, jnp.bfloat16)
        total = sum(m.prod(s.shape) for s in shapes.values())
        assert abs(total / 1e9 - published[name]) < 0.05, (name, total)
        per_device = 0
        for path, s in shapes.items():
            spec = shd.logical_to_spec(axes[path], s.shape, mesh)
            split = m.prod(mesh.shape[a] for d in spec if d is not None for a in ((d,) if isinstance(d, str) else d))
            per_device += m.prod(s.shape) // split
        assert per_device <= total / 8 * 1.01


def test_plan_finds_the_internvl_presets(capsys):
    from mstar_jax.memory.families import find_preset

    fam, cfg = find_preset("internvl2-2b")
    assert fam.name == "internvl" and cfg.llm_arch == "internlm2"
    batch = fam.batch(cfg, 4, 1024)
    assert batch["pixel_values"][0] == (4, 8, 3, 448, 448)
    assert "InternViT" in fam.describe(cfg)
