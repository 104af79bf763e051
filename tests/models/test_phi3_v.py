"""Phi-3.5-vision (model_type phi3_v) from a tiny random checkpoint in the release's layout, against a PyTorch
reference composed in tests/models/phi3_v_reference.py from the release's code (transformers' CLIP and Phi-3 plus
the HD transform written with torch primitives)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import mstar_jax
from mstar_jax.errors import CheckpointError, MstarError
from mstar_jax.models.phi3_v.processing import Phi3VImageProcessor, hd_size
from mstar_jax.models.phi3_v.tiny import TinyPhi3VSpec, make_tiny_phi3_v
from tests.models.phi3_v_reference import Reference, ref_preprocess

# 2 x 2, 2 x 1 (portrait) and 1 x 4 (wide) crops of the tiny model's 56-px crops with num_crops 4.
SIZES = [(52, 40), (30, 70), (150, 30)]


def images(sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_phi3_v(tmp_path_factory.mktemp("phi3v"))
    return path, Reference(path), mstar_jax.load(path)


def chat(processor, question, n_images=1):
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def batch_of(policy, padding_side="left"):
    """Three prompts: two images (2x2, 2x1 crops), one image (1x4 crops), text only."""
    p = policy.processor
    texts = [chat(p, "How many circles are there?", 2), chat(p, "Which bar is tallest?"), chat(p, "Hello", 0)]
    p.tokenizer.padding_side = padding_side
    try:
        return p(images=images(), text=texts, return_tensors="np", padding=True)
    finally:
        p.tokenizer.padding_side = "left"


@pytest.mark.parametrize("num_crops,crop", [(4, 56), (16, 56), (4, 336)])
def test_hd_preprocessing_matches_the_release(num_crops, crop):
    sizes = [(52, 40), (30, 70), (150, 30), (400, 120), (33, 33)] if crop == 56 else [(700, 500), (300, 900)]
    ours = Phi3VImageProcessor(num_crops, crop).preprocess(images(sizes))
    ref_px, ref_sizes = ref_preprocess(images(sizes), num_crops, crop)
    np.testing.assert_array_equal(ours["image_sizes"], ref_sizes)
    # Sub-image crops are PIL + the same float32 ops: equal; the global view is torch's bicubic, ours in float64.
    np.testing.assert_array_equal(ours["pixel_values"][:, 1:], ref_px[:, 1:])
    np.testing.assert_allclose(ours["pixel_values"][:, 0], ref_px[:, 0], atol=2e-5)
    assert len({tuple(s) for s in ref_sizes}) >= 2  # several crop grids


def test_image_token_counts_are_the_release_numbers():
    ip4, ip16 = Phi3VImageProcessor(4), Phi3VImageProcessor(16)
    # The release's formula (image_processing_phi3_v.py, calc_num_image_tokens_from_image_size):
    # (h//336 * w//336 + 1) * 144 + 1 + (h//336 + 1) * 12. A 1344x1344 image: 4 x 4 crops with num_crops 16,
    # 2 x 2 with 4 (Phi-3.5-vision's default).
    assert hd_size(1344, 1344, 16) == (1344, 1344) and ip16.num_image_tokens(1344, 1344) == 17 * 144 + 1 + 5 * 12 == 2509
    assert hd_size(1344, 1344, 4) == (672, 672) and ip4.num_image_tokens(1344, 1344) == 757
    # vLLM's tests/models/multimodal/processing/test_phi3v.py: its stop-sign test image gives 757 tokens with
    # num_crops 4 and 1921 with num_crops 16. The test names no size; both counts hold exactly for landscape
    # images of aspect 4:3 to 5:3 (2 x 2 and 4 x 3 crops), so any such size must give both, others not both.
    for w, h in ((1400, 1000), (1300, 876), (1600, 1000)):
        assert (ip4.num_image_tokens(w, h), ip16.num_image_tokens(w, h)) == (757, 1921), (w, h)
    for w, h in ((1000, 1000), (1800, 1000), (1000, 1400)):
        assert (ip4.num_image_tokens(w, h), ip16.num_image_tokens(w, h)) != (757, 1921), (w, h)


def test_processor_expands_each_tag_to_its_images_tokens(tiny):
    _, _, policy = tiny
    p = policy.processor
    batch = batch_of(policy)
    tok = policy.config.image_token_id
    per_row = (batch["input_ids"] == tok).sum(-1)
    s, g = 56, 2
    want = [(h // s * (w // s) + 1) * g * g + 1 + (h // s + 1) * g for h, w in batch["image_sizes"]]
    assert per_row.tolist() == [want[0] + want[1], want[2], 0]
    assert batch["image_sizes"].tolist() == [[112, 112], [112, 56], [56, 224]]
    assert "<|user|>\n<|image_1|>\n<|image_2|>\nHow many" in chat(p, "How many", 2)


def test_vision_and_hd_features_match_the_reference(tiny):
    _, ref, policy = tiny
    batch = batch_of(policy)
    model = policy.loaded.model()
    merged = np.asarray(model.merged_crops(batch["pixel_values"]))
    torch_feats = ref.crop_features(batch["pixel_values"])  # transformers' CLIP, hidden_states[-2]
    n, k = batch["pixel_values"].shape[:2]
    want = ref.merge(torch_feats.flatten(0, 1), 1, 1).reshape(n, k * 4, -1).numpy()
    np.testing.assert_allclose(merged, want, atol=1e-4)
    values, used = model.image_features(batch["pixel_values"], batch["image_sizes"])
    ref_all = ref.image_embeddings(batch["pixel_values"], batch["image_sizes"]).numpy()
    ours = np.concatenate([np.asarray(values)[i, :u] for i, u in enumerate(np.asarray(used))])
    assert ours.shape == ref_all.shape
    np.testing.assert_allclose(ours, ref_all, atol=1e-4)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_match_the_composed_torch_reference(tiny, padding_side):
    _, ref, policy = tiny
    batch = batch_of(policy, padding_side)
    mask = batch["attention_mask"].astype(bool)
    assert not mask.all()
    ours = policy.logits(batch)
    want = ref.logits(batch, policy.config.image_token_id)
    err = np.abs(ours - want)[mask].max()
    assert err < 1e-4, err
    assert np.std(want[mask]) > 1e-2


def test_round_trip_is_bitwise_in_the_release_layout(tiny, tmp_path):
    from safetensors.numpy import load_file

    from mstar_jax.cli import main

    path = tiny[0]
    assert main(["convert", "hf-to-flax", str(path), str(tmp_path / "flax")]) == 0
    assert main(["convert", "flax-to-hf", str(tmp_path / "flax"), str(tmp_path / "out")]) == 0
    original = load_file(str(path / "model.safetensors"))
    written = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        written.update(load_file(str(f)))
    assert set(written) == set(original)  # post_layernorm and the unused last CLIP layer included
    for key, value in original.items():
        assert written[key].dtype == value.dtype and written[key].tobytes() == value.tobytes(), key
    for name in ("config.json", "preprocessor_config.json", "tokenizer.json", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (path / name).read_bytes(), name
    # The converted checkpoint samples like the source.
    converted = mstar_jax.load(tmp_path / "flax")
    np.testing.assert_array_equal(converted.logits(batch_of(converted)), tiny[2].logits(batch_of(tiny[2])))


def test_mstar_sample_greedy_equals_the_reference(tiny, tmp_path, capsys):
    from mstar_jax.cli import main

    path, ref, policy = tiny
    img = images([(52, 40)])[0]
    img.save(tmp_path / "img.png")
    question = "How many circles are there?"
    assert main(["sample", str(path), "--image", str(tmp_path / "img.png"), "--prompt", question, "--n", "1",
                 "--temperature", "0", "--max-new-tokens", "10", "--json"]) == 0
    sample = json.loads(capsys.readouterr().out)["samples"][0]
    batch = policy.processor(images=[Image.open(tmp_path / "img.png")], text=[chat(policy.processor, question)])
    want = ref.greedy(batch, policy.config.image_token_id, 10, set(policy.config.eos_token_ids))
    assert sample["token_ids"] == want and len(want) >= 5


def test_unknown_hd_transform_order_is_named(tiny, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny[0], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["embd_layer"]["hd_transform_order"] = "glb_sub"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: embd_layer\.hd_transform_order 'glb_sub'"):
        mstar_jax.load(src)


def test_release_config_without_vision_config_reads_clip_sizes_from_the_tensors(tiny, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny[0], src)
    cfg = json.loads((src / "config.json").read_text())
    vision = cfg.pop("vision_config")
    (src / "config.json").write_text(json.dumps(cfg))
    from mstar_jax.models.phi3_v.config import from_config_json

    got = from_config_json(cfg, src).vision
    # The tiny tower's heads are 8 wide, not CLIP-L's 64: the shape rule gives hidden // 64 heads (0 here) and
    # every other size from the tensors.
    assert (got.hidden_size, got.intermediate_size, got.num_layers, got.image_size, got.patch_size) == (
        vision["hidden_size"], vision["intermediate_size"], vision["num_hidden_layers"], vision["image_size"],
        vision["patch_size"])
    assert got.num_heads == vision["hidden_size"] // 64


def test_bad_images_and_prompts_are_clear_errors(tiny):
    _, _, policy = tiny
    p = policy.processor
    with pytest.raises(MstarError, match=r"2 image\(s\) for 1 image placeholder"):
        p(images=images()[:2], text=[chat(p, "What?")])
    with pytest.raises(MstarError, match=r"numbered from <\|image_1\|> in order"):
        p(images=images()[:2], text=["<|image_2|> then <|image_1|>"])
    # 1 px high and 6000 px wide: 4 crops of 56 px tile the long side in 224 px, leaving 0 px of height.
    with pytest.raises(MstarError, match=r"6000x1 px is larger than the HD transform's limits"):
        p(images=[Image.new("RGB", (6000, 1))], text=[chat(p, "What?")])
    batch = batch_of(policy)
    batch["image_sizes"] = batch["image_sizes"][:, ::-1].copy()  # sizes that do not fit the placeholders
    with pytest.raises(MstarError, match="image features and image tokens do not match"):
        policy.logits(batch)


def test_a_different_tiny_model_differs(tmp_path):
    """The reference comparison can fail: another seed's weights give other logits."""
    a = mstar_jax.load(make_tiny_phi3_v(tmp_path / "a", TinyPhi3VSpec(seed=1)))
    b = mstar_jax.load(make_tiny_phi3_v(tmp_path / "b", TinyPhi3VSpec(seed=2)))
    assert np.abs(a.logits(batch_of(a)) - b.logits(batch_of(b))).max() > 1e-2


