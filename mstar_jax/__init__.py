"""mstar-jax: M-STaR self-evolving training of multimodal LLMs in JAX.

Public API (imported lazily so `import mstar_jax` stays light):
    load(path, dtype="float32") -> Policy with .config, .processor, .logits(batch), .generate(...)
    load_prm(path) -> ProcessRewardModel with .score(items, responses), .step_scores(...), .score_response(...)
    check_answer(response, item) -> bool
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load", "load_prm", "check_answer", "__version__"]


def load(path, dtype="float32", mesh=None):
    """Load an HF LLaVA directory or a converted checkpoint as a Policy."""
    from mstar_jax.policy import load as _load

    return _load(path, dtype=dtype, mesh=mesh)


def load_prm(path, dtype="float32", mesh=None, **kw):
    """Load a process reward model (written by `mstar prm train`, or its HF export) for scoring."""
    from mstar_jax.prm.score import load_prm as _load_prm

    return _load_prm(path, mesh=mesh, dtype=dtype, **kw)


def check_answer(response: str, item: dict) -> bool:
    """True if the final answer in `response` matches `item` (MathVista field names)."""
    from mstar_jax.answers import check_answer as _check

    return _check(response, item)
