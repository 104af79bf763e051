"""What a model family provides, as one record: its configs, NNX model, key map, input glue and presets.

A family lives in `mstar_jax/models/<name>/` and exposes `FAMILY = Family(...)`; the registry
(`mstar_jax.models.registry`) maps HF `model_type`s to it. Everything outside `models/` reaches a model through
its family and its one call (`model(ids, positions, images=, kv_valid=, cache=, ...)`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family (see the module docstring)."""

    name: str
    model_types: tuple[str, ...]  # HF `model_type` values (config.json) this family reads
    model_class: type  # the NNX module: model_class(cfg, dtype=...)
    from_hf: Callable[[dict, Any], Any]  # (config.json as a dict, its directory) -> our config
    config_from_json: Callable[[str], Any]  # our stored config (mstar_checkpoint.json) -> config
    rules: Callable[[Any], list]  # config -> the two-way key map (mapping.Rule list)
    layouts: tuple  # mapping.Layout of every published key layout; the first is the default export
    is_known_unused: Callable[[str, Any], bool]  # (canonical key, config) -> kept beside the model, written back
    layer_count: Callable[[Any, Any], int | None]  # (rule, config) -> layers a per-layer rule spans (None: not)
    inputs: Any  # prompt/image glue around the family's HF processor (see models/inputs.py)
    presets: Callable[[], dict]  # name -> config with real shapes (planning without weights)
    tiny: Callable | None = None  # (out_dir, **spec) -> a tiny random HF checkpoint made with transformers
    # (HF dir) -> its processor, where AutoProcessor cannot build one (no class in transformers, or a processor
    # that needs torchvision); None: AutoProcessor.
    processor: Callable | None = None
    # (config, layout name, source HF dir) -> {file name: bytes} an export in that layout writes over the source's
    # side files: a layout of another format (e.g. InternVL's original release) needs its own config.json.
    export_files: Callable | None = None

    @property
    def default_layout(self) -> str:
        """The key layout an export uses unless told otherwise."""
        return self.layouts[0].name
