"""InternVL in transformers' format: logits within 1e-4 of transformers (Qwen2 and Llama decoders, left and right
padding, several tile counts in one batch), greedy tokens equal to `generate`, cached decode equal to a full
forward, the bitwise HF -> Flax -> HF round trip in both transformers key layouts, 1 vs 8 devices, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mstar_jax
from mstar_jax.errors import CheckpointError, MstarError
from mstar_jax.sampler import sampler_for
from tests.models.internvl_helpers import SPECS, build, hf_greedy, hf_logits, make_batch, tiles_per_row, texts
from tests.test_conversion import read_all

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{name: (hf_dir, torch model)} of every spec, built once for this module."""
    root = tmp_path_factory.mktemp("internvl")
    return {name: build(root, name) for name in SPECS}


@pytest.fixture(scope="module")
def policies(tiny):
    return {name: mstar_jax.load(path) for name, (path, _) in tiny.items()}


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_match_transformers(tiny, policies, name, padding_side):
    policy, hf_model = policies[name], tiny[name][1]
    batch = make_batch(policy.processor, padding_side=padding_side)
    mask = batch["attention_mask"].astype(bool)
    assert not mask.all(), "the batch must contain padding"
    assert tiles_per_row(batch, policy.config) == [1, 3, 5]  # several tile counts (grid + thumbnail) in one batch
    ours = policy.logits(batch)
    ref = hf_logits(hf_model, batch)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    err = np.abs(ours - ref)[mask].max()
    assert err < 1e-4, f"{name}/{padding_side}: max abs logit error {err}"
    assert np.std(ref[mask]) > 1e-2  # logits vary: the comparison means something


def test_text_only_rows(tiny, policies):
    policy, hf_model = policies["qwen2"], tiny["qwen2"][1]
    batch = dict(policy.processor.tokenizer(texts(policy.processor, with_image=False), return_tensors="np",
                                            padding=True))
    mask = batch["attention_mask"].astype(bool)
    assert np.abs(policy.logits(batch) - hf_logits(hf_model, batch))[mask].max() < 1e-4


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_greedy_tokens_match_generate(tiny, policies, name):
    policy, hf_model = policies[name], tiny[name][1]
    batch = make_batch(policy.processor)
    new = 10
    ref = hf_greedy(hf_model, batch, new)
    sampler = sampler_for(policy)
    assert not np.isin(ref, list(sampler.eos_ids())).any(), "pick prompts whose greedy continuation has no EOS"
    out = sampler.generate(policy.params, batch=batch, n=2, temperature=0.0, max_new_tokens=new)
    for row, samples in zip(ref, out):
        for s in samples:
            assert s.token_ids == row.tolist() and s.finish_reason == "length"


def test_cached_decode_equals_full_forward(policies):
    policy = policies["llama"]
    batch = make_batch(policy.processor, prompts=["Which bar?", "What is the sum of the numbers shown?"],
                       sizes=[(60, 125), (120, 110)])
    n, steps = 2, 6
    vocab = policy.config.text.vocab_size
    forced = np.random.default_rng(0).integers(10, vocab, (2 * n, steps)).astype(np.int32)
    got = sampler_for(policy).step_logits(policy.params, forced, batch=batch, n=n)
    tiles = tiles_per_row(batch, policy.config)
    for r in range(2 * n):
        b = r // n
        first = sum(tiles[:b])
        full = {"input_ids": np.concatenate([batch["input_ids"][b:b + 1], forced[r:r + 1]], 1),
                "attention_mask": np.concatenate([batch["attention_mask"][b:b + 1], np.ones((1, steps), int)], 1),
                "pixel_values": batch["pixel_values"][first:first + tiles[b]]}
        ref = policy.logits(full)[0, -steps - 1:]
        assert np.abs(got[r] - ref).max() < 1e-5


@pytest.mark.parametrize("name", ["qwen2", "llama_variant"])
@pytest.mark.parametrize("layout", ["transformers", "transformers-state-dict"])
def test_hf_flax_hf_round_trip_is_bitwise_and_loads_in_transformers(tiny, tmp_path, name, layout):
    import transformers

    from mstar_jax.cli import main

    src = tiny[name][0]
    assert main(["convert", "hf-to-flax", str(src), str(tmp_path / "flax")]) == 0
    assert main(["convert", "flax-to-hf", str(tmp_path / "flax"), str(tmp_path / "out"), "--layout", layout]) == 0
    written, original = read_all(tmp_path / "out"), read_all(src)
    if layout == "transformers":  # what transformers itself writes: the same names
        assert set(written) == set(original)
    for k, v in original.items():
        name_out = k if layout == "transformers" else (
            "lm_head." + k[len("language_model.lm_head."):] if k.startswith("language_model.lm_head.") else
            "model.language_model." + k[len("language_model.model."):] if k.startswith("language_model.model.")
            else "model." + k)
        assert np.array_equal(written[name_out], v), k
    model, info = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(model).__name__ == "InternVLForConditionalGeneration"


