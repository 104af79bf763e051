"""`mstar train --dry-run` / `mstar study --dry-run`: check a config and print what the run would do, without
running it: the stages, the iterations, the SFT steps and the LR schedule length.

Everything here is computed from the config (and, for `data.source=files`, the size of the data files); the
numbers that depend on the model's answers (how many responses are correct) are upper bounds or the same
estimate the run sizes its continuous schedule with (`continuous_schedule_steps`).
"""

from __future__ import annotations

from pathlib import Path

from mstar_jax.errors import ConfigError
from mstar_jax.remat import check_policy

DTYPES = ("float32", "bfloat16", "float16")
SPLITS = ("warmup", "train", "val", "test_id", "test_ood")


class _Steps:
    """The Trainer's step arithmetic without a model (updates per epoch at the global batch)."""

    def __init__(self, train_cfg):
        from mstar_jax.loop.sft import Trainer

        self.num_steps = Trainer(None, train_cfg, total_steps=1, max_length=1).num_steps


def validate(cfg) -> None:
    """Raise ConfigError for any setting the run would refuse later (before hours of evaluation)."""
    from mstar_jax.loop.self_evolve import METHODS, iterations_per_pass
    from mstar_jax.optim import OptimConfig

    if cfg.data.source not in ("synthetic", "files"):
        raise ConfigError(f"data.source must be 'synthetic' or 'files', got {cfg.data.source!r}")
    if (cfg.model.dtype or "float32") != "float32":
        raise ConfigError(f"model.dtype={cfg.model.dtype!r}: the loaded policy holds the master weights that "
                          "training updates, which need float32 (AdamW steps of lr ~1e-6 vanish in bfloat16); "
                          "set model.dtype=float32 and train.compute_dtype=bfloat16 for bf16 compute")
    if cfg.train.method not in METHODS:
        raise ConfigError(f"train.method {cfg.train.method!r} is not one of {', '.join(METHODS)}")
    iterations_per_pass(cfg.train.interval)
    if cfg.train.compute_dtype not in DTYPES:
        raise ConfigError(f"train.compute_dtype must be one of {', '.join(DTYPES)}, got {cfg.train.compute_dtype!r}")
    check_policy(cfg.train.remat)
    if cfg.sampling.dtype not in ("",) + DTYPES:
        raise ConfigError(f"sampling.dtype must be empty or one of {', '.join(DTYPES)}, got {cfg.sampling.dtype!r}")
    OptimConfig.from_config(cfg.train, 1)  # schedule name, warm-up ratio
    for key in ("train.num_samples", "train.global_batch", "warmup.num_samples", "sampling.batch_size",
                "sampling.max_new_tokens"):
        section, name = key.split(".")
        if int(cfg[section][name]) < 1:
            raise ConfigError(f"{key} must be >= 1, got {cfg[section][name]}")
    if cfg.train.micro_batch and cfg.train.global_batch % cfg.train.micro_batch:
        raise ConfigError(f"train.global_batch {cfg.train.global_batch} is not a multiple of train.micro_batch "
                          f"{cfg.train.micro_batch}")
    d = cfg.dynamics
    if d.grid_step <= 0 or d.grid_high < d.grid_low:
        raise ConfigError(f"dynamics grid {d.grid_low}..{d.grid_high} step {d.grid_step} is empty")
    if cfg.adaptive.enabled and (cfg.adaptive.every < 1 or cfg.adaptive.window < 1):
        raise ConfigError("adaptive.every and adaptive.window must be >= 1 when adaptive.enabled")
    if cfg.data.source == "synthetic":
        from mstar_jax.data.synth import SynthConfig

        try:
            SynthConfig(sizes=cfg.data.synth_sizes.to_dict(), image_size=cfg.data.image_size,
                        difficulty=cfg.data.difficulty, mc_fraction=cfg.data.mc_fraction,
                        families=cfg.data.families)
        except ValueError as err:
            raise ConfigError(f"data: {err}") from None
    if "study" in cfg:
        from mstar_jax.loop.study import parse_variants

        parse_variants(cfg.study.variants)


