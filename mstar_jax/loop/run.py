"""`mstar train`: the whole recipe as resumable stages in one workdir.

    data -> base model -> base eval -> warm-up (rollouts, SFT, eval) -> PRM (labels, training, verifier)
         -> self-evolving iterations -> final eval -> report.md, plots, export/ (+ prm/export/)

Each stage writes its outputs atomically and is skipped when they exist, so the same command on the same
workdir continues where it stopped (also after `kill -9`); the iterations resume from the last Orbax checkpoint
and reuse rollouts already written. A gs:// workdir works the same way through a local mirror
(mstar_jax.workdir): the stages write there, each file is uploaded when complete, and the Orbax directories
live on the remote only.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from mstar_jax.config import diff_configs, resume_defaults
from mstar_jax.errors import ConfigError
from mstar_jax.io import write_atomic
from mstar_jax.workdir import Workdir, publish


class Console:
    """One clear line per stage, with elapsed time."""

    def __init__(self):
        self.t0 = time.time()

    def __call__(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:7.1f}s] {msg}", flush=True)


def check_workdir_config(cfg, workdir: Workdir | str | Path, ignore: tuple[str, ...] = ()) -> None:
    """Refuse a workdir made with another config (naming the keys that differ); record it otherwise.

    Top-level sections in `ignore` are left out (a study may add variants to a workdir it shares)."""
    wd = Workdir.open(workdir)
    path = wd.local / "config.json"
    current = {k: v for k, v in json.loads(cfg.to_json()).items() if k not in ignore}
    if path.exists():
        previous = json.loads(path.read_text())
        # A section added since (the PRM, unlabeled prompts) that is switched off is what an older workdir ran,
        # whatever its other keys hold.
        compared = {k: v for k, v in current.items()
                    if k in previous or not (isinstance(v, dict) and v.get("enabled") is False)}
        diffs = diff_configs(previous, compared, defaults=resume_defaults())
        if diffs:
            raise ConfigError(f"{wd.url} was made with a different config; differing keys: " + "; ".join(diffs)
                              + ". Use a new --workdir or the original config.")
    else:
        write_atomic(path, json.dumps(current, indent=1, sort_keys=True))


def stage_records(results: dict[str, dict]) -> list[dict]:
    """metrics.jsonl records of the evaluation and PRM stages (rebuilt from their result files on resume)."""
    out = []
    for stage, res in results.items():
        if stage == "prm":
            out += prm_records(res)
            continue
        for split in ("test_id", "test_ood"):
            if split in res:
                out.append({"stage": f"eval/{stage}", "split": split, "accuracy": res[split]["accuracy"],
                            **{f"task/{k}": v for k, v in res[split]["per_task"].items()}})
    return out


class IterationCheckpoints:
    """The Orbax manager of the self-evolving run, saving one checkpoint per iteration boundary."""

    def __init__(self, directory: Path, max_to_keep: int):
        from mstar_jax.checkpointing import CheckpointManager

        self.directory = directory
        self.manager = CheckpointManager(directory, max_to_keep=max_to_keep, save_interval_steps=1)
        self.manager.install_preemption_handler()

    def restore(self, template_state):
        """(state, loop metadata) of the latest iteration, or None."""
        from mstar_jax.checkpointing import abstract_like

        if self.manager.latest_step() is None:
            return None
        return self.manager.restore(abstract_state=abstract_like(template_state))

    def save_iteration(self, state, loop) -> None:
        """Save after an iteration (step key = iterations completed) and wait, so a kill loses nothing."""
        self.save_step(loop.iteration, state, loop.to_json(), what="iteration")

    def save_step(self, step: int, state, meta: dict, what: str = "step") -> None:
        """Save `state` with its metadata under `step` and wait; exit cleanly after a preemption signal."""
        from mstar_jax.faults import kill_point

        self.manager.save(step, state, meta)
        kill_point("checkpoint_write", f"{what} {step}")  # the async write is in flight here
        self.manager.wait()
        if self.manager.preempted:
            raise SystemExit(f"preempted: saved {what} {step}; rerun the same command to resume")

    def close(self) -> None:
        """Finish pending saves."""
        self.manager.close()


def prm_records(res: dict) -> list[dict]:
    """metrics.jsonl records of the PRM stages: label statistics, training metrics, verifier curves."""
    out = []
    if "labels" in res:
        lab = res["labels"]
        out.append({"stage": "prm/labels", **{k: v for k, v in lab.items() if isinstance(v, (int, float))},
                    **{f"short/{k}": v for k, v in lab.get("balance", {}).get("short", {}).items()}})
    if "train" in res:
        out.append({"stage": "prm/train", **{k: v for k, v in res["train"].items() if isinstance(v, (int, float))}})
    for split, ver in res.get("verifier", {}).items():
        for n, c in ver["curves"].items():
            out.append({"stage": "prm/verifier", "split": split, "n": int(n), **c})
    return out


@dataclasses.dataclass
class Prepared:
    """What the self-evolving stage starts from: the policy and its sampler, the splits, the warm-up model, the
    base / warm-up evaluations and the PRM (None when the run uses none)."""

    policy: object
    sampler: object
    splits: dict
    warm: object
    results: dict
    prm: object = None


def run_train(cfg, workdir: str | Path) -> dict:
    """Run (or resume) the full recipe in a local or gs:// workdir; returns the evaluation results by stage."""
    say = Console()
    wd = open_workdir(workdir, say)
    prep = prepare(cfg, wd, say)
    final, final_params = run_self_evolving(cfg, wd, prep, say)
    results = {**prep.results, "final": final}
    finish(cfg, wd, prep.policy, final_params, results, say, prep.prm)
    return results


