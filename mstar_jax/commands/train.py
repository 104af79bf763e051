"""`mstar train [--config FILE|NAME] [--config.key=value ...] [--workdir DIR]`."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add the `train` command."""
    p = subparsers.add_parser(
        "train", help="run (or resume) the M-STaR recipe: data, base eval, warm-up, self-evolving, report, export",
        description="With no arguments: the embedded default (configs/demo.py) in runs/demo on CPU. Overrides "
                    "look like --config.train.method=rest_em; the same command on the same workdir resumes.")
    p.add_argument("--config", default=None, help="config file or name in configs/ (default: demo)")
    p.add_argument("--workdir", default=None, help="output directory or gs:// URL (default: runs/<config name>); "
                                                   "a gs:// run resumes from the bucket on any machine")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config and print the plan (stages, iterations, steps, schedule) without running")
    p.set_defaults(handler=_train)


def split_config_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--config.x=y` overrides (and their values) from the other arguments."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config."):
            overrides.append(a)
            if "=" not in a and i + 1 < len(argv):
                overrides.append(argv[i + 1])
                i += 1
        else:
            rest.append(a)
        i += 1
    return rest, overrides


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mstar_jax.config import load_config, resolve_config_path
    from mstar_jax.loop.run import run_train

    cfg = load_config(args.config, args.config_overrides)
    workdir = args.workdir or str(Path("runs") / resolve_config_path(args.config).stem)
    if args.dry_run:
        from mstar_jax.loop.plan import plan_lines

        print("\n".join(plan_lines(cfg, workdir, "train")))
        return 0
    run_train(cfg, workdir)
    return 0
