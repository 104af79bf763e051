"""The SFT step: TrainState, response-only next-token loss, gradient accumulation, sharded jitted update.

    optim = OptimConfig(lr=1e-6, total_steps=1000)    # mstar_jax.optim
    step = make_train_step(policy.graphdef, optim, policy.mesh, micro_batch=32, compute_dtype="bfloat16")
    state = create_train_state(policy.params, step.tx)  # once per run: Adam moments + schedule position
    state, metrics = step(state, sft_batch(policy.processor, prompts, responses, images))

`state.params` stays the flat {path: array} dict of `Policy.params` (fp32 master copy, same shardings), so
`merge(graphdef, state.params)` and the sampler read it directly. Compute runs in `compute_dtype` (params
are cast inside the step); gradients, their accumulation and the optimizer state stay fp32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from mstar_jax import sharding as shd
from mstar_jax.models.base import merge
from mstar_jax.errors import TrainingError
from mstar_jax.optim import OptimConfig, make_optimizer, make_schedule, schedule_count, with_schedule_count
from mstar_jax.sft_batch import BATCH_KEYS

Params = dict[tuple, jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything training carries between steps and iterations (a pytree a checkpoint manager can save).

    `step` counts every update ever applied (checkpoint numbering); the LR schedule's position lives in
    the optimizer state and is reset only by `reset_optimizer` / `reset_schedule`.
    """

    params: Params
    opt_state: Any
    step: jax.Array
    rng: jax.Array


def _replicated(mesh):
    return NamedSharding(mesh, PartitionSpec())


def _mesh_of(params: Params):
    for a in params.values():
        if isinstance(getattr(a, "sharding", None), NamedSharding):
            return a.sharding.mesh
    return None


def opt_state_shardings(tx: optax.GradientTransformation, params: Params) -> Any:
    """Shardings for `tx.init(params)`: moments follow their parameter, counters are replicated."""
    mesh = _mesh_of(params) or shd.make_mesh(1, 1, 1, jax.devices()[:1])
    rep = _replicated(mesh)

    def one(path, leaf):
        # A moment sits under the dict key of its parameter (the last DictKey on its path).
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        if keys and keys[-1] in params and tuple(params[keys[-1]].shape) == tuple(leaf.shape):
            return params[keys[-1]].sharding
        return rep

    return jax.tree_util.tree_map_with_path(one, jax.eval_shape(tx.init, params))


def check_master_dtype(params: Params) -> None:
    """Refuse master weights below float32: an AdamW update smaller than half a bfloat16 spacing is rounded away.

    At the paper's lr of 1e-6 that is nearly every update (a weight of 0.02 has a bf16 spacing of 1.2e-4), so
    training would run for days and leave the model unchanged (tests/test_training.py shows it on one step).
    """
    low = sorted((".".join(map(str, p)), str(a.dtype)) for p, a in params.items()
                 if jnp.issubdtype(a.dtype, jnp.floating) and jnp.dtype(a.dtype).itemsize < 4)
    if low:
        raise TrainingError(
            f"{len(low)} of {len(params)} parameters are in a dtype below float32 (e.g. {low[0][0]}: "
            f"{low[0][1]}), and AdamW updates smaller than their spacing would be rounded away. Load the policy in "
            "float32 (mstar_jax.load(path, dtype='float32'); config model.dtype) and compute in bfloat16 with "
            "compute_dtype='bfloat16' (config train.compute_dtype); or pass allow_low_precision=True.")


def create_train_state(params: Params, tx: optax.GradientTransformation, seed: int = 0, *,
                       allow_low_precision: bool = False) -> TrainState:
    """A fresh TrainState around `params` (kept as given: dtype, sharding) with a zeroed optimizer state.

    The params are the master weights the updates accumulate in, so they must be float32 unless
    `allow_low_precision` (see `check_master_dtype`)."""
    if not allow_low_precision:
        check_master_dtype(params)
    mesh = _mesh_of(params) or shd.make_mesh(1, 1, 1, jax.devices()[:1])
    rep = _replicated(mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params))(params)
    return TrainState(params=params, opt_state=opt_state, step=jax.device_put(jnp.zeros((), jnp.int32), rep),
                      rng=jax.device_put(jax.random.key_data(jax.random.key(seed)), rep))


def reset_optimizer(state: TrainState, tx: optax.GradientTransformation, keep_schedule: bool = False) -> TrainState:
    """Fresh Adam moments (and, unless keep_schedule, a restarted LR schedule); params and step kept."""
    fresh = create_train_state(state.params, tx, allow_low_precision=True).opt_state  # dtype checked at creation
    if keep_schedule:
        fresh = _like(with_schedule_count(fresh, schedule_count(state.opt_state)), fresh)
    return state.replace(opt_state=fresh)


