"""MiniCPM-Llama3-V-2.5 (model_type minicpmv) from a tiny random checkpoint in the release's layout, against the
PyTorch reference of tests/models/minicpmv_reference.py (transformers' Idefics2VisionTransformer and
LlamaForCausalLM, the release's resampler with nn.MultiheadAttention, its slicing and scatter in torch)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import mstar_jax
from mstar_jax.errors import CheckpointError, MstarError
from mstar_jax.models.minicpmv.processing import MiniCPMVProcessor, slice_image
from mstar_jax.models.minicpmv.tiny import build_tokenizer, make_tiny_minicpmv
from tests.models.minicpmv_reference import RefResampler, ref_placeholder, ref_slice, ref_strips

# Tiny slicing (56-px slices of 14-px patches, 9 slices at most): 2 x 1 slices, upscaled whole, 1 x 4 slices.
SIZES = [(120, 60), (40, 30), (70, 200)]


def images(sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.models.minicpmv_reference import Reference

    path = make_tiny_minicpmv(tmp_path_factory.mktemp("minicpmv"))
    return path, Reference(path), mstar_jax.load(path)


def chat(processor, question, n_images=1):
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def bounds(policy):
    return policy.config.im_start_id, policy.config.im_end_id


def batch_of(policy, padding_side="left"):
    """Three prompts: two images (2 x 1 slices + source, one unsliced), one image (1 x 4 slices), text only."""
    p = policy.processor
    texts = [chat(p, "How many circles are there?", 2), chat(p, "Which bar is tallest?"), chat(p, "Hello", 0)]
    p.tokenizer.padding_side = padding_side
    try:
        return p(images=images(), text=texts, return_tensors="np"), [images()[:2], images()[2:], []]
    finally:
        p.tokenizer.padding_side = "left"


@pytest.mark.parametrize("scale,sizes", [(56, [(120, 60), (40, 30), (70, 200), (300, 41), (57, 55), (13, 400)]),
                                         (448, [(1344, 1344), (1000, 600), (500, 2000)])])
def test_slicing_matches_the_release(scale, sizes):
    """Slices (pixels, grids) and placeholder text equal the reference's transcription of the release's
    slice_image / reshape_by_patch / get_grid_placeholder."""
    p = MiniCPMVProcessor(build_tokenizer(400), query_num=3, scale_resolution=scale)
    grids = set()
    for img in images(sizes):
        arrays, grid = p.slices(img)
        strips, tgt, ref_grid = ref_strips(img, 9, scale, 14)
        assert grid == (None if ref_grid is None else tuple(ref_grid))
        assert [list(a.shape[1:]) for a in arrays] == [[h * 14, w * 14] for h, w in tgt]
        for a, s in zip(arrays, strips):
            from mstar_jax.models.minicpmv.processing import reshape_by_patch

            np.testing.assert_allclose(reshape_by_patch(a, 14), s.numpy(), atol=1e-6)
        assert p.placeholder(grid) == ref_placeholder(3, ref_grid)
        grids.add(grid)
    assert len(grids) >= 3  # unsliced and several grids


def test_token_and_slice_counts_are_the_documented_numbers():
    """The release's settings (config.json: query_num 96, slice_config max_slice_nums 9, scale_resolution 448,
    patch_size 14). Documented numbers:
    - the model card and the paper (arXiv 2408.01800, adaptive visual encoding): images up to 1.8 M pixels, e.g.
      1344 x 1344, cut into at most 9 slices of about 448 x 448 plus the source image, 96 tokens per slice;
    - vLLM's minicpmv.py (`MiniCPMVProcessingInfo.get_num_image_tokens`, version 2.5): an image gives
      (96 + 2) * (1 + cols * rows) + (rows - 1) + 2 tokens (<image> + 96 <unk> + </image> per slice, a newline
      between slice rows, <slice> and </slice>), the most for a 448 x 4032 image (`get_image_size_with_most_features`,
      h:w = 9:1)."""
    tok = build_tokenizer(400)
    p = MiniCPMVProcessor(tok)

    def count(w, h):
        arrays, grid = p.slices(Image.new("RGB", (w, h)))
        n = len(tok(p.placeholder(grid), add_special_tokens=False)["input_ids"])
        return grid, [(a.shape[1] // 14, a.shape[2] // 14) for a in arrays], n

    def vllm(grid):
        return 98 if grid is None else 98 * (1 + grid[0] * grid[1]) + grid[1] - 1 + 2

    grid, tgt, n = count(1344, 1344)
    assert grid == (3, 3) and tgt == [(32, 32)] * 10 and n == vllm(grid) == 984  # 32 x 32 patches = 448 px
    grid, tgt, n = count(448, 4032)
    assert grid == (1, 9) and len(tgt) == 10 and n == vllm(grid) == 990
    assert count(448, 448)[::2] == (None, 98)
    for w, h in [(1000, 600), (800, 2400), (1920, 1080), (2000, 300)]:
        grid, tgt, n = count(w, h)
        assert n == vllm(grid) and len(tgt) == 1 + grid[0] * grid[1] <= 10, (w, h)


def test_processor_expands_each_marker_to_its_slices(tiny):
    _, _, policy = tiny
    p = policy.processor
    batch, _ = batch_of(policy)
    grids = [slice_image(img, 9, 56, 14)[1] for img in images()]
    assert grids == [(2, 1), None, (1, 4)]
    assert batch["tgt_sizes"].tolist() == [[3, 6], [4, 4], [4, 4], [3, 5], [7, 2], [3, 5], [3, 5], [3, 5], [3, 5]]
    # Each prompt's slices attend over its longest slice (the release pads its one vpm batch to that length).
    assert batch["patch_span"].tolist() == [18] * 4 + [15] * 5
    from mstar_jax.models.minicpmv.inputs import image_mask

    assert image_mask(batch["input_ids"], policy.config).sum(-1).tolist() == [4 * 8, 5 * 8, 0]
    text = chat(p, "How many?", 2)
    assert "<|start_header_id|>user<|end_header_id|>\n\n(<image>./</image>)\n(<image>./</image>)\nHow many?" in text


def test_vision_tower_matches_transformers_on_variable_grids(tiny):
    """Our tower on the processor's strips equals transformers' Idefics2VisionTransformer fed as the release feeds
    it (one padded batch, its [B, 1, L] patch mask), slice by slice over the slice's own patches."""
    import torch

    _, ref, policy = tiny
    batch, per_row = batch_of(policy)
    model = policy.loaded.model()
    ours = np.asarray(model.vision_tower(batch["pixel_values"], batch["patch_span"]))
    start = 0
    for imgs in per_row[:2]:
        strips, tgt = [], []
        for img in imgs:
            s, t, _ = ref_strips(img, 9, 56, 14)
            strips, tgt = strips + s, tgt + t
        px = torch.nn.utils.rnn.pad_sequence([s.flatten(end_dim=1).permute(1, 0) for s in strips], batch_first=True)
        b, length, _ = px.shape
        px = px.permute(0, 2, 1).reshape(b, 3, -1, length)
        mask = torch.zeros((b, 1, max(h * w for h, w in tgt)), dtype=torch.bool)
        for i, (h, w) in enumerate(tgt):
            mask[i, :h * w] = True  # the release's indexing: the whole row
        with torch.no_grad():
            want = ref.vpm(px, patch_attention_mask=mask).last_hidden_state.numpy()
        for i, (h, w) in enumerate(tgt):
            np.testing.assert_allclose(ours[start + i, :h * w], want[i, :h * w], atol=1e-4)
        start += len(tgt)
    # The span matters: attending over the slice's own patches only (not the release's mask) gives other features.
    own = np.asarray(model.vision_tower(batch["pixel_values"], np.prod(batch["tgt_sizes"], -1)))
    assert np.abs(own[1:4, :16] - ours[1:4, :16]).max() > 1e-2


