"""Model plumbing every family shares: the abstract model (shapes, logical axes), merge, shardings, casts."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mstar_jax import sharding as shd


def abstract_model(model_class, cfg, dtype: Any = jnp.float32):
    """(graphdef, {path: ShapeDtypeStruct}, {path: logical axes}) of `model_class(cfg)` without allocating weights."""
    model = nnx.eval_shape(lambda: model_class(cfg, dtype=dtype))
    graphdef, state = nnx.split(model)
    shapes, axes = {}, {}
    for path, var in nnx.to_flat_state(state):
        shapes[path] = var.get_value()
        axes[path] = var.get_metadata().get("axes") or (None,) * len(var.get_value().shape)
    return graphdef, shapes, axes


def merge(graphdef, params: dict[tuple, Any]):
    """An NNX module from a graphdef and flat params {path: array} (works inside jit)."""
    return nnx.merge(graphdef, nnx.from_flat_state(list(params.items())))


def param_shardings(shapes: dict[tuple, Any], axes: dict[tuple, tuple], mesh) -> dict[tuple, Any]:
    """NamedSharding per parameter from its logical axes."""
    return {p: shd.named_sharding(mesh, axes[p], shapes[p].shape) for p in shapes}


def cast_params(params: dict[tuple, jax.Array], dtype: str | Any) -> dict[tuple, jax.Array]:
    """Cast every parameter to `dtype` (keeps shardings)."""
    dt = jnp.dtype(dtype)
    return {p: (a.astype(dt) if a.dtype != dt else a) for p, a in params.items()}
