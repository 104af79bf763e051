"""The named presets give a model skeleton and a full sharding plan without any weights (README: plan sharding
and memory before downloading a checkpoint)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh

from mstar_jax import sharding as shd
from mstar_jax.conversion import model_skeleton
from mstar_jax.models.llava.config import PRESETS, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_plans_an_fsdp_sharding_without_weights(name):
    mesh = AbstractMesh((1, 8, 1), ("data", "fsdp", "tensor"))  # 8 devices that need not exist
    _, shapes, axes = model_skeleton(preset(name), jnp.bfloat16)
    total = per_device = 0
    for path, s in shapes.items():
        assert not hasattr(s, "addressable_shards"), path  # shapes only: nothing allocated
        spec = shd.logical_to_spec(axes[path], s.shape, mesh)
        split = math.prod(mesh.shape[a] for d in spec if d is not None for a in ((d,) if isinstance(d, str) else d))
        total += math.prod(s.shape)
        per_device += math.prod(s.shape) // split
    assert total > 5e8  # real-checkpoint sizes, not a tiny model
    assert per_device <= total / 8 * 1.005  # all but norms and biases are split 8 ways


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(KeyError, match="llava-1.5-7b"):
        preset("llava-9")
