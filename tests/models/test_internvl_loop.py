"""`mstar train --config smoke --config.model.path=...` on a tiny InternVL in the original release layout (the
paper's InternVL2-2B format): every stage runs, and the trained policy and PRM come back in that layout.

A random model never answers a hinted question, so the tiny model is first pre-trained on the smoke run's synthetic
pre-training queries as the demo's own base model is (loop.base_model), through the same SFT trainer."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mstar_jax
from tests.loop.cli_helpers import mstar


def _pretrained_release_checkpoint(root):
    """A tiny InternVL (Llama decoder) pre-trained on the smoke config's queries, exported in the release layout."""
    from mstar_jax import sharding
    from mstar_jax.config import load_config, section_seed
    from mstar_jax.conversion import export_hf, load_hf
    from mstar_jax.loop import data as loop_data
    from mstar_jax.loop.base_model import _PretrainCfg, corpus, pretrain_examples
    from mstar_jax.loop.sft import Trainer
    from mstar_jax.models.internvl.tiny import TinySpec, make_tiny_internvl
    from mstar_jax.policy import Policy, load_processor

    cfg = load_config("smoke")
    queries = loop_data.load_splits(cfg, root / "data_run", lambda *a: None)["pretrain"]
    seed = section_seed(cfg, cfg.model.pretrain)
    make_tiny_internvl(root / "init", TinySpec(text="llama", vocab_size=cfg.model.tiny.vocab_size, seed=seed,
                                               max_patches=2), corpus=corpus(queries))
    loaded = load_hf(root / "init", sharding.make_mesh(), "float32")
    policy = Policy(loaded, load_processor(root / "init"))
    p = cfg.model.pretrain
    examples = pretrain_examples(queries, p.cot_fraction, seed, p.hint_fraction, p.cot_direct_fraction)
    trainer = Trainer(policy, _PretrainCfg(lr=p.lr, global_batch=p.batch_size, micro_batch=p.batch_size),
                      total_steps=p.steps, max_length=cfg.data.max_prompt_tokens)
    state, metrics = trainer.fit(trainer.fresh_state(policy.params), examples,
                                 epochs=p.steps * p.batch_size / len(examples), seed=seed)
    assert metrics["train_steps"] == p.steps and np.isfinite(metrics["loss"])
    loaded.params = state.params
    export_hf(loaded, root / "base", layout="internvl_chat")
    return root / "base"


@pytest.mark.slow
def test_smoke_loop_on_a_release_layout_internvl(tmp_path):
    base = _pretrained_release_checkpoint(tmp_path)
    assert json.loads((base / "config.json").read_text())["model_type"] == "internvl_chat"
    workdir = tmp_path / "run"
    proc = mstar("train", "--config", "smoke", "--workdir", str(workdir), f"--config.model.path={base}",
                 timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("base eval", "warm-up", "PRM trained", "self-evolving", "final eval", "report"):
        assert stage in proc.stdout, f"no line for stage {stage!r}"
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {"iteration", "eval/base", "eval/warmup", "eval/final", "prm/train"} <= {r["stage"] for r in records}
    iters = [r for r in records if r["stage"] == "iteration" and r.get("train_steps")]
    assert iters and all(np.isfinite(r["loss"]) for r in iters)  # SFT steps ran on InternVL tile batches
    # The final policy is exported in the source's layout and loads back as the release format.
    export = workdir / "export"
    assert json.loads((export / "config.json").read_text())["model_type"] == "internvl_chat"
    policy = mstar_jax.load(export)
    assert policy.loaded.layout == "internvl_chat" and policy.config.llm_arch == "internlm2"
    # The PRM trained on the InternVL backbone; its export loads for scoring with a head moved off its start.
    from mstar_jax.prm import model as M

    assert next(r for r in records if r["stage"] == "prm/train")["updates"] >= 2
    prm = mstar_jax.load_prm(workdir / "prm" / "export")
    start = M.init_head(prm.loaded.graphdef, prm.loaded.params)
    assert not np.array_equal(np.asarray(prm.head[M.HEAD_W]), np.asarray(start[M.HEAD_W]))
