"""Tiny random MiniCPM-Llama3-V-2.5 checkpoints in the release's layout (no download, no remote code).

Weights are random NumPy arrays under the release's key names (`llm.*`, `vpm.*`, `resampler.*`); config.json is in
the release's form (slicing settings both at the top level and in slice_config) at tiny sizes: 56-px slices of
14-px patches, a 10 x 10 tower position grid, 8 queries, a Llama decoder 256 wide (the resampler's heads are
hidden // 128). The tokenizer is a byte-level BPE trained in-process with Llama-3's and the release's special
tokens. Tests compose a PyTorch reference from transformers' Idefics2VisionTransformer and LlamaForCausalLM on
the same files.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable

from mstar_jax.models.minicpmv.processing import CHAT_TEMPLATE, MiniCPMVProcessor
from mstar_jax.models.phi3_v.tiny import CORPUS, random_tensors

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<unk>", "<image>", "</image>", "<slice>", "</slice>"]


@dataclasses.dataclass(frozen=True)
class TinyMiniCPMVSpec:
    """Sizes of a tiny MiniCPM-Llama3-V-2.5."""

    scale_resolution: int = 56
    patch_size: int = 14
    vision_image_size: int = 140  # the tower's position grid: 10 x 10
    vision_hidden: int = 32
    vision_intermediate: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    hidden: int = 256
    intermediate: int = 512
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab_size: int = 400
    query_num: int = 8
    max_slice_nums: int = 9
    version: float = 2.5
    seed: int = 0


def build_tokenizer(vocab_size: int, corpus: Iterable[str] | None = None):
    """A byte-level BPE `PreTrainedTokenizerFast` with Llama-3's chat tokens and the release's image tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus or CORPUS) + ["user assistant"], trainer=trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                  unk_token="<unk>", pad_token="<|end_of_text|>", padding_side="left")
    out.chat_template = CHAT_TEMPLATE
    return out


def release_config(spec: TinyMiniCPMVSpec, vocab: int, ids: dict[str, int]) -> dict:
    """config.json in the release's form."""
    sl = {"max_slice_nums": spec.max_slice_nums, "patch_size": spec.patch_size,
          "scale_resolution": spec.scale_resolution}
    return {
        "_name_or_path": "openbmb/MiniCPM-Llama3-V-2_5", "architectures": ["MiniCPMV"], "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMVConfig", "AutoModel": "modeling_minicpmv.MiniCPMV",
                     "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV"},
        "batch_vision_input": True, "bos_token_id": ids["<|begin_of_text|>"], "drop_vision_last_layer": False,
        "eos_token_id": ids["<|end_of_text|>"], "hidden_act": "silu", "hidden_size": spec.hidden,
        "image_size": spec.scale_resolution, "initializer_range": 0.02, "intermediate_size": spec.intermediate,
        "max_position_embeddings": 8192, "mm_use_im_start_end": True, "model_type": "minicpmv",
        "num_attention_heads": spec.heads, "num_hidden_layers": spec.layers, "num_key_value_heads": spec.kv_heads,
        "pretraining_tp": 1, "query_num": spec.query_num, "rms_norm_eps": 1e-5, "rope_scaling": None,
        "rope_theta": 500000.0, **sl, "slice_config": {**sl, "model_type": "minicpmv"}, "slice_mode": True,
        "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.40.0", "use_cache": True,
        "version": spec.version, "vocab_size": vocab,
        "vision_config": {"hidden_size": spec.vision_hidden, "image_size": spec.vision_image_size,
                          "intermediate_size": spec.vision_intermediate, "model_type": "idefics2",
                          "num_attention_heads": spec.vision_heads, "num_hidden_layers": spec.vision_layers,
                          "patch_size": spec.patch_size},
    }


def release_shapes(spec: TinyMiniCPMVSpec, vocab: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of the release's checkpoint, by key."""
    v, d, p = spec.vision_hidden, spec.hidden, spec.patch_size
    hd = d // spec.heads
    shapes = {
        "llm.model.embed_tokens.weight": (vocab, d), "llm.model.norm.weight": (d,), "llm.lm_head.weight": (vocab, d),
        "vpm.embeddings.patch_embedding.weight": (v, 3, p, p), "vpm.embeddings.patch_embedding.bias": (v,),
        "vpm.embeddings.position_embedding.weight": ((spec.vision_image_size // p) ** 2, v),
        "vpm.post_layernorm.weight": (v,), "vpm.post_layernorm.bias": (v,),
        "resampler.query": (spec.query_num, d), "resampler.kv_proj.weight": (d, v),
        "resampler.attn.in_proj_weight": (3 * d, d), "resampler.attn.in_proj_bias": (3 * d,),
        "resampler.attn.out_proj.weight": (d, d), "resampler.attn.out_proj.bias": (d,), "resampler.proj": (d, d),
    }
    for ln in ("ln_q", "ln_kv", "ln_post"):
        shapes[f"resampler.{ln}.weight"] = (d,)
        shapes[f"resampler.{ln}.bias"] = (d,)
    for i in range(spec.layers):
        pre = f"llm.model.layers.{i}."
        shapes.update({pre + "self_attn.q_proj.weight": (spec.heads * hd, d),
                       pre + "self_attn.k_proj.weight": (spec.kv_heads * hd, d),
                       pre + "self_attn.v_proj.weight": (spec.kv_heads * hd, d),
                       pre + "self_attn.o_proj.weight": (d, spec.heads * hd),
                       pre + "mlp.gate_proj.weight": (spec.intermediate, d),
                       pre + "mlp.up_proj.weight": (spec.intermediate, d),
                       pre + "mlp.down_proj.weight": (d, spec.intermediate),
                       pre + "input_layernorm.weight": (d,), pre + "post_attention_layernorm.weight": (d,)})
    for i in range(spec.vision_layers):
        pre = f"vpm.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[pre + f"self_attn.{proj}.weight"] = (v, v)
            shapes[pre + f"self_attn.{proj}.bias"] = (v,)
        shapes.update({pre + "mlp.fc1.weight": (spec.vision_intermediate, v),
                       pre + "mlp.fc1.bias": (spec.vision_intermediate,),
                       pre + "mlp.fc2.weight": (v, spec.vision_intermediate), pre + "mlp.fc2.bias": (v,),
                       pre + "layer_norm1.weight": (v,), pre + "layer_norm1.bias": (v,),
                       pre + "layer_norm2.weight": (v,), pre + "layer_norm2.bias": (v,)})
    return shapes


def make_tiny_minicpmv(out_dir: str | Path, spec: TinyMiniCPMVSpec = TinyMiniCPMVSpec(),
                       corpus: Iterable[str] | None = None) -> Path:
    """Write a random tiny MiniCPM-Llama3-V-2.5 (safetensors, config.json, generation_config.json, tokenizer,
    preprocessor_config.json) in the release's layout; returns the directory."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.vocab_size, corpus)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = len(tokenizer)
    (out / "config.json").write_text(json.dumps(release_config(spec, vocab, ids), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]]},
        indent=2) + "\n")
    save_file(random_tensors(release_shapes(spec, vocab), spec.seed), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    MiniCPMVProcessor(tokenizer, spec.query_num, spec.max_slice_nums, spec.scale_resolution, spec.patch_size,
                      max_patches=(spec.vision_image_size // spec.patch_size) ** 2).save_pretrained(out)
    return out
