"""train.remat: jax.checkpoint around every layer leaves the step's numbers unchanged and wraps each layer once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mstar_jax
from mstar_jax import remat, training
from mstar_jax.errors import ConfigError
from mstar_jax.models.llava.model import vision_layers_used
from mstar_jax.models.llava.tiny import TinySpec, make_tiny_llava
from mstar_jax.optim import OptimConfig
from mstar_jax.sft_batch import sft_batch
from tests.train_mesh_worker import LENGTH, OPTIM, sft_examples


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """The smallest LLaVA with three decoder layers (so that layers are really chained)."""
    path = tmp_path_factory.mktemp("remat_tiny")
    make_tiny_llava(path, TinySpec(layers=3))
    return mstar_jax.load(path)


def _eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(sub, "eqns"):
                    yield from _eqns(sub)


def _batch(policy, n=8):
    q, r, im = sft_examples(n, 5)
    return sft_batch(policy.processor, q, r, im, length=LENGTH)


@pytest.mark.parametrize("policy_name", ["dots", "full"])
def test_a_remat_step_equals_the_plain_step(policy, policy_name):
    optim = OptimConfig(**OPTIM)
    out = {}
    for name in ("none", policy_name):
        step = training.make_train_step(policy.graphdef, optim, policy.mesh, micro_batch=4,
                                        objective=remat.with_remat(training.SFT, name))
        state = training.create_train_state(jax.tree.map(jnp.copy, policy.params), step.tx)
        state, metrics = step(state, _batch(policy))
        out[name] = metrics, {p: np.asarray(a) for p, a in state.params.items()}
    (m0, p0), (m1, p1) = out["none"], out[policy_name]
    assert abs(m0["loss"] - m1["loss"]) <= 1e-6 * m0["loss"]
    assert abs(m0["grad_norm"] - m1["grad_norm"]) <= 1e-5 * m0["grad_norm"]
    for p in p0:
        np.testing.assert_allclose(p1[p], p0[p], rtol=1e-5, atol=1e-7, err_msg=str(p))


def test_every_decoder_and_vision_layer_is_checkpointed_once(policy):
    batch = {k: jnp.asarray(v) for k, v in _batch(policy, 2).items() if k in training.BATCH_KEYS}

    def checkpoints(name):
        objective = remat.with_remat(training.SFT, name)
        loss = lambda p: objective.loss_sum(policy.graphdef, p, batch, 64, 1)  # noqa: E731
        jaxpr = jax.make_jaxpr(jax.grad(loss))(policy.params).jaxpr
        # jax.checkpoint's primitive (remat2 in jax 0.10; checkpoint in some releases), at any depth.
        return sum(1 for eqn in _eqns(jaxpr) if eqn.primitive.name in ("remat2", "checkpoint"))

    cfg = policy.config
    assert checkpoints("none") == 0
    assert checkpoints("full") == cfg.text.num_layers + vision_layers_used(cfg)


def test_unknown_policy_and_other_objectives_are_refused():
    with pytest.raises(ConfigError, match="'everything' is not one of none, dots, full"):
        remat.with_remat(training.SFT, "everything")
    other = training.Objective("prm", training.SFT.loss_sum, training.SFT.keys)
    assert remat.with_remat(other, "none") is other
    with pytest.raises(ConfigError, match="SFT objective, not 'prm'"):
        remat.with_remat(other, "full")
    assert remat.with_remat(training.SFT, "full") is remat.with_remat(training.SFT, "full")  # one compile


def test_the_loop_trainer_takes_train_remat(policy):
    from ml_collections import ConfigDict

    from mstar_jax.loop.sft import Trainer

    cfg = ConfigDict({"global_batch": 4, "micro_batch": 4, "lr": 1e-3, "compute_dtype": "float32",
                      "remat": "dots"})
    trainer = Trainer(policy, cfg, total_steps=2, max_length=LENGTH)
    assert trainer.step_fn(2).objective is remat.with_remat(training.SFT, "dots")
    del cfg["remat"]  # sections without the key (the PRM's, a pre-training schedule) train without remat
    assert Trainer(policy, cfg, total_steps=2, max_length=LENGTH).step_fn(2).objective is training.SFT