def reset_schedule(state: TrainState) -> TrainState:
    """Restart the LR schedule (warm-up again) keeping the Adam moments."""
    return state.replace(opt_state=_like(with_schedule_count(state.opt_state, 0), state.opt_state))


def _like(tree, ref):
    """`tree` placed with the shardings of `ref` (so the step does not see a new layout and recompile)."""
    return jax.device_put(tree, jax.tree.map(lambda a: a.sharding, ref))


def schedule_position(state: TrainState) -> int:
    """How many updates the LR schedule has seen."""
    return int(schedule_count(state.opt_state))


# ------------------------------------------------------------------------------------------------ loss


def response_loss_sum(model, batch: dict[str, jax.Array], num_targets: int, groups: int = 1) -> jax.Array:
    """Sum over response tokens of -log p(token | prefix); only `num_targets` positions per row group hit the LM head.

    Target t (predicted from position t-1) counts where loss_mask[t] is set. The vocabulary projection and
    softmax run only on the targets, packed: the rows are split into `groups` runs of consecutive rows (one
    per batch shard, so the packing stays shard-local) and each group's first `num_targets` target positions
    (a static bound >= a group's target count) go to the head. Prompt, image and padding positions, most of
    an SFT sequence, never do.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    h, _ = model(ids, images=model.image_inputs(batch), kv_valid=mask, hidden_only=True)
    w = batch["loss_mask"][:, 1:].astype(jnp.float32).reshape(groups, -1)
    h = h[:, :-1].reshape(groups, -1, h.shape[-1])
    y = ids[:, 1:].reshape(groups, -1)
    # Stable sort puts the target positions first, in order; slots beyond a group's count get weight 0.
    order = jnp.argsort((w == 0).astype(jnp.int32), axis=1, stable=True)[:, :num_targets]
    h_sel = jnp.take_along_axis(h, order[..., None], axis=1)
    y = jnp.take_along_axis(y, order, axis=1)
    w_sel = jnp.take_along_axis(w, order, axis=1)
    logits = model.logits_from_hidden(h_sel)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * w_sel)


def num_targets_bound(loss_mask: np.ndarray, multiple: int = 16, groups: int = 1) -> int:
    """Static target count for `response_loss_sum`: the most targets in one row group, rounded up to a bucket.

    `loss_mask` is [rows, T] or [micro_steps, rows, T] (the bound covers every micro-batch). Buckets are
    `multiple` x {2^k, 1.5 x 2^k}: a new bucket recompiles the whole step (seconds on CPU, minutes for a large
    model), so they are coarse; the cost is at most 50 % padding in the LM head over the response tokens.
    """
    lm = np.asarray(loss_mask)
    lm = lm.reshape(-1, groups, lm.shape[-2] // groups, lm.shape[-1])[..., 1:]
    most = int(lm.sum(axis=(-2, -1)).max(initial=0))
    units = max(1, -(-most // multiple))
    power = 1 << (units - 1).bit_length()  # the smallest power of two >= units
    bucket = power * 3 // 4 if power >= 4 and units <= power * 3 // 4 else power
    return max(1, min(lm.shape[-3] * lm.shape[-2] * lm.shape[-1], bucket * multiple))


# ------------------------------------------------------------------------------------------------ step


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a train step minimises: `loss_sum(graphdef, params, micro, num_targets, groups)` summed over the
    micro-batch, divided by `count(batch)` (the global number of scored tokens), over the batch keys `keys`.

    `shifted`: the loss mask marks next-token targets (position t is predicted from t-1), so the LM-head packing
    bound of `num_targets_bound` applies; otherwise every masked position is scored in place (the PRM)."""

    name: str
    loss_sum: Callable
    keys: tuple[str, ...]
    shifted: bool = True

    def count(self, loss_mask: jax.Array) -> jax.Array:
        """Scored tokens of a [..., T] loss mask (at least 1)."""
        mask = loss_mask[..., 1:] if self.shifted else loss_mask
        return jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


def _sft_loss_sum(graphdef, params, micro, num_targets, groups):
    return response_loss_sum(merge(graphdef, params), micro, num_targets, groups)


SFT = Objective("sft", _sft_loss_sum, BATCH_KEYS)


