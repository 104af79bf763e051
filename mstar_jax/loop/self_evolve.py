"""Self-evolving iterations (paper 3.2): rest_em / iterative_rft / continuous on one code path, with resume.

Iteration i: take the i-th slice of the query set (interval = a fraction of it), sample K responses at the
current temperature, keep correct ones (de-duplicated, top-N by the scorer, at most M), fine-tune, measure the
dynamics on the validation set over the temperature grid, maybe adapt the temperature, and checkpoint
(params, optimizer state, step, RNG, iteration, temperature, metrics). The methods differ only in what the
fine-tuning starts from:

    rest_em        warm-up params, fresh optimizer and schedule every iteration
    iterative_rft  last params, fresh optimizer and schedule every iteration
    continuous     last params, the one optimizer state and LR schedule of the whole run

Every random choice is derived from (seed, iteration), so re-running an iteration after a crash reproduces it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from mstar_jax.errors import ConfigError, TrainingError
from mstar_jax.loop import prompts as P
from mstar_jax.loop.dynamics import DynamicsInput, dynamics_metrics
from mstar_jax.data.stream import start_state
from mstar_jax.loop.rollouts import Query, make_rollouts, reusable_rollouts, sample_queries, write_rollouts
from mstar_jax.loop.selection import select_responses
from mstar_jax.loop.temperature import choose_temperature, pooled_metric, temperature_grid

log = logging.getLogger(__name__)
METHODS = ("rest_em", "iterative_rft", "continuous")
INTERVALS = (0.0625, 0.125, 0.25, 0.5, 1.0)


def iterations_per_pass(interval: float) -> int:
    """How many iterations one pass over the queries takes (6.25 % -> 16)."""
    if not 0 < interval <= 1:
        raise ConfigError(f"train.interval must be in (0, 1], got {interval}")
    return max(1, round(1 / interval))


def iteration_slice(num_queries: int, interval: float, iteration: int, seed: int) -> np.ndarray:
    """Query indices of an iteration: a seeded permutation per pass, cut into disjoint, covering slices."""
    per_pass = iterations_per_pass(interval)
    pass_index, k = divmod(iteration, per_pass)
    perm = np.random.default_rng([seed, 7919, pass_index]).permutation(num_queries)
    bounds = np.linspace(0, num_queries, per_pass + 1).round().astype(int)
    return perm[bounds[k]:bounds[k + 1]]


def total_iterations(interval: float, passes: float) -> int:
    """Iterations in a run of `passes` passes over the query set (passes 0: the step budget decides, see
    `budget_iterations`)."""
    if passes <= 0:
        return 0
    return max(1, int(math.ceil(iterations_per_pass(interval) * passes)))


# A run sized by train.total_steps (train.passes = 0) stops once its schedule is spent, or after this many
# iterations should every one of them find nothing to train on.
MAX_BUDGET_ITERATIONS = 10_000


def continuous_schedule_steps(cfg, num_queries: int, trainer) -> int:
    """Length of the one LR schedule of a continuous run: `train.total_steps`, or an estimate that assumes
    half of the K samples are kept (at most M per query, at most the re-ranker's top N) for every query of
    every iteration."""
    if cfg.train.total_steps:
        return int(cfg.train.total_steps)
    if cfg.train.passes <= 0:
        raise ConfigError("train.passes = 0 sizes the run by its step budget: set train.total_steps too")
    iters = total_iterations(cfg.train.interval, cfg.train.passes)
    per_query = min(cfg.train.max_per_query or cfg.train.num_samples, cfg.train.rerank_top or
                    cfg.train.num_samples, max(1, cfg.train.num_samples // 2))
    per_iter = num_queries / iterations_per_pass(cfg.train.interval) * per_query
    return iters * trainer.num_steps(max(1, int(per_iter)), cfg.train.epochs)


@dataclasses.dataclass
class LoopState:
    """What the loop carries between iterations besides the train state (saved as checkpoint metadata)."""

    iteration: int = 0
    temperature: float = 1.0
    records: list[dict] = dataclasses.field(default_factory=list)
    threshold: float | None = None  # selection=threshold: the alpha chosen on the validation set
    unlabeled_from: int | None = None  # the first iteration that mixed unlabeled prompts in
    data_state: dict | None = None  # {"iteration", "iterator"}: grain's state of that iteration's query stream

    def to_json(self) -> dict:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


def training_examples(queries: Sequence[Query], rollouts, cfg, threshold: float | None = None,
                      iteration: int = 0) -> list[tuple[Query, str, str]]:
    """(query, CoT prompt, response) pairs chosen from the rollouts of one iteration by `train.selection`."""
    by_id = {q.id: q for q in queries}
    t = cfg.train
    out = []
    for k, r in enumerate(rollouts):
        rng = np.random.default_rng([int(cfg.seed), 211, int(iteration), k, 0 if r.kind == "labeled" else 1])
        keep = select_responses(r.texts, r.correct, r.scores, int(t.rerank_top) or None, t.max_per_query,
                                mode=t.selection, threshold=threshold, rng=rng)
        q = by_id[r.query_id]
        out += [(q, P.cot_prompt(q.item), r.texts[i]) for i in keep]
    return out


def measure_dynamics(sampler, params, val: Sequence[Query], cfg, scorers: dict, iteration: int) -> list[dict]:
    """Greedy, Pass@K, Pass@K-Greedy, Reward-Pass@2 on the validation set at each grid temperature.

    `reward_pass@2` ranks by `dynamics.scorer`; `reward_pass@2/<name>` is the same metric for every scorer in
    `scorers` (the PRM next to the mean log-probability)."""
    from mstar_jax.loop.dynamics import reward_pass_at
    from mstar_jax.loop.rollouts import scoring_items
    from mstar_jax.loop.evaluate import greedy_responses
    from mstar_jax.loop.rollouts import check_samples

    d = cfg.dynamics
    common = dict(max_new_tokens=cfg.sampling.max_new_tokens, batch_size=cfg.sampling.batch_size,
                  top_p=cfg.sampling.top_p, top_k=cfg.sampling.top_k, progress=True)
    greedy_ok = np.array(greedy_responses(sampler, params, val, cfg, f"dynamics it{iteration} greedy")[1], bool)
    rows = []
    for t_index, t in enumerate(temperature_grid(d.grid_low, d.grid_high, d.grid_step)):
        samples = sample_queries(sampler, params, val, P.cot_prompt, n=d.num_samples, temperature=t,
                                 seed=_seed(cfg.seed, 31, iteration, t_index), desc=f"dynamics it{iteration} T={t:g}",
                                 **common)
        correct = np.array(check_samples(val, samples), bool)
        items = scoring_items(val)
        scores = {name: np.array(sc.score(items, samples), float) for name, sc in scorers.items()}
        m = dynamics_metrics(DynamicsInput(greedy_ok, correct, scores[cfg.dynamics.scorer]))
        extra = {f"reward_pass@2/{name}": reward_pass_at(correct, sc) for name, sc in scores.items()}
        rows.append({"stage": "dynamics", "iteration": iteration, "temperature": t, "scorer": cfg.dynamics.scorer,
                     **m, **extra})
    return rows


def _in_choice_window(iteration: int, every: int, window: int) -> bool:
    """Whether the adaptive choice needs this iteration's validation evaluation (one of the last `window`
    iterations before a choice, the choice's own included)."""
    return every > 0 and (iteration % every == 0 or iteration % every > every - window)


def _seed(*parts: int) -> int:
    return int(np.random.default_rng([int(p) for p in parts]).integers(0, 2**31 - 1))


class SelfEvolvingRun:
    """Drives the iterations of one method from a warm-up checkpoint, resuming from the workdir."""

    def __init__(self, cfg, workdir: Path, policy, trainer, warmup_params, queries: Sequence[Query],
                 val: Sequence[Query], scorers: dict, metrics_log, ckpt_manager,
                 unlabeled: Sequence[Query] = ()):
        if cfg.train.method not in METHODS:
            raise ConfigError(f"train.method {cfg.train.method!r} is not one of {', '.join(METHODS)}")
        self.cfg, self.workdir, self.policy, self.trainer = cfg, Path(workdir), policy, trainer
        # queries stay a (lazy) source: an iteration reads only its slice.
        self.warmup_params, self.queries, self.val = warmup_params, queries, list(val)
        self.unlabeled = list(unlabeled) if cfg.unlabeled.enabled else []
        if cfg.unlabeled.enabled and not self.unlabeled:
            raise ConfigError("unlabeled.enabled but the run has no unlabeled queries (data.synth_sizes.unlabeled / "
                              "data.unlabeled)")
        self.scorers, self.log, self.ckpt = dict(scorers), metrics_log, ckpt_manager
        # Selection reads the scores of `train.scorer`; `all` and `random_k` need none.
        self.scorer = self.scorers[cfg.train.scorer] if cfg.train.selection in ("top_k", "threshold") else None
        self.prm = self.scorers.get("prm")
        from mstar_jax.sampler import sampler_for

        self.sampler = sampler_for(policy)
        self.num_iterations = total_iterations(cfg.train.interval, cfg.train.passes)  # 0: by the step budget

    def describe_length(self) -> str:
        """How long the run is, for the stage line."""
        if self.num_iterations:
            return f"{self.num_iterations} iterations"
        return f"iterations until the {self.trainer.total_steps}-step schedule is spent"

    def done(self, loop: LoopState, state) -> bool:
        """Whether the run is complete (every planned iteration, or the step budget spent)."""
        if self.num_iterations:
            return loop.iteration >= self.num_iterations
        return int(state.step) >= self.trainer.total_steps or loop.iteration >= MAX_BUDGET_ITERATIONS

    def progress(self, loop: LoopState, state) -> float:
        """The share of the run done before the current iteration (by iterations, or by steps)."""
        if self.num_iterations:
            return loop.iteration / self.num_iterations
        return int(state.step) / max(1, self.trainer.total_steps)

    def rollouts_path(self, iteration: int) -> Path:
        """Where an iteration's rollouts live (reused on resume)."""
        return self.workdir / "rollouts" / f"iter_{iteration:04d}.jsonl"

    def iteration_queries(self, iteration: int) -> tuple[np.ndarray, list[Query]]:
        """The iteration's query indices and queries."""
        idx = iteration_slice(len(self.queries), self.cfg.train.interval, iteration, self.cfg.seed)
        return idx, [self.queries[i] for i in idx]

    def rollouts(self, params, iteration: int, temperature: float, data_state: dict | None = None):
        """Generate (or reuse) the iteration's rollouts: this process's chunks through the grain stream, gathered."""
        from mstar_jax.data.stream import sample_stream

        path = self.rollouts_path(iteration)
        idx, queries = self.iteration_queries(iteration)
        reused = reusable_rollouts(path, queries, temperature)
        if reused is not None:
            log.info("iteration %d: reusing %s", iteration, path)
            return reused
        s = self.cfg.sampling
        samples = sample_stream(self.sampler, params, self.queries, idx, P.cot_prompt, n=self.cfg.train.num_samples,
                                temperature=temperature, seed=_seed(self.cfg.seed, 17, iteration),
                                max_new_tokens=s.max_new_tokens, batch_size=s.batch_size, top_p=s.top_p,
                                top_k=s.top_k, desc=f"iteration {iteration} rollouts T={temperature:g}",
                                progress_path=path, kill_point_name="rollouts", data_state=data_state)
        rollouts = make_rollouts(queries, samples, P.cot_prompt, self.scorer, temperature)
        write_rollouts(path, rollouts)
        for p in path.parent.glob(f"{path.stem}.p*.progress.jsonl"):
            p.unlink()  # the rollouts file holds it all now
        return rollouts

    def unlabeled_rollouts(self, params, loop: LoopState, state):
        """The iteration's unlabeled rollouts once the run has reached `unlabeled.start` (else [])."""
        from mstar_jax.loop.unlabeled import unlabeled_rollouts

        if not self.unlabeled or self.progress(loop, state) < float(self.cfg.unlabeled.start) - 1e-9:
            return []
        if loop.unlabeled_from is None:
            loop.unlabeled_from = loop.iteration
        i = loop.iteration
        idx = iteration_slice(len(self.unlabeled), self.cfg.train.interval, i - loop.unlabeled_from,
                              self.cfg.seed + 1)
        path = self.workdir / "rollouts" / f"iter_{i:04d}_unlabeled.jsonl"
        return unlabeled_rollouts(self.sampler, params, [self.unlabeled[k] for k in idx], self.cfg, self.scorer,
                                  self.prm, path, loop.temperature, _seed(self.cfg.seed, 19, i))

    def choose_threshold(self, params, loop: LoopState) -> float | None:
        """selection=threshold: `train.threshold`, or the alpha chosen on validation samples of the starting
        policy (paper 3.3: enumerated in 0.1 steps), logged once and kept in the loop state."""
        from mstar_jax.loop.rollouts import check_samples, scoring_items
        from mstar_jax.loop.selection import choose_threshold, threshold_grid

        cfg = self.cfg
        if cfg.train.selection != "threshold":
            return None
        if cfg.train.threshold >= 0:
            return float(cfg.train.threshold)
        if loop.threshold is not None:
            return loop.threshold
        if not self.val:
            raise ConfigError("train.selection=threshold with train.threshold < 0 chooses alpha on the validation "
                              "set, but the run has none: set train.threshold or give data.val")
        s = cfg.sampling
        samples = sample_queries(self.sampler, params, self.val, P.cot_prompt, n=cfg.dynamics.num_samples,
                                 temperature=loop.temperature, seed=_seed(cfg.seed, 37), max_new_tokens=s.max_new_tokens,
                                 batch_size=s.batch_size, top_p=s.top_p, top_k=s.top_k, desc="threshold (validation)")
        correct = np.array(check_samples(self.val, samples), bool)
        scores = np.array(self.scorer.score(scoring_items(self.val), samples), float)
        alpha, table = choose_threshold(correct, scores, threshold_grid(float(cfg.train.threshold_step)))
        reason = (f"selection threshold alpha={alpha:g}: best balanced accuracy of 'score >= alpha' against "
                  f"correctness on {correct.size} validation samples ({cfg.train.scorer}); grid "
                  + ", ".join(f"{a:g}:{v:.3f}" for a, v in table.items()))
        print(reason, flush=True)
        self.log.log({"stage": "threshold", "iteration": loop.iteration, "threshold": alpha, "reason": reason},
                     step=0)
        loop.records.append(self.log.records[-1])
        loop.threshold = alpha
        return alpha

    def run(self, state, loop: LoopState):
        """Run the remaining iterations; returns the final train state and loop state."""
        cfg = self.cfg
        adaptive = bool(cfg.adaptive.enabled)
        every, window = int(cfg.adaptive.every), int(cfg.adaptive.window)
        threshold = self.choose_threshold(state.params, loop)
        while not self.done(loop, state):
            i = loop.iteration
            data_state = (loop.data_state or {}).get("iterator") if (loop.data_state or {}).get("iteration") == i \
                else None
            rollouts = self.rollouts(state.params, i, loop.temperature, data_state)
            n_correct = sum(any(r.correct) for r in rollouts)
            examples = training_examples(self.iteration_queries(i)[1], rollouts, cfg, threshold, i)
            record = {"stage": "iteration", "iteration": i, "method": cfg.train.method,
                      "selection": cfg.train.selection, "temperature": loop.temperature, "queries": len(rollouts),
                      "queries_with_correct": n_correct,
                      "samples_correct": float(np.mean([c for r in rollouts for c in r.correct] or [0.0])),
                      "examples_labeled": len(examples)}
            unlabeled = self.unlabeled_rollouts(state.params, loop, state)
            if unlabeled:
                from mstar_jax.loop.unlabeled import pseudo_label_metrics

                extra = training_examples(self.unlabeled, unlabeled, cfg, threshold, i)
                record.update(pseudo_label_metrics(unlabeled), examples_unlabeled=len(extra))
                examples = examples + extra
            record["examples"] = len(examples)
            # Continuous keeps the run-long schedule; the others restart a schedule sized to this iteration.
            schedule = None if cfg.train.method == "continuous" else self.trainer.num_steps(
                max(1, len(examples)), cfg.train.epochs)
            if cfg.train.method == "rest_em":
                state = self.trainer.fresh_state(self.warmup_params, schedule, copy=True)
            elif cfg.train.method == "iterative_rft":
                state = self.trainer.fresh_state(state.params, schedule)
            if examples:
                try:
                    state, train_metrics = self.trainer.fit(state, examples, epochs=cfg.train.epochs,
                                                            seed=_seed(cfg.seed, 23, i),
                                                            desc=f"iteration {i} training", total_steps=schedule)
                except TrainingError as err:
                    kept = (f"the checkpoint of the {i} completed iteration(s) in {self.ckpt.directory} is intact "
                            "and a rerun resumes from it" if i else
                            "no iteration was checkpointed yet; a rerun starts again from the warm-up checkpoint")
                    raise TrainingError(
                        f"iteration {i} ({cfg.train.method}, T={loop.temperature:g}) training: {err}. Nothing of "
                        f"this iteration was saved; {kept} (lower train.lr or inspect {self.rollouts_path(i)} "
                        "first)") from err
                record.update(train_metrics)
            else:
                print(f"iteration {i}: no correct response among the {len(rollouts)} queries' "
                      f"{cfg.train.num_samples} samples at T={loop.temperature:g}; nothing to train on, the policy "
                      "is unchanged (the iteration is still checkpointed)", flush=True)
            self.log.log(record, step=int(state.step))
            loop.records.append(self.log.records[-1])
            last = self.done(dataclasses.replace(loop, iteration=i + 1), state)
            need_dynamics = (cfg.dynamics.every and (i + 1) % cfg.dynamics.every == 0) or (
                adaptive and _in_choice_window(i + 1, every, window)) or last
            if need_dynamics and self.val:
                rows = measure_dynamics(self.sampler, state.params, self.val, cfg, self.scorers, i + 1)
                for row in rows:
                    self.log.log(row, step=int(state.step))
                    loop.records.append(self.log.records[-1])
                if adaptive:
                    choice = choose_temperature(i + 1, loop.temperature,
                                                pooled_metric(loop.records, i + 1, window), every=every,
                                                metric_name="reward_pass@2" + (f" (mean of the last {window} "
                                                                               "iterations)" if window > 1 else ""))
                    if (i + 1) % every == 0:
                        print(f"adaptive temperature: {choice.reason}", flush=True)
                        self.log.log({"stage": "temperature", "iteration": i + 1, "temperature": choice.temperature,
                                      "changed": choice.changed, "reason": choice.reason}, step=int(state.step))
                        loop.records.append(self.log.records[-1])
                    loop.temperature = choice.temperature
            loop.iteration = i + 1
            loop.data_state = {"iteration": i + 1, "iterator": start_state()}
            self.ckpt.save_iteration(state, loop)
            best = max((r["reward_pass@2"] for r in loop.records
                        if r.get("stage") == "dynamics" and r.get("iteration") == i + 1), default=None)
            print(f"iteration {i + 1}/{self.num_iterations or '?'}: {len(examples)} examples from {n_correct}/"
                  f"{len(rollouts)} solved queries, loss {record.get('loss', float('nan')):.4f}, "
                  f"next T={loop.temperature:g}" + (f", best val reward_pass@2 {best:.3f}" if best is not None else ""),
                  flush=True)
        return state, loop
