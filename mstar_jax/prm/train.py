"""Training the PRM on Monte Carlo step labels: the policy's TrainState, optimizer, mesh and Orbax checkpoints,
with the MSE objective of `mstar_jax.prm.model` (paper appendix D: vision tower frozen, head at the mean
embedding).

Records are split into train / held-out by question (a stable hash of the query id), so no question's steps
appear on both sides. Training checkpoints every `checkpoint_every` updates into `ckpt_dir`; a rerun restores
the latest and skips the batches it has seen (the batch order is a function of the seed), so a killed run ends
with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from mstar_jax.errors import DataError
from mstar_jax.io import load_image
from mstar_jax.prm import model as M
from mstar_jax.prm.encode import encode


def split_heldout(records: Sequence[dict], fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) records, split by question id."""
    if not 0 <= fraction < 1:
        raise DataError(f"prm.train.heldout must be in [0, 1), got {fraction}")

    def side(qid: str) -> float:
        h = hashlib.sha256(f"{seed}:{qid}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2 ** 64

    train = [r for r in records if side(r["query_id"]) >= fraction]
    held = [r for r in records if side(r["query_id"]) < fraction]
    return train, held


def record_row(processor, rec: dict, max_length: int | None, where: str = "", inputs=None) -> dict:
    """Encode one label record (prompt, image, response, step spans and labels)."""
    image = load_image(rec["images"][0]) if rec.get("images") else None
    spans = [tuple(st["span"]) for st in rec["steps"]]
    labels = [float(st["label"]) for st in rec["steps"]]
    return encode(processor, rec["prompt"], image, rec["response"], spans, labels, max_length,
                  where or f"query {rec.get('query_id')!r} response {rec.get('response_index')}", inputs)


class PRMExamples:
    """Encodes label records for the Trainer (drops the scoring-only fields)."""

    def __init__(self, processor, max_length: int | None, inputs=None):
        self.processor, self.max_length, self.inputs = processor, max_length, inputs

    def __call__(self, rec: dict) -> dict:
        row = record_row(self.processor, rec, self.max_length, inputs=self.inputs)
        return {k: v for k, v in row.items() if k not in ("ends", "num_steps")}


def step_metrics(prm, records: Sequence[dict]) -> dict:
    """Step-level MSE, Pearson correlation and sign agreement of PRM scores against the stored labels."""
    if not records:
        return {"steps": 0, "mse": float("nan"), "corr": float("nan")}
    prompts = [r["prompt"] for r in records]
    images = [load_image(r["images"][0]) if r.get("images") else None for r in records]
    scores = prm.score_rows(prompts, images, [r["response"] for r in records])
    pred, gold = [], []
    for rec, s in zip(records, scores):
        spans = [tuple(st["span"]) for st in rec["steps"]]
        from mstar_jax.prm.steps import split_steps

        if [tuple(x) for x in split_steps(rec["response"], prm.step_rule)] != spans:
            raise DataError(f"query {rec['query_id']!r}: its stored steps were split by another rule than the "
                            f"PRM's ({prm.step_rule!r})")
        pred += list(s)
        gold += [float(st["label"]) for st in rec["steps"][:len(s)]]
    p, g = np.asarray(pred, np.float64), np.asarray(gold, np.float64)
    corr = float(np.corrcoef(p, g)[0, 1]) if p.size > 1 and p.std() > 0 and g.std() > 0 else float("nan")
    return {"steps": int(p.size), "mse": float(np.mean((p - g) ** 2)), "corr": corr,
            "mse_constant": float(np.mean((g - g.mean()) ** 2))}


def train_prm(backbone, processor, records: Sequence[dict], train_cfg, *, step_rule: str, aggregation: str,
              heldout: float, max_length: int | None, ckpt_dir, seed: int = 0, say=print):
    """Fit a PRM from a backbone (a LoadedModel, e.g. the labelling policy) on label records; returns
    (ProcessRewardModel, metrics)."""
    from mstar_jax.loop.run import IterationCheckpoints
    from mstar_jax.loop.sft import Trainer
    from mstar_jax.policy import Policy
    from mstar_jax.prm.score import ProcessRewardModel

    train, held = split_heldout(records, heldout, seed)
    if not train:
        raise DataError(f"no PRM training records left after holding out {heldout:.0%} of {len(records)}")
    policy = Policy(backbone, processor)
    params = M.with_head(backbone.params, M.init_head(backbone.graphdef, backbone.params, backbone.mesh))
    trainer = Trainer(policy, train_cfg, total_steps=1, max_length=max_length or 10 ** 9, seed=seed,
                      objective=M.PRM_MSE, encode=PRMExamples(processor, max_length, backbone.family.inputs))
    epochs = float(train_cfg.epochs)
    steps = trainer.num_steps(len(train), epochs)
    trainer.total_steps = steps
    state = trainer.fresh_state(params, steps, copy=True)
    ckpts = IterationCheckpoints(ckpt_dir, max_to_keep=1)
    restored = ckpts.restore(state)
    start, loss_sum = 0, 0.0
    if restored is not None:
        state, meta = restored
        start, loss_sum = int(meta.get("steps_done", 0)), float(meta.get("loss_sum", 0.0))
        say(f"PRM training: resuming after {start} of {steps} updates")
    every = max(1, int(train_cfg.checkpoint_every))
    # The loss sum travels in the checkpoint, so a resumed run reports the mean over all its updates.
    running = {"loss_sum": loss_sum}

    def on_step(st, done, metrics):
        running["loss_sum"] += metrics["loss"]
        if done % every == 0 and done < steps:
            ckpts.save_step(done, st, {"steps_done": done, "loss_sum": running["loss_sum"]})

    state, m = trainer.fit(state, train, epochs, seed=seed + 11, desc="PRM training", total_steps=steps,
                           start_step=start, on_step=on_step)
    ckpts.save_step(steps, state, {"steps_done": steps, "loss_sum": running["loss_sum"]})
    ckpts.close()
    m["loss"] = running["loss_sum"] / max(1, steps)
    head = {p: state.params[p] for p in M.HEAD_PATHS}
    trained = type(backbone)(backbone.cfg, backbone.graphdef, M.backbone(state.params), backbone.extras,
                             backbone.layout, backbone.hf_files, backbone.mesh)
    prm = ProcessRewardModel(trained, head, processor, step_rule=step_rule, aggregation=aggregation,
                             max_length=max_length)
    metrics = {"train_records": len(train), "heldout_records": len(held), "updates": steps,
               "train_loss": m["loss"], **{f"heldout_{k}": v for k, v in step_metrics(prm, held).items()}}
    prm.meta["metrics"] = metrics
    return prm, metrics