def test_prm_on_phi3_v_matches_the_reference(tiny):
    """The PRM's MSE objective (backbone + scalar head) on a Phi-3.5-vision backbone, against the composed torch
    reference's hidden states, and its batched step scores equal rows scored alone."""
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
    rows = []
    for i, (resp, lab) in enumerate(zip(responses, labels)):
        row = encode(policy.processor, f"question {i}?", images(SIZES[i:i + 1], seed=i)[0], resp,
                     split_steps(resp, "sentences"), lab, inputs=inputs)
        rows.append({k: v for k, v in row.items() if k not in ("ends", "num_steps")})
    batch = pad_examples(rows, pad_id=0, padding_side="right", inputs=inputs)
    assert batch["pixel_values"].shape[0] == 2 and batch["image_sizes"].tolist() == [[112, 112], [112, 56]]
    rng = np.random.default_rng(0)
    head = M.init_head(policy.graphdef, policy.params)
    head = {M.HEAD_W: head[M.HEAD_W] + jnp.asarray(rng.normal(0, 0.3, head[M.HEAD_W].shape), jnp.float32),
            M.HEAD_B: jnp.float32(0.25)}
    params = M.with_head(policy.params, head)
    loss, grads, _ = accumulate_grads(policy.graphdef, params, {k: jnp.asarray(v)[None] for k, v in batch.items()},
                                      1, objective=M.PRM_MSE)
    w = torch.tensor(np.asarray(head[M.HEAD_W])).requires_grad_(True)
    b = torch.tensor(0.25, requires_grad=True)
    scores = ref.hidden(batch, policy.config.image_token_id) @ w + b
    lm = torch.tensor(batch["loss_mask"]).float()
    want = (lm * (scores - torch.tensor(batch["targets"])) ** 2).sum() / lm.sum()
    want.backward()
    np.testing.assert_allclose(float(loss), want.item(), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(grads[M.HEAD_W]), w.grad.numpy(), rtol=1e-3, atol=1e-5)

    prm = ProcessRewardModel(policy.loaded, head, policy.processor, step_rule="sentences", batch_rows=2,
                             prompt_fn=lambda item: item["query"])
    items = [{"query": "What is the sum?", "image": images(SIZES[:1])[0]},
             {"query": "How many dots?", "image": images(SIZES[2:], seed=3)[0]}]
    batched = prm.step_scores(items, [responses, responses[1:]])
    assert [len(s) for s in batched[0]] == [3, 2]
    for item, rs, got in zip(items, [responses, responses[1:]], batched):
        for r, g in zip(rs, got):
            np.testing.assert_allclose(g, prm.score_rows([item["query"]], [item["image"]], [r])[0], rtol=1e-5,
                                       atol=1e-5)
