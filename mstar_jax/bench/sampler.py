"""`mstar bench sampler`: our JAX sampler vs `transformers` generate on the same model, inputs and threads.

Each measurement prints one JSON line: generated tokens/s of both engines and their ratio (medians over
--repeats steady calls, each listed in `*_runs_s`; the two engines' calls alternate, and `ratio_per_run` gives
each adjacent pair's ratio), our compile time (first call minus steady-state call) apart from the steady-state
time, the peak RSS of the process while each engine ran, and, for greedy decoding, whether both produced
identical tokens. Our decode loop is also timed apart from the prefill and set against memory bandwidth
(`bench/roofline.py`): the bytes a step must read per second of step, as a fraction of a measured streaming read
and of the device's datasheet HBM peak (GPU/TPU).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path

# >= 20M parameters with a real-size vocabulary and LLaVA-1.5's 576 image tokens (336px, 14px patches);
# a few minutes on 2 CPU cores.
BENCH_SPEC = dict(vision="clip", text="llama", image_size=336, patch_size=14, vision_hidden=128, vision_layers=2,
                  vision_heads=4, hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=8, vocab_size=32000,
                  max_position_embeddings=2048)
# For tests: seconds, not minutes.
TINY_SPEC = dict(vision="clip", text="llama", layers=2, hidden=64, intermediate=128, vocab_size=400)
# For GPUs/TPUs: a ~1.4B decoder (24 x 2048, MLP 5632). The 59M bench model's decode step reads 0.2 GB, ~60 us
# of H100 bandwidth, so there it would measure kernel launches rather than the memory roofline.
LARGE_SPEC = dict(BENCH_SPEC, hidden=2048, intermediate=5632, layers=24, heads=16, kv_heads=16)
SIZES = {"bench": BENCH_SPEC, "tiny": TINY_SPEC, "large": LARGE_SPEC}
# Qwen2-VL / Qwen2.5-VL (`--family`) at the same sizes: the LLaVA bench's decoder (M-RoPE sections scaled to its
# 64-dim heads), a 2-layer ViT of 14 px patches (Qwen2.5: one windowed, one full-attention layer) and images
# resized to about 600 image tokens, as LLaVA-1.5's 576.
_QWEN_VIT = dict(patch_size=14, vision_hidden=128, vision_intermediate=256, vision_layers=2, vision_heads=4,
                 window_size=112, fullatt_block_indexes=(1,), min_pixels=448 * 448 * 2, max_pixels=1024 * 1024)
QWEN_SIZES = {
    "bench": dict(_QWEN_VIT, hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=8, vocab_size=32000,
                  mrope_section=(8, 12, 12)),
    "tiny": dict(layers=2, hidden=64, intermediate=128, vocab_size=400),
    "large": dict(_QWEN_VIT, hidden=2048, intermediate=5632, layers=24, heads=16, kv_heads=16, vocab_size=32000,
                  mrope_section=(16, 24, 24)),
}
FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl")

QUESTIONS = [
    "How many circles are there in the picture? Count them carefully and explain your reasoning step by step.",
    "Which bar is the tallest?",
    "What is the sum of the two numbers shown in the figure? Answer with a single number.",
    "Describe the shape in the middle.",
]


def add_common_args(p, engine: str) -> None:
    """Flags both benches share: the model, where it is built, torch threads, and skipping the HF side."""
    p.add_argument("--model", default=None,
                   help="HF LLaVA dir or converted checkpoint (default: build the bench model in --workdir)")
    p.add_argument("--workdir", default="runs/bench", help="where the default bench model is built and kept")
    p.add_argument("--size", default="bench", choices=sorted(SIZES),
                   help="default model size when --model is not given (tiny: for tests; large: ~1.4B, for GPUs/TPUs)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (XLA uses every core)")
    p.add_argument("--skip-hf", action="store_true", help=f"only measure our {engine}")


def add_sampler_args(p) -> None:
    """Flags of `mstar bench sampler`."""
    add_common_args(p, "sampler")
    from mstar_jax.commands.sample import add_sampling_args

    p.add_argument("--prompts", type=int, default=1, help="distinct prompts (one image each)")
    p.add_argument("--family", default="llava", choices=FAMILIES,
                   help="model family of the default bench model (with --model: the checkpoint's own)")
    add_sampling_args(p, max_new_tokens=128)  # --temperature is the `sample` mode's
    p.add_argument("--modes", default="greedy,sample", help="comma-separated: greedy, sample")
    p.add_argument("--repeats", type=int, default=3,
                   help="steady-state runs per engine, the two engines' runs alternating (medians are reported)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="parameter (and KV cache) dtype of both engines")
    p.add_argument("--peak-hbm-gbs", type=float, default=None,
                   help="peak memory bandwidth of all devices, GB/s (default: datasheet value for known GPUs/TPUs)")
    p.add_argument("--stream-mb", type=int, default=256,
                   help="array size for the measured streaming bandwidth (0: skip)")


class PeakRSS:
    """Context manager: the highest resident set size (MiB) of this process while the block ran."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.proc, self.interval, self.peak = psutil.Process(), interval, 0.0
        self._stop = threading.Event()

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss / 2 ** 20)
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self.proc.memory_info().rss / 2 ** 20
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss / 2 ** 20)


