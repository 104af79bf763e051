"""ml_collections configs: load `configs/NAME.py`, apply `--config.key=value` overrides, reject unknown keys."""

from __future__ import annotations

import ast
import difflib
import importlib.util
from pathlib import Path
from typing import Any, Iterable

from ml_collections import ConfigDict

from mstar_jax.errors import ConfigError

def _config_dir() -> Path:
    """`configs/` beside the package in a source checkout, else the copy the wheel ships as `mstar_jax/configs`."""
    checkout = Path(__file__).resolve().parents[1] / "configs"
    return checkout if checkout.is_dir() else Path(__file__).resolve().parent / "configs"


CONFIG_DIR = _config_dir()


def resolve_config_path(name_or_path: str | None, default: str = "demo") -> Path:
    """A config file from a path or a name in `configs/` (`smoke` -> configs/smoke.py)."""
    name = name_or_path or default
    path = Path(name)
    if path.suffix != ".py":
        path = CONFIG_DIR / f"{name}.py"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.py")) if CONFIG_DIR.is_dir() else []
        raise ConfigError(f"config file {path} not found; configs/ has: {', '.join(known)}")
    return path


def base_config(config_file: str | Path, name: str) -> ConfigDict:
    """`get_config()` of the config file `name`.py next to `config_file` (for configs that extend another)."""
    path = Path(config_file).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"mstar_config_base_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def load_config_file(path: str | Path) -> ConfigDict:
    """Import a config file and call its `get_config()`; the result is locked (no new keys)."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"mstar_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        raise ConfigError(f"{path}: cannot import config file ({type(err).__name__}: {err})") from err
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: has no get_config() function")
    cfg = module.get_config()
    if not isinstance(cfg, ConfigDict):
        raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    cfg.lock()
    return cfg


def _all_keys(cfg: ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        out.append(prefix + k)
        if isinstance(v, ConfigDict):
            out.extend(_all_keys(v, prefix + k + "."))
    return out


def _parse_value(text: str, current: Any) -> Any:
    """Parse an override string into the type of the field it replaces."""
    if isinstance(current, str):
        return text
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ValueError(f"cannot parse {text!r} as a {type(current).__name__}") from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
        value = type(current)(value)
    return value


def apply_override(cfg: ConfigDict, key: str, text: str) -> None:
    """Set `cfg.<key>` from a command-line string; unknown keys raise with the close names."""
    keys = _all_keys(cfg)
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown config key {key!r}{hint}")
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    try:
        value = _parse_value(text, node[leaf])
        with node.ignore_type() if node[leaf] is None else _nullcontext():
            node[leaf] = value
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--config.{key}={text}: {err}") from err


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def parse_overrides(argv: Iterable[str]) -> list[tuple[str, str]]:
    """Split `--config.a.b=v` / `--config.a.b v` arguments into (key, value) pairs; other args raise."""
    args = list(argv)
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--config."):
            raise ConfigError(f"unrecognised argument {arg!r} (overrides look like --config.key=value)")
        body = arg[len("--config."):]
        if "=" in body:
            key, value = body.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg} needs a value")
            key, value = body, args[i + 1]
            i += 1
        out.append((key, value))
        i += 1
    return out


def load_config(name_or_path: str | None, overrides: Iterable[str] = (), default: str = "demo") -> ConfigDict:
    """Load a config file and apply command-line overrides."""
    cfg = load_config_file(resolve_config_path(name_or_path, default))
    for key, value in parse_overrides(overrides):
        apply_override(cfg, key, value)
    return cfg


def section_seed(cfg: ConfigDict, section: ConfigDict) -> int:
    """A section's own `seed` (e.g. `data.seed`), or the run's `seed` where the section's is negative or absent."""
    seed = int(section.get("seed", -1))
    return int(cfg.seed) if seed < 0 else seed


def diff_configs(a: ConfigDict | dict, b: ConfigDict | dict, prefix: str = "",
                 defaults: dict | None = None) -> list[str]:
    """Keys whose values differ between two configs (used to refuse resuming a run with another config).

    `defaults` (a config as a dict, e.g. `default_values()`): a key that `b` has and `a` lacks is no difference
    when `b` holds the default value, since keys are added at the value that keeps the earlier behaviour.
    """
    da = a.to_dict() if isinstance(a, ConfigDict) else a
    db = b.to_dict() if isinstance(b, ConfigDict) else b
    defaults = defaults or {}
    out = []
    for k in sorted(set(da) | set(db)):
        va, vb = da.get(k, "<missing>"), db.get(k, "<missing>")
        dk = defaults.get(k, "<missing>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_configs(va, vb, prefix + k + ".", dk if isinstance(dk, dict) else None)
        elif k not in da and dk != "<missing>" and _norm(vb) == _norm(dk):
            continue  # added since `a` was written, at the value that keeps the earlier behaviour
        elif _norm(va) != _norm(vb):
            out.append(f"{prefix}{k}: {va!r} != {vb!r}")
    return out


# Keys added since workdirs were first written whose default (the demo's) changes what a run does: a workdir
# written before them ran as these values say, so resuming it under the new defaults is refused, not silent.
LEGACY_VALUES = {"prm": {"enabled": False}, "train": {"scorer": "mean_logprob"},
                 "dynamics": {"scorer": "mean_logprob"}}


def resume_defaults(name: str = "demo") -> dict:
    """`default_values` with LEGACY_VALUES laid over it: what a workdir that lacks a key must have run with."""
    out = default_values(name)

    def overlay(d: dict, patch: dict) -> None:
        for k, v in patch.items():
            if isinstance(v, dict) and isinstance(d.get(k), dict):
                overlay(d[k], v)
            elif k in d:
                d[k] = v

    overlay(out, LEGACY_VALUES)
    return out


def default_values(name: str = "demo") -> dict:
    """The base config's values as a plain dict (empty when configs/ is not installed beside the package)."""
    import json

    try:
        return json.loads(load_config_file(resolve_config_path(name)).to_json())  # as workdirs store configs
    except ConfigError:
        return {}


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v
