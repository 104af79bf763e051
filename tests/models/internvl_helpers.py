"""Shared pieces of the InternVL tests: tiny checkpoints in transformers' format, batches with several tile counts
per batch, and the reference logits / greedy tokens from the transformers model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mstar_jax.models.internvl.tiny import TinySpec, make_tiny_internvl
from tests.conftest import random_images

# Qwen2 decoder with a tied head; Llama decoder (InternLM2's maths) with dynamic NTK rope like the InternVL2
# releases, q/k/v/o biases, RMSNorm in the vision tower and transformers' final vision LayerNorm.
SPECS = {
    "qwen2": TinySpec(text="qwen2", tie_word_embeddings=True),
    "llama": TinySpec(text="llama", kv_heads=2, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "llama_variant": TinySpec(text="llama", attention_bias=True, norm_type="rms_norm", use_mean_pooling=False,
                              qk_norm=False, qkv_bias=False, seed=1),
}
PROMPTS = ["How many circles are there? Count them.", "Which bar is the tallest?", "What is shown?"]
# (height, width): 1 tile, a 1 x 2 grid + thumbnail, a 2 x 2 grid + thumbnail at 56-px tiles and max_patches 4.
SIZES = [(50, 56), (60, 125), (120, 110)]


def build(root: Path, name: str):
    """(hf_dir, torch model) of a tiny checkpoint."""
    path = root / name
    return path, make_tiny_internvl(path, SPECS[name])


def texts(processor, prompts=PROMPTS, with_image=True):
    """Each prompt as one user turn through the processor's chat template."""
    content = [{"type": "image"}] if with_image else []
    return [processor.apply_chat_template([{"role": "user", "content": content + [{"type": "text", "text": p}]}],
                                          add_generation_prompt=True) for p in prompts]


def make_batch(processor, prompts=PROMPTS, sizes=SIZES, padding_side="left", seed=0) -> dict:
    """Processor output (numpy) for one image + one prompt per row, padded."""
    images = random_images(seed, sizes[:len(prompts)])
    side, processor.tokenizer.padding_side = processor.tokenizer.padding_side, padding_side
    try:
        return dict(processor(images=images, text=texts(processor, prompts), return_tensors="np", padding=True))
    finally:
        processor.tokenizer.padding_side = side


def tiles_per_row(batch: dict, cfg) -> list[int]:
    """Tiles each row's placeholders stand for."""
    return ((batch["input_ids"] == cfg.image_token_id).sum(-1) // cfg.image_seq_length).tolist()


def hf_logits(model, batch) -> np.ndarray:
    """Reference logits from the transformers model, with generate-style position ids."""
    import torch

    mask = batch["attention_mask"]
    pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 0)
    kw = {} if batch.get("pixel_values") is None else {"pixel_values": torch.tensor(batch["pixel_values"])}
    with torch.no_grad():
        out = model(input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(pos), **kw)
    return out.logits.float().numpy()


def hf_greedy(model, batch, new_tokens: int) -> np.ndarray:
    """transformers' greedy continuation [B, new_tokens]."""
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(batch["input_ids"]),
                             attention_mask=torch.tensor(batch["attention_mask"]),
                             pixel_values=torch.tensor(batch["pixel_values"]), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
    return out[:, batch["input_ids"].shape[1]:].numpy()
