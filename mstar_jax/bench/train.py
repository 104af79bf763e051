"""`mstar bench train`: our jitted SFT step vs a PyTorch AdamW step on the `transformers` model.

Same weights, same batch (global batch split into the same micro-batches), same response-only loss (mean over
the global batch's response tokens), same AdamW + clipping + schedule. Each compute dtype prints one JSON
line: input tokens/s of both engines and their ratio, our compile time (first call minus steady state) apart
from the steady-state step time, the peak RSS while each engine ran, and both engines' first-step loss. Our step's
model FLOP/s (6 N per input token) is also given, and its MFU against the devices' dense bf16 peak where that is
known (GPUs/TPUs in `bench/roofline.py`, or `--peak-tflops`).
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from pathlib import Path

from mstar_jax.bench.sampler import (BENCH_SPEC, LARGE_SPEC, QUESTIONS, TINY_SPEC, PeakRSS, add_common_args,
                                     bench_checkpoint, device_peak_mb, machine, release_free_memory)

# The sampler's >= 20M-parameter bench model (8 x 512 Llama, 32k vocabulary) with 56px images (16 image
# tokens), so a global batch of 128 short SFT examples takes seconds, not minutes, per step on 2 cores.
TRAIN_BENCH_SPEC = dict(BENCH_SPEC, image_size=56)
TRAIN_TINY_SPEC = dict(TINY_SPEC)
TRAIN_SIZES = {"bench": TRAIN_BENCH_SPEC, "tiny": TRAIN_TINY_SPEC, "large": dict(LARGE_SPEC, image_size=56)}


def add_train_args(p) -> None:
    """Flags of `mstar bench train`."""
    add_common_args(p, "step")
    p.add_argument("--global-batch", type=int, default=128, help="examples per optimizer step (paper: 128)")
    p.add_argument("--micro-batch", type=int, default=32, help="examples per forward/backward (accumulated)")
    p.add_argument("--response-words", type=int, default=24, help="mean response length in words")
    p.add_argument("--steps", type=int, default=2, help="steady-state steps per engine (median is reported)")
    p.add_argument("--dtypes", default="float32", help="comma-separated compute dtypes: float32, bfloat16")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak FLOP/s of all devices in TFLOP/s for the MFU (default: dense bf16 datasheet value "
                        "for known GPUs/TPUs; none on CPUs)")


def bench_model(args) -> tuple[Path, Path]:
    """(checkpoint for mstar_jax.load, HF dir for transformers): --model, or the default model built once."""
    return bench_checkpoint(args, TRAIN_SIZES[args.size], f"train-{args.size}-hf")


def make_batch(processor, n: int, response_words: int, seed: int = 0) -> dict:
    """n (question, image, response) examples of varied lengths, right-padded."""
    import numpy as np
    from PIL import Image

    from mstar_jax.sft_batch import sft_batch

    rng = np.random.default_rng(seed)
    vocab = " ".join(QUESTIONS).replace("?", "").replace(".", "").replace(",", "").split()
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]
    responses = [" ".join(rng.choice(vocab, size=int(rng.integers(response_words // 2, 3 * response_words // 2 + 1))))
                 + ". The answer is " + str(int(rng.integers(0, 20))) + "." for _ in range(n)]
    images = [Image.fromarray(rng.integers(0, 256, (40 + i % 7 * 4, 48 - i % 5 * 3, 3), dtype=np.uint8))
              for i in range(n)]
    return sft_batch(processor, questions, responses, images, padding_side="right")


def _time_steps(run_step, steps: int) -> tuple[float, list[float], float, object]:
    """(first call s, steady call s, peak RSS MiB, first result) of repeated calls of run_step()."""
    release_free_memory()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        first = run_step()
        first_s = time.perf_counter() - t0
        steady = []
        for _ in range(steps):
            t0 = time.perf_counter()
            run_step()
            steady.append(time.perf_counter() - t0)
    return first_s, steady, rss.peak, first


def bench_ours(policy, batch, optim, args, dtype: str) -> dict:
    """Time our jitted step (compile = first call - steady)."""
    import jax
    import numpy as np

    from mstar_jax.training import create_train_state, make_train_step, matmul_params, mfu, train_flops

    step = make_train_step(policy.graphdef, optim, policy.mesh, micro_batch=args.micro_batch, compute_dtype=dtype)
    params = jax.tree.map(lambda a: a.copy(), policy.params)  # the step donates its state
    holder = {"state": create_train_state(params, step.tx)}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        return metrics

    first_s, steady, peak_rss, metrics = _time_steps(run, args.steps)
    del holder
    gc.collect()
    steady_s = statistics.median(steady)
    tokens = int(np.asarray(batch["attention_mask"]).sum())
    n_matmul = matmul_params(policy.params)
    peak = _peak_tflops(args)
    return {"ours_first_call_s": round(first_s, 3), "ours_compile_s": round(max(first_s - steady_s, 0.0), 3),
            "ours_steady_s": round(steady_s, 3), "ours_tok_s": round(tokens / steady_s, 1),
            "ours_peak_rss_mb": round(peak_rss, 1), "ours_device_peak_mb": device_peak_mb(),
            "ours_loss": round(metrics["loss"], 6),
            "ours_model_gflop_s": round(train_flops(n_matmul, tokens) / steady_s / 1e9, 3),
            "peak_tflops": peak, "mfu": None if peak is None else round(mfu(n_matmul, tokens, steady_s, peak * 1e12), 6)}


def _peak_tflops(args) -> float | None:
    """--peak-tflops, or the datasheet dense bf16 peak of all accelerator devices; None on CPUs."""
    from mstar_jax.bench.roofline import accelerator_peaks

    peaks = accelerator_peaks()
    return args.peak_tflops or (peaks[1] if peaks else None)


def _torch_decay_groups(model, weight_decay: float):
    """AdamW groups as ours: decay matrices/embeddings (ndim >= 2), not norms/biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def bench_hf(hf_dir, batch, optim, args, dtype: str) -> dict:
    """Time a PyTorch training step of the HF model with the same micro-batching, loss and optimizer."""
    import numpy as np
    import torch
    import transformers

    from mstar_jax.optim import make_schedule

    model = transformers.LlavaForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(_torch_decay_groups(model, optim.weight_decay), lr=optim.lr, betas=(optim.b1, optim.b2),
                            eps=optim.eps)
    schedule = make_schedule(optim)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(schedule(s)) / optim.lr)
    b = len(batch["input_ids"])
    micro = args.micro_batch or b
    labels = np.where(np.asarray(batch["loss_mask"]) > 0, batch["input_ids"], -100)
    n_items = torch.tensor(int((labels[:, 1:] != -100).sum()))
    micro_batches = [dict(input_ids=torch.from_numpy(np.asarray(batch["input_ids"][i:i + micro], np.int64)),
                          attention_mask=torch.from_numpy(np.asarray(batch["attention_mask"][i:i + micro], np.int64)),
                          pixel_values=torch.from_numpy(np.asarray(batch["pixel_values"][i:i + micro], np.float32)),
                          labels=torch.from_numpy(labels[i:i + micro].astype(np.int64)))
                     for i in range(0, b, micro)]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def run():
        total = 0.0
        for mb in micro_batches:
            with autocast:
                # num_items_in_batch: sum / global response-token count, like ours (not a mean of means).
                loss = model(**mb, num_items_in_batch=n_items).loss
            loss.backward()
            total += loss.item()
        if optim.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return total

    first_s, steady, peak, loss = _time_steps(run, args.steps)
    steady_s = statistics.median(steady)
    tokens = int(np.asarray(batch["attention_mask"]).sum())
    del model, opt
    gc.collect()
    return {"hf_first_call_s": round(first_s, 3), "hf_steady_s": round(steady_s, 3),
            "hf_tok_s": round(tokens / steady_s, 1), "hf_peak_rss_mb": round(peak, 1), "hf_loss": round(loss, 6)}