def device_peak_mb() -> float | None:
    """Peak accelerator memory in use since the process started (MiB), where the backend reports it (not CPUs)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else round(peak / 2 ** 20, 1)


def machine() -> dict:
    """nproc, CPU model and accelerator kind, for the record."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import jax

    return {"nproc": os.cpu_count(), "cpu": cpu, "device_kind": jax.devices()[0].device_kind}


def bench_model(args) -> tuple[Path, Path]:
    """(checkpoint for mstar_jax.load, HF dir for transformers): --model, or the default model built once."""
    family = getattr(args, "family", "llava")
    if family != "llava":
        return bench_checkpoint(args, dict(QWEN_SIZES[args.size], model_type=family), f"{family}-{args.size}-hf",
                                family)
    return bench_checkpoint(args, SIZES[args.size], f"{args.size}-hf")


def bench_checkpoint(args, spec: dict, name: str, family: str = "llava") -> tuple[Path, Path]:
    """--model (exported to HF once if it is a converted checkpoint), or a random model of `spec` built once."""
    from mstar_jax.conversion import flax_to_hf, is_converted

    if args.model:
        path = Path(args.model)
        if not is_converted(path):
            return path, path
        hf = Path(args.workdir) / (path.name + "-hf-export")
        if not (hf / "config.json").is_file():
            flax_to_hf(path, hf, overwrite=True)
        return path, hf
    import numpy as np

    from mstar_jax.models.llava.tiny import TinySpec, make_tiny_llava

    hf = Path(args.workdir) / name
    if not (hf / "model.safetensors.index.json").is_file() and not (hf / "model.safetensors").is_file():
        # A generated corpus of random words lets the BPE learn the full vocabulary size.
        rng = np.random.default_rng(0)
        letters = list("abcdefghijklmnopqrstuvwxyz")
        words = ["".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(60000)]
        corpus = [" ".join(words[i:i + 20]) for i in range(0, len(words), 20)] + QUESTIONS
        if family == "llava":
            make_tiny_llava(hf, TinySpec(**spec), corpus=corpus)
        else:
            from mstar_jax.models.qwen2_vl import tiny as qwen_tiny

            qwen_tiny.make_tiny_qwen_vl(hf, qwen_tiny.TinySpec(**spec), corpus=corpus)
    return hf, hf


def _images(count: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (48 + 8 * i, 64 - 4 * i, 3), dtype=np.uint8)) for i in range(count)]


def prompt_batch(processor, count: int) -> dict:
    """The bench's processor batch: `count` chat-template prompts (question + random image), left-padded."""
    from mstar_jax.sampler import build_prompts

    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(count)]
    images = _images(count)
    texts = build_prompts(processor, questions, images)
    processor.tokenizer.padding_side = "left"
    return dict(processor(images=images, text=texts, return_tensors="np", padding=True))