def missing_settings(cfg) -> list[str]:
    """Settings a real run needs that the config leaves empty (a shipped template such as configs/paper.py)."""
    if cfg.data.source == "synthetic":
        return []
    return [f"{k} (empty)" for k in ("model.path", "data.warmup", "data.train", "data.test_id")
            if not cfg[k.split(".")[0]][k.split(".")[1]]]


def _split_sizes(cfg) -> dict[str, int | None]:
    """Queries per split: the synthetic sizes, or the records in each data file (None: not set or not found)."""
    if cfg.data.source == "synthetic":
        return {k: int(cfg.data.synth_sizes[k]) for k in SPLITS if cfg.data.synth_sizes.get(k)}
    from mstar_jax.data.readers import read_dataset

    from mstar_jax.data.sources import TFDS_PREFIX, is_shard_spec

    out = {}
    for split in SPLITS:
        path = cfg.data[split]
        if path and (path.startswith(TFDS_PREFIX) or is_shard_spec(path)):
            out[split] = _source_size(path, cfg.data.root)
        elif path and Path(path).is_file():
            records, _ = read_dataset(Path(path), root=Path(cfg.data.root) if cfg.data.root else Path(path).parent)
            out[split] = len(records)
        else:
            out[split] = None
    return out


def _source_size(spec: str, root: str) -> int | None:
    """Records in a shard set or TFDS split (None when it cannot be opened; the run names why)."""
    import tempfile

    from mstar_jax.data.sources import open_queries
    from mstar_jax.errors import DataError

    try:
        return len(open_queries(spec, root=Path(root) if root else None, cache_dir=Path(tempfile.gettempdir()),
                                labeled=True, read_file=None))
    except DataError:
        return None


def _n(x) -> str:
    return "?" if x is None else str(x)