def open_workdir(workdir: str | Path, say) -> Workdir:
    """The run's workdir; a remote one is pulled into its local mirror first (after jax.distributed is up, since
    the mirror is per process)."""
    from mstar_jax import sharding

    sharding.initialize_distributed()
    wd = Workdir.open(workdir)
    if wd.is_remote:
        say(f"workdir: {wd.url} (local mirror {wd.local}; Orbax checkpoints written to the remote directly)")
    return wd


def prepare(cfg, workdir: Workdir | str | Path, say, ignore: tuple[str, ...] = (), with_prm: bool = True) -> Prepared:
    """The stages before self-evolving: data -> base model -> base eval -> warm-up (rollouts, SFT) -> warm-up eval
    -> PRM (unless `with_prm` is False)."""
    from mstar_jax import sharding
    from mstar_jax.conversion import LoadedModel, load_any, save_converted
    from mstar_jax.loop import data as loop_data
    from mstar_jax.loop.base_model import build_base_model
    from mstar_jax.loop.evaluate import evaluate_stage
    from mstar_jax.loop.plan import validate
    from mstar_jax.loop.sft import Trainer
    from mstar_jax.loop.warmup import warmup_examples, warmup_rollouts
    from mstar_jax.prm.stage import check_scorer_config, prm_stage
    from mstar_jax.policy import Policy, load_processor
    from mstar_jax.sampler import sampler_for

    if not cfg.model.path and cfg.data.source != "synthetic":
        raise ConfigError("model.path is empty: set --config.model.path to an HF LLaVA directory or a converted "
                          "checkpoint (only the synthetic demo builds its own tiny base model)")
    validate(cfg)  # every setting the run would refuse later, before hours of base evaluation
    check_scorer_config(cfg)
    wd = Workdir.open(workdir)
    workdir = wd.local
    check_workdir_config(cfg, wd, ignore)
    sharding.initialize_distributed()
    mesh = sharding.mesh_from_config(cfg)

    splits = loop_data.load_splits(cfg, workdir, say)
    say("data: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))

    base_path = cfg.model.path or build_base_model(cfg, workdir, splits["pretrain"], say)  # str: may be gs://
    # float32 also when model.dtype is empty: a bf16 checkpoint's weights become the fp32 master copy.
    policy = Policy(load_any(base_path, mesh, cfg.model.dtype or "float32"), None)
    policy.processor = load_processor(policy.loaded.hf_files)
    sampler = sampler_for(policy)
    sampler.param_dtype = cfg.sampling.dtype or None
    say(f"base model: {base_path} ({sum(a.size for a in policy.params.values()) / 1e6:.1f}M parameters)")

    results = {"base": evaluate_stage(sampler, policy.params, splits, cfg, workdir / "results" / "base.json", "base")}
    say(f"base eval: {_acc_line(results['base'])}")

    warm_dir = wd.durable("warmup_ckpt")  # Orbax: on the remote for a gs:// workdir
    if (warm_dir / "mstar_checkpoint.json").exists():
        warm = load_any(warm_dir, mesh, None)
        say(f"warm-up: reusing {warm_dir}")
    else:
        rollouts = warmup_rollouts(sampler, policy.params, splits["warmup"], cfg, workdir / "rollouts" / "warmup.jsonl")
        examples = warmup_examples(splits["warmup"], rollouts, cfg)
        solved = sum(any(r.correct) for r in rollouts)
        say(f"warm-up rollouts: {len(examples)} correct hinted CoT responses from {solved}/{len(rollouts)} queries")
        if not examples:
            raise ConfigError("warm-up found no correct response: the base model never reproduced the hinted "
                              "answer; raise warmup.num_samples or check the answer checker on your data")
        wcfg = cfg.warmup
        trainer = Trainer(policy, _section(cfg.train, lr=wcfg.lr), total_steps=1,
                          max_length=cfg.data.max_prompt_tokens + cfg.sampling.max_new_tokens, seed=cfg.seed)
        steps = trainer.num_steps(len(examples), wcfg.epochs)
        state = trainer.fresh_state(policy.params, steps)
        state, m = trainer.fit(state, examples, wcfg.epochs, seed=cfg.seed + 5, desc="warm-up SFT", total_steps=steps)
        say(f"warm-up SFT: {m['train_steps']} steps, mean loss {m['loss']:.3f}")
        warm = LoadedModel(policy.loaded.cfg, policy.graphdef, state.params, policy.loaded.extras,
                           policy.loaded.layout, policy.loaded.hf_files, mesh)
        save_converted(warm, warm_dir, overwrite=True)
    results["warmup"] = evaluate_stage(sampler, warm.params, splits, cfg, workdir / "results" / "warmup.json",
                                       "warmup")
    say(f"+warm-up eval: {_acc_line(results['warmup'])}")
    prep = Prepared(policy, sampler, splits, warm, results)
    if not with_prm:
        return prep
    prep.prm = prm_stage(cfg, wd, prep, say)
    if prep.prm is not None:
        results["prm"] = _prm_results(cfg, wd, prep, say)
    return prep


def _prm_results(cfg, wd: Workdir, prep: Prepared, say) -> dict:
    """results/prm.json (labels, training) plus the verifier curves of the warm-up policy (paper figure 2a)."""
    from mstar_jax.prm.stage import verify_stage

    path = wd.local / "results" / "prm.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    verifier = {}
    for split in cfg.prm.verify.splits:
        if prep.splits.get(split):
            out = verify_stage(cfg, wd, prep.sampler, prep.warm.params, prep.splits[split], prep.prm, say, split)
            if out is not None:
                verifier[split] = out
    if verifier:
        res["verifier"] = verifier
    return res


def run_self_evolving(cfg, workdir: Workdir | str | Path, prep: Prepared, say):
    """The iterations of `cfg.train.method` from the warm-up params in `workdir` (its checkpoints, rollouts,
    metrics); returns (final evaluation, final params)."""
    from mstar_jax.loop.dynamics import MeanLogprobScorer
    from mstar_jax.loop.evaluate import evaluate_stage
    from mstar_jax.loop.self_evolve import LoopState, SelfEvolvingRun, continuous_schedule_steps
    from mstar_jax.loop.sft import Trainer
    from mstar_jax.reporting import MetricsLog

    policy, warm, splits, sampler = prep.policy, prep.warm, prep.splits, prep.sampler
    wd = Workdir.open(workdir)
    workdir = wd.local
    trainer = Trainer(policy, cfg.train, total_steps=1,
                      max_length=cfg.data.max_prompt_tokens + cfg.sampling.max_new_tokens, seed=cfg.seed)
    trainer.total_steps = continuous_schedule_steps(cfg, len(splits["train"]), trainer)
    template = trainer.fresh_state(warm.params, copy=True)
    ckpts = IterationCheckpoints(wd.durable("checkpoints"), cfg.checkpoint.max_to_keep)
    restored = ckpts.restore(template)
    if restored is None:
        state, loop = template, LoopState(temperature=float(cfg.train.temperature))
    else:
        state, meta = restored
        loop = LoopState(**meta)
        say(f"resuming after iteration {loop.iteration} (T={loop.temperature:g})")
    metrics = MetricsLog(workdir, records=stage_records(prep.results) + loop.records)
    scorers = {"mean_logprob": MeanLogprobScorer(), **({"prm": prep.prm} if prep.prm is not None else {})}
    run = SelfEvolvingRun(cfg, workdir, policy, trainer, warm.params, splits["train"], splits.get("val", []),
                          scorers, metrics, ckpts, unlabeled=splits.get("unlabeled", []))
    selection = cfg.train.selection + (f" (k={cfg.train.rerank_top}, {cfg.train.scorer})" if cfg.train.selection in (
        "top_k", "threshold") else f" (k={cfg.train.rerank_top})" if cfg.train.selection == "random_k" else "")
    say(f"self-evolving: {cfg.train.method}, {run.describe_length()} of {cfg.train.interval:.2%} of "
        f"{len(splits['train'])} queries, K={cfg.train.num_samples}, selection {selection}, "
        f"Reward-Pass@2 by {cfg.dynamics.scorer}, "
        + (f"unlabeled prompts ({cfg.unlabeled.mode}) from {cfg.unlabeled.start:.0%} of the run, "
           if cfg.unlabeled.enabled else "") +
        f"{'adaptive' if cfg.adaptive.enabled else 'fixed'} temperature from T={loop.temperature:g}, "
        f"LR schedule of {trainer.total_steps} steps")
    state, loop = run.run(state, loop)
    ckpts.close()
    final = evaluate_stage(sampler, state.params, splits, cfg, workdir / "results" / "final.json",
                           cfg.train.method)
    for rec in stage_records({"final": final}):
        metrics.log(rec, step=int(state.step))
    metrics.close()
    say(f"final eval: {_acc_line(final)}")
    return final, state.params


def finish(cfg, workdir: Workdir | str | Path, policy, params, results: dict, say, prm=None) -> None:
    """report.md, dynamics plots and the HF exports of the policy and the PRM (written in the mirror and uploaded,
    for a gs:// workdir)."""
    from mstar_jax.conversion import LoadedModel, export_hf
    from mstar_jax.loop.report import write_report
    from mstar_jax.reporting import plot_dynamics

    wd = Workdir.open(workdir)
    workdir = wd.local
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    plots = plot_dynamics(records, workdir / "plots")
    write_report(workdir / "report.md", {"base": results["base"], "+warm-up": results["warmup"],
                                         cfg.train.method + (" + adaptive T" if cfg.adaptive.enabled else ""):
                                         results["final"]}, records, plots, results.get("prm"))
    say(f"report: {wd.show('report.md')}; plots: {len(plots)} in {wd.show('plots')}")
    if cfg.export.enabled:
        final = LoadedModel(policy.loaded.cfg, policy.graphdef, params, policy.loaded.extras, policy.loaded.layout,
                            policy.loaded.hf_files, policy.mesh)
        export_hf(final, workdir / "export", dtype=cfg.export.dtype or None, overwrite=True)
        publish(workdir / "export", last="config.json")
        say(f"exported the final policy for transformers: {wd.show('export')}")
        if prm is not None and not cfg.prm.path:
            prm.export_hf(workdir / "prm" / "export", dtype=cfg.export.dtype or None, overwrite=True)
            publish(workdir / "prm" / "export", last="config.json")
            say(f"exported the PRM (backbone for transformers + reward_head.safetensors): {wd.show('prm/export')}")


def _acc_line(res: dict) -> str:
    return ", ".join(f"{k} {res[k]['accuracy']:.1f}%" for k in ("test_id", "test_ood") if k in res)


def _section(section, **overrides):
    """A copy of a config section with some values replaced (for the warm-up's own learning rate)."""
    copy = section.copy_and_resolve_references()
    with copy.unlocked():
        for k, v in overrides.items():
            copy[k] = v
    return copy