def test_resampler_matches_nn_multihead_attention(tiny):
    """Our resampler against the release's Resampler forward with nn.MultiheadAttention, on grids of several
    shapes, one past the release's 70 x 70 positional table (its _adjust_pos_cache)."""
    import torch
    from safetensors.torch import load_file

    path, _, policy = tiny
    st = load_file(str(path / "model.safetensors"))
    d = policy.config.text.hidden_size
    ref = RefResampler(st, d, d // 128)
    tgt = np.asarray([[3, 6], [4, 4], [7, 2], [1, 1], [2, 75]], np.int32)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((len(tgt), 150, policy.config.vision.hidden_size)).astype(np.float32)
    ours = np.asarray(policy.loaded.model().multi_modal_projector(x, tgt))
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(tgt)).numpy()
    assert ours.shape == want.shape == (len(tgt), policy.config.query_num, d)
    np.testing.assert_allclose(ours, want, atol=1e-4)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_match_the_composed_torch_reference(tiny, padding_side):
    _, ref, policy = tiny
    batch, per_row = batch_of(policy, padding_side)
    mask = batch["attention_mask"].astype(bool)
    assert not mask.all()
    ours = policy.logits(batch)
    want = ref.logits(batch, per_row, bounds(policy))
    err = np.abs(ours - want)[mask].max()
    assert err < 1e-4, err
    assert np.std(want[mask]) > 1e-2


