"""HF `model_type` (read from config.json, never executed) -> the model family that implements it."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from mstar_jax.errors import CheckpointError

# model_type -> family module (each defines FAMILY); imported on first use, so `import mstar_jax` stays light.
MODEL_TYPES = {
    "llava": "mstar_jax.models.llava",
    "internvl": "mstar_jax.models.internvl",
    "internvl_chat": "mstar_jax.models.internvl",
    "qwen2_vl": "mstar_jax.models.qwen2_vl",
    "qwen2_5_vl": "mstar_jax.models.qwen2_vl",
    "phi3_v": "mstar_jax.models.phi3_v",
    "minicpmv": "mstar_jax.models.minicpmv",
}


def supported() -> list[str]:
    """The model_types this installation reads."""
    return sorted(MODEL_TYPES)


def family(name_or_model_type: str):
    """The Family for a family name or an HF model_type."""
    module = MODEL_TYPES.get(name_or_model_type)
    if module is None:
        for m in set(MODEL_TYPES.values()):
            if m.rsplit(".", 1)[-1] == name_or_model_type:
                module = m
                break
    if module is None:
        raise CheckpointError(f"model_type {name_or_model_type!r} is not supported; supported: "
                              f"{', '.join(supported())}")
    return importlib.import_module(module).FAMILY


def read_config_json(hf_dir: str | Path) -> dict:
    """config.json of an HF directory as a dict, with errors that name the file."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no config.json; is {hf_dir} a Hugging Face checkpoint directory?")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return raw


def family_of(hf_dir: str | Path):
    """The Family of an HF checkpoint directory, from its config.json's model_type."""
    raw = read_config_json(hf_dir)
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{Path(hf_dir) / 'config.json'}: model_type {model_type!r} is not supported; "
                              f"supported: {', '.join(supported())}. mstar-jax never runs remote code "
                              "(trust_remote_code): a family reads its published layout with its own code")
    return family(model_type)