def bench_train(args) -> int:
    """Run the measurements and print one JSON line per compute dtype."""
    import jax
    import numpy as np
    import torch

    import mstar_jax
    from mstar_jax.optim import OptimConfig

    torch.set_num_threads(args.threads)
    ckpt, hf_dir = bench_model(args)
    policy = mstar_jax.load(ckpt)
    batch = make_batch(policy.processor, args.global_batch, args.response_words)
    optim = OptimConfig(lr=args.lr, total_steps=100, warmup_ratio=0.0, weight_decay=0.01, max_grad_norm=1.0)
    n_params = sum(int(np.prod(a.shape)) for a in policy.params.values())
    ids = np.asarray(batch["input_ids"])
    base = {"bench": "train", "model": str(ckpt), "params_m": round(n_params / 1e6, 1), **machine(),
            "threads": args.threads, "jax_devices": jax.device_count(), "global_batch": args.global_batch,
            "micro_batch": args.micro_batch, "seq_len": int(ids.shape[1]),
            "tokens_per_step": int(np.asarray(batch["attention_mask"]).sum()),
            "loss_tokens_per_step": int(np.asarray(batch["loss_mask"])[:, 1:].sum())}
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        rec = {**base, "dtype": dtype, **bench_ours(policy, batch, optim, args, dtype)}
        if not args.skip_hf:
            rec.update(bench_hf(hf_dir, batch, optim, args, dtype))
            rec["ratio"] = round(rec["ours_tok_s"] / rec["hf_tok_s"], 2)
            rec["loss_rel_diff"] = abs(rec["ours_loss"] - rec["hf_loss"]) / max(abs(rec["hf_loss"]), 1e-12)
        print(json.dumps(rec), flush=True)
    return 0
