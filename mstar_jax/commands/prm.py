"""`mstar prm label|train|score`: the process reward model's stages on their own.

    mstar prm label --policy CKPT --data train.json --out runs/prm     # MC step labels -> runs/prm/prm_labels.jsonl
    mstar prm train --labels runs/prm/prm_labels.jsonl --init CKPT --out runs/prm/model
    mstar prm score runs/prm/model --image I.png --prompt "..." --response "..." [--json]

`label` and `train` also run as the stages of a `mstar train` workdir: `mstar prm label --config demo --workdir
runs/demo` (or `train`) runs the recipe up to that stage there. Defaults come from `--config` (paper by default
for explicit paths, demo for a workdir) and `--config.prm.*` overrides.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add `prm` with its `label`, `train` and `score` sub-commands."""
    p = subparsers.add_parser("prm", help="process reward model: Monte Carlo step labels, training, scoring")
    sub = p.add_subparsers(dest="prm_command", required=True)

    for name, handler, help_, description, flags in _STAGES:
        stage = sub.add_parser(name, help=help_, description=description)
        for flag, flag_help in flags:
            stage.add_argument(flag, help=flag_help)
        if name == "train":
            stage.add_argument("--overwrite", action="store_true")
        _common(stage)
        stage.set_defaults(handler=handler)

    sc = sub.add_parser("score", help="per-step scores of one response")
    sc.add_argument("ckpt", help="PRM directory (ours or its HF export with reward_head.safetensors)")
    sc.add_argument("--image", default=None, help="image file (omit for a text-only prompt)")
    sc.add_argument("--prompt", required=True, help="the question, as the policy was asked it")
    sc.add_argument("--response", required=True, help="the response to score ('-' reads it from stdin)")
    sc.add_argument("--aggregation", default=None, choices=["min", "mean", "last", "product"],
                    help="how step scores combine (default: the PRM's own, min in the paper)")
    sc.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    sc.add_argument("--json", action="store_true", help="print the scores as JSON")
    sc.set_defaults(handler=_score)


def _common(p) -> None:
    p.add_argument("--config", default=None, help="defaults: config file or name (paper for explicit paths, "
                                                  "demo for --workdir); override with --config.prm.label.pairs=...")
    p.add_argument("--workdir", default=None, help="run the recipe's stages up to this one in a `mstar train` workdir")


def _cfg(args, explicit: bool):
    from mstar_jax.config import load_config

    return load_config(args.config or ("paper" if explicit else "demo"), args.config_overrides)


def _in_workdir(args):
    """(config, console, workdir) of the --workdir form: the recipe's stages in a `mstar train` workdir."""
    from mstar_jax.loop.run import Console, open_workdir

    say = Console()
    return _cfg(args, explicit=False), say, open_workdir(args.workdir, say)


def _require(args, names: tuple[str, ...], command: str) -> None:
    from mstar_jax.errors import ConfigError

    missing = [f"--{k}" for k in names if not getattr(args, k)]
    if missing:
        raise ConfigError(f"mstar prm {command} needs {', '.join(missing)} (or --workdir)")