def _hf_rows(out, prompt_len: int, eos: set[int]) -> list[list[int]]:
    """Generated ids per row from HF's output, cut after the first stop id (HF pads finished rows)."""
    rows = []
    for row in out[:, prompt_len:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


def bench_sampler(args) -> int:
    """Run the measurements and print one JSON line per mode."""
    import numpy as np
    import torch

    import mstar_jax
    from mstar_jax.bench import roofline
    from mstar_jax.sampler import Sampler

    torch.set_num_threads(args.threads)
    ckpt, hf_dir = bench_model(args)
    policy = mstar_jax.load(ckpt, dtype=args.dtype)
    sampler = Sampler(policy.graphdef, policy.config, policy.processor, policy.mesh,
                      max_rows=max(64, args.prompts * args.n))
    sampler.time_phases = True
    n_params = sum(int(np.prod(a.shape)) for a in policy.params.values())
    batch = prompt_batch(policy.processor, args.prompts)
    eos = sampler.eos_ids()
    hf_model = None
    if not args.skip_hf:
        import transformers

        cls = (transformers.LlavaForConditionalGeneration if policy.loaded.family.name == "llava"
               else transformers.AutoModelForImageTextToText)
        hf_model = cls.from_pretrained(str(hf_dir), dtype=getattr(torch, args.dtype)).eval()
    import jax

    base = {"bench": "sampler", "model": str(ckpt), "params_m": round(n_params / 1e6, 1), **machine(),
            "threads": args.threads, "jax_devices": jax.device_count(), "dtype": args.dtype, "prompts": args.prompts,
            "n": args.n,
            "prompt_tokens": int(batch["input_ids"].shape[1]), "max_new_tokens": args.max_new_tokens}
    stream, peak = _bandwidths(args)
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        greedy = mode == "greedy"
        kw = dict(n=args.n, max_new_tokens=args.max_new_tokens, seed=0,
                  temperature=0.0 if greedy else args.temperature, top_p=args.top_p, top_k=args.top_k)

        def ours():
            return sampler.generate(policy.params, batch=batch, **kw)

        engines = {"ours": _Timed(ours)}
        if hf_model is not None:
            engines["hf"] = _Timed(_hf_generate(hf_model, batch, args, kw, greedy))
        for engine in engines.values():
            engine.warm_up()
        # The engines' timed calls alternate, so a slow spell of the machine (a 2-core VM drifts by ~40 % over
        # minutes) hits both rather than one side of the ratio.
        phase_runs = []
        for _ in range(args.repeats):
            for name, engine in engines.items():
                engine.timed()
                if name == "ours":
                    phase_runs.append(dict(sampler.last_phases))
        result = engines["ours"].out
        ours_rows = [s.token_ids for samples in result for s in samples]
        ours_tokens = sum(len(r) for r in ours_rows)
        ours_s = engines["ours"].median
        first_s = engines["ours"].first_s
        phases = {k: statistics.median(r[k] for r in phase_runs) for k in phase_runs[0]}  # as ours_steady_s
        steps = max(int(phases["decode_steps"]), 1)
        min_bytes = roofline.decode_min_bytes_per_step(
            policy.params, policy.config, prompt_tokens=int(np.asarray(batch["attention_mask"]).sum()),
            rows=args.prompts * args.n, steps=steps)
        rec = {**base, "mode": mode, "temperature": kw["temperature"], "top_p": args.top_p, "top_k": args.top_k,
               "ours_tokens": ours_tokens, "ours_first_call_s": round(first_s, 3),
               "ours_compile_s": round(max(first_s - ours_s, 0.0), 3), "ours_steady_s": round(ours_s, 3),
               "ours_runs_s": [round(t, 3) for t in engines["ours"].times],
               "ours_tok_s": round(ours_tokens / ours_s, 1), "ours_peak_rss_mb": round(engines["ours"].peak_rss, 1),
               "ours_device_peak_mb": device_peak_mb(),
               "ours_prefill_calls_per_run": sampler.prefill_calls // (args.repeats + 1),
               "ours_prefill_s": round(phases["prefill_s"], 3), "ours_decode_s": round(phases["decode_s"], 3),
               "decode_steps": steps, "decode_step_ms": round(phases["decode_s"] / steps * 1e3, 2),
               "decode_tok_s": round(ours_tokens / phases["decode_s"], 1),
               **roofline.decode_figures(min_bytes, phases["decode_s"] / steps, stream, peak)}
        sampler.prefill_calls = 0
        if "hf" in engines:
            rec.update(_hf_record(engines["hf"], ours_rows, greedy, eos))
            rec["ratio"] = ratio(rec)
            # Each pair of adjacent calls on its own: how far the machine's drift moves the ratio.
            per_token = rec["hf_tokens"] / ours_tokens
            rec["ratio_per_run"] = [round(h / o / per_token, 2) for o, h in zip(engines["ours"].times,
                                                                                 engines["hf"].times)]
        del engines, result
        print(json.dumps(rec), flush=True)
    return 0


def release_free_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the OS (glibc), so that the RSS peak of the next
    engine's call is not inflated by what the other engine freed but the allocator kept."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peaks stay an upper bound
        pass


class _Timed:
    """One engine's calls: an untimed first call (compilation, warm-up), then timed steady calls."""

    def __init__(self, fn):
        self.fn, self.times, self.peak_rss, self.out, self.first_s = fn, [], 0.0, None, 0.0

    def _call(self) -> float:
        release_free_memory()
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            self.out = self.fn()
            seconds = time.perf_counter() - t0
        self.peak_rss = max(self.peak_rss, rss.peak)
        return seconds

    def warm_up(self) -> None:
        """The first call (compilation included)."""
        self.first_s = self._call()

    def timed(self) -> None:
        """One steady-state call."""
        self.times.append(self._call())

    @property
    def median(self) -> float:
        """Median steady-state seconds."""
        return statistics.median(self.times)


def _bandwidths(args) -> tuple[float | None, float | None]:
    """(measured streaming GB/s, peak GB/s) over the devices a sampler call runs on; None where unknown."""
    import jax

    from mstar_jax.bench import roofline

    devices = jax.devices()
    # CPU "devices" (forced host platform count) share one memory; accelerators each have their own.
    count = 1 if devices[0].platform == "cpu" else len(devices)
    stream = roofline.stream_gbs(args.stream_mb) * count if args.stream_mb else None
    peaks = roofline.accelerator_peaks()
    return stream, args.peak_hbm_gbs or (peaks[0] if peaks else None)


def _hf_generate(model, batch, args, kw, greedy):
    """A call of transformers' generate on the same batch and settings (returns its output ids)."""
    import torch

    inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
    gen = dict(max_new_tokens=args.max_new_tokens, pad_token_id=model.generation_config.pad_token_id)
    if greedy:
        # HF refuses num_return_sequences > 1 without sampling; expanding the rows is what it does internally.
        inputs = {k: v.repeat_interleave(args.n, dim=0) for k, v in inputs.items()}
        if "image_grid_thw" in batch:  # flat patches: repeat each row's images, not each patch
            from mstar_jax.models.qwen2_vl.inputs import repeat_rows

            inputs = {k: torch.from_numpy(v) for k, v in repeat_rows(batch, args.n).items()}
        gen.update(do_sample=False)
    else:
        gen.update(do_sample=True, temperature=kw["temperature"], top_p=kw["top_p"], top_k=kw["top_k"],
                   num_return_sequences=args.n)
    torch.manual_seed(0)

    def run():
        with torch.inference_mode():
            return model.generate(**inputs, **gen), inputs["input_ids"].shape[1]

    return run


def _hf_record(engine: _Timed, ours_rows, greedy: bool, eos: set[int]) -> dict:
    """The HF fields of a record from its timed calls (tokens of the last call)."""
    out, prompt_len = engine.out
    rows = _hf_rows(out, prompt_len, eos)
    hf_tokens = sum(len(r) for r in rows)
    hf_s = engine.median
    rec = {"hf_tokens": hf_tokens, "hf_s": round(hf_s, 3), "hf_runs_s": [round(t, 3) for t in engine.times],
           "hf_tok_s": round(hf_tokens / hf_s, 1), "hf_peak_rss_mb": round(engine.peak_rss, 1)}
    rec["greedy_identical"] = (rows == ours_rows) if greedy else None
    return rec


def ratio(rec: dict) -> float | None:
    """ours / HF tokens per second."""
    return round(rec["ours_tok_s"] / rec["hf_tok_s"], 2) if rec.get("hf_tok_s") else None
