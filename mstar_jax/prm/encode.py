"""PRM inputs: (prompt, image, response, step spans[, labels]) -> token ids, step end positions, token targets.

The prompt is the one user turn the policy was asked (chat template + generation prompt, image placeholder
expanded by the processor) and the response follows it tokenised on its own, exactly as the SFT step builds
its examples; the character offsets of the response's tokens map step spans to end tokens.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mstar_jax.errors import DataError
from mstar_jax.prm.steps import end_tokens, token_targets


def response_tokens(tokenizer, response: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of a response (no special tokens) and each token's character span in it."""
    try:
        enc = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(map(int, o)) for o in enc["offset_mapping"]]
    except NotImplementedError:  # a slow (Python) tokenizer has no offsets: recover them by decoding prefixes
        ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
        offsets, prev = [], 0
        for j in range(len(ids)):
            end = len(tokenizer.decode(ids[:j + 1], skip_special_tokens=True))
            offsets.append((min(prev, end), end))
            prev = end
        return ids, offsets


def prompt_ids(processor, prompt: str, image: Any | None, inputs=None) -> tuple[np.ndarray, dict | None]:
    """(ids of the templated prompt with image tokens expanded, its image arrays (the family's `inputs` glue;
    default pixel_values) or None)."""
    from mstar_jax.sft_batch import _inputs, prompt_text

    text = prompt_text(processor, prompt, int(image is not None))
    if image is not None:
        enc = processor(images=[image], text=[text], return_tensors="np")
        return np.asarray(enc["input_ids"][0], np.int32), _inputs(inputs).example_images(enc)
    tok = getattr(processor, "tokenizer", processor)
    return np.asarray(tok([text], return_tensors="np")["input_ids"][0], np.int32), None


def encode(processor, prompt: str, image: Any | None, response: str, spans: Sequence[tuple[int, int]],
           labels: Sequence[float] | None = None, max_length: int | None = None, where: str = "",
           inputs=None) -> dict:
    """One PRM row: input_ids [T], ends [S] (absolute end-token positions), and with `labels` the loss mask and
    targets [T]; `images` (the family's arrays) when there is an image. Steps cut off by `max_length` are dropped."""
    if not spans:
        raise DataError(f"{where or 'response'}: empty response (no steps to score)")
    tok = getattr(processor, "tokenizer", processor)
    p_ids, images = prompt_ids(processor, prompt, image, inputs)
    r_ids, offsets = response_tokens(tok, response)
    ends = end_tokens(offsets, spans)
    keep = len(ends)
    if max_length is not None:
        room = max_length - len(p_ids)
        if room <= 0:
            raise DataError(f"{where or 'prompt'}: the prompt's {len(p_ids)} tokens (images expanded) leave no room "
                            f"for the response under max_length={max_length}")
        keep = sum(1 for e in ends if e < room)
        if keep == 0:
            raise DataError(f"{where or 'response'}: its first step ends after max_length={max_length} tokens")
        r_ids = r_ids[:ends[keep - 1] + 1]
    ends = ends[:keep]
    row = {"input_ids": np.concatenate([p_ids, np.asarray(r_ids, np.int32)]),
           "ends": np.asarray(ends, np.int32) + len(p_ids), "num_steps": keep}
    if images is not None:
        row["images"] = images
    if labels is not None:
        targets, mask = token_targets(ends, list(labels)[:keep], len(r_ids))
        row["targets"] = np.concatenate([np.zeros(len(p_ids), np.float32), targets])
        row["loss_mask"] = np.concatenate([np.zeros(len(p_ids), np.int32), mask])
    return row
