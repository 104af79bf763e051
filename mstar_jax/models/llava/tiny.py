"""Tiny random LLaVA checkpoints in real HF format, made with `transformers` itself (no download).

Used by the tests, the README's first command and the embedded default run: the checkpoint goes through the
same HF -> Flax conversion as a real one. The tokenizer is a byte-level BPE trained in-process on the text the
caller gives, with the special tokens and `<image>` placeholder a LLaVA processor needs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '</s>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<|user|>", "<|assistant|>", "<|system|>"]

_DEFAULT_CORPUS = [
    "What is shown in the image? Answer the question using a single word or phrase.",
    "How many circles are there? The answer is 3.",
    "The bar for B is the tallest, so the answer is B.",
    "Let's think step by step. First, count the red shapes. Then add the blue ones.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 + - * / = . , ( ) A B C D",
]


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """Sizes and families of a tiny LLaVA."""

    vision: str = "clip"  # clip | siglip
    text: str = "llama"  # llama | qwen2 | phi3
    image_size: int = 28
    patch_size: int = 14
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 4
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int | None = None
    vocab_size: int = 400
    tie_word_embeddings: bool = False
    vision_feature_layer: int | tuple[int, ...] = -2
    select_strategy: str = "default"
    rope_scaling: dict | None = None
    max_position_embeddings: int = 512
    sliding_window: int | None = None  # qwen2: a sliding window on the layers from `max_window_layers` on
    max_window_layers: int = 0
    projector_act: str = "gelu"
    projector_bias: bool = True
    dtype: str = "float32"
    seed: int = 0


def build_tokenizer(vocab_size: int, corpus: Iterable[str] | None = None):
    """A byte-level BPE `PreTrainedTokenizerFast` with LLaVA's special tokens, trained on `corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus or _DEFAULT_CORPUS), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                   padding_side="left")


def build_processor(spec: TinySpec, tokenizer):
    """A `LlavaProcessor` with the tower's image processor and the chat template."""
    from transformers import CLIPImageProcessor, LlavaProcessor, SiglipImageProcessor

    s = spec.image_size
    if spec.vision == "clip":
        image_processor = CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
    else:
        image_processor = SiglipImageProcessor(size={"height": s, "width": s})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.patch_size,
                          vision_feature_select_strategy=spec.select_strategy, chat_template=CHAT_TEMPLATE,
                          image_token="<image>", num_additional_image_tokens=1 if spec.vision == "clip" else 0)


def build_hf_config(spec: TinySpec, tokenizer):
    """The `transformers.LlavaConfig` for a spec."""
    import transformers as T

    vocab = len(tokenizer)
    common = dict(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 2,
                  num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                  image_size=spec.image_size, patch_size=spec.patch_size)
    vision = T.CLIPVisionConfig(projection_dim=16, **common) if spec.vision == "clip" else T.SiglipVisionConfig(**common)
    text_kwargs = dict(vocab_size=vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                       num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                       num_key_value_heads=spec.kv_heads, max_position_embeddings=spec.max_position_embeddings,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=spec.tie_word_embeddings)
    if spec.head_dim:
        text_kwargs["head_dim"] = spec.head_dim
    if spec.rope_scaling:
        text_kwargs["rope_scaling"] = dict(spec.rope_scaling)
    if spec.sliding_window:
        text_kwargs.update(use_sliding_window=True, sliding_window=spec.sliding_window,
                           max_window_layers=spec.max_window_layers)
    cls = {"llama": T.LlamaConfig, "qwen2": T.Qwen2Config, "phi3": T.Phi3Config}[spec.text]
    if spec.text == "phi3" and spec.rope_scaling and "original_max_position_embeddings" in spec.rope_scaling:
        text_kwargs["original_max_position_embeddings"] = spec.rope_scaling["original_max_position_embeddings"]
    text = cls(**text_kwargs)
    return T.LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=(spec.vision_feature_layer if isinstance(spec.vision_feature_layer, int)
                                               else list(spec.vision_feature_layer)),
                         vision_feature_select_strategy=spec.select_strategy,
                         projector_hidden_act=spec.projector_act, multimodal_projector_bias=spec.projector_bias,
                         tie_word_embeddings=spec.tie_word_embeddings,
                         image_seq_length=(spec.image_size // spec.patch_size) ** 2)


def make_tiny_llava(out_dir: str | Path, spec: TinySpec = TinySpec(), corpus: Iterable[str] | None = None,
                    max_shard_size: str | int = "5GB"):
    """Create and `save_pretrained` a random tiny LLaVA (weights, config, tokenizer, processor); returns the model."""
    import torch
    import transformers as T

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(spec.vocab_size, corpus)
    processor = build_processor(spec, tokenizer)
    config = build_hf_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    model = T.LlavaForConditionalGeneration(config)
    # Random init of norms is all-ones/zeros; perturb every tensor so the parity tests exercise every weight.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = model.to(getattr(torch, spec.dtype)).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    processor.save_pretrained(out_dir)
    return model