def test_round_trip_is_bitwise_in_the_release_layout(tiny, tmp_path):
    from safetensors.numpy import load_file

    from mstar_jax.cli import main

    path, _, policy = tiny
    assert main(["convert", "hf-to-flax", str(path), str(tmp_path / "flax")]) == 0
    assert main(["convert", "flax-to-hf", str(tmp_path / "flax"), str(tmp_path / "out")]) == 0
    original = load_file(str(path / "model.safetensors"))
    written = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        written.update(load_file(str(f)))
    assert set(written) == set(original)  # vpm.*, resampler.* (packed in_proj), llm.model.*, llm.lm_head
    for key, value in original.items():
        assert written[key].dtype == value.dtype and written[key].tobytes() == value.tobytes(), key
    for name in ("config.json", "preprocessor_config.json", "tokenizer.json", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (path / name).read_bytes(), name
    converted = mstar_jax.load(tmp_path / "flax")
    batch, _ = batch_of(converted)
    np.testing.assert_array_equal(converted.logits(batch), policy.logits(batch))


def test_mstar_sample_greedy_equals_the_reference(tiny, tmp_path, capsys):
    from mstar_jax.cli import main

    path, ref, policy = tiny
    images(SIZES[:1])[0].save(tmp_path / "img.png")
    question = "How many circles are there?"
    assert main(["sample", str(path), "--image", str(tmp_path / "img.png"), "--prompt", question, "--n", "1",
                 "--temperature", "0", "--max-new-tokens", "10", "--json"]) == 0
    sample = json.loads(capsys.readouterr().out)["samples"][0]
    img = Image.open(tmp_path / "img.png")
    batch = policy.processor(images=[img], text=[chat(policy.processor, question)])
    want = ref.greedy(batch["input_ids"][0].tolist(), [img], bounds(policy), 10, set(policy.config.eos_token_ids))
    assert sample["token_ids"] == want and len(want) >= 5


def _edited(src, tmp_path, edit):
    out = tmp_path / "src"
    shutil.copytree(src, out)
    cfg = json.loads((out / "config.json").read_text())
    edit(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(query_num=4), r"resampler\.query' has shape \(8, 256\), but config\.json implies \(4, 256\)"),
    (lambda c: c.update(version=2.6), r"config\.json: version 2\.6 is not supported"),
    (lambda c: c["slice_config"].update(max_slice_nums=4), r"slice_config\.max_slice_nums 4 and the top-level "),
    (lambda c: c.update(batch_vision_input=False), r"config\.json: batch_vision_input False is not supported"),
    (lambda c: c["vision_config"].update(model_type="clip_vision_model"), r"vision_config\.model_type 'clip_vis"),
])
def test_unexpected_config_values_are_named(tiny, tmp_path, edit, match):
    with pytest.raises(CheckpointError, match=match):
        mstar_jax.load(_edited(tiny[0], tmp_path, edit))


def test_bad_images_and_prompts_are_clear_errors(tiny):
    _, _, policy = tiny
    p = policy.processor
    with pytest.raises(MstarError, match=r"2 image\(s\) for 1 image placeholder"):
        p(images=images()[:2], text=[chat(p, "What?")])
    # 2500 x 1 px: resized to one 14-px patch row of 179 patches, past the tiny tower's 10 x 10 position table.
    with pytest.raises(MstarError, match=r"image of 2500x1 px is larger than the slicing limits"):
        p(images=[Image.new("RGB", (2500, 1))], text=[chat(p, "What?")])
    batch, _ = batch_of(policy)
    batch["tgt_sizes"] = batch["tgt_sizes"][1:]  # one slice fewer than the placeholders stand for
    batch["patch_span"] = batch["patch_span"][1:]
    batch["pixel_values"] = batch["pixel_values"][1:]
    with pytest.raises(MstarError, match="image features and image tokens do not match"):
        policy.logits(batch)


