"""The process reward model: the policy's backbone (vision tower + projector + LM) and a scalar linear head.

Paper appendix D: the head reads the final (normed) hidden state of every token; its weight starts as the mean
of the token-embedding rows and its bias at 0. Training regresses every response token onto the Monte Carlo
label of the step it belongs to (MSE); a step's score is the head's output at the step's end token.

The PRM's parameters are the backbone's flat {path: array} dict plus two head entries, so the TrainState,
optimizer, freezing, mesh and Orbax checkpoints of the policy's SFT step serve it unchanged
(`mstar_jax.training.Objective`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mstar_jax import sharding as shd
from mstar_jax.models.base import merge
from mstar_jax.training import Objective

HEAD_W = ("reward_head", "kernel")  # [hidden] float32
HEAD_B = ("reward_head", "bias")  # [] float32
HEAD_PATHS = (HEAD_W, HEAD_B)
PRM_KEYS = ("input_ids", "attention_mask", "loss_mask", "targets")  # + the family's image keys (TrainStep)


def is_head(path: tuple) -> bool:
    """True for the reward head's parameters."""
    return path in HEAD_PATHS


def backbone(params: dict) -> dict:
    """The backbone's parameters of a PRM's flat params."""
    return {p: a for p, a in params.items() if not is_head(p)}


def init_head(graphdef, params: dict, mesh=None) -> dict:
    """{HEAD_W: mean of the token-embedding rows (float32), HEAD_B: 0}, replicated over the mesh."""
    table = merge(graphdef, backbone(params)).token_embeddings()
    w = jnp.mean(table.astype(jnp.float32), axis=0)
    b = jnp.zeros((), jnp.float32)
    if mesh is not None:
        w = jax.device_put(w, shd.named_sharding(mesh, (None,), w.shape))
        b = jax.device_put(b, shd.named_sharding(mesh, (), ()))
    return {HEAD_W: w, HEAD_B: b}


def with_head(params: dict, head: dict) -> dict:
    """Backbone params plus a head: the PRM's flat params."""
    return {**backbone(params), **head}


def token_scores(graphdef, params: dict, input_ids, attention_mask, images=None):
    """Head outputs [B, T] (float32) at every position of prompt + response rows (`images`: the model's argument,
    e.g. with an "index" so that n responses to one image run the vision tower once)."""
    model = merge(graphdef, backbone(params))
    h, _ = model(input_ids, images=images, kv_valid=attention_mask, hidden_only=True)
    w = params[HEAD_W].astype(jnp.float32)
    return jnp.einsum("btd,d->bt", h.astype(jnp.float32), w) + params[HEAD_B].astype(jnp.float32)


def _prm_loss_sum(graphdef, params, micro, num_targets, groups):
    """Sum over scored tokens of (score - label)^2 (num_targets / groups: unused, the head is one dot)."""
    del num_targets, groups
    model = merge(graphdef, backbone(params))
    scores = token_scores(graphdef, params, micro["input_ids"], micro["attention_mask"], model.image_inputs(micro))
    mask = micro["loss_mask"].astype(jnp.float32)
    return jnp.sum(mask * (scores - micro["targets"].astype(jnp.float32)) ** 2)


PRM_MSE = Objective("prm_mse", _prm_loss_sum, PRM_KEYS, shifted=False)


def head_to_numpy(params: dict) -> dict[str, np.ndarray]:
    """The head as torch `nn.Linear(hidden, 1)` tensors: {"weight": [1, hidden], "bias": [1]} float32."""
    return {"weight": np.asarray(jax.device_get(params[HEAD_W]), np.float32).reshape(1, -1),
            "bias": np.asarray(jax.device_get(params[HEAD_B]), np.float32).reshape(1)}


def head_from_numpy(tensors: dict[str, np.ndarray], hidden: int, mesh=None) -> dict:
    """Inverse of `head_to_numpy` (shapes checked against the backbone's hidden size)."""
    from mstar_jax.errors import CheckpointError

    w, b = np.asarray(tensors.get("weight")), np.asarray(tensors.get("bias"))
    if w.size != hidden or b.size != 1:
        raise CheckpointError(f"reward head of shapes weight {w.shape} / bias {b.shape} does not fit a backbone "
                              f"of hidden size {hidden} (expected [1, {hidden}] and [1])")
    head = {HEAD_W: jnp.asarray(w.reshape(hidden), jnp.float32), HEAD_B: jnp.asarray(b.reshape(()), jnp.float32)}
    if mesh is not None:
        head = {p: jax.device_put(a, shd.named_sharding(mesh, (None,) * a.ndim, a.shape)) for p, a in head.items()}
    return head
