"""Fine-tuning on selected (query, prompt, response) examples with the jitted SFT step of `mstar_jax.training`."""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mstar_jax.io import load_images
from mstar_jax.optim import OptimConfig, make_optimizer
from mstar_jax.remat import with_remat
from mstar_jax.sft_batch import pad_examples, sft_example
from mstar_jax.training import SFT, Objective, TrainState, create_train_state, make_train_step


class Trainer:
    """Builds batches from examples and runs train steps; one TrainStep (and its compiled code) per schedule.

    The objective is the policy's SFT loss by default; the PRM trains through the same class with
    `objective=PRM_MSE` and its own example encoder (`encode(example) -> unpadded arrays`)."""

    def __init__(self, policy, train_cfg, *, total_steps: int, max_length: int, seed: int = 0,
                 objective: Objective = SFT, encode=None):
        self.policy, self.train_cfg, self.max_length, self.seed = policy, train_cfg, max_length, seed
        self.global_batch = int(train_cfg.global_batch)
        self.micro_batch = int(train_cfg.micro_batch or train_cfg.global_batch)
        self.total_steps = max(1, int(total_steps))
        self.objective, self.encode = objective, encode or self._sft_encode
        self._steps: dict[int, object] = {}

    @property
    def inputs(self):
        """The policy family's image glue for SFT batches."""
        return self.policy.loaded.family.inputs

    def _sft_encode(self, example) -> dict:
        q, prompt, response = example
        return sft_example(self.policy.processor, prompt, response, load_images(q.images, record=q.id)[0],
                           self.max_length, self.inputs)

    def optim(self, total_steps: int) -> OptimConfig:
        """The optimizer config for a schedule of `total_steps` updates."""
        return OptimConfig.from_config(self.train_cfg, total_steps)

    def step_fn(self, total_steps: int):
        """The (cached) jitted step for a schedule length."""
        if total_steps not in self._steps:
            self._steps[total_steps] = make_train_step(
                self.policy.graphdef, self.optim(total_steps), self.policy.mesh, micro_batch=self.micro_batch,
                compute_dtype=self.train_cfg.compute_dtype, image_keys=self.inputs.batch_keys,
                objective=with_remat(self.objective, getattr(self.train_cfg, "remat", "none")))
        return self._steps[total_steps]

    def fresh_state(self, params, total_steps: int | None = None, *, copy: bool = False) -> TrainState:
        """A new optimizer state and schedule position over `params` (an explicit reset).

        The step donates the state's buffers, so pass `copy=True` when `params` must survive training (the
        warm-up params that rest_em restarts from, or that several study variants share)."""
        if copy:
            params = jax.tree.map(jnp.copy, params)
        tx = make_optimizer(self.optim(total_steps or self.total_steps))
        return create_train_state(params, tx, seed=self.seed)

    def num_steps(self, num_examples: int, epochs: float) -> int:
        """Updates needed to see every example `epochs` times at the global batch size."""
        return max(1, math.ceil(num_examples * epochs / self.global_batch))

    def batches(self, examples: Sequence[tuple], epochs: float, seed: int) -> Iterator[dict]:
        """The padded global batches `fit` trains on: seeded shuffles of the examples, each encoded once.

        Every batch of one fit is padded to the same length (the longest example's, rounded up to 16): a new
        shape recompiles the step, which costs far more than the padding."""
        steps = self.num_steps(len(examples), epochs)
        rng = np.random.default_rng(seed)
        order = np.concatenate([rng.permutation(len(examples))
                                for _ in range(math.ceil(steps * self.global_batch / len(examples)))])
        used = sorted(set(order[:steps * self.global_batch].tolist()))
        encoded = {i: self.encode(examples[i]) for i in used}  # decoded and tokenised once, however many epochs
        length = -(-max(len(e["input_ids"]) for e in encoded.values()) // 16) * 16
        tok = self.policy.processor.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        for s in range(steps):
            idx = order[s * self.global_batch:(s + 1) * self.global_batch]
            yield pad_examples([encoded[i] for i in idx], int(pad), "right", length=length, inputs=self.inputs)

    def fit(self, state: TrainState, examples: Sequence[tuple], epochs: float, seed: int, desc: str = "training",
            total_steps: int | None = None, start_step: int = 0, on_step=None) -> tuple[TrainState, dict]:
        """Train on examples in shuffled global batches; returns state and mean metrics.

        `start_step` skips the batches a resumed run already trained on (the order is a function of `seed`);
        `on_step(state, steps_done, metrics)` runs after every update (e.g. a periodic checkpoint)."""
        from tqdm.auto import tqdm

        from mstar_jax.faults import kill_point

        steps = self.num_steps(len(examples), epochs)
        step_fn = self.step_fn(total_steps or self.total_steps)
        losses, tokens, metrics = [], 0, {}
        bar = tqdm(total=steps, initial=start_step, desc=desc, unit="step", leave=False)
        for k, batch in enumerate(self.batches(examples, epochs, seed)):
            if k < start_step:
                continue
            state, metrics = step_fn(state, batch)
            losses.append(metrics["loss"])
            tokens += int(batch["loss_mask"].sum())
            bar.update(1)
            kill_point("train_step", f"{desc}:{k + 1}")
            if on_step is not None:
                on_step(state, k + 1, metrics)
        bar.close()
        return state, {"loss": float(np.mean(losses)) if losses else float("nan"), "train_steps": steps,
                       "train_tokens": tokens, "lr": float(metrics.get("lr", float("nan")))}