def _label(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.workdir:
        from mstar_jax.loop.run import prepare
        from mstar_jax.prm.stage import run_labelling

        cfg, say, wd = _in_workdir(args)
        prep = prepare(cfg, wd, say, with_prm=False)
        records, _ = run_labelling(cfg, prep.sampler, prep.warm.params, prep.splits["train"], wd.local / "prm", say)
        say(f"labels: {wd.show('prm/prm_labels.jsonl')} ({len(records)} responses)")
        return 0
    _require(args, ("policy", "data", "out"), "label")
    import mstar_jax
    from mstar_jax.loop.data import _read_queries
    from mstar_jax.loop.run import Console
    from mstar_jax.prm.stage import run_labelling
    from mstar_jax.sampler import sampler_for

    cfg = _cfg(args, explicit=True)
    say = Console()
    data = Path(args.data)
    queries = _read_queries(data, Path(args.root) if args.root else data.parent, say)
    policy = mstar_jax.load(args.policy)
    sampler = sampler_for(policy)
    sampler.param_dtype = cfg.sampling.dtype or None
    records, summary = run_labelling(cfg, sampler, policy.params, queries, Path(args.out), say)
    say(f"labels: {Path(args.out) / 'prm_labels.jsonl'} ({len(records)} responses, {summary['steps']} steps)")
    return 0


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mstar_jax.errors import ConfigError

    if args.workdir:
        from mstar_jax.loop.run import prepare

        cfg, say, wd = _in_workdir(args)
        prep = prepare(cfg, wd, say)
        if prep.prm is None:
            raise ConfigError("this config uses no PRM (prm.enabled False and no PRM scorer)")
        say(f"PRM: {wd.show('prm/model')}")
        return 0
    _require(args, ("labels", "init", "out"), "train")
    from mstar_jax.conversion import _refuse_existing, load_any
    from mstar_jax.loop.run import Console
    from mstar_jax.policy import load_processor
    from mstar_jax.prm.labels import read_labels
    from mstar_jax.prm.train import train_prm

    cfg = _cfg(args, explicit=True)
    say = Console()
    _refuse_existing(args.out, args.overwrite)
    records = read_labels(args.labels)
    rules = {r.get("step_rule") for r in records} - {None}
    if len(rules) > 1:
        raise ConfigError(f"{args.labels}: records split by several step rules ({', '.join(sorted(rules))})")
    step_rule = rules.pop() if rules else cfg.prm.step_rule
    backbone = load_any(args.init, None, "float32")
    processor = load_processor(backbone.hf_files)
    out = Path(args.out)
    prm, metrics = train_prm(backbone, processor, records, cfg.prm.train, step_rule=step_rule,
                             aggregation=cfg.prm.aggregation, heldout=float(cfg.prm.train.heldout),
                             max_length=int(cfg.data.max_prompt_tokens + cfg.sampling.max_new_tokens),
                             ckpt_dir=out.with_name(out.name + ".ckpt"), seed=int(cfg.seed), say=say)
    prm.save(out, overwrite=args.overwrite)
    say(f"PRM: {out} ({metrics['updates']} updates; held-out step MSE {metrics['heldout_mse']:.4f}, correlation "
        f"{metrics['heldout_corr']:.3f})")
    if args.export:
        prm.export_hf(args.export, overwrite=args.overwrite)
        say(f"HF export: {args.export}")
    return 0


def _score(args: argparse.Namespace) -> int:
    import json
    import sys

    import mstar_jax
    from mstar_jax.io import load_image

    response = sys.stdin.read() if args.response == "-" else args.response
    image = load_image(args.image) if args.image else None
    prm = mstar_jax.load_prm(args.ckpt, dtype=args.dtype, aggregation=args.aggregation)
    out = prm.score_response(args.prompt, image, response)
    if args.json:
        print(json.dumps(out))
    else:
        for k, st in enumerate(out["steps"]):
            print(f"step {k + 1} [{st['span'][0]}:{st['span'][1]}] score {st['score']:.4f}  {st['text'][:80]}")
        print(f"{out['aggregation']}: {out['score']:.4f}")
    return 0


# (sub-command, handler, help, description, its path flags) of the two stages that also run in a workdir.
_STAGES = (
    ("label", _label, "Monte Carlo step labels (paper appendix D)",
     "With --policy/--data/--out: label questions of a data file with a policy. With --workdir: run the "
     "recipe's stages up to the labels in that workdir.",
     (("--policy", "labelling policy (HF directory or converted checkpoint)"),
      ("--data", "labeled questions (MathV360K / MathVista format)"),
      ("--root", "dataset root for image paths (default: the data file's folder)"),
      ("--out", "output folder (prm_labels.jsonl, samples.jsonl, labels_summary.json)"))),
    ("train", _train, "train a PRM on step labels",
     "With --labels/--init/--out: train from a label file. With --workdir: run the recipe's stages up to the "
     "trained PRM in that workdir.",
     (("--labels", "prm_labels.jsonl"), ("--init", "backbone to start from (paper: the labelling policy)"),
      ("--out", "output PRM directory"), ("--export", "also write an HF export of the PRM here"))),
)
