"""SFT batches from (prompt, image, response) triples through the HF processor, with a response-only loss mask.

The prompt is exactly what the sampler feeds the model (one user turn: image then text, through the chat
template with the generation prompt); the response follows it, tokenised on its own, plus EOS. So training
teaches the model the continuations the sampler asks it for.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mstar_jax.errors import DataError

BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask", "pixel_values")


def prompt_text(processor, question: str, num_images: int = 1) -> str:
    """One user turn (`num_images` image placeholders, then the question) through the chat template, plus the
    generation prompt: the one place a prompt is built, for sampling, SFT and the data pipeline alike."""
    content = [{"type": "image"}] * int(num_images) + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; SFT responses must end with one")
    return int(tokenizer.eos_token_id)


def _inputs(inputs):
    if inputs is None:
        from mstar_jax.models.inputs import FixedImages

        return FixedImages()
    return inputs


def sft_example(processor, question: str, response: str, image: Any | None = None,
                max_length: int | None = None, inputs=None) -> dict[str, np.ndarray]:
    """Unpadded ids, loss mask (1 on response + EOS) and the image arrays (the family's `inputs` glue; default
    pixel_values) of one example."""
    tok = getattr(processor, "tokenizer", processor)
    text = prompt_text(processor, question, int(image is not None))
    if image is not None:
        enc = processor(images=[image], text=[text], return_tensors="np")
    else:
        enc = tok([text], return_tensors="np")
    prompt = np.asarray(enc["input_ids"][0], np.int64)
    reply = np.asarray(tok(response, add_special_tokens=False)["input_ids"] + [_eos_id(tok)], np.int64)
    if max_length is not None:
        if len(prompt) >= max_length:
            raise DataError(f"prompt of {len(prompt)} tokens (images expanded) leaves no room for the response "
                            f"under max_length={max_length}: {question[:60]!r}")
        reply = reply[:max_length - len(prompt)]  # truncate the response, never the prompt (image tokens)
    out = {"input_ids": np.concatenate([prompt, reply]),
           "loss_mask": np.concatenate([np.zeros(len(prompt), np.int32), np.ones(len(reply), np.int32)])}
    if image is not None:
        out["images"] = _inputs(inputs).example_images(enc)
    return out


def pad_examples(examples: Sequence[dict[str, np.ndarray]], pad_id: int, padding_side: str = "right",
                 pad_to_multiple: int = 1, length: int | None = None, inputs=None) -> dict[str, np.ndarray]:
    """Stack examples into a batch padded to a common length (rounded up, so fewer shapes compile); images go
    through the family's `inputs.batch_images` (leading row axis)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not examples:
        raise DataError("an SFT batch needs at least one example")
    longest = max(len(e["input_ids"]) for e in examples)
    t = length if length is not None else -(-longest // pad_to_multiple) * pad_to_multiple
    if t < longest:
        raise DataError(f"batch length {t} is shorter than its longest example ({longest} tokens)")
    b = len(examples)
    ids = np.full((b, t), pad_id, np.int32)
    attn = np.zeros((b, t), np.int32)
    loss = np.zeros((b, t), np.int32)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        sl = slice(0, n) if padding_side == "right" else slice(t - n, t)
        ids[i, sl], attn[i, sl], loss[i, sl] = e["input_ids"], 1, e["loss_mask"]
    batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}
    # Other per-token arrays (e.g. the PRM's float `targets`) are padded with zeros the same way.
    for k in sorted({k for e in examples for k in e} - {"input_ids", "loss_mask", "images"}):
        first = np.asarray(examples[0][k])
        if first.ndim != 1 or len(first) != len(examples[0]["input_ids"]):
            continue
        extra = np.zeros((b, t), first.dtype)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            extra[i, slice(0, n) if padding_side == "right" else slice(t - n, t)] = e[k]
        batch[k] = extra
    with_images = [e for e in examples if e.get("images") is not None]
    if with_images and len(with_images) != b:
        raise DataError(f"{len(with_images)} of {b} SFT examples have an image; a batch must be all-image or "
                        "all-text")
    if with_images:
        batch.update(_inputs(inputs).batch_images([e["images"] for e in examples], "SFT batch"))
    return batch


def sft_batch(processor, questions: Sequence[str], responses: Sequence[str], images: Sequence[Any] | None = None,
              padding_side: str = "right", pad_to_multiple: int = 1, max_length: int | None = None,
              length: int | None = None, inputs=None) -> dict[str, np.ndarray]:
    """input_ids / attention_mask / loss_mask [B, T] (+ pixel_values [B, C, H, W]) for (question, image, response)."""
    images = list(images) if images is not None else [None] * len(questions)
    if not len(questions) == len(responses) == len(images):
        raise DataError(f"{len(questions)} questions, {len(responses)} responses and {len(images)} images; "
                        "pass one of each per example")
    examples = [sft_example(processor, q, r, im, max_length, inputs) for q, r, im in zip(questions, responses, images)]
    tok = getattr(processor, "tokenizer", processor)
    pad = tok.pad_token_id if tok.pad_token_id is not None else _eos_id(tok)
    return pad_examples(examples, int(pad), padding_side, pad_to_multiple, length, inputs)
