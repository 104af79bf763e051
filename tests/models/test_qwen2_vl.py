"""Qwen2-VL / Qwen2.5-VL against transformers on tiny random checkpoints: logits, M-RoPE positions under jit,
greedy tokens, cached decode, the SFT loss and its gradients, the PRM, HF <-> Flax round trips, 8 devices, the
processor without torchvision, presets, and bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mstar_jax
from mstar_jax.errors import CheckpointError, MstarError
from mstar_jax.models.qwen2_vl.tiny import TinySpec, make_tiny_qwen_vl
from tests.conftest import random_images

ROOT = Path(__file__).resolve().parents[2]
SPECS = {
    # Full attention in every ViT layer; untied head; a KV-head ratio of 2.
    "qwen2_vl": TinySpec(model_type="qwen2_vl"),
    # Windowed ViT layers 0 and 2 (2x2 merged tokens per window) around a full-attention layer 1; tied embeddings.
    "qwen2_5_vl": TinySpec(model_type="qwen2_5_vl", vision_layers=3, fullatt_block_indexes=(1,),
                           tie_word_embeddings=True, kv_heads=1),
}
# Images of three sizes (after resizing: 40x56, 32x64 and 64x64 px at patch 4, i.e. 140, 128 and 256 patches).
SIZES = [(40, 52), (30, 70), (64, 64)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{name: (hf_dir, torch model)} for both model types."""
    out = {}
    for name, spec in SPECS.items():
        path = tmp_path_factory.mktemp(name)
        out[name] = (path, make_tiny_qwen_vl(path, spec))
    return out


@pytest.fixture(scope="module")
def policies(tiny):
    return {name: mstar_jax.load(path) for name, (path, _) in tiny.items()}


def _turn(processor, question: str, images: int) -> str:
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def mixed_batch(processor, padding_side="left") -> dict:
    """Rows: text only, one image, two images of different sizes (three sizes in all), padded."""
    images = random_images(1, SIZES)
    texts = [_turn(processor, "How many circles are there in the picture? Count them.", 0),
             _turn(processor, "Which bar is tallest?", 1), _turn(processor, "Compare the two pictures.", 2)]
    side, processor.tokenizer.padding_side = processor.tokenizer.padding_side, padding_side
    try:
        return dict(processor(images=images, text=texts, return_tensors="np", padding=True))
    finally:
        processor.tokenizer.padding_side = side