def test_eight_devices_give_the_same_logits(tiny, tmp_path):
    path = tiny["llama"][0]
    from tests.conftest import make_batch as conftest_batch

    policy = mstar_jax.load(path)
    batch = conftest_batch(policy.processor)  # what tests/mesh_worker.py feeds
    ref = policy.logits(batch)
    out = tmp_path / "logits.npz"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-m", "tests.mesh_worker", str(path), str(out), "1", "4", "2"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads(Path(str(out) + ".json").read_text())
    assert info["devices"] == 8
    mask = batch["attention_mask"].astype(bool)
    assert np.abs(np.load(out)["logits"] - ref)[mask].max() < 1e-5
    specs = info["specs"]
    assert specs["language_model.layers.0.self_attn.q_proj.kernel"] == ["fsdp", "tensor"]
    assert specs["vision_tower.layers.0.fc1.kernel"] == ["fsdp", "tensor"]
    assert specs["multi_modal_projector.linear_1.kernel"][0] == "fsdp"


def test_tile_and_placeholder_mismatch_is_a_clear_error(policies):
    policy = policies["qwen2"]
    batch = make_batch(policy.processor)
    short = dict(batch, pixel_values=batch["pixel_values"][:-1])
    with pytest.raises(MstarError, match=r"tiles and image placeholders do not match: rows hold \[4, 12, 20\] "
                                         r"image tokens .* 8 tile\(s\) x 4 tokens per tile = 32"):
        policy.logits(short)
    with pytest.raises(MstarError, match="tiles and image placeholders do not match"):
        sampler_for(policy).generate(policy.params, batch=short, n=1, max_new_tokens=2)


def test_checkpoint_whose_tile_tokens_disagree_is_refused(tiny, tmp_path):
    src = tiny["qwen2"][0]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["image_seq_length"] = 256  # a 56-px tile of 14-px patches shuffled by 0.5 holds 4 tokens
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json: image_seq_length 256 disagrees .* 4 tokens per tile"):
        mstar_jax.load(bad)
    shutil.copy(src / "config.json", bad / "config.json")
    proc = json.loads((bad / "processor_config.json").read_text())
    (bad / "processor_config.json").write_text(json.dumps({**proc, "image_seq_length": 16}))
    with pytest.raises(CheckpointError, match=r"processor_config.json: image_seq_length 16 but the model's tiles "
                                              r"hold 4 tokens"):
        mstar_jax.load(bad)


def test_missing_tensor_is_named(tiny, tmp_path):
    from safetensors.numpy import save_file

    src = tiny["llama"][0]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    tensors = read_all(src)
    key = "vision_tower.encoder.layer.1.attention.q_norm.weight"
    del tensors[key]
    for f in bad.glob("*.safetensors"):
        f.unlink()
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"missing from the checkpoint.*HF key {key}"):
        mstar_jax.load(bad)


def test_processor_without_torchvision_gives_the_batch_of_its_parts(tiny, caplog):
    """Without torchvision the processor is built from GotOcr2's PIL image processor and the tokenizer (said once);
    its batch is the image processor's tiles and the tokenizer's ids of <img><IMG_CONTEXT>*N</img>-expanded text."""
    import logging

    from transformers import AutoTokenizer, GotOcr2ImageProcessorPil

    from mstar_jax.models.internvl import processing as P
    from tests.conftest import random_images

    path = tiny["qwen2"][0]
    P._SAID.clear()
    with caplog.at_level(logging.WARNING, logger="mstar_jax.models.internvl.processing"):
        proc = P.hf_processor(path)
        P.hf_processor(path)
    said = [r for r in caplog.records if "torchvision is not installed" in r.getMessage()]
    assert len(said) == (0 if P._torchvision() else 1)
    proc = P.hf_processor(path, force_pil=True)
    batch = make_batch(proc)
    images = random_images(0, [(50, 56), (60, 125), (120, 110)])
    pixels = GotOcr2ImageProcessorPil.from_pretrained(path)(images, crop_to_patches=True, return_tensors="np")
    np.testing.assert_array_equal(batch["pixel_values"], pixels["pixel_values"])
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    expanded = [t.replace("<IMG_CONTEXT>", "<img>" + "<IMG_CONTEXT>" * 4 * n + "</img>")
                for t, n in zip(texts(proc), pixels["num_patches"])]
    ids = tok(expanded, padding=True, return_tensors="np")
    np.testing.assert_array_equal(batch["input_ids"], ids["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], ids["attention_mask"])
