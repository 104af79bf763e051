"""Roofline and MFU figures for `mstar bench`: device peaks, the bytes a decode step must read, stream bandwidth.

A decode step reads the decoder's weights, the LM head and the KV caches of every row once, and does little
arithmetic per byte, so its ceiling is memory bandwidth: bytes per step / step time is the bandwidth it reached,
and over the device's peak HBM bandwidth that is its roofline fraction (issue 4's GPU target: >= 60 % at batch
>= 64). Train steps report model FLOP utilisation, 6 N per token over the devices' peak (`training.mfu`).
"""

from __future__ import annotations

import time
from typing import Any, Mapping

# (substring of jax's device_kind, HBM GB/s, dense bf16 TFLOP/s) per device, from the vendors' datasheets.
# First match wins, so the more specific names come first.
PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H200", 4800.0, 989.0),
    ("H100 PCIe", 2000.0, 756.0),
    ("H100 NVL", 3900.0, 835.0),
    ("H100", 3350.0, 989.0),  # SXM, "NVIDIA H100 80GB HBM3"
    ("A100-SXM4-80GB", 2039.0, 312.0),
    ("A100 80GB PCIe", 1935.0, 312.0),
    ("A100", 1555.0, 312.0),  # 40 GB
    ("L40S", 864.0, 362.0),
    ("L4", 300.0, 121.0),
    ("TPU v6 lite", 1640.0, 918.0),  # v6e
    ("TPU v5 lite", 819.0, 197.0),  # v5e
    ("TPU v5", 2765.0, 459.0),  # v5p
    ("TPU v4", 1200.0, 275.0),
)


def device_peaks(device_kind: str) -> tuple[float, float] | None:
    """(HBM GB/s, dense bf16 TFLOP/s) of one device of this kind, or None when it is not in PEAKS (CPUs)."""
    for name, gbs, tflops in PEAKS:
        if name.lower() in device_kind.lower():
            return gbs, tflops
    return None


def accelerator_peaks() -> tuple[float, float] | None:
    """(HBM GB/s, dense bf16 TFLOP/s) summed over this process's devices; None on CPUs or unknown kinds."""
    import jax

    devices = jax.devices()
    peaks = device_peaks(devices[0].device_kind)
    if peaks is None or devices[0].platform == "cpu":
        return None
    return peaks[0] * len(devices), peaks[1] * len(devices)


def decode_weight_bytes(params: Mapping[tuple, Any], tie_word_embeddings: bool) -> int:
    """Bytes of the parameters every decode step reads in full: the decoder's layers and final norm, and the LM
    head (the input embedding table when tied; an untied table is only gathered, one row per token)."""
    total = 0
    for path, a in params.items():
        root = path[0]
        if root == "lm_head" or (root == "language_model" and (path[1] != "embed_tokens" or tie_word_embeddings)):
            total += int(a.size) * a.dtype.itemsize
    return total


def decode_min_bytes_per_step(params: Mapping[tuple, Any], config, *, prompt_tokens: int, rows: int,
                              steps: int, cache_itemsize: int | None = None) -> int:
    """Least bytes a decode step of `rows` rows must read, averaged over `steps` steps: the weights once, the
    prompts' KV caches once (`prompt_tokens` summed over the prompts; the rows of a prompt share its cache) and
    each row's own generated keys/values so far ((steps - 1) / 2 on average). Padding and preallocated cache
    slots are not counted: this is the roofline's numerator, not what our compiled step happens to touch."""
    t = config.text
    weights = decode_weight_bytes(params, config.tie_word_embeddings)
    if cache_itemsize is None:  # the sampler's caches take the embedding table's dtype
        cache_itemsize = next(a.dtype.itemsize for p, a in params.items() if p[:2] == ("language_model", "embed_tokens"))
    per_token = t.num_layers * 2 * t.num_kv_heads * t.head_dim * cache_itemsize
    return int(weights + per_token * (prompt_tokens + rows * (steps - 1) / 2))


def stream_gbs(megabytes: int = 512, passes: int = 8) -> float:
    """Bandwidth one jitted reduction reaches reading a `megabytes` fp32 array on the default device (GB/s, best
    of 3): the achievable ceiling beside the datasheet peak (the only one there is on a CPU)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((megabytes * 2 ** 20 // 4,), jnp.float32)

    @jax.jit
    def read(x):
        # The scale depends on the previous pass, so XLA cannot hoist the read out of the loop.
        return jax.lax.fori_loop(0, passes, lambda i, c: c + jnp.sum(x * (1.0 + c * 1e-30)), jnp.float32(0))

    read(x).block_until_ready()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        read(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return x.nbytes * passes / best / 1e9


def decode_figures(min_bytes: int, step_s: float, stream: float | None, peak_gbs: float | None) -> dict:
    """Bandwidth a decode step reached and its fractions of the measured stream and of the peak (GB/s, over the
    devices the step ran on)."""
    gbs = min_bytes / step_s / 1e9
    return {"decode_min_bytes_per_step": min_bytes, "decode_gbs": round(gbs, 1),
            "stream_gbs": None if stream is None else round(stream, 1),
            "decode_stream_frac": round(gbs / stream, 3) if stream else None,
            "peak_hbm_gbs": peak_gbs, "decode_roofline_frac": round(gbs / peak_gbs, 3) if peak_gbs else None}