def test_prm_on_minicpmv_matches_the_reference(tiny):
    """The PRM's MSE objective (backbone + scalar head) and its batched step scores on a MiniCPM-V backbone, against
    the composed torch reference's hidden states (rows of 3 and 5 slices)."""
    import jax.numpy as jnp
    import torch

    from mstar_jax.prm import model as M
    from mstar_jax.prm.encode import encode
    from mstar_jax.prm.score import ProcessRewardModel
    from mstar_jax.prm.steps import split_steps
    from mstar_jax.sft_batch import pad_examples
    from mstar_jax.training import accumulate_grads

    _, ref, policy = tiny
    inputs = policy.loaded.family.inputs
    responses = ["The left die shows 3. The right die shows 5. 3 + 5 = 8.", "Count the dots. The answer is 4."]
    labels = [[1.0, 0.5, 0.25], [0.125, 0.0]]
    pics = [images(SIZES[0:1], seed=1)[0], images(SIZES[2:3], seed=2)[0]]
    rows, ends = [], []
    for i, (resp, lab) in enumerate(zip(responses, labels)):
        row = encode(policy.processor, f"question {i}?", pics[i], resp, split_steps(resp, "sentences"), lab,
                     inputs=inputs)
        ends.append(row["ends"])
        rows.append({k: v for k, v in row.items() if k not in ("ends", "num_steps")})
    batch = pad_examples(rows, pad_id=0, padding_side="right", inputs=inputs)
    assert batch["tgt_sizes"].shape[:2] == (2, 8)  # 3 and 5 slices, padded to a power of two
    rng = np.random.default_rng(0)
    head = M.init_head(policy.graphdef, policy.params)
    head = {M.HEAD_W: head[M.HEAD_W] + jnp.asarray(rng.normal(0, 0.3, head[M.HEAD_W].shape), jnp.float32),
            M.HEAD_B: jnp.float32(0.25)}
    params = M.with_head(policy.params, head)
    loss, grads, _ = accumulate_grads(policy.graphdef, params, {k: jnp.asarray(v)[None] for k, v in batch.items()},
                                      1, objective=M.PRM_MSE)
    w = torch.tensor(np.asarray(head[M.HEAD_W])).requires_grad_(True)
    b = torch.tensor(0.25, requires_grad=True)
    scores = ref.hidden(batch, [[pics[0]], [pics[1]]], bounds(policy)) @ w + b
    lm = torch.tensor(batch["loss_mask"]).float()
    want = (lm * (scores - torch.tensor(batch["targets"])) ** 2).sum() / lm.sum()
    want.backward()
    np.testing.assert_allclose(float(loss), want.item(), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(grads[M.HEAD_W]), w.grad.numpy(), rtol=1e-3, atol=1e-5)

    # Scoring (left-padded batch of both rows): the reference's scores at each step's end token.
    prm = ProcessRewardModel(policy.loaded, head, policy.processor, step_rule="sentences", batch_rows=2,
                             prompt_fn=lambda item: item["query"])
    items = [{"query": f"question {i}?", "image": pics[i]} for i in range(2)]
    got = prm.step_scores(items, [responses[:1], responses[1:]])
    for i in range(2):
        np.testing.assert_allclose(got[i][0], scores[i, ends[i]].detach().numpy(), rtol=1e-4, atol=1e-4)


def test_preset_has_the_released_shapes():
    """minicpm-llama3-v-2.5: 8.5 B parameters (the size InternVL2's model card tables list for
    MiniCPM-Llama3-V-2_5: Llama-3-8B + SigLIP-so400m + the resampler), planned sharded 8 ways without weights."""
    import math

    import jax.numpy as jnp
    from jax.sharding import AbstractMesh

    from mstar_jax import sharding as shd
    from mstar_jax.conversion import model_skeleton
    from mstar_jax.memory.families import find_preset

    fam, cfg = find_preset("minicpm-llama3-v-2.5")
    _, shapes, axes = model_skeleton(cfg, jnp.bfloat16)
    total = sum(math.prod(s.shape) for s in shapes.values())
    assert abs(total / 1e9 - 8.5) < 0.05, total
    assert shapes[("multi_modal_projector", "query")].shape == (96, 4096)
    assert shapes[("vision_tower", "position_embedding")].shape == (4900, 1152)
    mesh = AbstractMesh((1, 8, 1), ("data", "fsdp", "tensor"))
    per_device = 0
    for path, s in shapes.items():
        spec = shd.logical_to_spec(axes[path], s.shape, mesh)
        per_device += math.prod(s.shape) // math.prod(
            mesh.shape[a] for d in spec if d is not None for a in ((d,) if isinstance(d, str) else d))
    assert per_device <= total / 8 * 1.01
    assert fam.batch(cfg, 4, 1024)["pixel_values"][0] == (4, 16, 3, 14, 14 * 1024)
    assert "Idefics2" in fam.describe(cfg)
