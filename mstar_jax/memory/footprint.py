"""One candidate's per-device bytes: abstract parameters, optimizer state and KV cache laid out by the mesh,
and the compiled train step's memory analysis. Runs in a process that has the mesh's devices (simulated CPU
devices: see `planner.worker_env`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mstar_jax import sharding as shd


@dataclasses.dataclass(frozen=True)
class Candidate:
    """What is planned: a preset on a (data, fsdp, tensor) mesh, its batch, remat policy and dtypes."""

    preset: str
    mesh: tuple[int, int, int]
    global_batch: int
    micro_batch: int
    seq_len: int
    response_len: int
    remat: str = "none"
    compute_dtype: str = "bfloat16"
    rollout_batch: int = 0
    sampling_dtype: str = "bfloat16"
    freeze_vision: bool = False

    @property
    def devices(self) -> int:
        """Devices the mesh spans."""
        return math.prod(self.mesh)

    def label(self) -> str:
        """`data=1,fsdp=8,tensor=1 remat=none micro=8`."""
        d, f, t = self.mesh
        return f"data={d},fsdp={f},tensor={t} remat={self.remat} micro-batch={self.micro_batch}"


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of abstract arrays with NamedShardings (the largest shard each)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def _abstract(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), sharding=sharding)


def _state(family, cfg, cand: Candidate):
    """(mesh, train step, abstract TrainState, abstract fp32 gradients), all laid out on the candidate's mesh."""
    from mstar_jax import training
    from mstar_jax.optim import OptimConfig
    from mstar_jax.remat import with_remat

    mesh = shd.make_mesh(*cand.mesh, devices=jax.devices()[:cand.devices])
    rep = NamedSharding(mesh, PartitionSpec())
    graphdef, shapes, axes = family.abstract(cfg)
    params = {p: _abstract(s.shape, s.dtype, shd.named_sharding(mesh, axes[p], s.shape)) for p, s in shapes.items()}
    optim = OptimConfig(lr=1e-6, total_steps=1000, freeze_vision_tower=cand.freeze_vision,
                        freeze_projector=cand.freeze_vision)
    step = training.make_train_step(graphdef, optim, mesh, micro_batch=cand.micro_batch,
                                    compute_dtype=cand.compute_dtype,
                                    objective=with_remat(training.SFT, cand.remat))
    opt_sh = training.opt_state_shardings(step.tx, params)
    opt_state = jax.tree.map(lambda a, s: _abstract(a.shape, a.dtype, s), jax.eval_shape(step.tx.init, params), opt_sh)
    rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    state = training.TrainState(params=params, opt_state=opt_state, step=_abstract((), np.int32, rep),
                                rng=_abstract(rng.shape, rng.dtype, rep))
    grads = {p: _abstract(a.shape, np.float32, a.sharding) for p, a in params.items() if not optim.is_frozen(p)}
    return mesh, step, state, grads


def static_bytes(family, cfg, cand: Candidate) -> int:
    """Per-device params + optimizer state + gradients: what the step holds whatever its activations."""
    _, _, state, grads = _state(family, cfg, cand)
    return shard_bytes(state.params) + shard_bytes(state.opt_state) + shard_bytes(grads)


@dataclasses.dataclass
class Compiled:
    """A candidate's train step compiled for abstract inputs, and what it was compiled for."""

    mesh: Any
    state: Any
    grads: dict
    batch: dict
    loss_mask: np.ndarray
    executable: Any


def compile_step(family, cfg, cand: Candidate) -> Compiled:
    """The candidate's jitted train step (TrainStep's own), lowered for its abstract state and batch and compiled."""
    from mstar_jax import training

    mesh, step, state, grads = _state(family, cfg, cand)

    # The batch as TrainStep.put_batch lays it out: [micro steps, micro, ...] over (data, fsdp); each row's
    # last `response_len` tokens are targets.
    steps = cand.global_batch // cand.micro_batch
    batch = {}
    for key, (shape, dtype) in family.batch(cfg, cand.global_batch, cand.seq_len).items():
        dtype = np.float32 if np.issubdtype(np.dtype(dtype), np.floating) else np.int32
        shape = (steps, cand.micro_batch, *shape[1:])
        spec = (None, "batch") + (None,) * (len(shape) - 2)
        batch[key] = _abstract(shape, dtype, shd.named_sharding(mesh, spec, shape))
    loss_mask = np.zeros((steps, cand.micro_batch, cand.seq_len), np.int32)
    loss_mask[..., cand.seq_len - cand.response_len:] = 1
    groups = step.loss_groups(cand.micro_batch)
    num_targets = training.num_targets_bound(loss_mask, step.targets_multiple, groups)

    with shd.use_mesh(mesh):
        executable = step._update_fn(state).lower(state, batch, num_targets, groups).compile()
    return Compiled(mesh, state, grads, batch, loss_mask, executable)


def measure(family, cfg, cand: Candidate) -> dict[str, Any]:
    """Per-device bytes of `cand`: params, optimizer state, gradients, batch, the compiled step's arguments /
    temporaries / peak, the rollout KV cache and the sampling copy of the weights."""
    c = compile_step(family, cfg, cand)
    mesh, params, opt_state, grads, batch = c.mesh, c.state.params, c.state.opt_state, c.grads, c.batch
    ma = c.executable.memory_analysis()
    peak = ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes

    rows = cand.rollout_batch or cand.global_batch
    cache, cache_axes = family.cache(cfg, rows, cand.seq_len, np.dtype(cand.sampling_dtype))
    cache = jax.tree.map(lambda a: _abstract(a.shape, a.dtype, shd.named_sharding(mesh, cache_axes(a), a.shape)),
                         cache)
    sampling_copy = 0 if np.dtype(cand.sampling_dtype) == np.float32 else shard_bytes(
        {p: _abstract(a.shape, cand.sampling_dtype, a.sharding) for p, a in params.items()})
    out = {"params": shard_bytes(params), "opt_state": shard_bytes(opt_state), "gradients": shard_bytes(grads),
           "batch": shard_bytes(batch), "compiled_arguments": ma.argument_size_in_bytes,
           "compiled_outputs": ma.output_size_in_bytes, "compiled_aliased": ma.alias_size_in_bytes,
           "compiled_temp": ma.temp_size_in_bytes, "kv_cache": shard_bytes(cache), "sampling_params": sampling_copy}
    # Temporaries beyond the fp32 gradient accumulator: activations kept for the backward pass and workspace.
    out["activations"] = max(0, ma.temp_size_in_bytes - out["gradients"])
    out["train_peak"] = peak
    # During rollouts the train state stays resident beside the sampling weights and the KV cache.
    out["rollout_peak"] = out["params"] + out["opt_state"] + sampling_copy + out["kv_cache"]
    return out
