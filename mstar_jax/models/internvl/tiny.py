"""Tiny random InternVL checkpoints in transformers' `internvl` format, made with `transformers` itself (no
download): weights, config, a byte-level BPE tokenizer trained in-process with InternVL's special tokens, GotOcr2's
image-processor settings and the release's chat template (a short system message, so tiny prompts stay short)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable

from mstar_jax.models.internvl.config import IMG_CONTEXT, IMG_END, IMG_START
from mstar_jax.models.internvl.processing import IMAGENET_MEAN, IMAGENET_STD, chat_template

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMG_START, IMG_END, IMG_CONTEXT, "<video>"]
SYSTEM_MESSAGE = "You are InternVL."

_CORPUS = [
    "What is shown in the image? Answer the question using a single word or phrase.",
    "How many circles are there? The answer is 3.",
    "The bar for B is the tallest, so the answer is B.",
    "Let's think step by step. First, count the red shapes. Then add the blue ones.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 + - * / = . , ( ) A B C D",
    "system user assistant You are InternVL.",
]


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """Sizes and options of a tiny InternVL."""

    text: str = "qwen2"  # qwen2 | llama
    image_size: int = 56  # 4 x 4 patches of 14 px: 4 tokens per tile after the pixel shuffle
    patch_size: int = 14
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 4
    qk_norm: bool = True
    qkv_bias: bool = True
    norm_type: str = "layer_norm"
    use_mean_pooling: bool = True
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab_size: int = 400
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # llama: biases on q/k/v/o (InternLM2's `bias`)
    rope_scaling: dict | None = None
    max_patches: int = 4
    template: str = "internvl2_5"
    dtype: str = "float32"
    seed: int = 0


def build_tokenizer(vocab_size: int, corpus: Iterable[str] | None = None):
    """A byte-level BPE tokenizer with InternVL's special tokens named as InternVLProcessor reads them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus or _CORPUS) + _CORPUS[-1:], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left",
        extra_special_tokens={"start_image_token": IMG_START, "end_image_token": IMG_END,
                              "context_image_token": IMG_CONTEXT, "video_token": "<video>"})


def build_hf_config(spec: TinySpec, tokenizer):
    """The `transformers.InternVLConfig` of a spec."""
    import transformers as T

    vision = T.InternVLVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads, image_size=spec.image_size,
        patch_size=spec.patch_size, use_qk_norm=spec.qk_norm, attention_bias=spec.qkv_bias,
        norm_type=spec.norm_type, use_mean_pooling=spec.use_mean_pooling)
    text_kwargs = dict(vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                       num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                       num_key_value_heads=spec.kv_heads, max_position_embeddings=2048,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       tie_word_embeddings=spec.tie_word_embeddings)
    if spec.rope_scaling:
        text_kwargs["rope_scaling"] = dict(spec.rope_scaling)
    if spec.text == "llama":
        text = T.LlamaConfig(attention_bias=spec.attention_bias, **text_kwargs)
    else:
        text = T.Qwen2Config(**text_kwargs)
    tokens_per_tile = (spec.image_size // spec.patch_size // 2) ** 2
    return T.InternVLConfig(vision_config=vision, text_config=text,
                            image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT),
                            image_seq_length=tokens_per_tile, tie_word_embeddings=spec.tie_word_embeddings)


def save_processor(out_dir: Path, spec: TinySpec, tokenizer, tokens_per_tile: int) -> None:
    """The processor files of an `internvl` checkpoint: tokenizer, GotOcr2 image processor (the release's tiling
    numbers, ImageNet statistics), processor_config.json and the chat template."""
    from transformers import GotOcr2ImageProcessorPil

    tokenizer.save_pretrained(out_dir)
    s = spec.image_size
    GotOcr2ImageProcessorPil(crop_to_patches=True, min_patches=1, max_patches=spec.max_patches,
                             size={"height": s, "width": s}, image_mean=list(IMAGENET_MEAN),
                             image_std=list(IMAGENET_STD)).save_pretrained(out_dir)
    (out_dir / "processor_config.json").write_text(json.dumps(
        {"processor_class": "InternVLProcessor", "image_seq_length": tokens_per_tile}, indent=2) + "\n")
    (out_dir / "chat_template.jinja").write_text(chat_template(spec.template, IMG_CONTEXT, SYSTEM_MESSAGE))


def make_tiny_internvl(out_dir: str | Path, spec: TinySpec = TinySpec(), corpus: Iterable[str] | None = None):
    """Create and `save_pretrained` a random tiny InternVL (weights, config, processor files); returns the model."""
    import torch
    import transformers as T

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(spec.vocab_size, corpus)
    config = build_hf_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    model = T.InternVLForConditionalGeneration(config)
    # Random init leaves norms at ones, layer scales at 0.1 and positions at zero; perturb every tensor so the
    # parity tests exercise every weight.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = model.to(getattr(torch, spec.dtype)).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    save_processor(out_dir, spec, tokenizer, config.image_seq_length)
    return model
