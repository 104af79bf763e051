"""Our Flax model gives the HF PyTorch model's logits (fp32, 1e-4) for every supported family."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import mstar_jax
from mstar_jax.models.llava.tiny import TinySpec, make_tiny_llava
from tests.conftest import PROMPTS, SPECS, hf_logits, make_batch


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_match_hf(tiny_models, name, padding_side):
    path, hf_model = tiny_models[name]
    policy = mstar_jax.load(path)
    batch = make_batch(policy.processor, padding_side=padding_side)
    mask = batch["attention_mask"].astype(bool)
    assert not mask.all(), "the batch must contain padding"
    ours = policy.logits(batch)
    ref = hf_logits(hf_model, batch)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    err = np.abs(ours - ref)[mask].max()
    assert err < 1e-4, f"{name}/{padding_side}: max abs logit error {err}"
    # The comparison must be meaningful: logits vary across positions and vocab.
    assert np.std(ref[mask]) > 1e-2


def test_long_sequence_switches_longrope(tiny_models):
    """Phi-3.5's longrope switches to the long factors past original_max_position_embeddings (16 here)."""
    path, hf_model = tiny_models["clip_phi3"]
    policy = mstar_jax.load(path)
    long_prompt = "Count every circle and every square, then add the numbers of each colour together. " * 2
    batch = make_batch(policy.processor, prompts=[long_prompt, "Short?"])
    assert batch["attention_mask"].sum(-1).max() > 16
    ours, ref = policy.logits(batch), hf_logits(hf_model, batch)
    mask = batch["attention_mask"].astype(bool)
    assert np.abs(ours - ref)[mask].max() < 1e-4


def test_text_only_rows(tiny_models):
    """A batch without images goes through the decoder alone."""
    path, hf_model = tiny_models["clip_llama"]
    policy = mstar_jax.load(path)
    tok = policy.processor.tokenizer
    batch = dict(tok(["hello there", "How many circles are there?"], return_tensors="np", padding=True))
    import torch

    mask = batch["attention_mask"]
    pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(pos)).logits.numpy()
    ours = policy.logits(batch)
    assert np.abs(ours - ref)[mask.astype(bool)].max() < 1e-4


def test_image_token_mismatch_is_a_clear_error(tiny_models):
    path, _ = tiny_models["clip_llama"]
    policy = mstar_jax.load(path)
    batch = make_batch(policy.processor)
    batch["pixel_values"] = batch["pixel_values"][:1]
    with pytest.raises(mstar_jax.errors.MstarError, match="image tokens"):
        policy.logits(batch)


# The README's other decoder options, each on a model of its own: the logits match, and the option matters (the
# same weights loaded without it give logits far from transformers').
OPTIONS = {
    "llama_yarn": TinySpec(text="llama", max_position_embeddings=64, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "llama_linear": TinySpec(text="llama", rope_scaling={"rope_type": "linear", "factor": 3.0}),
    # Layer 0 full attention, layer 1 a 6-token window (prompts are ~30 tokens long).
    "qwen2_sliding": TinySpec(vision="siglip", text="qwen2", select_strategy="full", vision_feature_layer=-1,
                              sliding_window=6, max_window_layers=1),
}


def _without_option(src, dst):
    """A copy of an HF LLaVA directory whose text config drops rope scaling and the sliding window."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    text = cfg["text_config"]
    for key in ("rope_parameters", "rope_scaling"):
        if isinstance(text.get(key), dict):
            text[key] = {"rope_type": "default", "rope_theta": text[key].get("rope_theta", 10000.0)}
    if text.get("use_sliding_window"):
        text.update(use_sliding_window=False, sliding_window=None, layer_types=["full_attention"] *
                    text["num_hidden_layers"])
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_rope_scaling_and_sliding_window_logits_match_hf(tmp_path, name):
    hf_model = make_tiny_llava(tmp_path / "hf", OPTIONS[name])
    policy = mstar_jax.load(tmp_path / "hf")
    if name == "qwen2_sliding":
        assert policy.config.text.windows == (None, 6)
    batch = make_batch(policy.processor, prompts=[PROMPTS[0] * 2, PROMPTS[1]])
    mask = batch["attention_mask"].astype(bool)
    assert mask.sum(-1).max() > 16 and not mask.all()  # past the original context and the window; padded
    ref = hf_logits(hf_model, batch)
    assert np.abs(policy.logits(batch) - ref)[mask].max() < 1e-4
    plain = mstar_jax.load(_without_option(tmp_path / "hf", tmp_path / "plain"))
    assert np.abs(plain.logits(batch) - ref)[mask].max() > 1e-2
