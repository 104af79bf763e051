"""Tiny random Phi-3.5-vision checkpoints in the release's layout (no download, no remote code).

Weights are random NumPy arrays written to safetensors under the release's key names; config.json has the release's
fields plus a `vision_config` (CLIP sizes, which the release hard-codes for ViT-L/14-336); the tokenizer is a
byte-level BPE trained in-process with the release's special tokens; preprocessor_config.json is in the release's
form. Tests compose a PyTorch reference from transformers' CLIPVisionModel and Phi3ForCausalLM on the same files.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable

import numpy as np

from mstar_jax.models.phi3_v.processing import CHAT_TEMPLATE, Phi3VImageProcessor, Phi3VProcessor

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|user|>", "<|system|>", "<|end|>",
                  "<|image|>"]
CORPUS = [
    "What is shown in the image? Answer the question using a single word or phrase.",
    "How many circles are there? The answer is 3.",
    "The bar for B is the tallest, so the answer is B.",
    "Let's think step by step. First, count the red shapes. Then add the blue ones.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 + - * / = . , ( ) A B C D",
]


@dataclasses.dataclass(frozen=True)
class TinyPhi3VSpec:
    """Sizes of a tiny Phi-3.5-vision (crop 56 px of 14-px patches: 2 x 2 merged tokens per crop)."""

    image_size: int = 56
    patch_size: int = 14
    vision_hidden: int = 32
    vision_intermediate: int = 64
    vision_layers: int = 3  # the feature layer (-2) uses 2; the last is kept unused, as in the release
    vision_heads: int = 4
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4
    vocab_size: int = 400
    num_crops: int = 4
    original_max_position_embeddings: int = 4096
    max_position_embeddings: int = 131072
    hd_transform_order: str = "sub_glb"
    seed: int = 0


def build_tokenizer(vocab_size: int, corpus: Iterable[str] | None = None):
    """A byte-level BPE `PreTrainedTokenizerFast` with the release's special tokens (bos <s>, eos/pad
    <|endoftext|>, unk <unk>) and its chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus or CORPUS), trainer=trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>",
                                  unk_token="<unk>", pad_token="<|endoftext|>", padding_side="left")
    out.chat_template = CHAT_TEMPLATE
    return out


def release_config(spec: TinyPhi3VSpec, vocab: int, token_ids: dict[str, int]) -> dict:
    """config.json in the release's form (plus `vision_config`)."""
    half = spec.hidden // spec.heads // 2
    return {
        "_name_or_path": "Phi-3.5-vision-instruct", "architectures": ["Phi3VForCausalLM"], "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_phi3_v.Phi3VConfig",
                     "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"},
        "bos_token_id": token_ids["<s>"],
        "embd_layer": {"embedding_cls": "image", "hd_transform_order": spec.hd_transform_order,
                       "projection_cls": "mlp", "use_hd_transform": True, "with_learnable_separator": True},
        "embd_pdrop": 0.0, "eos_token_id": token_ids["<|endoftext|>"], "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "img_processor": {"image_dim_out": spec.vision_hidden, "model_name": "openai/clip-vit-large-patch14-336",
                          "name": "clip_vision_model",
                          "num_img_tokens": (spec.image_size // spec.patch_size // 2) ** 2},
        "initializer_range": 0.02, "intermediate_size": spec.intermediate,
        "max_position_embeddings": spec.max_position_embeddings, "model_type": "phi3_v",
        "num_attention_heads": spec.heads, "num_hidden_layers": spec.layers, "num_key_value_heads": spec.kv_heads,
        "original_max_position_embeddings": spec.original_max_position_embeddings,
        "pad_token_id": token_ids["<|endoftext|>"], "resid_pdrop": 0.0, "rms_norm_eps": 1e-5,
        "rope_scaling": {"long_factor": [1.0 + 0.25 * i for i in range(half)],
                         "short_factor": [1.0 + 0.05 * i for i in range(half)], "type": "su"},
        "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": False, "torch_dtype": "float32",
        "transformers_version": "4.38.1", "use_cache": True, "vocab_size": vocab,
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": spec.vision_hidden,
                          "intermediate_size": spec.vision_intermediate,
                          "num_hidden_layers": spec.vision_layers, "num_attention_heads": spec.vision_heads,
                          "image_size": spec.image_size, "patch_size": spec.patch_size, "num_channels": 3,
                          "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
    }


