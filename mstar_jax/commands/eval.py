"""`mstar eval CKPT --benchmark NAME --data PATH`: greedy accuracy (overall, per sub-task) and optional Pass@K.

Writes into OUT (see `default_out_dir`):
  results.json     metrics (greedy_accuracy, per_task, pass@K when --n > 1) and the run's settings ("config")
  results.md       the same as a markdown table, one row per sub-task plus "overall"
  responses.jsonl  one line per item: id, task, answer, every response (greedy first, then the samples),
                   their correctness and extracted answers

Benchmarks map to a reader format of `mstar_jax.data.readers` (`synthetic` is a MathVista-format split written by
`mstar data synth`, e.g. test_ood.json). `--reasoning-only` keeps the paper's "-R" subsets of MMStar / MMBench
(perception sub-tasks removed, see `mstar_jax.evaluation.PERCEPTION_CATEGORIES`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from mstar_jax.commands.sample import add_dtype_arg

BENCHMARK_FORMATS = {"mathvista": "mathvista", "m3cot": "m3cot", "mmstar": "mmstar", "mmbench": "mmbench",
                     "ai2d": "ai2d", "synthetic": "mathvista"}
# Split read when --data is a directory and --split is not given.
DEFAULT_SPLITS = {"mathvista": "testmini", "synthetic": "test_ood"}
SPLIT_SUFFIXES = (".json", ".jsonl", ".parquet", ".tsv")
PROMPTS = ("cot", "direct")


def register(subparsers) -> None:
    """Add the `eval` command."""
    p = subparsers.add_parser(
        "eval", help="benchmark accuracy (greedy, per sub-task) and Pass@K of a checkpoint",
        description="Greedy accuracy overall and per sub-task, and Pass@K when --n > 1. Writes results.json, "
                    "results.md and responses.jsonl into --out (default: CKPT/eval/BENCHMARK[-R] when CKPT is a "
                    "writable local directory, else runs/eval/BENCHMARK[-R] under the current directory).")
    p.add_argument("ckpt", help="HF LLaVA directory or converted checkpoint")
    p.add_argument("--benchmark", required=True, metavar="NAME",
                   help=f"one of {', '.join(BENCHMARK_FORMATS)} (synthetic: a split of `mstar data synth`)")
    p.add_argument("--data", required=True,
                   help="the benchmark file (json, jsonl, parquet, tsv) or a folder holding SPLIT.<ext>")
    p.add_argument("--root", default=None, help="folder that image paths are relative to (default: the file's)")
    p.add_argument("--split", default=None,
                   help="with a folder --data: read SPLIT.<ext> from it (default testmini for mathvista, test_ood "
                        "for synthetic); with a file: keep only records whose metadata split is SPLIT")
    p.add_argument("--n", type=int, default=1, help="sampled responses per item for Pass@N (1 = greedy only)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the Pass@N samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling of the Pass@N samples")
    p.add_argument("--reasoning-only", action="store_true",
                   help="MMStar / MMBench only: the paper's -R subset (perception sub-tasks removed)")
    p.add_argument("--out", default=None, help="output folder (default: see above)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
    p.add_argument("--prompt", default="cot", choices=PROMPTS,
                   help="cot: think step by step and end with 'The answer is X' (default); direct: answer only")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    p.add_argument("--seed", type=int, default=0, help="seed of the Pass@N samples")
    add_dtype_arg(p)
    p.set_defaults(handler=run_eval_command)


# ----------------------------------------------------------------------------------------------- helpers


def benchmark_format(benchmark: str) -> str:
    """The reader format of a benchmark name; MstarError for an unknown one."""
    from mstar_jax.errors import MstarError

    if benchmark not in BENCHMARK_FORMATS:
        raise MstarError(f"unknown benchmark {benchmark!r}; expected one of {', '.join(BENCHMARK_FORMATS)}")
    return BENCHMARK_FORMATS[benchmark]


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

    A folder reads `<split>.<ext>` (split defaults per benchmark, see DEFAULT_SPLITS); a file with --split keeps
    the records whose metadata split matches.
    """
    from mstar_jax.errors import DataError

    path = Path(data)
    if path.is_dir():
        split = split or DEFAULT_SPLITS.get(benchmark)
        if not split:
            raise DataError(f"{path}: is a folder; pass --split NAME to read NAME.json / .jsonl / .parquet / .tsv "
                            "from it, or pass the file itself")
        for suffix in SPLIT_SUFFIXES:
            if (path / f"{split}{suffix}").is_file():
                return path / f"{split}{suffix}", None
        present = sorted(p.name for p in path.iterdir() if p.suffix in SPLIT_SUFFIXES)
        raise DataError(f"{path}: no {split}.json / .jsonl / .parquet / .tsv in this folder "
                        f"(found: {', '.join(present) or 'none'})")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return path, split


