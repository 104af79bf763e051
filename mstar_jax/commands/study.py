"""`mstar study [--config FILE|NAME] [--config.key=value ...] [--workdir DIR]`."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add the `study` command."""
    p = subparsers.add_parser(
        "study", help="compare self-evolving methods x intervals x fixed/adaptive temperature from one warm-up",
        description="Runs the shared stages (data, base model, warm-up) once, then every variant of "
                    "study.variants (e.g. --config.study.variants='rest_em@100%%,continuous@25%%+adaptive'); "
                    "writes study.md and plots/study.png. The same command on the same workdir resumes.")
    p.add_argument("--config", default=None, help="config file or name in configs/ (default: study_demo)")
    p.add_argument("--workdir", default=None, help="output directory or gs:// URL (default: runs/<config name>)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config and print the plan (variants, iterations, steps) without running")
    p.set_defaults(handler=_study)


def _study(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mstar_jax.config import load_config, resolve_config_path
    from mstar_jax.loop.study import run_study

    cfg = load_config(args.config, args.config_overrides, default="study_demo")
    workdir = args.workdir or str(Path("runs") / resolve_config_path(args.config, default="study_demo").stem)
    if args.dry_run:
        from mstar_jax.loop.plan import plan_lines

        if "study" not in cfg:
            from mstar_jax.errors import ConfigError

            raise ConfigError("this config has no `study` section; use configs/study_demo.py or "
                              "configs/study_paper.py (or add study.variants to yours)")
        print("\n".join(plan_lines(cfg, workdir, "study")))
        return 0
    run_study(cfg, workdir)
    return 0
