"""The SFT optimizer: AdamW with the paper's warm-up schedule, global-norm clipping and frozen sub-models.

Paper (appendix C, after Yao et al. 2024): lr 1e-6, global batch 128, constant LR after a linear warm-up over
10 % of the steps. The update matches `torch.optim.AdamW` + HF's `get_constant_schedule_with_warmup` /
`get_cosine_schedule_with_warmup`: decoupled weight decay, eps added to sqrt(v_hat), LR 0 on the first step.

Weight decay applies only to matrices and embedding tables (ndim >= 2); norm scales, biases and CLIP's class
embedding (all 1-D) are not decayed, as in HF Trainer's usual grouping. Frozen parameters are labelled
"frozen" in an `optax.multi_transform`, so they get a zero update and no Adam moments at all.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from mstar_jax.errors import ConfigError

SCHEDULES = ("constant", "cosine")
# Flat-param path prefixes of the sub-models that can be frozen.
VISION_TOWER = ("vision_tower",)
PROJECTOR = ("multi_modal_projector",)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW + schedule + clipping + freezing settings (defaults: the paper's appendix C)."""

    lr: float = 1e-6
    total_steps: int = 1000
    warmup_ratio: float = 0.1
    schedule: str = "constant"  # constant (after linear warm-up) | cosine (to final_lr_ratio * lr)
    final_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    freeze_vision_tower: bool = False
    freeze_projector: bool = False

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.total_steps < 1:
            raise ConfigError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")

    @property
    def warmup_steps(self) -> int:
        """Linear warm-up length, rounded up like HF's `get_warmup_steps`."""
        import math

        return math.ceil(self.total_steps * self.warmup_ratio)

    @property
    def frozen_prefixes(self) -> tuple[tuple, ...]:
        """Path prefixes of the frozen sub-models."""
        return ((VISION_TOWER,) if self.freeze_vision_tower else ()) + ((PROJECTOR,) if self.freeze_projector else ())

    def is_frozen(self, path: tuple) -> bool:
        """True if the flat-param `path` belongs to a frozen sub-model."""
        return any(path[:len(p)] == p for p in self.frozen_prefixes)

    @classmethod
    def from_config(cls, train: Any, total_steps: int, **overrides) -> "OptimConfig":
        """From an ml_collections `train` section (lr, schedule, warmup_ratio, weight_decay, ...)."""
        get = lambda k, d: getattr(train, k, d) if not isinstance(train, dict) else train.get(k, d)  # noqa: E731
        freeze = bool(get("freeze_vision", False))
        kw = dict(lr=float(get("lr", cls.lr)), total_steps=int(total_steps),
                  warmup_ratio=float(get("warmup_ratio", cls.warmup_ratio)),
                  schedule=str(get("schedule", cls.schedule)), weight_decay=float(get("weight_decay", 0.0)),
                  b1=float(get("b1", cls.b1)), b2=float(get("b2", cls.b2)), eps=float(get("eps", cls.eps)),
                  max_grad_norm=get("max_grad_norm", cls.max_grad_norm),
                  freeze_vision_tower=bool(get("freeze_vision_tower", freeze)),
                  freeze_projector=bool(get("freeze_projector", freeze)))
        kw.update(overrides)
        return cls(**kw)


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """LR as a function of the update count: linear warm-up from 0, then constant or cosine."""
    warm = cfg.warmup_steps
    if cfg.schedule == "constant":
        if warm == 0:
            return optax.constant_schedule(cfg.lr)
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), optax.constant_schedule(cfg.lr)],
                                    [warm])
    decay = optax.cosine_decay_schedule(cfg.lr, max(cfg.total_steps - warm, 1), alpha=cfg.final_lr_ratio)
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), decay], [warm])


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: matrices and embedding tables, not norms/biases."""
    return jax.tree.map(lambda a: jnp.ndim(a) >= 2, params)


def param_labels(cfg: OptimConfig) -> Callable[[dict], dict]:
    """Function flat params -> {path: "train" | "frozen"} for `optax.multi_transform`."""
    return lambda params: {p: ("frozen" if cfg.is_frozen(p) else "train") for p in params}


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """Clip (global norm over trainable grads) -> Adam -> decoupled weight decay -> scheduled LR; frozen: zero."""
    parts = []
    if cfg.max_grad_norm:
        parts.append(optax.clip_by_global_norm(float(cfg.max_grad_norm)))
    parts += [optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps)]
    if cfg.weight_decay:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))
    parts.append(optax.scale_by_learning_rate(make_schedule(cfg)))
    return optax.multi_transform({"train": optax.chain(*parts), "frozen": optax.set_to_zero()}, param_labels(cfg))


def _is_schedule_state(x) -> bool:
    return isinstance(x, optax.ScaleByScheduleState)


def schedule_count(opt_state: Any) -> jax.Array:
    """Position of the LR schedule (updates counted since the schedule was last reset)."""
    found = [s.count for s in jax.tree.leaves(opt_state, is_leaf=_is_schedule_state) if _is_schedule_state(s)]
    if not found:
        raise ValueError("optimizer state has no LR schedule (build it with mstar_jax.optim.make_optimizer)")
    return found[0]


def with_schedule_count(opt_state: Any, count: jax.Array | int) -> Any:
    """The same optimizer state with the LR schedule moved to `count` (Adam moments untouched)."""
    def set_count(s):
        if _is_schedule_state(s):
            return s._replace(count=jnp.asarray(count, s.count.dtype).reshape(s.count.shape))
        return s

    return jax.tree.map(set_count, opt_state, is_leaf=_is_schedule_state)
