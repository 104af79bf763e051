"""The user-facing policy: `mstar_jax.load(path)` -> Policy with `.config`, `.processor`, `.logits(batch)`."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from mstar_jax import sharding as shd
from mstar_jax.conversion import LoadedModel, load_any
from mstar_jax.models.base import merge
from mstar_jax.errors import MstarError
from mstar_jax.io import to_host


def forward_logits(graphdef, params, input_ids, attention_mask, positions, images):
    """Pure full forward: fp32 logits [B, T, V] (jit this; graphdef is static; positions None: the model's)."""
    model = merge(graphdef, params)
    logits, _ = model(input_ids, positions, images=images, kv_valid=attention_mask)
    return logits


class Policy:
    """A loaded VLM on a mesh plus its HF processor; the object the sampler and trainer build on."""

    def __init__(self, loaded: LoadedModel, processor: Any):
        self.loaded = loaded
        self.processor = processor
        self.mesh = loaded.mesh

    @property
    def config(self):
        """Our frozen model config."""
        return self.loaded.cfg

    @property
    def params(self) -> dict[tuple, jax.Array]:
        """Flat parameters {path: sharded jax.Array}."""
        return self.loaded.params

    @params.setter
    def params(self, value: dict[tuple, jax.Array]) -> None:
        self.loaded.params = value

    @property
    def graphdef(self):
        """The NNX graph definition (static structure) of the model."""
        return self.loaded.graphdef

    @functools.cached_property
    def _forward(self):
        return jax.jit(functools.partial(forward_logits, self.graphdef))

    def _put(self, x: np.ndarray, batch_axis: bool = True):
        spec = ("batch",) + (None,) * (x.ndim - 1) if batch_axis else (None,) * x.ndim
        return jax.device_put(x, shd.named_sharding(self.mesh, spec, x.shape))

    def logits(self, batch: Mapping[str, Any]) -> np.ndarray:
        """fp32 numpy logits [batch, seq, vocab] for a processor output (numpy or torch arrays)."""
        arrays = {k: np.asarray(v) for k, v in batch.items() if v is not None and hasattr(v, "shape")}
        if "input_ids" not in arrays:
            raise MstarError("batch has no input_ids; pass the processor's output")
        ids = arrays["input_ids"].astype(np.int32)
        if ids.ndim != 2:
            raise MstarError(f"input_ids must be [batch, seq], got shape {ids.shape}")
        mask = arrays.get("attention_mask", np.ones_like(ids)).astype(np.int32)
        positions = arrays.get("position_ids")
        inputs = self.loaded.family.inputs
        inputs.check(arrays, self.config)
        images = inputs.images_of(arrays)
        if images is not None:
            images = {k: self._put(v, batch_axis=False) for k, v in images.items()}
        with shd.use_mesh(self.mesh):
            out = self._forward(self.params, self._put(ids), self._put(mask),
                                None if positions is None else self._put(np.asarray(positions, np.int32)), images)
        return to_host(out).astype(np.float32, copy=False)


    def generate(self, images, prompts, **kw):
        """n samples per (image, prompt); keywords as `mstar_jax.sampler.Sampler.generate` (params=... optional)."""
        from mstar_jax.sampler import generate

        return generate(self, images, prompts, **kw)


def load_processor(path: str | Path | None):
    """The HF processor (tokenizer, image processor, chat template) stored with a checkpoint."""
    if path is None:
        return None
    from transformers import AutoProcessor

    from mstar_jax.models import registry

    # A family whose processor AutoProcessor cannot build (no transformers class, torchvision absent) builds its own.
    model_type = registry.read_config_json(path).get("model_type") if (Path(path) / "config.json").is_file() else None
    if model_type in registry.MODEL_TYPES:
        fam = registry.family(model_type)
        if fam.processor is not None:
            return fam.processor(Path(path))
    return AutoProcessor.from_pretrained(str(path), trust_remote_code=False)


def load(path: str | Path, dtype: str | None = "float32", mesh=None) -> Policy:
    """Load an HF LLaVA directory or a converted checkpoint as a Policy on `mesh` (default: all devices, fsdp)."""
    loaded = load_any(path, mesh, dtype)
    return Policy(loaded, load_processor(loaded.hf_files))
