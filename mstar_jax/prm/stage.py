"""The PRM stages of `mstar train` (and `mstar prm label|train`): label -> train -> verify, each resumable.

    prm/samples.jsonl           K samples per labelling question (reused on resume)
    prm/prm_labels.jsonl        the Monte Carlo step labels (chunk-resumable, see labels.py)
    prm/labels_summary.json     the stage's counts, balance report and label statistics (marks it complete)
    prm/ckpt/                   PRM training checkpoints (Orbax)
    prm/model/                  the trained PRM (our checkpoint format + reward_head.safetensors + prm.json)
    results/prm.json            held-out MSE / correlation, label summary, verifier curves
    plots/prm_verifier.png      Best-of-N / weighted / majority voting / Pass@N over N on the validation set

With `prm.path` set, that PRM is loaded instead and nothing is labelled or trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mstar_jax.errors import ConfigError
from mstar_jax.io import write_atomic


def uses_prm(cfg) -> bool:
    """Whether any part of the run reads PRM scores (selection, dynamics, unlabeled prompts, verifier)."""
    selection = cfg.train.selection
    return (cfg.dynamics.scorer == "prm" or (selection in ("top_k", "threshold") and cfg.train.scorer == "prm")
            or (cfg.unlabeled.enabled and cfg.unlabeled.mode == "pseudo"))


def check_scorer_config(cfg) -> None:
    """Refuse combinations with nothing to score or check against, before any work."""
    from mstar_jax.loop.selection import SELECTIONS

    for key, value in (("train.scorer", cfg.train.scorer), ("dynamics.scorer", cfg.dynamics.scorer)):
        if value not in ("prm", "mean_logprob"):
            raise ConfigError(f"{key} {value!r} is not one of prm, mean_logprob")
    if cfg.train.selection not in SELECTIONS:
        raise ConfigError(f"train.selection {cfg.train.selection!r} is not one of {', '.join(SELECTIONS)}")
    if cfg.unlabeled.enabled:
        if cfg.unlabeled.mode not in ("pseudo", "oracle"):
            raise ConfigError(f"unlabeled.mode {cfg.unlabeled.mode!r} is not one of pseudo, oracle")
        if cfg.unlabeled.mode == "pseudo" and cfg.train.selection == "all":
            raise ConfigError(
                "unlabeled prompts with train.selection=all: nothing checks their responses (they have no answer, and "
                "`all` uses no reward model to pseudo-label or re-rank them). Use train.selection=top_k with "
                "train.scorer=prm (the paper's 3.4 setting), or unlabeled.mode=oracle for the skyline")
        if not 0.0 <= float(cfg.unlabeled.start) < 1.0:
            raise ConfigError(f"unlabeled.start must be in [0, 1), got {cfg.unlabeled.start}")
    if uses_prm(cfg) and not cfg.prm.enabled and not cfg.prm.path:
        raise ConfigError("the run uses PRM scores (train.scorer / dynamics.scorer / unlabeled.mode) but prm.enabled "
                          "is False and prm.path is empty: enable the PRM stages or give a trained PRM")


def _settings(cfg):
    from mstar_jax.prm.labels import LabelSettings

    L = cfg.prm.label
    return LabelSettings(completions=int(L.completions), temperature=float(L.temperature),
                         step_rule=str(cfg.prm.step_rule), complete_last_step=bool(L.complete_last_step),
                         max_new_tokens=int(cfg.sampling.max_new_tokens), top_p=float(cfg.sampling.top_p),
                         top_k=int(cfg.sampling.top_k), chunk=int(L.chunk), max_rows=int(L.max_rows),
                         seed=int(cfg.seed) * 7919 + 13)


def label_questions(queries, n: int, seed: int):
    """The labelling questions: a seeded draw of n (all if fewer)."""
    order = np.random.default_rng([int(seed), 50021]).permutation(len(queries))
    return [queries[i] for i in order[:n]]


def run_labelling(cfg, sampler, params, queries, out_dir: Path, say) -> tuple[list[dict], dict]:
    """Sample, pool, balance and label into `out_dir`; reuses what a previous run finished."""
    from tqdm.auto import tqdm

    from mstar_jax.loop import prompts as P
    from mstar_jax.loop.rollouts import make_rollouts, read_rollouts, sample_queries, write_rollouts
    from mstar_jax.prm.labels import balance, balance_line, candidate_pool, label_stats, read_labels, write_labels

    L = cfg.prm.label
    out_dir = Path(out_dir)
    summary_path = out_dir / "labels_summary.json"
    labels_path = out_dir / "prm_labels.jsonl"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        say(f"PRM labels: reusing {labels_path} ({summary['responses']} responses, {summary['steps']} steps)")
        return read_labels(labels_path), summary
    qs = label_questions(queries, int(L.questions), cfg.seed)
    samples_path = out_dir / "samples.jsonl"
    if samples_path.exists():
        rollouts = read_rollouts(samples_path)
    else:
        s = cfg.sampling
        samples = sample_queries(sampler, params, qs, P.cot_prompt, n=int(L.samples), temperature=float(L.temperature),
                                 seed=int(cfg.seed) * 31 + 7, max_new_tokens=s.max_new_tokens,
                                 batch_size=max(s.batch_size, int(L.samples)), top_p=s.top_p, top_k=s.top_k,
                                 desc="PRM label samples", kill_point_name="prm_samples")
        rollouts = make_rollouts(qs, samples, P.cot_prompt)
        write_rollouts(samples_path, rollouts)
    by_id = {q.id: q for q in qs}
    pool, stats = candidate_pool(rollouts, {q.id: q.item for q in qs}, int(L.per_question))
    chosen, report = balance(pool, int(L.pairs), str(L.balance), cfg.seed)
    say(f"PRM labels: {stats['questions']} questions x {L.samples} samples -> {len(pool)} distinct responses "
        f"(<= {L.per_question} per question; {stats['questions_all_correct']} questions all correct, "
        f"{stats['questions_all_wrong']} all wrong) -> {balance_line(report)}")
    if not chosen:
        raise ConfigError("PRM labelling found no responses to label (every sample empty); check the labelling "
                          "policy and sampling.max_new_tokens")
    bar = tqdm(total=len(chosen), desc="PRM labels (MC completions)", unit="resp", leave=False)
    records = write_labels(sampler, params, chosen, by_id, P.cot_prompt, _settings(cfg), labels_path,
                           progress=lambda k: bar.update(k - bar.n))
    bar.close()
    summary = {**stats, "balance": report, **label_stats(records)}
    write_atomic(summary_path, json.dumps(summary, indent=1))
    say(f"PRM labels: {summary['responses']} responses, {summary['steps']} steps, {summary['completions']} "
        f"completions; mean label {summary['label_mean']:.3f} (correct responses {summary['label_mean_correct']:.3f},"
        f" wrong {summary['label_mean_wrong']:.3f})")
    return records, summary


def prm_stage(cfg, wd, prep, say):
    """The run's PRM: loaded from `prm.path`, reused from the workdir, or labelled and trained now (None when the
    run uses no PRM)."""
    from mstar_jax import sharding
    from mstar_jax.conversion import load_any
    from mstar_jax.policy import Policy, load_processor
    from mstar_jax.prm.score import load_prm, same_tokenizer
    from mstar_jax.prm.train import train_prm
    from mstar_jax.sampler import sampler_for

    if not (uses_prm(cfg) or (cfg.prm.enabled and cfg.prm.verify.enabled)):
        return None
    processor = prep.policy.processor
    if cfg.prm.path:
        prm = load_prm(cfg.prm.path, mesh=prep.policy.mesh, aggregation=cfg.prm.aggregation,
                       batch_rows=cfg.prm.score_batch, max_length=_max_length(cfg))
        diff = same_tokenizer(prm.tokenizer, processor.tokenizer)
        if diff and cfg.prm.require_same_tokenizer:
            raise ConfigError(f"prm.path {cfg.prm.path}: the PRM's tokenizer does not match the policy's ({diff}). "
                              "Its backbone was trained for another model; set prm.require_same_tokenizer=False to "
                              "score with the PRM's own tokenizer (as the paper did across backbones)")
        say(f"PRM: loaded {cfg.prm.path} (steps by {prm.step_rule!r}, {prm.aggregation} aggregation)")
        return _configure(prm, cfg)
    model_dir = wd.durable("prm/model")
    if (model_dir / "mstar_checkpoint.json").exists():
        prm = load_prm(model_dir, mesh=prep.policy.mesh, aggregation=cfg.prm.aggregation,
                       batch_rows=cfg.prm.score_batch, max_length=_max_length(cfg))
        say(f"PRM: reusing {wd.show('prm/model')}")
        return _configure(prm, cfg)
    mesh = sharding.mesh_from_config(cfg)
    if cfg.prm.label.policy:
        labeller = load_any(cfg.prm.label.policy, mesh, "float32")
        lp = Policy(labeller, load_processor(labeller.hf_files) or processor)
        sampler = sampler_for(lp)
        sampler.param_dtype = cfg.sampling.dtype or None
        params, backbone = labeller.params, labeller
    else:
        sampler, params, backbone = prep.sampler, prep.warm.params, prep.warm
    records, summary = run_labelling(cfg, sampler, params, prep.splits["train"], wd.local / "prm", say)
    prm, metrics = train_prm(backbone, processor, records, cfg.prm.train, step_rule=cfg.prm.step_rule,
                             aggregation=cfg.prm.aggregation, heldout=float(cfg.prm.train.heldout),
                             max_length=_max_length(cfg), ckpt_dir=wd.durable("prm/ckpt"), seed=int(cfg.seed),
                             say=say)
    prm.meta["labels"] = {k: v for k, v in summary.items() if k != "balance"}
    prm.save(model_dir, overwrite=True)
    say(f"PRM trained: {metrics['updates']} updates on {metrics['train_records']} responses; held-out step MSE "
        f"{metrics['heldout_mse']:.4f} (a constant predictor: {metrics.get('heldout_mse_constant', float('nan')):.4f}),"
        f" correlation {metrics['heldout_corr']:.3f} over {metrics['heldout_steps']} steps")
    write_atomic(wd.local / "results" / "prm.json", json.dumps({"labels": summary, "train": metrics}, indent=1))
    return _configure(load_prm(model_dir, mesh=prep.policy.mesh, aggregation=cfg.prm.aggregation,
                               batch_rows=cfg.prm.score_batch, max_length=_max_length(cfg)), cfg)


def _configure(prm, cfg):
    prm.param_dtype = cfg.sampling.dtype or None
    return prm


def _max_length(cfg) -> int:
    return int(cfg.data.max_prompt_tokens + cfg.sampling.max_new_tokens)


def _verifier_title(name: str, result: dict) -> str:
    return f"PRM as a verifier ({name}, {result['questions']} questions, T={result['temperature']:g})"


def verify_stage(cfg, wd, sampler, params, queries, prm, say, name: str = "val") -> dict | None:
    """The PRM as a verifier on `queries` (paper figure 2a): curves over N, a table and a PNG (reused on resume)."""
    from mstar_jax.answers import answer_groups
    from mstar_jax.loop import prompts as P
    from mstar_jax.loop.rollouts import check_samples, sample_queries, scoring_items
    from mstar_jax.prm.verify import plot_curves, verifier_curves

    v = cfg.prm.verify
    if prm is None or not v.enabled or not queries:
        return None
    out = wd.local / "results" / f"prm_verifier_{name}.json"
    plot = wd.local / "plots" / f"prm_verifier_{name}.png"
    if out.exists():
        result = json.loads(out.read_text())
        if not plot.exists():  # plots are outputs of the run's end, redrawn from the stored curves
            plot_curves({int(n): c for n, c in result["curves"].items()}, plot, result["greedy"],
                        title=_verifier_title(name, result))
        return result
    ns = sorted(int(n) for n in v.ns)
    s = cfg.sampling
    samples = sample_queries(sampler, params, queries, P.cot_prompt, n=max(ns), temperature=float(v.temperature),
                             seed=int(cfg.seed) * 13 + 3, max_new_tokens=s.max_new_tokens,
                             batch_size=max(s.batch_size, max(ns)), top_p=s.top_p, top_k=s.top_k,
                             desc=f"PRM verifier samples ({name})")
    correct = check_samples(queries, samples)
    scores = prm.score(scoring_items(queries), samples)
    groups = [answer_groups([x.text for x in ss], q.item) for q, ss in zip(queries, samples)]
    greedy = sample_queries(sampler, params, queries, P.cot_prompt, n=1, temperature=0.0, seed=0,
                            max_new_tokens=s.max_new_tokens, batch_size=s.batch_size, desc=f"greedy ({name})")
    greedy_acc = 100.0 * float(np.mean([c[0] for c in check_samples(queries, greedy)]))
    curves = verifier_curves(correct, scores, groups, ns)
    result = {"split": name, "questions": len(queries), "temperature": float(v.temperature), "greedy": greedy_acc,
              "curves": {str(n): c for n, c in curves.items()}, "policy": "warm-up"}
    plot_curves(curves, plot, greedy_acc, title=_verifier_title(name, result))
    write_atomic(out, json.dumps(result, indent=1))
    top = curves[max(ns)]
    say(f"PRM verifier ({name}, N={max(ns)}): Best-of-N {top['best_of_n']:.1f}%, weighted voting "
        f"{top['weighted_vote']:.1f}%, majority voting {top['majority_vote']:.1f}%, Pass@N {top['pass@n']:.1f}%, "
        f"greedy {greedy_acc:.1f}%")
    return result
