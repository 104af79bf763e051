"""The original InternVL release layout (internvl_chat: InternViT's packed qkv, mlp1, InternLM2 with packed wqkv).

transformers has no class for it, so the check is independent: the test packs a transformers-format checkpoint with
a Llama decoder into the release layout itself, from InternLM2's published modeling code (wqkv rows per KV head:
its query heads, then its key, then its value), writes the release's config.json, and the converted model's
logits must equal the transformers model's. The release's preprocessing (dynamic_preprocess tiling, ImageNet
statistics, the MPT conversation templates) is checked against the numbers the release documents.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import mstar_jax
from mstar_jax.errors import CheckpointError
from mstar_jax.models.internvl import processing as P
from tests.models.internvl_helpers import build, hf_logits, make_batch, tiles_per_row
from tests.test_conversion import read_all

SYSTEM = "You are InternVL."  # the tiny checkpoints' system message


def pack_wqkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, kv_heads: int, head_dim: int) -> np.ndarray:
    """InternLM2's wqkv from torch q/k/v weights [out, in]: its forward views the output as (h gs d) with
    gs = groups + 2 and takes, per KV head h, slots 0..groups-1 as query heads h*groups + g, slot -2 as the key
    and slot -1 as the value."""
    groups = q.shape[0] // head_dim // kv_heads
    rows = []
    for h in range(kv_heads):
        for g in range(groups):
            head = h * groups + g
            rows.append(q[head * head_dim:(head + 1) * head_dim])
        rows.append(k[h * head_dim:(h + 1) * head_dim])
        rows.append(v[h * head_dim:(h + 1) * head_dim])
    return np.concatenate(rows, axis=0)


def release_tensors(hf: dict[str, np.ndarray], layers: int, vision_layers: int, kv_heads: int,
                    head_dim: int) -> dict[str, np.ndarray]:
    """The release's tensors (InternVLChatModel with InternLM2) of a transformers internvl + Llama checkpoint."""
    out = {}
    lm = "language_model.model."
    out["language_model.model.tok_embeddings.weight"] = hf[lm + "embed_tokens.weight"]
    out["language_model.model.norm.weight"] = hf[lm + "norm.weight"]
    out["language_model.output.weight"] = hf["language_model.lm_head.weight"]
    for i in range(layers):
        a = b = f"{lm}layers.{i}."
        out[b + "attention.wqkv.weight"] = pack_wqkv(hf[a + "self_attn.q_proj.weight"],
                                                     hf[a + "self_attn.k_proj.weight"],
                                                     hf[a + "self_attn.v_proj.weight"], kv_heads, head_dim)
        out[b + "attention.wo.weight"] = hf[a + "self_attn.o_proj.weight"]
        out[b + "feed_forward.w1.weight"] = hf[a + "mlp.gate_proj.weight"]
        out[b + "feed_forward.w3.weight"] = hf[a + "mlp.up_proj.weight"]
        out[b + "feed_forward.w2.weight"] = hf[a + "mlp.down_proj.weight"]
        out[b + "attention_norm.weight"] = hf[a + "input_layernorm.weight"]
        out[b + "ffn_norm.weight"] = hf[a + "post_attention_layernorm.weight"]
    vt, vm = "vision_tower.", "vision_model."
    out[vm + "embeddings.class_embedding"] = hf[vt + "embeddings.cls_token"]
    out[vm + "embeddings.position_embedding"] = hf[vt + "embeddings.position_embeddings"]
    out[vm + "embeddings.patch_embedding.weight"] = hf[vt + "embeddings.patch_embeddings.projection.weight"]
    out[vm + "embeddings.patch_embedding.bias"] = hf[vt + "embeddings.patch_embeddings.projection.bias"]
    for i in range(vision_layers):
        a, b = f"{vt}encoder.layer.{i}.", f"{vm}encoder.layers.{i}."
        for wb in ("weight", "bias"):
            out[b + f"attn.qkv.{wb}"] = np.concatenate([hf[a + f"attention.{p}_proj.{wb}"] for p in "qkv"])
            out[b + f"attn.proj.{wb}"] = hf[a + f"attention.projection_layer.{wb}"]
            out[b + f"norm1.{wb}"] = hf[a + f"layernorm_before.{wb}"]
            out[b + f"norm2.{wb}"] = hf[a + f"layernorm_after.{wb}"]
            out[b + f"mlp.fc1.{wb}"] = hf[a + f"mlp.fc1.{wb}"]
            out[b + f"mlp.fc2.{wb}"] = hf[a + f"mlp.fc2.{wb}"]
        out[b + "attn.q_norm.weight"] = hf[a + "attention.q_norm.weight"]
        out[b + "attn.k_norm.weight"] = hf[a + "attention.k_norm.weight"]
        out[b + "ls1"] = hf[a + "lambda_1"]
        out[b + "ls2"] = hf[a + "lambda_2"]
    for ours_i, theirs in (("0", "layer_norm"), ("1", "linear_1"), ("3", "linear_2")):
        for wb in ("weight", "bias"):
            out[f"mlp1.{ours_i}.{wb}"] = hf[f"multi_modal_projector.{theirs}.{wb}"]
    return out