def self_evolving_lines(cfg, n_train: int | None, indent: str = "   ") -> list[str]:
    """Iterations, queries per iteration, SFT steps and the LR schedule of the self-evolving stage."""
    from mstar_jax.loop.self_evolve import continuous_schedule_steps, iterations_per_pass, total_iterations

    t, steps = cfg.train, _Steps(cfg.train)
    iters = total_iterations(t.interval, t.passes)
    per_pass = iterations_per_pass(t.interval)
    per_iter = None if n_train is None else -(-n_train // per_pass)
    temperature = (f"adaptive from T={t.temperature:g} (chosen every {cfg.adaptive.every} iterations over a "
                   f"{cfg.adaptive.window}-iteration window)" if cfg.adaptive.enabled else f"fixed T={t.temperature:g}")
    length = (f"{iters} iterations ({t.interval:.2%} of the queries each, {t.passes:g} pass(es))" if iters else
              f"iterations until the {t.total_steps}-step schedule is spent")
    lines = [f"{indent}{t.method}: {length}; {_n(per_iter)} queries x K={t.num_samples} samples per iteration; "
             f"{temperature}"]
    if n_train is None and not t.total_steps:
        lines.append(f"{indent}SFT steps and LR schedule: known once data.train is set")
        return lines
    # The run's own estimate (half the K samples kept, capped by M and the re-ranker), without train.total_steps.
    estimate = None
    if n_train is not None and iters:
        free = cfg.copy_and_resolve_references()
        with free.unlocked():
            free.train.total_steps = 0
        estimate = continuous_schedule_steps(free, n_train, steps) // iters
    if t.method == "continuous":
        schedule = continuous_schedule_steps(cfg, n_train or 0, steps)
        warm = int(-(-schedule * float(t.warmup_ratio) // 1))
        lines.append(f"{indent}one LR schedule of {schedule} steps for the whole run ({t.schedule} after {warm} "
                     f"warm-up steps, lr {t.lr:g}, global batch {t.global_batch}); about {_n(estimate)} SFT steps "
                     "per iteration")
    else:
        lines.append(f"{indent}a fresh optimizer and LR schedule every iteration, sized to its examples: about "
                     f"{_n(estimate)} steps each ({t.schedule}, lr {t.lr:g}, global batch {t.global_batch})")
    return lines


def plan_lines(cfg, workdir: str, command: str = "train") -> list[str]:
    """The run's plan, one stage per numbered line (after `validate`)."""
    from mstar_jax.loop.temperature import temperature_grid

    validate(cfg)
    sizes = _split_sizes(cfg)
    missing = missing_settings(cfg)
    lines = [f"plan of `mstar {command}` in {workdir} (a dry run: nothing is read from or written to it)",
             "config: valid" + (f"; a real run needs: {', '.join(missing)}" if missing else "")]
    d, s, w = cfg.data, cfg.sampling, cfg.warmup
    split_text = ", ".join(f"{k} {_n(v)}" for k, v in sizes.items())
    if d.source == "synthetic":
        lines.append(f"1. data: synthetic ({d.families or 'all families'}, {d.image_size} px), generated into "
                     f"the workdir: {split_text}")
        m, p = cfg.model.tiny, cfg.model.pretrain
        lines.append(f"2. base model: a tiny {m.vision}+{m.text} LLaVA (hidden {m.hidden}, {m.layers} layers) "
                     f"pre-trained {p.steps} steps of {p.batch_size} on {p.queries} queries")
    else:
        lines.append(f"1. data: {split_text} (records in data.* files)")
        lines.append(f"2. base model: {cfg.model.path or '? (model.path)'}")
    tests = ", ".join(f"{k} ({_n(sizes.get(k))})" for k in ("test_id", "test_ood") if k in sizes)
    lines.append(f"3. base evaluation: greedy chain-of-thought answers on {tests}, <= {s.max_new_tokens} new tokens")
    n_warm = sizes.get("warmup")
    most = None if n_warm is None else min(n_warm * min(w.num_samples, w.max_per_query), w.max_examples)
    warm_steps = None if most is None else _Steps(cfg.train).num_steps(max(1, most), w.epochs)
    lines.append(f"4. warm-up: {w.num_samples} answer-hinted samples for each of {_n(n_warm)} queries at "
                 f"T={w.temperature:g}; SFT on <= {_n(most)} correct ones: <= {_n(warm_steps)} steps ({w.epochs:g} "
                 f"epoch(s), lr {w.lr:g}); then the warm-up evaluation")
    n_train = sizes.get("train")
    if command == "study":
        from mstar_jax.loop.study import parse_variants

        variants = parse_variants(cfg.study.variants)
        lines.append(f"5. self-evolving, {len(variants)} variants from the one warm-up model, each followed by its "
                     "final evaluation:")
        for v in variants:
            lines.append(f"   {v.name}:")
            lines += self_evolving_lines(v.config(cfg), n_train, indent="     ")
        lines.append("6. study.md (one table, the ordering against the paper's table 1) and plots/study.png")
        return lines
    lines.append("5. self-evolving:")
    lines += self_evolving_lines(cfg, n_train)
    grid = temperature_grid(cfg.dynamics.grid_low, cfg.dynamics.grid_high, cfg.dynamics.grid_step)
    lines.append(f"   dynamics on {_n(sizes.get('val'))} validation queries every {cfg.dynamics.every} "
                 f"iteration(s): greedy + {cfg.dynamics.num_samples} samples at {len(grid)} temperatures "
                 f"{grid[0]:g}..{grid[-1]:g}")
    lines.append("6. final evaluation: as in 3")
    lines.append("7. report.md, plots/, metrics.jsonl, tensorboard/" + (", export/ (for transformers)"
                                                                       if cfg.export.enabled else ""))
    return lines
