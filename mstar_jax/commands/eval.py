"""`mstar eval CKPT --benchmark NAME --data PATH`: greedy accuracy (overall, per sub-task) and optional Pass@K.

Writes into OUT (default: see `mstar_jax.benchmark_eval.default_out_dir`):
  results.json     metrics (metric used, greedy_accuracy, per_task, per_skill for MathVista, pass@K when --n > 1),
                   the run's settings ("config") and what the reader assumed ("reader")
  results.md       the same as markdown tables, one row per sub-task plus "overall"
  responses.jsonl  one line per item: id, task, answer, choices, the exact prompt, every response (greedy first, then
                   the samples), their correctness and extracted answers

The library logic lives in `mstar_jax.benchmark_eval`; this module only maps flags onto it.
"""

from __future__ import annotations

from mstar_jax.benchmark_eval import BENCHMARK_FORMATS, METRIC_CHOICES, PROMPTS
from mstar_jax.commands.sample import add_dtype_arg


def register(subparsers) -> None:
    """Add the `eval` command."""
    p = subparsers.add_parser(
        "eval", help="benchmark accuracy (greedy, per sub-task) and Pass@K of a checkpoint",
        description="Greedy accuracy overall and per sub-task, and Pass@K when --n > 1, under the benchmark's "
                    "official metric. Writes results.json, results.md and responses.jsonl into --out (default: "
                    "CKPT/eval/BENCHMARK[-R] when CKPT is a writable local directory, else runs/eval/BENCHMARK[-R] "
                    "under the current directory). Where to get each benchmark: docs/benchmarks_data.md.")
    p.add_argument("ckpt", help="HF LLaVA directory or converted checkpoint")
    p.add_argument("--benchmark", required=True, metavar="NAME",
                   help=f"one of {', '.join(BENCHMARK_FORMATS)} (synthetic: a split of `mstar data synth`)")
    p.add_argument("--data", required=True,
                   help="the benchmark file (json, jsonl, parquet, tsv) or a folder holding SPLIT.<ext>")
    p.add_argument("--root", default=None, help="folder that image paths are relative to (default: the file's)")
    p.add_argument("--split", default=None,
                   help="with a folder --data: read SPLIT.<ext> from it (default testmini for mathvista, test for "
                        "m3cot, test_ood for synthetic); with a file: keep only records whose metadata split is SPLIT")
    p.add_argument("--metric", default="auto", choices=METRIC_CHOICES,
                   help="auto: the benchmark's official metric (MMBench: circular, others: accuracy); circular / "
                        "first_copy: MMBench CircularEval or its unrotated copies only; accuracy: every row alone")
    p.add_argument("--n", type=_counts, default=[1],
                   help="sampled responses per item for Pass@N (1 = greedy only); with --verifier a list such as "
                        "2,4,8,16 (the largest is sampled, each N uses the first N)")
    p.add_argument("--verifier", default=None, metavar="PRM",
                   help="a PRM (`mstar prm train` output or its HF export): Best-of-N, weighted and majority voting "
                        "and Pass@N over --n, written to verifier.json / .md / .png")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the Pass@N samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling of the Pass@N samples")
    p.add_argument("--reasoning-only", action="store_true",
                   help="MMStar / MMBench only: the paper's -R subset (perception sub-tasks removed)")
    p.add_argument("--out", default=None, help="output folder (default: see above)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
    p.add_argument("--prompt", default="cot", choices=PROMPTS,
                   help="cot: think step by step and end with 'The answer is X' (default); direct: answer only")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate only the first N items (questions, with all their copies, under circular)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Pass@N samples")
    add_dtype_arg(p)
    p.set_defaults(handler=run_eval_command)


def _counts(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--n takes a number or a comma-separated list of numbers, got {text!r}") from None


def run_eval_command(args) -> int:
    """The handler: evaluate, print the tables and where the files went."""
    import sys

    from mstar_jax.benchmark_eval import evaluate_checkpoint, load_benchmark, verify_responses
    from mstar_jax.errors import MstarError
    from mstar_jax.evaluation import results_markdown

    if len(args.n) > 1 and not args.verifier:
        raise MstarError(f"--n {','.join(map(str, args.n))}: a list of N needs --verifier PRM")
    n = max(args.n)
    result, paths = evaluate_checkpoint(
        args.ckpt, args.benchmark, args.data, root=args.root, split=args.split, n=n,
        temperature=args.temperature, top_p=args.top_p, reasoning_only=args.reasoning_only, metric=args.metric,
        out=args.out, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, prompt=args.prompt,
        limit=args.limit, seed=args.seed, dtype=args.dtype, log=lambda msg: print(msg, file=sys.stderr))
    print(results_markdown(result), end="")
    print(f"wrote {paths['json']}, {paths['markdown'].name} and {paths['responses'].name} in {paths['json'].parent}")
    if args.verifier:
        bench = load_benchmark(args.data, args.benchmark, root=args.root, split=args.split,
                               reasoning_only=args.reasoning_only, limit=args.limit, metric=args.metric)
        verdict, vpaths = verify_responses(result, bench["records"], bench["root"], args.verifier, args.n,
                                           paths["json"].parent, dtype=args.dtype,
                                           log=lambda msg: print(msg, file=sys.stderr))
        print(vpaths["markdown"].read_text().split("\n", 2)[2], end="")
        print(f"wrote {vpaths['json'].name}, {vpaths['markdown'].name} and {vpaths['plot'].name}")
    return 0
