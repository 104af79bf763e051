"""Tiny random Qwen2-VL / Qwen2.5-VL checkpoints in the published HF layout, made with `transformers` (no download).

The directory looks like a hub checkpoint: safetensors + config.json from `save_pretrained`, a byte-level BPE
tokenizer trained in-process with Qwen's special tokens, preprocessor_config.json (min/max pixels, patch and
merge sizes, `Qwen2VLImageProcessor`) and chat_template.json with Qwen-VL's chat format.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable

# Qwen-VL's chat format: a default system turn, <|im_start|>role\n ... <|im_end|>\n, each image as
# <|vision_start|><|image_pad|><|vision_end|> (the processor expands <|image_pad|> to the image's tokens).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}{{ 'Picture ' + image_count.value | string + ': ' }}{% endif %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif 'text' in item %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

_DEFAULT_CORPUS = [
    "You are a helpful assistant. system user assistant",
    "What is shown in the image? Answer the question using a single word or phrase.",
    "How many circles are there? The answer is 3.",
    "The bar for B is the tallest, so the answer is B.",
    "Let's think step by step. First, count the red shapes. Then add the blue ones.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 + - * / = . , ( ) A B C D",
]


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny Qwen-VL (patch 4 px: an image of a few dozen pixels gives dozens of patches)."""

    model_type: str = "qwen2_vl"  # qwen2_vl | qwen2_5_vl
    patch_size: int = 4
    temporal_patch_size: int = 2
    vision_hidden: int = 32
    vision_intermediate: int = 64  # Qwen2-VL: mlp_ratio = this / vision_hidden
    vision_layers: int = 2
    vision_heads: int = 4
    window_size: int = 16  # Qwen2.5-VL: 2 x 2 merged tokens per window at patch 4
    fullatt_block_indexes: tuple[int, ...] = (1,)
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab_size: int = 400
    mrope_section: tuple[int, ...] = (2, 3, 3)  # sums to head_dim / 2
    rope_theta: float = 1000000.0
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # a window on the layers from `max_window_layers` on
    max_window_layers: int = 0
    max_position_embeddings: int = 2048
    min_pixels: int = 16 * 16
    max_pixels: int = 64 * 64
    dtype: str = "float32"
    seed: int = 0


def build_tokenizer(vocab_size: int, corpus: Iterable[str] | None = None):
    """A byte-level BPE `PreTrainedTokenizerFast` with Qwen-VL's special tokens, trained on `corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus or _DEFAULT_CORPUS), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   padding_side="left")


def image_processor(spec: TinySpec):
    """The PIL backend of transformers' Qwen2-VL image processor at the spec's sizes."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=spec.min_pixels, max_pixels=spec.max_pixels, patch_size=spec.patch_size,
                                    temporal_patch_size=spec.temporal_patch_size, merge_size=2)


def build_hf_config(spec: TinySpec, tokenizer):
    """The `transformers.Qwen2VLConfig` / `Qwen2_5_VLConfig` for a spec."""
    import transformers as T

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "mrope_section": list(spec.mrope_section),
                                 "rope_theta": spec.rope_theta},
                bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                tie_word_embeddings=spec.tie_word_embeddings)
    if spec.sliding_window:
        text.update(use_sliding_window=True, sliding_window=spec.sliding_window,
                    max_window_layers=spec.max_window_layers)
    common = dict(depth=spec.vision_layers, num_heads=spec.vision_heads, patch_size=spec.patch_size,
                  spatial_merge_size=2, temporal_patch_size=spec.temporal_patch_size)
    if spec.model_type == "qwen2_vl":
        vision = dict(embed_dim=spec.vision_hidden, hidden_size=spec.hidden,
                      mlp_ratio=spec.vision_intermediate // spec.vision_hidden, **common)
        cls = T.Qwen2VLConfig
    elif spec.model_type == "qwen2_5_vl":
        vision = dict(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
                      out_hidden_size=spec.hidden, window_size=spec.window_size,
                      fullatt_block_indexes=list(spec.fullatt_block_indexes), **common)
        cls = T.Qwen2_5_VLConfig
    else:
        raise ValueError(f"model_type {spec.model_type!r} is not qwen2_vl or qwen2_5_vl")
    return cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
               video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
               vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=spec.tie_word_embeddings)


def write_processor_files(out_dir: Path, spec: TinySpec, tokenizer) -> None:
    """Tokenizer, preprocessor_config.json and chat_template.json as the published checkpoints ship them."""
    tokenizer.save_pretrained(out_dir)
    ip = image_processor(spec)
    processor_class = "Qwen2VLProcessor" if spec.model_type == "qwen2_vl" else "Qwen2_5_VLProcessor"
    pre = {"min_pixels": spec.min_pixels, "max_pixels": spec.max_pixels, "patch_size": spec.patch_size,
           "temporal_patch_size": spec.temporal_patch_size, "merge_size": 2, "image_mean": list(ip.image_mean),
           "image_std": list(ip.image_std), "image_processor_type": "Qwen2VLImageProcessor",
           "processor_class": processor_class}
    (out_dir / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    (out_dir / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2) + "\n")


def make_tiny_qwen_vl(out_dir: str | Path, spec: TinySpec = TinySpec(), corpus: Iterable[str] | None = None,
                      max_shard_size: str | int = "5GB"):
    """Create and `save_pretrained` a random tiny Qwen2-VL / Qwen2.5-VL (weights, config, tokenizer, processor
    files); returns the torch model."""
    import torch
    import transformers as T

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(spec.vocab_size, corpus)
    config = build_hf_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    cls = T.Qwen2VLForConditionalGeneration if spec.model_type == "qwen2_vl" else T.Qwen2_5_VLForConditionalGeneration
    model = cls(config)
    # Norms start at ones/zeros; perturb every tensor so the parity tests exercise every weight.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = model.to(getattr(torch, spec.dtype)).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    write_processor_files(out_dir, spec, tokenizer)
    return model
