"""`mstar bench sampler|train`: speed and memory against the `transformers` reference implementations."""

from __future__ import annotations

import importlib


def register(subparsers) -> None:
    """Add `bench` with its `sampler` and (when built) `train` sub-commands."""
    p = subparsers.add_parser("bench", help="benchmarks against transformers (prints JSON lines)")
    sub = p.add_subparsers(dest="bench", required=True)
    from mstar_jax.bench.sampler import add_sampler_args

    s = sub.add_parser("sampler", help="our sampler vs transformers generate, n samples per prompt")
    add_sampler_args(s)
    s.set_defaults(handler=_run("mstar_jax.bench.sampler", "bench_sampler"))
    from mstar_jax.bench.prm_label import add_prm_label_args

    lab = sub.add_parser("prm-label", help="PRM step-label completions: our shared-prefix sampler vs a transformers "
                                           "generate loop over prefixes")
    add_prm_label_args(lab)
    lab.set_defaults(handler=_run("mstar_jax.bench.prm_label", "bench_prm_label"))
    try:
        train = importlib.import_module("mstar_jax.bench.train")
    except ModuleNotFoundError as err:
        if err.name != "mstar_jax.bench.train":
            raise
        return
    t = sub.add_parser("train", help="our SFT step vs a transformers/PyTorch training step")
    train.add_train_args(t)
    t.set_defaults(handler=_run("mstar_jax.bench.train", "bench_train"))


def _run(module: str, name: str):
    def handler(args):
        return getattr(importlib.import_module(module), name)(args)

    return handler