def accumulate_grads(graphdef, params: Params, batch: dict[str, jax.Array], num_targets: int,
                     frozen: Callable[[tuple], bool] = lambda p: False, compute_dtype: Any = jnp.float32,
                     param_shardings: dict | None = None, groups: int = 1,
                     objective: Objective = SFT) -> tuple[jax.Array, Params, jax.Array]:
    """(global mean loss, fp32 grads of the trainable params, target count) over a [micro_steps, micro, ...] batch."""
    order = list(params)
    train_paths = [p for p in order if not frozen(p)]

    def cast(a):
        return a.astype(compute_dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

    # Cast once per step; differentiating w.r.t. the cast copy gives the same numbers as through the cast.
    train_c = {p: cast(params[p]) for p in train_paths}
    frozen_c = {p: cast(params[p]) for p in order if frozen(p)}
    n_tokens = objective.count(batch["loss_mask"])

    def constrain(tree):
        # Keep the accumulator laid out like the params (else the scan carry may end up replicated).
        if param_shardings is None:
            return tree
        return {p: jax.lax.with_sharding_constraint(g, param_shardings[p]) for p, g in tree.items()}

    def micro_loss(train, micro):
        full = {p: (train[p] if p in train else frozen_c[p]) for p in order}
        # Dividing by the global token count makes the summed micro-batch grads the global-batch mean.
        return objective.loss_sum(graphdef, full, micro, num_targets, groups) / n_tokens

    def body(carry, micro):
        loss_acc, grad_acc = carry
        loss, grads = jax.value_and_grad(micro_loss)(train_c, micro)
        grads = constrain({p: g.astype(jnp.float32) for p, g in grads.items()})
        return (loss_acc + loss.astype(jnp.float32), jax.tree.map(jnp.add, grad_acc, grads)), None

    zeros = constrain({p: jnp.zeros(params[p].shape, jnp.float32) for p in train_paths})
    (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), batch)
    return loss, grads, n_tokens


def _train_update(graphdef, tx, schedule, frozen: Callable[[tuple], bool], compute_dtype, param_shardings,
                  objective: Objective, state: TrainState, batch: dict[str, jax.Array], num_targets: int,
                  groups: int):
    """One optimizer update from a [micro_steps, micro, ...] batch (pure; jitted by TrainStep)."""
    loss, grads, n_tokens = accumulate_grads(graphdef, state.params, batch, num_targets, frozen, compute_dtype,
                                             param_shardings, groups, objective)
    grad_norm = optax.tree.norm(grads)
    lr = schedule(schedule_count(state.opt_state))
    order = list(state.params)
    # Frozen params get no gradient: zeros the "frozen" branch ignores (XLA drops them).
    full_grads = {p: (grads[p] if p in grads else jnp.zeros_like(state.params[p])) for p in order}
    updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
    # Frozen params are passed through untouched, so they stay bitwise identical.
    params = {p: (state.params[p] if frozen(p) else (state.params[p] + updates[p]).astype(state.params[p].dtype))
              for p in order}
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = state.replace(params=params, opt_state=opt_state, step=state.step + 1,
                        rng=jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0]))
    # A non-finite step returns the old state unchanged (the caller's buffers are donated).
    new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens": n_tokens, "ok": ok}
    return new, metrics


@functools.lru_cache(maxsize=16)
def _jitted_update(graphdef, optim: OptimConfig, compute_dtype, objective: Objective, state_treedef,
                   state_shardings: tuple):
    """The jitted update for one model/optimizer/dtype/objective/layout, shared by every TrainStep (one compile
    each)."""
    state_sh = jax.tree.unflatten(state_treedef, state_shardings)
    mesh = _mesh_of(state_sh.params)
    tx, schedule = make_optimizer(optim), make_schedule(optim)
    pshard = state_sh.params if mesh is not None and mesh.size > 1 else None

    def update(state, batch, num_targets, groups):
        return _train_update(graphdef, tx, schedule, optim.is_frozen, compute_dtype, pshard, objective, state,
                             batch, num_targets, groups)

    out = (state_sh, _replicated(mesh)) if mesh is not None else None
    return jax.jit(update, static_argnums=(2, 3), donate_argnums=0, out_shardings=out)


def _canonical(sharding):
    """P(None,) and P() are the same layout; jit outputs use the short form, so key the cache on it."""
    if isinstance(sharding, NamedSharding):
        spec = list(sharding.spec)
        while spec and spec[-1] is None:
            spec.pop()
        return NamedSharding(sharding.mesh, PartitionSpec(*spec), memory_kind=sharding.memory_kind)
    return sharding


