"""The roofline model of `mstar bench`: decode bytes counted against the HF model's own parameters and config."""

from __future__ import annotations

import pytest

import mstar_jax
from mstar_jax.bench import roofline


@pytest.mark.parametrize("name", ["clip_llama", "siglip_qwen2", "clip_phi3"])
def test_decode_bytes_match_the_hf_models_decoder_and_head(tiny_models, name):
    path, hf = tiny_models[name]
    policy = mstar_jax.load(path)
    tied = hf.config.get_text_config().tie_word_embeddings
    # named_parameters() lists a tied head once, as the embedding table.
    expected = sum(p.numel() * p.element_size() for n, p in hf.named_parameters()
                   if n.startswith("lm_head.") or (n.startswith("model.language_model.")
                                                   and ("embed_tokens" not in n or tied)))
    assert roofline.decode_weight_bytes(policy.params, policy.config.tie_word_embeddings) == expected

    tc = hf.config.get_text_config()
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    per_token = tc.num_hidden_layers * 2 * tc.num_key_value_heads * head_dim * 4  # fp32 keys and values
    got = roofline.decode_min_bytes_per_step(policy.params, policy.config, prompt_tokens=100, rows=16, steps=33)
    assert got == expected + per_token * (100 + 16 * 16)


def test_device_peaks_know_the_accelerators_and_not_cpus():
    assert roofline.device_peaks("NVIDIA H100 80GB HBM3") == (3350.0, 989.0)
    assert roofline.device_peaks("NVIDIA H100 PCIe") == (2000.0, 756.0)
    assert roofline.device_peaks("NVIDIA H200") == (4800.0, 989.0)
    assert roofline.device_peaks("TPU v5 lite") == (819.0, 197.0)
    assert roofline.device_peaks("TPU v5") == (2765.0, 459.0)
    assert roofline.device_peaks("cpu") is None


def test_decode_figures_divide_bytes_by_time_and_bandwidths():
    rec = roofline.decode_figures(2_000_000_000, 0.5, stream=8.0, peak_gbs=None)
    assert rec["decode_gbs"] == 4.0 and rec["decode_stream_frac"] == 0.5 and rec["decode_roofline_frac"] is None
    rec = roofline.decode_figures(3_350_000_000, 0.002, stream=None, peak_gbs=3350.0)
    assert rec["decode_roofline_frac"] == 0.5 and rec["decode_stream_frac"] is None


def test_stream_bandwidth_is_measured():
    assert roofline.stream_gbs(megabytes=8, passes=2) > 0