def release_shapes(spec: TinyPhi3VSpec, vocab: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of the release's checkpoint, by key."""
    v, d = spec.vision_hidden, spec.hidden
    hd = d // spec.heads
    clip = "model.vision_embed_tokens.img_processor.vision_model."
    shapes = {
        "model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,), "lm_head.weight": (vocab, d),
        clip + "embeddings.class_embedding": (v,),
        clip + "embeddings.patch_embedding.weight": (v, 3, spec.patch_size, spec.patch_size),
        clip + "embeddings.position_embedding.weight": ((spec.image_size // spec.patch_size) ** 2 + 1, v),
        clip + "pre_layrnorm.weight": (v,), clip + "pre_layrnorm.bias": (v,),
        clip + "post_layernorm.weight": (v,), clip + "post_layernorm.bias": (v,),
        "model.vision_embed_tokens.img_projection.0.weight": (d, 4 * v),
        "model.vision_embed_tokens.img_projection.0.bias": (d,),
        "model.vision_embed_tokens.img_projection.2.weight": (d, d),
        "model.vision_embed_tokens.img_projection.2.bias": (d,),
        "model.vision_embed_tokens.sub_GN": (1, 1, 1, 4 * v), "model.vision_embed_tokens.glb_GN": (1, 1, 4 * v),
    }
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.qkv_proj.weight": ((spec.heads + 2 * spec.kv_heads) * hd, d),
                       p + "self_attn.o_proj.weight": (d, spec.heads * hd),
                       p + "mlp.gate_up_proj.weight": (2 * spec.intermediate, d),
                       p + "mlp.down_proj.weight": (d, spec.intermediate),
                       p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)})
    for i in range(spec.vision_layers):
        p = clip + f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (v, v)
            shapes[p + f"self_attn.{proj}.bias"] = (v,)
        shapes.update({p + "mlp.fc1.weight": (spec.vision_intermediate, v), p + "mlp.fc1.bias": (spec.vision_intermediate,),
                       p + "mlp.fc2.weight": (v, spec.vision_intermediate), p + "mlp.fc2.bias": (v,),
                       p + "layer_norm1.weight": (v,), p + "layer_norm1.bias": (v,),
                       p + "layer_norm2.weight": (v,), p + "layer_norm2.bias": (v,)})
    return shapes


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Random float32 tensors: norm weights near 1, everything else N(0, 0.05^2) (every weight matters)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, shape in sorted(shapes.items()):
        x = rng.standard_normal(shape).astype(np.float32) * np.float32(0.05)
        if k.endswith(".weight") and "norm" in k:  # RMSNorm / LayerNorm scales (pre_layrnorm included)
            x = x + np.float32(1.0)
        out[k] = x
    return out


def make_tiny_phi3_v(out_dir: str | Path, spec: TinyPhi3VSpec = TinyPhi3VSpec(),
                     corpus: Iterable[str] | None = None) -> Path:
    """Write a random tiny Phi-3.5-vision (safetensors, config.json, generation_config.json, tokenizer,
    preprocessor_config.json) in the release's layout; returns the directory."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.vocab_size, corpus)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = len(tokenizer)
    (out / "config.json").write_text(json.dumps(release_config(spec, vocab, ids), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["<s>"], "eos_token_id": [ids["<|end|>"], ids["<|endoftext|>"]],
         "pad_token_id": ids["<|endoftext|>"]}, indent=2) + "\n")
    save_file(random_tensors(release_shapes(spec, vocab), spec.seed), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    per_crop = (spec.image_size // spec.patch_size // 2) ** 2
    Phi3VProcessor(tokenizer, Phi3VImageProcessor(spec.num_crops, spec.image_size), ids["<|image|>"],
                   per_crop).save_pretrained(out)
    return out