def load_records(data: str | Path, benchmark: str, *, root: str | Path | None = None, split: str | None = None,
                 reasoning_only: bool = False, limit: int | None = None, log: Callable[[str], None] | None = None):
    """(records, data file, dataset root): read, filter by split, take the -R subset, then the first `limit`."""
    from mstar_jax.data.readers import read_dataset
    from mstar_jax.errors import DataError, MstarError
    from mstar_jax.evaluation import PERCEPTION_CATEGORIES, reasoning_subset

    fmt = benchmark_format(benchmark)
    if reasoning_only and benchmark not in PERCEPTION_CATEGORIES:
        raise MstarError(f"--reasoning-only applies to {' and '.join(sorted(PERCEPTION_CATEGORIES))}, "
                         f"not {benchmark}")
    if limit is not None and limit < 1:
        raise MstarError(f"--limit must be >= 1, got {limit}")
    path, split_filter = resolve_data(data, benchmark, split)
    root = Path(root) if root is not None else path.parent
    records, report = read_dataset(path, fmt, root=root, labeled=True)
    if report.skipped and log:
        log(f"warning: {report.summary()}")
    if split_filter is not None:
        present = sorted({str((r.metadata or {}).get("split")) for r in records})
        records = [r for r in records if str((r.metadata or {}).get("split")) == split_filter]
        if not records:
            raise DataError(f"{path}: no records of split {split_filter!r} (splits present: {', '.join(present)})")
    if reasoning_only:
        records = reasoning_subset(records, benchmark)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise DataError(f"{path}: no records to evaluate")
    return records, path, root


def load_images(paths: Sequence[str]) -> list:
    """RGB PIL images; DataError naming the file if one cannot be read."""
    from PIL import Image

    from mstar_jax.errors import DataError

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append(im.convert("RGB"))
        except OSError as err:
            raise DataError(f"{p}: cannot read the image ({err})") from err
    return out


def make_generate_fn(policy, *, n: int = 1, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 256,
                     seed: int = 0, progress: Callable[[int], None] | None = None):
    """A `run_eval` generate_fn: per prompt [greedy response] + (n samples at `temperature` when n > 1).

    Each call samples with its own seed (derived from `seed` and the call's index), so a batch's samples do not
    depend on the batch size of the greedy pass.
    """
    from mstar_jax.errors import MstarError

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
                        reasoning_only: bool = False, out: str | Path | None = None, max_new_tokens: int = 256,
                        batch_size: int = 32, prompt: str = "cot", limit: int | None = None, seed: int = 0,
                        dtype: str = "float32", policy=None,
                        log: Callable[[str], None] | None = None) -> tuple[dict, dict[str, Path]]:
    """Read the benchmark, generate with the checkpoint, score, and write the files; returns (result, paths).

    `policy`: an already loaded Policy (default: `mstar_jax.load(ckpt, dtype=dtype)`).
    """
    from mstar_jax.errors import MstarError
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
    records, path, root = load_records(data, benchmark, root=root, split=split, reasoning_only=reasoning_only,
                                       limit=limit, log=log)
    out_dir = Path(out) if out is not None else default_out_dir(ckpt, benchmark, reasoning_only)
    if policy is None:
        import mstar_jax

        policy = mstar_jax.load(ckpt, dtype=dtype)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(records), desc=f"eval {benchmark}", unit="q", leave=False, disable=None)
    generate_fn = make_generate_fn(policy, n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                   seed=seed, progress=bar.update)
    builder = P.cot_prompt if prompt == "cot" else P.direct_prompt
    try:
        result = run_eval(generate_fn, records, root=root, prompt_builder=builder, batch_size=batch_size,
                          k=n if n > 1 else 0, benchmark=benchmark)
    finally:
        bar.close()
    result["config"] = {"checkpoint": str(ckpt), "benchmark": benchmark + ("-R" if reasoning_only else ""),
                        "data": str(path), "split": split, "prompt": prompt, "n": n,
                        "temperature": temperature if n > 1 else None, "top_p": top_p if n > 1 else None,
                        "max_new_tokens": max_new_tokens, "limit": limit, "seed": seed,
                        "dtype": str(next(iter(policy.params.values())).dtype)}
    name = benchmark + ("-R" if reasoning_only else "")
    paths = write_results(result, out_dir, title=f"{name}: {Path(str(ckpt)).name} ({result['n']} items)")
    return result, paths


def run_eval_command(args) -> int:
    """The handler: evaluate, print the table and where the files went."""
    import sys

    from mstar_jax.evaluation import markdown_table

    def log(msg: str) -> None:
        print(msg, file=sys.stderr)

    result, paths = evaluate_checkpoint(
        args.ckpt, args.benchmark, args.data, root=args.root, split=args.split, n=args.n,
        temperature=args.temperature, top_p=args.top_p, reasoning_only=args.reasoning_only, out=args.out,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, prompt=args.prompt, limit=args.limit,
        seed=args.seed, dtype=args.dtype, log=log)
    print(markdown_table(result), end="")
    print(f"wrote {paths['json']}, {paths['markdown'].name} and {paths['responses'].name} in {paths['json'].parent}")
    return 0
