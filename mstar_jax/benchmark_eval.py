"""Evaluate a checkpoint on a published benchmark: find and read its file, pick its metric, generate, score, write.

What `mstar eval` runs (the command only parses flags). The benchmarks map to a reader format of
`mstar_jax.data.readers` (`synthetic` is a MathVista-format split written by `mstar data synth`); the metric
defaults to the benchmark's official one (MMBench: CircularEval), see `mstar_jax.evaluation.METRICS`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from mstar_jax.errors import DataError, MstarError

BENCHMARK_FORMATS = {"mathvista": "mathvista", "m3cot": "m3cot", "mmstar": "mmstar", "mmbench": "mmbench",
                     "ai2d": "ai2d", "synthetic": "mathvista"}
# Split read when --data is a directory and --split is not given.
DEFAULT_SPLITS = {"mathvista": "testmini", "synthetic": "test_ood", "m3cot": "test"}
SPLIT_SUFFIXES = (".json", ".jsonl", ".parquet", ".tsv")
PROMPTS = ("cot", "direct")
METRIC_CHOICES = ("auto", "accuracy", "circular", "first_copy")


def benchmark_format(benchmark: str) -> str:
    """The reader format of a benchmark name; MstarError for an unknown one."""
    if benchmark not in BENCHMARK_FORMATS:
        raise MstarError(f"unknown benchmark {benchmark!r}; expected one of {', '.join(BENCHMARK_FORMATS)}")
    return BENCHMARK_FORMATS[benchmark]


def resolve_metric(benchmark: str, metric: str = "auto") -> str:
    """The metric to score with: the benchmark's official one for "auto"; MMBench's variants only for MMBench."""
    if metric not in METRIC_CHOICES:
        raise MstarError(f"unknown metric {metric!r}; expected one of {', '.join(METRIC_CHOICES)}")
    if metric == "auto":
        return "circular" if benchmark == "mmbench" else "accuracy"
    if metric in ("circular", "first_copy") and benchmark != "mmbench":
        raise MstarError(f"--metric {metric} is MMBench's (rotated copies); {benchmark} is scored by accuracy")
    return metric


def default_out_dir(ckpt: str | Path, benchmark: str, reasoning_only: bool = False) -> Path:
    """Where results go without --out.

    `<CKPT>/eval/<benchmark>` next to the weights when CKPT is a local directory this process may write to (an
    HF directory or a converted checkpoint; neither reader looks at an `eval/` folder), else
    `runs/eval/<benchmark>` under the current directory (gs:// checkpoints, read-only or shared model folders).
    A "-R" suffix marks the reasoning subsets, so they do not overwrite the full benchmark's results.
    """
    name = benchmark + ("-R" if reasoning_only else "")
    path = Path(str(ckpt))
    if "://" not in str(ckpt) and path.is_dir() and os.access(path, os.W_OK | os.X_OK):
        eval_dir = path / "eval"
        if not eval_dir.exists() or (eval_dir.is_dir() and os.access(eval_dir, os.W_OK | os.X_OK)):
            return eval_dir / name
    return Path("runs") / "eval" / name


def resolve_data(data: str | Path, benchmark: str, split: str | None) -> tuple[Path, str | None]:
    """The dataset file, and the split to filter records by (None: keep all).

    A folder reads `<split>.<ext>` or a single HF shard `<split>-*.parquet` (split defaults per benchmark, see
    DEFAULT_SPLITS); a file with --split keeps the records whose metadata split matches.
    """
    path = Path(data)
    if path.is_dir():
        split = split or DEFAULT_SPLITS.get(benchmark)
        if not split:
            raise DataError(f"{path}: is a folder; pass --split NAME to read NAME.json / .jsonl / .parquet / .tsv "
                            "from it, or pass the file itself")
        for suffix in SPLIT_SUFFIXES:
            if (path / f"{split}{suffix}").is_file():
                return path / f"{split}{suffix}", None
        shards = sorted(path.glob(f"{split}-*.parquet")) + sorted(path.glob(f"data/{split}-*.parquet"))
        if len(shards) == 1:
            return shards[0], None
        present = sorted(p.name for p in path.iterdir() if p.suffix in SPLIT_SUFFIXES)
        raise DataError(f"{path}: no {split}.json / .jsonl / .parquet / .tsv (or one {split}-*.parquet shard) in "
                        f"this folder (found: {', '.join(present) or 'none'}"
                        + (f"; {len(shards)} shards: pass one file" if shards else "") + ")")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return path, split


def load_benchmark(data: str | Path, benchmark: str, *, root: str | Path | None = None, split: str | None = None,
                   reasoning_only: bool = False, limit: int | None = None, metric: str = "auto",
                   log: Callable[[str], None] | None = None) -> dict:
    """Read a benchmark for evaluation: split filter, the -R subset, the metric's rows, then the first `limit`.

    Returns {"records", "path", "root", "metric", "report"}. Under "first_copy" MMBench's rotated copies are
    dropped; under "circular" `limit` counts questions (all their copies are kept). The reader's report line,
    with what it assumed, goes to `log`.
    """
    from mstar_jax.data.readers import read_dataset
    from mstar_jax.data.records import LoadReport
    from mstar_jax.evaluation import PERCEPTION_CATEGORIES, reasoning_subset

    fmt = benchmark_format(benchmark)
    metric = resolve_metric(benchmark, metric)
    if reasoning_only and benchmark not in PERCEPTION_CATEGORIES:
        raise MstarError(f"--reasoning-only applies to {' and '.join(sorted(PERCEPTION_CATEGORIES))}, "
                         f"not {benchmark}")
    if limit is not None and limit < 1:
        raise MstarError(f"--limit must be >= 1, got {limit}")
    from mstar_jax.data.sources import embedded_records, is_embedded_file_spec

    if is_embedded_file_spec(str(data)):  # shards of `mstar data prepare` or tfds:NAME:SPLIT; --root: TFDS data dir
        import tempfile

        path, split_filter = Path(str(data)), split
        records, root = embedded_records(str(data), Path(root) if root is not None else None,
                                         Path(tempfile.gettempdir()) / "mstar-image-cache")
        report = LoadReport(file=str(data), loaded=len(records))
    else:
        path, split_filter = resolve_data(data, benchmark, split)
        root = Path(root) if root is not None else path.parent
        records, report = read_dataset(path, fmt, root=root, labeled=True)
    if log:
        log(("warning: " if report.skipped else "read ") + report.summary())
    if split_filter is not None:
        present = sorted({str((r.metadata or {}).get("split")) for r in records})
        records = [r for r in records if str((r.metadata or {}).get("split")) == split_filter]
        if not records:
            raise DataError(f"{path}: no records of split {split_filter!r} (splits present: {', '.join(present)})")
    if reasoning_only:
        before = len(records)
        records = reasoning_subset(records, benchmark)
        if log:
            log(f"reasoning subset: removed {before - len(records)} perception rows, kept {len(records)}")
    if metric == "first_copy":
        records = [r for r in records if not r.metadata.get("circular_copy")]
    if limit is not None:
        if metric == "circular":
            keep = list(dict.fromkeys(r.metadata.get("circular_group", r.id) for r in records))[:limit]
            records = [r for r in records if r.metadata.get("circular_group", r.id) in set(keep)]
        else:
            records = records[:limit]
    if not records:
        raise DataError(f"{path}: no records to evaluate")
    return {"records": records, "path": path, "root": root, "metric": metric, "report": report}


def make_generate_fn(policy, *, n: int = 1, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 256,
                     seed: int = 0, progress: Callable[[int], None] | None = None):
    """A `run_eval` generate_fn: per prompt [greedy response] + (n samples at `temperature` when n > 1).

    Each call samples with its own seed (derived from `seed` and the call's index), so a batch's samples do not
    depend on the batch size of the greedy pass.
    """
    from mstar_jax.io import load_images

    if n < 1:
        raise MstarError(f"--n must be >= 1, got {n}")
    if n > 1 and temperature <= 0:
        raise MstarError(f"Pass@{n} needs --temperature > 0 (got {temperature}); greedy samples would be identical")
    calls = [0]

    def generate(batch: list[dict]) -> list[list[str]]:
        images = [load_images(b["images"]) or None for b in batch]
        prompts = [b["prompt"] for b in batch]
        greedy = policy.generate(images, prompts, n=1, temperature=0.0, max_new_tokens=max_new_tokens, seed=seed)
        out = [[g[0].text] for g in greedy]
        if n > 1:
            call_seed = (seed * 1_000_003 + calls[0]) % 2**31
            samples = policy.generate(images, prompts, n=n, temperature=temperature, top_p=top_p,
                                      max_new_tokens=max_new_tokens, seed=call_seed)
            for row, ss in zip(out, samples):
                row.extend(s.text for s in ss)
        calls[0] += 1
        if progress:
            progress(len(batch))
        return out

    return generate


def evaluate_checkpoint(ckpt: str | Path, benchmark: str, data: str | Path, *, root: str | Path | None = None,
                        split: str | None = None, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                        reasoning_only: bool = False, metric: str = "auto", out: str | Path | None = None,
                        max_new_tokens: int = 256, batch_size: int = 32, prompt: str = "cot",
                        limit: int | None = None, seed: int = 0, dtype: str = "float32", policy=None,
                        log: Callable[[str], None] | None = None) -> tuple[dict, dict[str, Path]]:
    """Read the benchmark, generate with the checkpoint, score, and write the files; returns (result, paths).

    `policy`: an already loaded Policy (default: `mstar_jax.load(ckpt, dtype=dtype)`).
    """
    from mstar_jax.evaluation import run_eval, write_results
    from mstar_jax.loop import prompts as P

    if prompt not in PROMPTS:
        raise MstarError(f"unknown prompt {prompt!r}; expected one of {', '.join(PROMPTS)}")
    if batch_size < 1 or max_new_tokens < 1:
        raise MstarError(f"--batch-size ({batch_size}) and --max-new-tokens ({max_new_tokens}) must be >= 1")
    if n < 1:
        raise MstarError(f"--n must be >= 1, got {n}")
    if n > 1 and temperature <= 0:
        raise MstarError(f"Pass@{n} needs --temperature > 0 (got {temperature})")
    bench = load_benchmark(data, benchmark, root=root, split=split, reasoning_only=reasoning_only, limit=limit,
                           metric=metric, log=log)
    out_dir = Path(out) if out is not None else default_out_dir(ckpt, benchmark, reasoning_only)
    if policy is None:
        import mstar_jax

        policy = mstar_jax.load(ckpt, dtype=dtype)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(bench["records"]), desc=f"eval {benchmark}", unit="q", leave=False, disable=None)
    generate_fn = make_generate_fn(policy, n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                   seed=seed, progress=bar.update)
    try:
        result = run_eval(generate_fn, bench["records"], root=bench["root"],
                          prompt_builder=P.cot_prompt if prompt == "cot" else P.direct_prompt,
                          batch_size=batch_size, k=n if n > 1 else 0, metric=bench["metric"])
    finally:
        bar.close()
    name = benchmark + ("-R" if reasoning_only else "")
    result["config"] = {"checkpoint": str(ckpt), "benchmark": name, "data": str(bench["path"]),
                        "root": str(bench["root"]), "split": split, "prompt": prompt, "n": n,
                        "temperature": temperature if n > 1 else None, "top_p": top_p if n > 1 else None,
                        "max_new_tokens": max_new_tokens, "limit": limit, "seed": seed, "metric": bench["metric"],
                        "dtype": str(next(iter(policy.params.values())).dtype)}
    result["reader"] = {"summary": bench["report"].summary(), "notes": bench["report"].notes,
                        "left_out": bench["report"].counts}
    paths = write_results(result, out_dir, title=f"{name}: {Path(str(ckpt)).name} ({result['n']} items)")
    return result, paths


def verify_responses(result: dict, records, root: str | Path, prm_path: str | Path, ns, out_dir: str | Path,
                     dtype: str = "float32", log: Callable[[str], None] | None = None) -> tuple[dict, dict[str, Path]]:
    """The PRM as a verifier on an evaluation's samples (paper 3.3, figure 2a): Best-of-N, weighted and majority
    voting and Pass@N for each N in `ns`, from the first N samples of every item (greedy as the reference line).

    Writes verifier.json, verifier.md and verifier.png into `out_dir`; returns (verifier result, paths)."""
    import json

    import mstar_jax
    from mstar_jax.answers import answer_groups
    from mstar_jax.io import load_images, write_atomic
    from mstar_jax.prm.verify import curves_table, plot_curves, verifier_curves

    rows = result["per_item"]
    ns = sorted(int(n) for n in ns)
    if not ns or ns[0] < 1 or any(len(r["responses"]) - 1 < ns[-1] for r in rows):
        raise MstarError(f"--verifier needs {ns[-1] if ns else 1} sampled responses per item (--n {','.join(map(str, ns))})")
    prm = mstar_jax.load_prm(prm_path, dtype=dtype)
    items = [r.to_item() for r in records]
    by_id = {it["pid"]: it for it in items}
    prompts, images, texts, counts = [], [], [], []
    for row in rows:
        item = by_id[row["id"]]
        img = load_images([str(Path(root) / rel) for rel in item["images"][:1]]) if item["images"] else [None]
        samples = row["responses"][1:1 + ns[-1]]
        prompts += [row["prompt"]] * len(samples)
        images += img * len(samples)
        texts += samples
        counts.append(len(samples))
    if log:
        log(f"verifier: scoring {len(texts)} samples with {prm_path}")
    step_scores = prm.score_rows(prompts, images, texts)
    from mstar_jax.prm.score import aggregate

    scores, k = [], 0
    for c in counts:
        scores.append([aggregate(s, prm.aggregation) for s in step_scores[k:k + c]])
        k += c
    correct = [r["correct"][1:1 + ns[-1]] for r in rows]
    groups = [answer_groups(r["responses"][1:1 + ns[-1]], by_id[r["id"]]) for r in rows]
    curves = verifier_curves(correct, scores, groups, ns)
    greedy = 100.0 * sum(r["greedy_correct"] for r in rows) / max(1, len(rows))
    out = Path(out_dir)
    verdict = {"prm": str(prm_path), "aggregation": prm.aggregation, "rows": len(rows), "greedy": greedy,
               "note": "rows are scored one by one (MMBench copies too); Best-of-N / voting use the first N samples",
               "curves": {str(n): c for n, c in curves.items()}}
    paths = {"json": out / "verifier.json", "markdown": out / "verifier.md", "plot": out / "verifier.png"}
    write_atomic(paths["json"], json.dumps(verdict, indent=1))
    write_atomic(paths["markdown"], f"# PRM as a verifier ({prm_path})\n\n" + curves_table(curves, greedy))
    plot_curves(curves, paths["plot"], greedy, title=f"PRM as a verifier ({len(rows)} questions)")
    return verdict, paths