def release_config(hf_cfg: dict) -> dict:
    """The release's config.json for a transformers internvl + Llama config (as InternVL2's are written)."""
    t, v = hf_cfg["text_config"], hf_cfg["vision_config"]
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": 0.5,
        "dynamic_image_size": True, "force_image_size": v["image_size"][0], "min_dynamic_patch": 1,
        "max_dynamic_patch": 4, "use_thumbnail": True, "ps_version": "v2", "select_layer": -1,
        "template": "internvl2_5", "system_message": SYSTEM,
        "llm_config": {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
                       "vocab_size": t["vocab_size"], "hidden_size": t["hidden_size"],
                       "intermediate_size": t["intermediate_size"], "num_hidden_layers": t["num_hidden_layers"],
                       "num_attention_heads": t["num_attention_heads"],
                       "num_key_value_heads": t["num_key_value_heads"], "rms_norm_eps": t["rms_norm_eps"],
                       "hidden_act": "silu", "max_position_embeddings": t["max_position_embeddings"],
                       "rope_theta": t["rope_parameters"]["rope_theta"],
                       "rope_scaling": {"type": "dynamic", "factor": 2.0}, "eos_token_id": t["eos_token_id"],
                       "pad_token_id": t["pad_token_id"], "tie_word_embeddings": False},
        "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                          "hidden_size": v["hidden_size"], "intermediate_size": v["intermediate_size"],
                          "num_hidden_layers": v["num_hidden_layers"], "num_attention_heads": v["num_attention_heads"],
                          "image_size": v["image_size"][0], "patch_size": v["patch_size"][0], "num_channels": 3,
                          "layer_norm_eps": v["layer_norm_eps"], "hidden_act": "gelu", "norm_type": "layer_norm",
                          "qkv_bias": True, "qk_normalization": True},
    }


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(transformers-format dir, its torch model, the release-layout dir packed by this test)."""
    root = tmp_path_factory.mktemp("internvl_chat")
    src, model = build(root, "llama")
    hf_cfg = json.loads((src / "config.json").read_text())
    t, v = hf_cfg["text_config"], hf_cfg["vision_config"]
    head_dim = t["hidden_size"] // t["num_attention_heads"]
    tensors = release_tensors(read_all(src), t["num_hidden_layers"], v["num_hidden_layers"],
                              t["num_key_value_heads"], head_dim)
    out = root / "release"
    out.mkdir()
    from safetensors.numpy import save_file

    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(release_config(hf_cfg), indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, out / name)
    return src, model, out


def test_release_layout_logits_equal_the_llama_model(release):
    src, hf_model, chat_dir = release
    policy = mstar_jax.load(chat_dir)
    assert policy.config.llm_arch == "internlm2" and policy.loaded.layout == "internvl_chat"
    assert isinstance(policy.processor, P.ChatProcessor)
    ref_policy = mstar_jax.load(src)
    for side in ("left", "right"):
        ours = make_batch(policy.processor, padding_side=side)
        theirs = make_batch(ref_policy.processor, padding_side=side)
        # The release's preprocessing and transformers' processor give the same batch.
        np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
        np.testing.assert_allclose(ours["pixel_values"], theirs["pixel_values"], atol=2e-6)
        assert tiles_per_row(ours, policy.config) == [1, 3, 5]
        mask = ours["attention_mask"].astype(bool)
        err = np.abs(policy.logits(ours) - hf_logits(hf_model, theirs))[mask].max()
        assert err < 1e-4, f"{side}: max abs logit error {err}"


def test_converter_writes_the_release_layout_both_ways(release, tmp_path):
    import transformers

    from mstar_jax.cli import main

    src, _, chat_dir = release
    packed = read_all(chat_dir)
    # transformers format -> release layout: exactly the tensors this test packed.
    assert main(["convert", "hf-to-flax", str(src), str(tmp_path / "a")]) == 0
    assert main(["convert", "flax-to-hf", str(tmp_path / "a"), str(tmp_path / "chat"), "--layout",
                 "internvl_chat"]) == 0
    written = read_all(tmp_path / "chat")
    assert set(written) == set(packed)
    assert all(np.array_equal(written[k], packed[k]) for k in packed)
    cfg = json.loads((tmp_path / "chat" / "config.json").read_text())
    assert cfg["model_type"] == "internvl_chat" and cfg["llm_config"]["architectures"] == ["InternLM2ForCausalLM"]
    assert cfg["llm_config"]["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    # release layout -> ours -> release layout: bitwise; -> transformers' format: the original tensors.
    assert main(["convert", "hf-to-flax", str(chat_dir), str(tmp_path / "b")]) == 0
    assert main(["convert", "flax-to-hf", str(tmp_path / "b"), str(tmp_path / "chat2")]) == 0
    again = read_all(tmp_path / "chat2")
    assert set(again) == set(packed) and all(np.array_equal(again[k], packed[k]) for k in packed)
    assert main(["convert", "flax-to-hf", str(tmp_path / "b"), str(tmp_path / "hf"), "--layout",
                 "transformers"]) == 0
    original, exported = read_all(src), read_all(tmp_path / "hf")
    assert set(exported) == set(original) and all(np.array_equal(exported[k], original[k]) for k in original)
    model, info = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # The export is a whole transformers checkpoint: its processor and config give the source's logits.
    policy = mstar_jax.load(tmp_path / "hf")
    batch = make_batch(policy.processor)
    mask = batch["attention_mask"].astype(bool)
    assert np.abs(policy.logits(batch) - hf_logits(model, batch))[mask].max() < 1e-4


def test_release_checkpoint_missing_a_tensor_names_it(release, tmp_path):
    from safetensors.numpy import save_file

    _, _, chat_dir = release
    bad = tmp_path / "bad"
    shutil.copytree(chat_dir, bad)
    tensors = read_all(chat_dir)
    del tensors["language_model.model.layers.1.attention.wqkv.weight"]
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"3 tensor\(s\) missing.*HF key "
                                              r"language_model\.model\.layers\.1\.attention\.wqkv\.weight"):
        mstar_jax.load(bad)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(ps_version="v1"), "ps_version 'v1'"),
    (lambda c: c["llm_config"].update(architectures=["MixtralForCausalLM"]), "MixtralForCausalLM"),
    (lambda c: c.update(force_image_size=448), "force_image_size 448"),
    (lambda c: c.update(template="vicuna_v1.1"), "template 'vicuna_v1.1'"),
])
def test_bad_release_configs_are_named(release, tmp_path, edit, message):
    _, _, chat_dir = release
    bad = tmp_path / "bad"
    shutil.copytree(chat_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    edit(cfg)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        mstar_jax.load(bad)


def test_release_tokenizer_without_image_context_is_refused(release, tmp_path):
    _, _, chat_dir = release
    bad = tmp_path / "bad"
    shutil.copytree(chat_dir, bad)
    tj = json.loads((bad / "tokenizer.json").read_text())
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] != "<IMG_CONTEXT>"]
    tj["model"]["vocab"].pop("<IMG_CONTEXT>")
    (bad / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(CheckpointError, match="do not define <IMG_CONTEXT>"):
        mstar_jax.load(bad)


# ------------------------------------------------------------------------------ the release's preprocessing


def test_tiling_follows_the_documented_numbers(release):
    """InternVL 1.5's report: an 800 x 1300 image matches the 2:3 grid, is resized to 896 x 1344 and cut into six
    448-px tiles, plus a thumbnail; a tile holds 256 tokens (1024 patches of 14 px, pixel-shuffled by 0.5)."""
    from PIL import Image

    from mstar_jax.models.internvl.config import PRESETS

    cfg = PRESETS["internvl2-2b"]
    assert cfg.image_seq_length == 256
    assert P.tile_grid(800, 1300, 1, 12, 448) == (2, 3)
    tok = mstar_jax.load(release[2]).processor.tokenizer
    proc = P.ChatProcessor(tok, template=cfg.template, image_size=448, tokens_per_tile=cfg.image_seq_length,
                           max_tiles=12)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1300, 800, 3), np.uint8))
    tiles = P.tile_image(image, 448, 1, 12)
    assert len(tiles) == 7 and all(t.size == (448, 448) for t in tiles)
    resized = image.resize((896, 1344), Image.BICUBIC)
    assert np.array_equal(np.asarray(tiles[5]), np.asarray(resized.crop((448, 896, 896, 1344))))  # row 3, col 2
    assert np.array_equal(np.asarray(tiles[6]), np.asarray(image.resize((448, 448), Image.BICUBIC)))
    batch = proc(images=[image], text=["<image>\nWhat is it?"])
    assert batch["pixel_values"].shape == (7, 3, 448, 448)
    context = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert (batch["input_ids"] == context).sum() == 7 * 256
    # One tile and no thumbnail for a square image.
    square = Image.fromarray(np.full((448, 448, 3), 255, np.uint8))
    assert len(P.tile_image(square, 448, 1, 12)) == 1
    # ImageNet normalisation: a white pixel is (1 - mean) / std per channel.
    white = P.normalize(square)
    expected = (1 - np.array(P.IMAGENET_MEAN, np.float32)) / np.array(P.IMAGENET_STD, np.float32)
    np.testing.assert_array_equal(white[:, 0, 0], expected)


def test_tile_grids_agree_with_transformers_got_ocr2():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    for max_num in (4, 6, 12):
        for w in range(20, 1500, 41):
            for h in range(20, 1500, 53):
                canvas = get_optimal_tiled_canvas((h, w), (448, 448), 1, max_num)
                assert P.tile_grid(w, h, 1, max_num, 448) == canvas, (w, h, max_num)


def mpt(system: str, sep: str, turns: list[tuple[str, str]], generation: bool) -> str:
    """The release's MPT prompt rule: system turn + sep, then role + message + sep per turn, then the open role."""
    out = "<|im_start|>system\n" + system + sep
    for role, message in turns:
        out += f"<|im_start|>{role}\n" + message + sep
    return out + ("<|im_start|>assistant\n" if generation else "")