class TrainStep:
    """`step(state, batch) -> (state, metrics)`: one jitted, sharded, accumulated AdamW update."""

    def __init__(self, graphdef, optim: OptimConfig, mesh=None, *, micro_batch: int | None = None,
                 compute_dtype: Any = "float32", targets_multiple: int = 16, objective: Objective = SFT,
                 image_keys: tuple[str, ...] = ("pixel_values",)):
        # Optax transforms are pure: this tx and any other make_optimizer(optim) share one state layout.
        self.graphdef, self.optim, self.tx, self.mesh = graphdef, optim, make_optimizer(optim), mesh
        self.micro_batch, self.compute_dtype = micro_batch, jnp.dtype(compute_dtype)
        self.targets_multiple, self.objective = targets_multiple, objective
        self.image_keys = tuple(image_keys)  # the family's image arrays in a batch (a leading row axis each)

    def _update_fn(self, state: TrainState):
        leaves, treedef = jax.tree.flatten(jax.tree.map(lambda a: _canonical(a.sharding), state))
        return _jitted_update(self.graphdef, self.optim, self.compute_dtype, self.objective, treedef, tuple(leaves))

    def loss_groups(self, rows: int) -> int:
        """Row groups the LM-head targets are packed in: one per batch shard of a micro-batch (else 1)."""
        shards = 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        return shards if rows % shards == 0 else 1

    def put_batch(self, batch: dict[str, Any]) -> tuple[dict[str, jax.Array], int, int]:
        """Host batch [B, ...] -> device batch [B/micro, micro, ...] sharded over (data, fsdp); + target bound, groups."""
        keys = tuple(dict.fromkeys(self.objective.keys + self.image_keys))
        arrays = {k: np.asarray(batch[k]) for k in keys if batch.get(k) is not None}
        for k in ("input_ids", "attention_mask", "loss_mask"):
            if k not in arrays:
                raise TrainingError(f"SFT batch has no {k!r}; build it with mstar_jax.sft_batch.sft_batch")
        b = arrays["input_ids"].shape[0]
        micro = self.micro_batch or b
        if b % micro:
            raise TrainingError(f"global batch {b} is not a multiple of the micro-batch {micro}")
        for k in self.image_keys:
            if k in arrays and arrays[k].shape[0] != b:
                raise TrainingError(f"SFT batches need their image arrays by row: {k} has {arrays[k].shape[0]} "
                                    f"entries for {b} rows (one image per row)")
        for k, a in arrays.items():  # a NaN input would train on garbage: refuse it before the step
            if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
                rows = np.flatnonzero(~np.isfinite(a.reshape(b, -1)).all(axis=1)).tolist()
                raise TrainingError(f"batch {k!r} holds NaN/inf in row(s) {rows}; no update was applied and the "
                                    "state is unchanged")
        groups = self.loss_groups(micro)
        num_targets = 1 if not self.objective.shifted else num_targets_bound(
            arrays["loss_mask"].reshape(b // micro, micro, -1), self.targets_multiple, groups)
        out = {}
        for k, a in arrays.items():
            floating = np.issubdtype(a.dtype, np.floating)
            a = a.astype(np.float32 if floating else np.int32).reshape(b // micro, micro, *a.shape[1:])
            if self.mesh is None:
                out[k] = jnp.asarray(a)
            else:
                spec = (None, "batch") + (None,) * (a.ndim - 2)
                out[k] = jax.device_put(a, shd.named_sharding(self.mesh, spec, a.shape))
        return out, num_targets, groups

    def __call__(self, state: TrainState, batch: dict[str, Any]) -> tuple[TrainState, dict[str, float]]:
        """Apply one update; raises TrainingError (with `.state`, unchanged) on a non-finite loss/grad norm."""
        update = self._update_fn(state)
        device_batch, num_targets, groups = self.put_batch(batch)
        step = int(state.step)
        with shd.use_mesh(self.mesh):
            new_state, metrics = update(state, device_batch, num_targets, groups)
        metrics = {k: v.item() for k, v in jax.device_get(metrics).items()}
        if not metrics.pop("ok"):
            bad = [k for k in ("loss", "grad_norm") if not math.isfinite(metrics[k])]
            err = TrainingError(f"step {step}: non-finite {' and '.join(bad)} (loss={metrics['loss']}, "
                                f"grad_norm={metrics['grad_norm']}); the update was skipped and the state is "
                                "unchanged (available as error.state); resume from the last good checkpoint or "
                                "lower the learning rate")
            err.state = new_state
            raise err
        metrics["step"] = step + 1
        return new_state, metrics


def make_train_step(graphdef, optim: OptimConfig, mesh=None, **kwargs) -> TrainStep:
    """The jitted SFT step for a model structure and optimizer config (options: see TrainStep)."""
    return TrainStep(graphdef, optim, mesh, **kwargs)


# ------------------------------------------------------------------------------------------------ FLOPs


def matmul_params(params: Params) -> int:
    """Parameters that take part in matmuls (all but the input embedding table, which is a lookup)."""
    return sum(int(np.prod(a.shape)) for p, a in params.items() if "embed_tokens" not in p)


def train_flops(n_params: int, tokens: int) -> float:
    """Approximate training FLOPs (forward + backward) of `tokens` tokens: 6 * N * tokens."""
    return 6.0 * n_params * tokens


def mfu(n_params: int, tokens: int, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: 6*N*tokens / (seconds * peak FLOP/s of all devices used)."""
    return train_flops(n_params, tokens) / (seconds * peak_flops)