def hf_logits(model, batch) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in batch.items()}).logits.float().numpy()


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_match_transformers(tiny, policies, name, padding_side):
    policy, hf = policies[name], tiny[name][1]
    batch = mixed_batch(policy.processor, padding_side)
    mask = batch["attention_mask"].astype(bool)
    assert not mask.all() and len({tuple(g) for g in batch["image_grid_thw"].tolist()}) == 3
    ours, ref = policy.logits(batch), hf_logits(hf, batch)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    err = np.abs(ours - ref)[mask].max()
    assert err < 1e-4, f"{name}/{padding_side}: max abs logit error {err}"
    assert np.std(ref[mask]) > 1e-2


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_mrope_positions_equal_get_rope_index_under_jit(tiny, policies, padding_side):
    import torch

    from mstar_jax.models.qwen2_vl.rope import mrope_positions

    policy, hf = policies["qwen2_5_vl"], tiny["qwen2_5_vl"][1]
    batch = mixed_batch(policy.processor, padding_side)
    cfg = policy.config
    positions = jax.jit(lambda ids, mask, grid: mrope_positions(ids, mask, grid, cfg.image_token_id, 2))
    ours = np.asarray(positions(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"]))
    ref, _ = hf.model.get_rope_index(torch.tensor(batch["input_ids"]), torch.tensor(batch["mm_token_type_ids"]),
                                     torch.tensor(batch["image_grid_thw"]),
                                     attention_mask=torch.tensor(batch["attention_mask"]))
    np.testing.assert_array_equal(ours, ref.numpy())
    # Not plain 1-D positions: image rows' height/width components differ, and skip ahead after each image.
    assert (ours[1] != ours[2]).any() and ours[:, 2].max() < batch["attention_mask"][2].sum() - 1
    # A text-only batch: the running position of the mask, the same in all three components.
    mask = batch["attention_mask"][:1]
    text = np.asarray(positions(batch["input_ids"][:1], mask, None))
    np.testing.assert_array_equal(text, np.broadcast_to(np.where(mask > 0, np.cumsum(mask, -1) - 1, 0), text.shape))


def test_window_attention_matters(tiny, tmp_path):
    """The same Qwen2.5-VL weights with every ViT layer at full attention give logits far from transformers'."""
    src, hf = tiny["qwen2_5_vl"]
    dst = tmp_path / "full"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["vision_config"]["fullatt_block_indexes"] = list(range(cfg["vision_config"]["depth"]))
    (dst / "config.json").write_text(json.dumps(cfg))
    policy = mstar_jax.load(dst)
    batch = mixed_batch(policy.processor)
    mask = batch["attention_mask"].astype(bool)
    assert np.abs(policy.logits(batch) - hf_logits(hf, batch))[mask].max() > 1e-2


@pytest.mark.parametrize("name", sorted(SPECS))
def test_greedy_tokens_match_generate(tiny, policies, name):
    import torch

    from mstar_jax.sampler import Sampler

    policy, hf = policies[name], tiny[name][1]
    batch = mixed_batch(policy.processor)
    sampler = Sampler(policy.graphdef, policy.config, policy.processor, policy.mesh)
    ours = sampler.generate(policy.params, batch=batch, n=2, temperature=0.0, max_new_tokens=12)
    with torch.no_grad():
        out = hf.generate(**{k: torch.tensor(v) for k, v in batch.items()}, do_sample=False, max_new_tokens=12)
    eos = sampler.eos_ids()
    for row, samples in enumerate(ours):
        ref = out[row, batch["input_ids"].shape[1]:].tolist()
        ref = ref[:next((i + 1 for i, t in enumerate(ref) if t in eos), len(ref))]
        assert [s.token_ids for s in samples] == [ref, ref], row
    assert sum(len(s[0].token_ids) for s in ours) >= 12  # rows really decoded


def test_cached_decode_equals_full_forward(policies):
    """Logits of forced tokens fed through the shared-prompt decode cache equal one full forward over prompt +
    tokens (M-RoPE positions continue after the images in both)."""
    from mstar_jax.sampler import Sampler

    policy = policies["qwen2_vl"]
    batch = mixed_batch(policy.processor)
    sampler = Sampler(policy.graphdef, policy.config, policy.processor, policy.mesh)
    forced = np.random.default_rng(0).integers(10, policy.config.text.vocab_size, (3, 5)).astype(np.int32)
    stepped = sampler.step_logits(policy.params, forced, batch=batch)  # [3, 6, V]
    mask = batch["attention_mask"].astype(bool)
    rows = [np.concatenate([ids[m], f]) for ids, m, f in zip(batch["input_ids"], mask, forced)]
    width = max(len(r) for r in rows)
    ids = np.zeros((3, width), np.int64)
    full_mask = np.zeros((3, width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], full_mask[i, width - len(r):] = r, 1
    full = policy.logits({**batch, "input_ids": ids, "attention_mask": full_mask,
                          "mm_token_type_ids": (ids == policy.config.image_token_id).astype(np.int64)})
    for i in range(3):
        np.testing.assert_allclose(stepped[i], full[i, width - forced.shape[1] - 1:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_sft_loss_and_gradients_match_pytorch(tiny, policies, name):
    """The response-only SFT loss on a batch of padded images ([rows, 1, P, patch_dim]) and its gradients in the
    ViT, the merger and the LM equal PyTorch's."""
    import torch

    from mstar_jax.sft_batch import sft_batch
    from mstar_jax.training import accumulate_grads, num_targets_bound

    policy, hf = policies[name], tiny[name][1]
    inputs = policy.loaded.family.inputs
    batch = sft_batch(policy.processor, ["How many circles?", "Which bar is tallest?"],
                      ["Count them: 3. The answer is 3.", "The answer is B."], random_images(2, SIZES[:2]),
                      inputs=inputs)
    assert batch["pixel_values"].shape[:2] == (2, 1) and batch["image_grid_thw"].shape == (2, 1, 3)
    device = {k: jnp.asarray(v)[None] for k, v in batch.items()}
    loss, grads, _ = accumulate_grads(policy.graphdef, policy.params, device, num_targets_bound(batch["loss_mask"]))

    model = hf.float().train(False)
    model.zero_grad()
    grid = batch["image_grid_thw"].reshape(-1, 3)
    flat = np.concatenate([px[:int(np.prod(g))] for px, g in zip(batch["pixel_values"].reshape(
        -1, *batch["pixel_values"].shape[2:]), grid)])
    ids = torch.tensor(batch["input_ids"]).long()
    logits = model(input_ids=ids, attention_mask=torch.tensor(batch["attention_mask"]),
                   pixel_values=torch.tensor(flat), image_grid_thw=torch.tensor(grid),
                   mm_token_type_ids=(ids == policy.config.image_token_id).long()).logits
    w = torch.tensor(batch["loss_mask"][:, 1:]).float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    ref = (nll * w).sum() / w.sum()
    ref.backward()
    np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-5)
    pairs = {("vision_tower", "patch_embed", "kernel"): model.model.visual.patch_embed.proj.weight.grad.reshape(
                 model.model.visual.patch_embed.proj.weight.shape[0], -1).T,
             ("vision_tower", "layers", 0, "attn", "qkv", "kernel"): model.model.visual.blocks[0].attn.qkv.weight.grad.T,
             ("multi_modal_projector", "linear_1", "kernel"): model.model.visual.merger.mlp[0].weight.grad.T,
             ("language_model", "layers", 1, "self_attn", "q_proj", "kernel"):
                 model.model.language_model.layers[1].self_attn.q_proj.weight.grad.T}
    for path, ref_grad in pairs.items():
        ref_grad = ref_grad.numpy()
        assert np.abs(ref_grad).max() > 0, path
        np.testing.assert_allclose(np.asarray(grads[path]), ref_grad, rtol=1e-3, atol=1e-5 * np.abs(ref_grad).max())


def test_freezing_the_vision_tower_keeps_it_bitwise(policies):
    """train.freeze_vision* freezes the Qwen ViT (and, separately, the merger) like the other families' towers."""
    from mstar_jax.optim import OptimConfig
    from mstar_jax.sft_batch import sft_batch
    from mstar_jax.training import create_train_state, make_train_step

    policy = policies["qwen2_vl"]
    inputs = policy.loaded.family.inputs
    batch = sft_batch(policy.processor, ["How many circles?", "Which bar?"], ["3.", "B."],
                      random_images(5, SIZES[:2]), inputs=inputs)
    params = {p: jnp.copy(a) for p, a in policy.params.items()}
    before = {p: np.asarray(a).copy() for p, a in params.items()}  # the step donates its state
    step = make_train_step(policy.graphdef, OptimConfig(lr=1e-2, total_steps=2, warmup_ratio=0.0,
                                                        freeze_vision_tower=True), image_keys=inputs.batch_keys)
    state, metrics = step(create_train_state(params, step.tx), batch)
    after = jax.device_get(state.params)
    changed = {p[0] for p in before if not np.array_equal(np.asarray(after[p]), before[p])}
    assert np.isfinite(metrics["loss"]) and changed == {"language_model", "lm_head", "multi_modal_projector"}


def test_prm_trains_and_scores_on_qwen(tiny, policies):
    """The PRM's MSE and gradients through the Qwen backbone equal PyTorch's, and batched step scores (rows with
    their own padded images, a text-only row among them) equal rows scored alone."""
    import torch

    from mstar_jax.prm import model as M
    from mstar_jax.prm.encode import encode
    from mstar_jax.prm.score import ProcessRewardModel
    from mstar_jax.prm.steps import split_steps
    from mstar_jax.sft_batch import pad_examples
    from mstar_jax.training import accumulate_grads

    policy, hf = policies["qwen2_5_vl"], tiny["qwen2_5_vl"][1]
    inputs = policy.loaded.family.inputs
    responses, labels = ["Three dots. Five dots. The answer is 8.", "Count. The answer is 4."], [[1, .5, .25], [0, 1]]
    images = random_images(4, SIZES[1:])
    rows = [{k: v for k, v in encode(policy.processor, f"q{i}?", im, r, split_steps(r, "sentences"), lab,
                                     inputs=inputs).items() if k not in ("ends", "num_steps")}
            for i, (im, r, lab) in enumerate(zip(images, responses, labels))]
    batch = pad_examples(rows, 0, "right", inputs=inputs)
    params = M.with_head(policy.params, M.init_head(policy.graphdef, policy.params))
    loss, grads, _ = accumulate_grads(policy.graphdef, params, {k: jnp.asarray(v)[None] for k, v in batch.items()},
                                      1, objective=M.PRM_MSE)
    model = hf.float()
    model.zero_grad()
    grid = batch["image_grid_thw"].reshape(-1, 3)
    flat = np.concatenate([px[:int(np.prod(g))] for px, g in zip(batch["pixel_values"].reshape(
        -1, *batch["pixel_values"].shape[2:]), grid)])
    ids = torch.tensor(batch["input_ids"]).long()
    out = model.model(input_ids=ids, attention_mask=torch.tensor(batch["attention_mask"]),
                      pixel_values=torch.tensor(flat), image_grid_thw=torch.tensor(grid),
                      mm_token_type_ids=(ids == policy.config.image_token_id).long())
    w = model.get_input_embeddings().weight.detach().mean(0).clone().requires_grad_(True)
    scores = out.last_hidden_state @ w
    lm = torch.tensor(batch["loss_mask"]).float()
    ref = (lm * (scores - torch.tensor(batch["targets"])) ** 2).sum() / lm.sum()
    ref.backward()
    np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grads[M.HEAD_W]), w.grad.numpy(), rtol=1e-4, atol=1e-6)

    rng = np.random.default_rng(0)
    head = {M.HEAD_W: params[M.HEAD_W] + jnp.asarray(rng.normal(0, 0.3, params[M.HEAD_W].shape), jnp.float32),
            M.HEAD_B: jnp.float32(0.25)}
    prm = ProcessRewardModel(policy.loaded, head, policy.processor, step_rule="sentences", batch_rows=4)
    prompts, imgs = ["q0?", "q1?", "q1?"], [images[0], None, images[1]]
    triples = [responses[0], responses[1], responses[1]]
    batched = prm.score_rows(prompts, imgs, triples)
    assert [len(s) for s in batched] == [3, 2, 2]
    for p, im, r, got in zip(prompts, imgs, triples, batched):
        np.testing.assert_allclose(got, prm.score_rows([p], [im], [r])[0], rtol=1e-5, atol=1e-6)
    assert batched[1] != batched[2]  # the image changes the scores


def _load_keys(path: Path) -> dict:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _relayout(src: Path, dst: Path) -> None:
    """A copy of a checkpoint in transformers 4.52-4.57's save layout (model.language_model.*, model.visual.*)."""
    from safetensors.numpy import save_file

    shutil.copytree(src, dst)
    tensors = _load_keys(src)
    renamed = {("model.language_model." + k[len("model."):] if k.startswith("model.") else
                "model." + k if k.startswith("visual.") else k): v for k, v in tensors.items()}
    for f in dst.glob("*.safetensors*"):
        f.unlink()
    save_file(renamed, dst / "model.safetensors")


@pytest.mark.parametrize("name,layout", [("qwen2_vl", "hub"), ("qwen2_5_vl", "hub"),
                                         ("qwen2_5_vl", "transformers-4.5x")])
def test_hf_flax_hf_round_trip_is_bitwise_and_loads_in_transformers(tiny, tmp_path, name, layout):
    import transformers

    from mstar_jax.conversion import flax_to_hf, hf_to_flax, load_converted

    src = tiny[name][0]
    if layout != "hub":
        _relayout(src, tmp_path / "src")
        src = tmp_path / "src"
    hf_to_flax(src, tmp_path / "flax")
    assert load_converted(tmp_path / "flax").layout == layout
    flax_to_hf(tmp_path / "flax", tmp_path / "back")
    before, after = _load_keys(src), _load_keys(tmp_path / "back")
    assert sorted(before) == sorted(after)
    for k in before:
        assert before[k].dtype == after[k].dtype and np.array_equal(before[k], after[k]), k
    cls = getattr(transformers, "Qwen2VLForConditionalGeneration" if name == "qwen2_vl" else
                  "Qwen2_5_VLForConditionalGeneration")
    for out in ("back", "other"):
        if out == "other":  # the other layout loads in transformers too
            flax_to_hf(tmp_path / "flax", tmp_path / out,
                       layout="transformers-4.5x" if layout == "hub" else "hub")
        _, info = cls.from_pretrained(tmp_path / out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_eight_devices_give_the_same_logits(tiny, policies, tmp_path):
    from tests.conftest import make_batch

    path = tiny["qwen2_5_vl"][0]
    policy = policies["qwen2_5_vl"]
    batch = make_batch(policy.processor)
    ref, mask = policy.logits(batch), batch["attention_mask"].astype(bool)
    out = tmp_path / "logits.npz"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-m", "tests.mesh_worker", str(path), str(out), "1", "4", "2"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads(Path(str(out) + ".json").read_text())
    assert info["devices"] == 8
    assert info["specs"]["language_model.layers.0.self_attn.q_proj.kernel"] == ["fsdp", "tensor"]
    assert info["specs"]["vision_tower.layers.0.attn.qkv.kernel"] == ["fsdp", "tensor"]
    assert np.abs(np.load(out)["logits"] - ref)[mask].max() < 1e-5


def test_processor_without_torchvision_gives_transformers_batch(tiny, caplog):
    """The processor built from the checkpoint without torchvision (said once) gives the batch of transformers'
    own Qwen2_5_VLProcessor assembled from the published pieces (PIL image processor at the spec's pixel budget,
    tokenizer, chat template)."""
    from transformers import AutoTokenizer
    from transformers.utils import is_torchvision_available

    from mstar_jax.models.qwen2_vl import processor as P
    from mstar_jax.models.qwen2_vl.tiny import CHAT_TEMPLATE, image_processor

    assert not is_torchvision_available()  # the case this test is about
    path = tiny["qwen2_5_vl"][0]
    P._SAID.clear()
    with caplog.at_level("WARNING", logger=P.__name__):
        ours = P.load_processor(path)
        P.load_processor(path)
    assert sum("torchvision is not installed" in r.message for r in caplog.records) == 1
    ref = P.build_image_only("qwen2_5_vl", image_processor(SPECS["qwen2_5_vl"]), AutoTokenizer.from_pretrained(path),
                             CHAT_TEMPLATE)
    import transformers

    assert isinstance(ours, transformers.Qwen2_5_VLProcessor)
    a, b = mixed_batch(ours), mixed_batch(ref)
    assert sorted(a) == sorted(b) == ["attention_mask", "image_grid_thw", "input_ids", "mm_token_type_ids",
                                      "pixel_values"]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("name,params_b", [("qwen2-vl-2b", 2.21), ("qwen2.5-vl-3b", 3.75), ("qwen2.5-vl-7b", 8.29)])
def test_presets_have_the_published_sizes_and_shard_without_weights(name, params_b):
    from jax.sharding import AbstractMesh

    from mstar_jax import sharding as shd
    from mstar_jax.conversion import model_skeleton
    from mstar_jax.models import registry

    cfg = registry.family("qwen2_vl").presets()[name]
    mesh = AbstractMesh((1, 8, 1), ("data", "fsdp", "tensor"))
    _, shapes, axes = model_skeleton(cfg, jnp.bfloat16)
    total = per_device = 0
    for path, s in shapes.items():
        spec = shd.logical_to_spec(axes[path], s.shape, mesh)
        split = math.prod(mesh.shape[a] for d in spec if d is not None for a in ((d,) if isinstance(d, str) else d))
        total += math.prod(s.shape)
        per_device += math.prod(s.shape) // split
    assert round(total / 1e9, 2) == params_b  # the model cards' parameter counts
    assert per_device <= total / 8 * 1.005


def test_an_image_too_large_for_max_pixels_is_refused(policies):
    """A very thin image cannot be shrunk under max_pixels by the processor: refused with its size, not run."""
    from PIL import Image

    policy = policies["qwen2_vl"]
    image = Image.fromarray(np.zeros((8, 1000, 3), np.uint8))
    text = _turn(policy.processor, "What is this?", 1)
    batch = dict(policy.processor(images=[image], text=[text], return_tensors="np"))
    with pytest.raises(MstarError, match=r"image 0 is 8x712 px .*max_pixels=4096"):
        policy.logits(batch)
    with pytest.raises(MstarError, match="max_pixels=4096"):
        policy.generate([image], ["What is this?"], n=1, max_new_tokens=2)


def test_image_token_mismatch_and_videos_are_clear_errors(policies):
    policy = policies["qwen2_vl"]
    batch = mixed_batch(policy.processor)
    short = {**batch, "image_grid_thw": batch["image_grid_thw"][:2],
             "pixel_values": batch["pixel_values"][:int(np.prod(batch["image_grid_thw"][:2], axis=1).sum())]}
    with pytest.raises(MstarError, match="image tokens"):
        policy.logits(short)
    with pytest.raises(MstarError, match="patches but image_grid_thw"):
        policy.logits({**batch, "pixel_values": batch["pixel_values"][:-4]})
    with pytest.raises(MstarError, match="videos are not supported"):
        policy.generate(None, None, batch={**batch, "video_grid_thw": np.ones((1, 3), np.int64)}, n=1,
                        max_new_tokens=2)


def test_missing_tensor_is_named_and_unsupported_model_types_list_ours(tiny, tmp_path):
    from safetensors.numpy import save_file

    from mstar_jax.conversion import hf_to_flax
    from mstar_jax.models import registry

    src = tiny["qwen2_5_vl"][0]
    dst = tmp_path / "cut"
    shutil.copytree(src, dst)
    tensors = _load_keys(src)
    del tensors["visual.blocks.1.attn.qkv.bias"]
    for f in dst.glob("*.safetensors*"):
        f.unlink()
    save_file(tensors, dst / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"visual\.blocks\.1\.attn\.qkv\.bias"):
        hf_to_flax(dst, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen3_vl"}))
    with pytest.raises(CheckpointError, match="qwen2_5_vl.*qwen2_vl|qwen2_vl.*qwen2_5_vl") as err:
        registry.family_of(dst)
    assert "'qwen3_vl' is not supported" in str(err.value)