@pytest.mark.parametrize("template, system, sep", [
    ("internlm2-chat", "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，"
                       "英文名叫InternVL, 是一个有用无害的人工智能助手。", "<|im_end|>"),
    ("internvl2_5", "你是书生·万象，英文名是InternVL，"
                    "是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。", "<|im_end|>\n"),
])
def test_chat_templates_follow_the_release(release, template, system, sep):
    tok = mstar_jax.load(release[2]).processor.tokenizer
    proc = P.ChatProcessor(tok, template=template, image_size=56, tokens_per_tile=4)
    one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which bar?"}]}]
    assert proc.apply_chat_template(one, add_generation_prompt=True) == mpt(
        system, sep, [("user", "<image>\nWhich bar?")], True)
    two = [{"role": "system", "content": "Be brief."}, *one, {"role": "assistant", "content": "B."}]
    assert proc.apply_chat_template(two) == mpt(
        "Be brief.", sep, [("user", "<image>\nWhich bar?"), ("assistant", "B.")], False)
    # <image> becomes <img><IMG_CONTEXT>*N</img>, N = tokens per tile x tiles.
    assert proc.expand("a <image> b", [3]) == "a <img>" + "<IMG_CONTEXT>" * 12 + "</img> b"


def test_internlm2_biases_pack_per_kv_head_and_convert_back(tmp_path):
    """InternLM2's `bias` packs the q/k/v biases like wqkv's rows; a Llama decoder with biases round-trips through
    the release layout and keeps transformers' logits."""
    from mstar_jax.cli import main
    from mstar_jax.models.internvl.tiny import TinySpec, make_tiny_internvl

    spec = TinySpec(text="llama", attention_bias=True, seed=2)
    model = make_tiny_internvl(tmp_path / "hf", spec)
    assert main(["convert", "hf-to-flax", str(tmp_path / "hf"), str(tmp_path / "flax")]) == 0
    assert main(["convert", "flax-to-hf", str(tmp_path / "flax"), str(tmp_path / "chat"), "--layout",
                 "internvl_chat"]) == 0
    hf, chat = read_all(tmp_path / "hf"), read_all(tmp_path / "chat")
    assert json.loads((tmp_path / "chat" / "config.json").read_text())["llm_config"]["bias"] is True
    a = "language_model.model.layers.1."
    bias = [hf[a + f"self_attn.{p}_proj.bias"][:, None] for p in "qkv"]  # as [out, 1] "weights"
    packed = pack_wqkv(*bias, kv_heads=spec.kv_heads, head_dim=spec.hidden // spec.heads)[:, 0]
    np.testing.assert_array_equal(chat[a + "attention.wqkv.bias"], packed)
    np.testing.assert_array_equal(chat[a + "attention.wo.bias"], hf[a + "self_attn.o_proj.bias"])
    policy = mstar_jax.load(tmp_path / "chat")
    batch = make_batch(policy.processor)
    mask = batch["attention_mask"].astype(bool)
    assert np.abs(policy.logits(batch) - hf_logits(model, batch))[mask].max() < 1e-4


def test_a_final_vision_layernorm_cannot_go_to_the_release_layout(tmp_path):
    from mstar_jax.cli import main

    path, _ = build(tmp_path, "llama_variant")  # use_mean_pooling false: transformers' final LayerNorm
    assert main(["convert", "hf-to-flax", str(path), str(tmp_path / "flax")]) == 0
    with pytest.raises(CheckpointError, match="ends in a LayerNorm"):
        from mstar_jax.conversion import flax_to_hf

        flax_to_hf(tmp_path / "flax", tmp_path / "chat", layout="internvl_chat")
    assert not (tmp_path / "chat").exists()  # nothing written


def test_remote_code_tokenizer_is_read_from_its_sentencepiece_model_without_running_code(tmp_path):
    """InternVL2's tokenizer_config names a remote-code class (InternLM2Tokenizer); its tokenizer.model is read
    instead (BOS first), and the class's module is never imported."""
    import sentencepiece as spm

    text = ["How many circles are there? Count them.", "Which bar is the tallest?", "The answer is 8."] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_prefix=str(tmp_path / "tokenizer"), vocab_size=340, model_type="bpe",
        byte_fallback=True, user_defined_symbols=["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"],
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2, normalization_rule_name="identity",
        remove_extra_whitespaces=False)
    marker = tmp_path / "imported"
    (tmp_path / "tokenization_internlm2.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "InternLM2Tokenizer", "auto_map": {"AutoTokenizer": [
            "tokenization_internlm2.InternLM2Tokenizer", None]}, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True}))
    tok = P.load_tokenizer(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    for s in ("Which bar is the tallest?<|im_end|> <IMG_CONTEXT><IMG_CONTEXT>", "The answer is 8."):
        assert tok(s)["input_ids"] == [1] + sp.encode(s)
    assert tok.convert_tokens_to_ids("<IMG_CONTEXT>") == sp.piece_to_id("<IMG_CONTEXT>")
    assert not marker.exists()


def test_a_qwen2_decoder_round_trips_through_the_release_layout(tmp_path):
    """InternVL2.5/3's release layout keeps a Qwen2 LLM under its own names (language_model.model.*, tied head
    here): transformers -> release -> transformers is bitwise and the release checkpoint keeps the logits."""
    from mstar_jax.cli import main

    path, model = build(tmp_path, "qwen2")
    assert main(["convert", "hf-to-flax", str(path), str(tmp_path / "a")]) == 0
    assert main(["convert", "flax-to-hf", str(tmp_path / "a"), str(tmp_path / "chat"), "--layout",
                 "internvl_chat"]) == 0
    cfg = json.loads((tmp_path / "chat" / "config.json").read_text())
    assert cfg["llm_config"]["architectures"] == ["Qwen2ForCausalLM"] and cfg["template"] == "internvl2_5"
    chat = read_all(tmp_path / "chat")
    assert "language_model.model.layers.0.self_attn.q_proj.bias" in chat and "language_model.lm_head.weight" not in chat
    policy = mstar_jax.load(tmp_path / "chat")
    batch = make_batch(policy.processor)
    mask = batch["attention_mask"].astype(bool)
    assert np.abs(policy.logits(batch) - hf_logits(model, batch))[mask].max() < 1e-4
    assert main(["convert", "hf-to-flax", str(tmp_path / "chat"), str(tmp_path / "b")]) == 0
    assert main(["convert", "flax-to-hf", str(tmp_path / "b"), str(tmp_path / "hf"), "--layout", "transformers"]) == 0
    original, back = read_all(path), read_all(tmp_path / "hf")
    assert set(back) == set(original) and all(np.array_equal(back[k], original[k]) for k in original)
