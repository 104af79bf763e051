"""The demo's base model: a tiny LLaVA made with transformers and pre-trained here on synthetic visual math.

Like the paper's base LMMs it answers directly and can explain a given answer: most pre-training examples pair
the direct prompt with "The answer is X."; configured fractions pair the CoT prompt with the generator's
rationale or with the direct answer, and the answer-hinted prompt of the warm-up with the rationale.
(Without hinted examples a tiny model has never seen a prompt that long and degenerates on it, where a real
instruction-tuned LMM follows the hint.) The result is saved in HF format and then enters the loop through the
same HF -> Flax conversion as a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from mstar_jax.config import section_seed
from mstar_jax.loop import prompts as P
from mstar_jax.loop.rollouts import Query
from mstar_jax.workdir import publish, share


def corpus(queries: Sequence[Query]) -> list[str]:
    """Text the tokenizer is trained on: every prompt form, rationale and answer of the pre-training data."""
    out = []
    for q in queries:
        out += [P.direct_prompt(q.item), P.hinted_prompt(q.item), q.item.get("rationale") or "",
                f"The answer is {q.item['answer']}."]
    return out


def pretrain_examples(queries: Sequence[Query], cot_fraction: float, seed: int, hint_fraction: float = 0.0,
                      cot_direct_fraction: float = 0.0) -> list[tuple[Query, str, str]]:
    """(query, prompt, response): direct answers, plus rationales after the CoT prompt for a `cot_fraction` of
    the queries and after the answer-hinted prompt for a `hint_fraction`, and the direct answer after the CoT
    prompt for a `cot_direct_fraction` (a base model that ignores the instruction to reason)."""
    rng = np.random.default_rng(seed)
    out = []
    for q in queries:
        answer = f"The answer is {q.item['answer']}."
        out.append((q, P.direct_prompt(q.item), answer))
        cot, hint = rng.random(2)
        cot_direct = rng.random() if cot_direct_fraction else 1.0  # the same draws as before the option existed
        rationale = q.item.get("rationale")
        if rationale and cot < cot_fraction:
            out.append((q, P.cot_prompt(q.item), rationale))
        elif cot_direct < cot_direct_fraction:
            out.append((q, P.cot_prompt(q.item), answer))
        if rationale and hint < hint_fraction:
            out.append((q, P.hinted_prompt(q.item), rationale))
    return out


def build_base_model(cfg, workdir: Path, pretrain_queries: Sequence[Query], log) -> Path:
    """Create, pre-train and save the tiny base model as an HF directory (skipped if already there)."""
    out = workdir / "base_hf"
    if (out / "config.json").exists():
        return out
    from mstar_jax import sharding
    from mstar_jax.conversion import export_hf, load_hf
    from mstar_jax.loop.sft import Trainer
    from mstar_jax.models.llava.tiny import TinySpec, make_tiny_llava
    from mstar_jax.policy import Policy, load_processor

    t, seed = cfg.model.tiny, section_seed(cfg, cfg.model.pretrain)  # initialisation and pre-training
    spec = TinySpec(vision=t.vision, text=t.text, image_size=t.image_size, patch_size=t.patch_size,
                    vision_hidden=t.vision_hidden, vision_layers=t.vision_layers, vision_heads=t.vision_heads,
                    hidden=t.hidden, intermediate=t.intermediate, layers=t.layers, heads=t.heads,
                    kv_heads=t.kv_heads, vocab_size=t.vocab_size, seed=seed)
    init_dir = workdir / "base_init_hf"
    if not (init_dir / "config.json").exists():
        make_tiny_llava(init_dir, spec, corpus=corpus(pretrain_queries))
        publish(init_dir, last="config.json")  # config.json marks the directory complete
    loaded = load_hf(init_dir, sharding.mesh_from_config(cfg), "float32")
    policy = Policy(loaded, load_processor(init_dir))
    p = cfg.model.pretrain
    train_cfg = _PretrainCfg(lr=p.lr, global_batch=p.batch_size, micro_batch=p.batch_size)
    examples = pretrain_examples(pretrain_queries, p.cot_fraction, seed, p.hint_fraction,
                                 p.cot_direct_fraction)
    epochs = p.steps * p.batch_size / max(1, len(examples))
    trainer = Trainer(policy, train_cfg, total_steps=p.steps, max_length=cfg.data.max_prompt_tokens)
    state = trainer.fresh_state(policy.params)
    state, metrics = trainer.fit(state, examples, epochs=epochs, seed=seed, desc="pre-training the base model")
    log(f"pre-trained the tiny base model: {metrics['train_steps']} steps, final mean loss {metrics['loss']:.3f}")
    loaded.params = state.params
    export_hf(loaded, out, overwrite=True)  # by process 0
    share(out, last="config.json")  # every process loads it next
    return out


class _PretrainCfg:
    """A `train` section for the pre-training schedule (cosine, short warm-up)."""

    def __init__(self, lr, global_batch, micro_batch):
        self.lr, self.global_batch, self.micro_batch = lr, global_batch, micro_batch
        self.schedule, self.warmup_ratio, self.weight_decay, self.max_grad_norm = "cosine", 0.05, 0.0, 1.0
        self.compute_dtype, self.freeze_vision = "float32", False
