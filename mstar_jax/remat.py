"""Rematerialisation (`train.remat`): `jax.checkpoint` around every layer of the model, with a named policy.

    none  keep every activation for the backward pass (fastest, most memory)
    dots  keep each layer's matmul outputs, recompute the elementwise work (norms, activations, softmax)
    full  keep only each layer's input; the backward pass runs the layer's forward again

A checkpoint around the whole loss would save nothing at the peak (the backward pass recomputes every layer
before it starts), so the checkpoint goes around each layer: each item of every `nnx.List` attribute called
`layers` (the decoder's and the vision tower's blocks), found by walking the merged model, so any model family
that keeps its blocks in `layers` gets remat without code of its own.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from mstar_jax.errors import ConfigError

POLICIES: dict[str, Callable | None] = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def check_policy(name: str) -> str:
    """The name, if it is a known remat policy; else a ConfigError listing them."""
    if name not in POLICIES:
        raise ConfigError(f"train.remat {name!r} is not one of {', '.join(POLICIES)}")
    return name


class _Checkpointed(nnx.Module):
    """A layer whose call runs under `jax.checkpoint` (array arguments traced, the rest static)."""

    def __init__(self, layer: nnx.Module, policy: Callable):
        self.layer, self.policy = layer, policy

    def __call__(self, *args):
        graphdef, state = nnx.split(self.layer)
        leaves, treedef = jax.tree.flatten(args)
        dynamic = [i for i, x in enumerate(leaves) if isinstance(x, (jax.Array, np.ndarray))]

        def run(state, arrays):
            full = list(leaves)
            for i, a in zip(dynamic, arrays):
                full[i] = a
            return nnx.merge(graphdef, state)(*jax.tree.unflatten(treedef, full))

        return jax.checkpoint(run, policy=self.policy)(state, [leaves[i] for i in dynamic])


def checkpoint_layers(model: nnx.Module, policy: str) -> nnx.Module:
    """`model` with each block of its `layers` lists under `jax.checkpoint(policy)` (in place; for a model
    merged inside the traced loss, never one that is split again)."""
    fn = POLICIES[check_policy(policy)]
    if fn is None:
        return model
    lists = [node for path, node in nnx.iter_graph(model)
             if isinstance(node, nnx.List) and path and path[-1] == "layers"]
    for layers in lists:
        for i in range(len(layers)):
            if not isinstance(layers[i], _Checkpointed):
                layers[i] = _Checkpointed(layers[i], fn)
    return model


@functools.lru_cache(maxsize=None)
def with_remat(objective: Any, policy: str) -> Any:
    """The train-step objective with remat `policy` (the same object for the same arguments, so jitted steps
    are shared); "none" returns `objective` itself. Only the policy's SFT loss takes remat so far."""
    from mstar_jax import training

    if check_policy(policy) == "none":
        return objective
    if objective is not training.SFT:
        raise ConfigError(f"train.remat={policy!r} applies to the SFT objective, not {objective.name!r}")

    def loss_sum(graphdef, params, micro, num_targets, groups):
        model = checkpoint_layers(training.merge(graphdef, params), policy)
        return training.response_loss_sum(model, micro, num_targets, groups)

    return training.Objective(f"{objective.name}+remat:{policy}", loss_sum, objective.keys, objective.shifted)
