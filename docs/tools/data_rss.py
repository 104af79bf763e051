"""Host RSS of the loop's data path at the paper's size: N queries (tiny images) x K samples, one iteration.

Writes N records with distinct 8x8 PNGs as `mstar data prepare` shards (or as a MathV360K-format JSON + image
files), opens them the way `mstar train` does (`mstar_jax.loop.data.load_splits`), then runs the iteration's
data path: `iteration_slice` -> `SelfEvolvingRun.iteration_queries` -> `data.stream.sample_stream` (grain chunk
stream, images decoded in its thread, progress file) -> `make_rollouts` (answer checks) -> `write_rollouts`. The
sampler is a stand-in that returns K fixed-length texts per query (no model), so what is measured is the data
path plus the samples it carries. RSS is read after every chunk.

    python docs/tools/data_rss.py --queries 180000 --samples 16 --source shards --out /tmp/data_rss
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from mstar_jax.memory.measured import proc_status_bytes


def rss_mb() -> float:
    return proc_status_bytes("VmRSS") / 2**20


def tiny_png(i: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def row(i: int) -> dict:
    """A MathV360K-format row (what the readers and `mstar data prepare` read)."""
    a, b = i % 6 + 1, (i // 6) % 6 + 1
    return {"id": f"q{i:06d}", "image": f"img/{i // 1000:03d}/{i:06d}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is the sum of the two dice?"},
        {"from": "gpt", "value": str(a + b)}]}


def write_data(out: Path, n: int, source: str) -> str:
    """The split setting for `data.train` (written once per size and source)."""
    from mstar_jax.data.readers import read_dataset

    spec = out / ("shards/train.manifest.json" if source == "shards" else "json/train.json")
    if spec.exists():
        return str(spec)
    root = out / "json"
    for i in range(n):
        p = root / row(i)["image"]
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(tiny_png(i))
    (root / "train.json").write_text(json.dumps([row(i) for i in range(n)]))
    (root / "test.json").write_text(json.dumps([row(i) for i in range(4)]))  # the config needs a test split
    if source == "shards":
        from mstar_jax.cli import main

        main(["data", "prepare", str(root / "train.json"), str(out / "shards"), "--shards", "8"])
    read_dataset(root / "train.json", image_check="none")  # fail here, not in the measurement
    return str(spec)


class StandIn:
    """A sampler without a model: K texts of ~`tokens` tokens per query, a log-prob per token; records RSS."""

    def __init__(self, tokens: int, trace: list):
        self.tokens, self.trace = tokens, trace

    def sampling_params(self, params):
        return params

    def process_local(self):
        return self

    def adopt(self, params):
        return params

    def generate(self, params, images, prompts, *, n, seed, **kw):
        from mstar_jax.sampler import Sample

        rng = np.random.default_rng(seed)
        out = []
        for _ in prompts:
            answers = rng.integers(2, 13, n)
            text = "The first die shows a number and the second die shows another. " * (self.tokens // 12)
            out.append([Sample(list(range(self.tokens)), f"{text}The answer is {a}", [-0.5] * self.tokens, "stop")
                        for a in answers])
        self.trace.append((time.time(), rss_mb()))
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=180_000)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--interval", type=float, default=0.0625, help="train.interval (the paper's 6.25 %%)")
    ap.add_argument("--iterations", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per stand-in sample")
    ap.add_argument("--batch-size", type=int, default=256, help="sampling.batch_size (rows per generate call)")
    ap.add_argument("--source", choices=("shards", "json"), default="shards")
    ap.add_argument("--out", default="/tmp/data_rss")
    args = ap.parse_args()

    from mstar_jax.config import load_config
    from mstar_jax.data.stream import sample_stream
    from mstar_jax.loop import prompts as P
    from mstar_jax.loop.data import load_splits
    from mstar_jax.loop.rollouts import make_rollouts, write_rollouts
    from mstar_jax.loop.self_evolve import SelfEvolvingRun

    out = Path(args.out)
    t0 = time.time()
    spec = write_data(out, args.queries, args.source)
    made = time.time() - t0
    base = rss_mb()
    run_dir = out / f"run-{args.source}"
    # A journal left by an earlier run would be resumed instead of sampled, leaving nothing to measure.
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config("smoke", ["--config.data.source=files", f"--config.data.train={spec}",
                                f"--config.data.test_id={out / 'json' / 'test.json'}", "--config.model.path=unused",
                                f"--config.train.interval={args.interval}"])
    splits = {k: v for k, v in load_splits(cfg, run_dir, lambda s: None).items() if k == "train"}
    opened = rss_mb()
    run = SelfEvolvingRun.__new__(SelfEvolvingRun)  # only what the iteration's data path reads
    run.cfg, run.queries = cfg, splits["train"]
    report = {"machine": f"{os.cpu_count()} CPUs, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB",
              "queries": len(run.queries), "source": repr(run.queries), "samples": args.samples,
              "data_written_s": round(made, 1), "rss_mb": {"after_imports": round(base, 1),
                                                          "after_opening_the_split": round(opened, 1)},
              "iterations": []}
    for i in range(args.iterations):
        trace: list = []
        start = time.time()
        idx, queries = run.iteration_queries(i)
        samples = sample_stream(StandIn(args.tokens, trace), None, run.queries, idx, P.cot_prompt, n=args.samples,
                                temperature=1.0, seed=i, max_new_tokens=args.tokens, batch_size=args.batch_size,
                                progress_path=run_dir / "rollouts" / f"iter_{i:04d}.jsonl", say=lambda s: None)
        sampled = rss_mb()
        rollouts = make_rollouts(queries, samples, P.cot_prompt, None, 1.0)
        write_rollouts(run_dir / "rollouts" / f"iter_{i:04d}.jsonl", rollouts)
        written = rss_mb()
        del samples, rollouts, queries
        rss = [r for _, r in trace]
        tenth = max(1, len(rss) // 10)
        report["iterations"].append({
            "iteration": i, "queries": len(idx), "chunks": len(rss), "seconds": round(time.time() - start, 1),
            "rss_mb_first_tenth_of_chunks_max": round(max(rss[:tenth]), 1),
            "rss_mb_last_tenth_of_chunks_max": round(max(rss[-tenth:]), 1),
            "rss_mb_chunks_min_max": [round(min(rss), 1), round(max(rss), 1)],
            "rss_mb_after_sampling": round(sampled, 1), "rss_mb_after_rollouts_written": round(written, 1),
            "rss_mb_after_iteration": round(rss_mb(), 1)})
        print(json.dumps(report["iterations"][-1]), flush=True)
    report["peak_rss_mb"] = round(proc_status_bytes("VmHWM") / 2**20, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
