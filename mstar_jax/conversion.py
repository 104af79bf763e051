"""HF <-> Flax conversion over the model registry: read an HF checkpoint of any registered family onto the mesh,
write our checkpoint, export back to HF in any of the family's published key layouts.

A converted checkpoint directory holds:
    mstar_checkpoint.json   the family, our config, the source key layout, parameter dtypes
    params/                 Orbax checkpoint of the parameters
    extras.safetensors      tensors the model does not use (e.g. SigLIP's pooling head), kept for the export
    hf/                     config.json, tokenizer, processor and chat-template files of the source

Everything family-specific (config, key map, layouts, model class) comes from `mstar_jax.models.registry`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mstar_jax import sharding as shd
from mstar_jax.errors import CheckpointError
from mstar_jax.io import to_host
from mstar_jax.models import registry
from mstar_jax.models.base import abstract_model, cast_params, merge, param_shardings
from mstar_jax.models.mapping import Layout
from mstar_jax.weights import SafetensorsReader, restore_params, save_params, write_safetensors

log = logging.getLogger(__name__)

META_NAME = "mstar_checkpoint.json"
FORMAT_PREFIX = "mstar-jax/"  # + family name ("mstar-jax/llava")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack")


def family_of_config(cfg):
    """The Family a config belongs to (each family's config class names it)."""
    return registry.family(cfg.FAMILY)


@dataclasses.dataclass
class LoadedModel:
    """A model on the mesh: config, NNX graph definition, flat params, unused tensors and HF side files."""

    cfg: Any
    graphdef: Any
    params: dict[tuple, jax.Array]
    extras: dict[str, np.ndarray]
    layout: str
    hf_files: Path | None
    mesh: Any

    @property
    def family(self):
        """The model family (registry entry) of this model."""
        return family_of_config(self.cfg)

    def model(self):
        """The NNX module holding these params (cheap: shares the arrays)."""
        return merge(self.graphdef, self.params)

    def with_params(self, params: dict[tuple, jax.Array]) -> "LoadedModel":
        """The same model with other parameters (e.g. a trained policy or a PRM backbone)."""
        return dataclasses.replace(self, params=params)


def model_skeleton(cfg, dtype: Any = jnp.float32):
    """(graphdef, shapes, logical axes) of a config's model, through its family."""
    return abstract_model(family_of_config(cfg).model_class, cfg, dtype)


# ---------------------------------------------------------------------------------------- HF reading


def _detect_layout(keys: list[str], rules, layouts) -> Layout:
    """The layout under which the most keys map to a rule."""
    best, best_hits = layouts[0], -1
    for layout in layouts:
        hits = 0
        for k in keys:
            canon = layout.to_canonical(k)
            if canon is not None and any(r.match(canon) for r in rules):
                hits += 1
        if hits > best_hits:
            best, best_hits = layout, hits
    return best


def plan_hf_load(reader: SafetensorsReader, cfg, shapes: dict[tuple, Any]):
    """Match every checkpoint tensor to a rule (or to the unused extras); check names and shapes.

    Returns (layout, {our path: (rule, part, hf key)}, {canonical key: hf key} of extras).
    """
    fam = family_of_config(cfg)
    rules = fam.rules(cfg)
    keys = reader.keys()
    layout = _detect_layout(keys, rules, fam.layouts)
    plan: dict[tuple, tuple] = {}
    extras: dict[str, str] = {}
    unexpected = []
    for key in keys:
        canon = layout.to_canonical(key)
        hit = None
        if canon is not None:
            for rule in rules:
                m = rule.match(canon)
                if m:
                    hit = (rule, m)
                    break
        if hit is not None:
            rule, m = hit
            paths = rule.paths(m)
            if all(p in shapes for p in paths):
                expect = rule.hf_shape([shapes[p].shape for p in paths], cfg)
                got = reader.shape(key)
                if tuple(got) != tuple(expect):
                    raise CheckpointError(
                        f"{reader.file_of(key)}: tensor {key!r} has shape {tuple(got)}, but config.json implies "
                        f"{tuple(expect)}")
                for part, p in enumerate(paths):
                    plan[p] = (rule, part, key)
                continue
        if canon is not None and fam.is_known_unused(canon, cfg):
            extras[canon] = key
            continue
        unexpected.append(key)
    if unexpected:
        shown = ", ".join(repr(k) for k in unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise CheckpointError(f"{reader.dir}: {len(unexpected)} unexpected tensor(s) for this {fam.name} config "
                              f"({layout.name} layout): {shown}")
    missing = [p for p in shapes if p not in plan]
    if missing:
        names = []
        for p in missing[:5]:
            rule = next((r for r in rules if any(_path_matches(t, p) for t in r.ours)
                         and layout.names(_hf_key_of(r, p))), None)
            names.append(".".join(map(str, p)) + (f" (HF key {layout.from_canonical(_hf_key_of(rule, p))})"
                                                  if rule is not None else ""))
        raise CheckpointError(f"{reader.dir}: {len(missing)} tensor(s) missing from the checkpoint, e.g. our "
                              f"{', '.join(names)} (layout {layout.name})")
    return layout, plan, extras


def _path_matches(template: str, path: tuple) -> bool:
    parts = template.split(".")
    return len(parts) == len(path) and all(t == "{i}" or t == str(p) for t, p in zip(parts, path))


def _hf_key_of(rule, path: tuple) -> str:
    layer = next((p for p in path if isinstance(p, int)), None)
    return rule.hf_key(layer)


def _np_dtype(name: str):
    import ml_dtypes

    table = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
             "I64": np.int64, "I32": np.int32}
    if name not in table:
        raise CheckpointError(f"unsupported tensor dtype {name}")
    return table[name]


def load_hf(hf_dir: str | Path, mesh=None, dtype: str | None = None) -> LoadedModel:
    """Read an HF checkpoint directory of a registered family straight onto the mesh: each device reads only its
    own slices."""
    hf_dir = Path(hf_dir)
    fam = registry.family_of(hf_dir)
    cfg = fam.from_hf(registry.read_config_json(hf_dir), hf_dir)
    reader = SafetensorsReader(hf_dir)
    mesh = mesh if mesh is not None else shd.make_mesh()
    graphdef, shapes, axes = abstract_model(fam.model_class, cfg)
    layout, plan, extra_keys = plan_hf_load(reader, cfg, shapes)
    shardings = param_shardings(shapes, axes, mesh)
    params = {}
    for path, (rule, part, key) in plan.items():
        src_dtype = _np_dtype(reader.dtype(key))
        view = reader.slice(key)
        shape = shapes[path].shape

        def cb(index, rule=rule, part=part, view=view, shape=shape):
            index = tuple(index) + (slice(None),) * (len(shape) - len(index))
            index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape))
            return rule.read_slice(view, part, index, cfg)

        arr = jax.make_array_from_callback(shape, shardings[path], cb)
        assert arr.dtype == src_dtype, (path, arr.dtype, src_dtype)
        params[path] = arr
    if dtype is not None:
        params = cast_params(params, dtype)
    extras = {canon: reader.read(key) for canon, key in extra_keys.items()}
    log.info("loaded %s (%s layout, %d tensors, %d kept unused)", hf_dir, layout.name, len(plan), len(extras))
    return LoadedModel(cfg, graphdef, params, extras, layout.name, hf_dir, mesh)


# ------------------------------------------------------------------------------ our checkpoint format


def _epath(path):
    # etils.epath reads local paths and gs:// alike (Orbax uses it too).
    from etils import epath

    return epath.Path(path)


def _is_remote(path) -> bool:
    from mstar_jax.workdir import is_remote

    return is_remote(path)


def is_converted(path: str | Path) -> bool:
    """True if `path` (local or gs://) is a checkpoint written by `hf_to_flax`."""
    return (_epath(path) / META_NAME).exists()


def load_converted(ckpt_dir: str | Path, mesh=None, dtype: str | None = None) -> LoadedModel:
    """Restore a converted checkpoint (local or gs://) onto the mesh (Orbax places each shard on its devices)."""
    ckpt_dir = _epath(ckpt_dir)
    meta_path = ckpt_dir / META_NAME
    try:
        meta = json.loads(meta_path.read_text())
        fmt = meta["format"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{meta_path}: not a valid mstar-jax checkpoint description ({err})") from err
    if not isinstance(fmt, str) or not fmt.startswith(FORMAT_PREFIX):
        raise CheckpointError(f"{meta_path}: format {fmt!r} is not an mstar-jax checkpoint ({FORMAT_PREFIX}<family>)")
    fam = registry.family(meta.get("family") or fmt[len(FORMAT_PREFIX):])
    try:
        cfg = fam.config_from_json(json.dumps(meta["config"]))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{meta_path}: its {fam.name} config cannot be read ({err})") from err
    mesh = mesh if mesh is not None else shd.make_mesh()
    graphdef, shapes, axes = abstract_model(fam.model_class, cfg)
    dtypes = meta["param_dtypes"]
    shardings = param_shardings(shapes, axes, mesh)
    abstract = {}
    for p, s in shapes.items():
        name = ".".join(map(str, p))
        if name not in dtypes:
            raise CheckpointError(f"{meta_path}: no parameter {name} recorded; the checkpoint does not match its config")
        abstract[p] = jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtypes[name]), sharding=shardings[p])
    params = restore_params(ckpt_dir / "params", abstract)
    if dtype is not None:
        params = cast_params(params, dtype)
    extras = {}
    if (ckpt_dir / "extras.safetensors").exists():
        from safetensors import safe_open

        local = _local_copy(ckpt_dir) / "extras.safetensors" if str(ckpt_dir).startswith("gs://") else None
        with safe_open(str(local or ckpt_dir / "extras.safetensors"), "np") as f:
            extras = {k: f.get_slice(k)[:] for k in f.keys()}
    hf_files = _local_copy(ckpt_dir / "hf") if (ckpt_dir / "hf").is_dir() else None
    return LoadedModel(cfg, graphdef, params, extras, meta.get("layout", fam.default_layout), hf_files, mesh)


def _local_copy(hf_dir) -> Path:
    """Tokenizer/processor files as a local directory (transformers cannot read gs:// paths)."""
    if not str(hf_dir).startswith("gs://"):
        return Path(str(hf_dir))
    local = Path(tempfile.mkdtemp(prefix="mstar-hf-files-"))
    for f in hf_dir.iterdir():
        if f.is_file():
            (local / f.name).write_bytes(f.read_bytes())
    return local


def load_any(path: str | Path, mesh=None, dtype: str | None = None) -> LoadedModel:
    """Load an HF directory or a converted checkpoint (converted ones may live on gs://)."""
    if is_converted(path):
        return load_converted(path, mesh, dtype)
    if str(path).startswith("gs://"):
        raise CheckpointError(f"{path}: HF directories must be local; convert them first (mstar convert hf-to-flax)")
    if not Path(path).is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    return load_hf(path, mesh, dtype)


class _Staging:
    """Write into a temporary sibling of OUT_DIR and rename on success, so a failure leaves nothing partial."""

    def __init__(self, out_dir: str | Path, overwrite: bool):
        self.out = Path(out_dir)
        _refuse_existing(self.out, overwrite)
        self.out.parent.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Path:
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{self.tmp.name[-8:]}")
            self.out.rename(old)
            self.tmp.rename(self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.tmp.rename(self.out)
        return False


def _copy_side_files(src: Path | None, dst) -> None:
    """Copy tokenizer/processor/config files (everything but weights) from an HF directory (`dst` may be gs://)."""
    dst.mkdir(parents=True, exist_ok=True)
    if src is None:
        return
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and f.name != "model.safetensors.index.json":
            (dst / f.name).write_bytes(f.read_bytes())


def save_converted(loaded: LoadedModel, out_dir: str | Path, overwrite: bool = False,
                   extra_files: dict[str, bytes] | None = None):
    """Write `loaded` as a converted checkpoint: atomically on a local disk, description last on gs://.

    `extra_files` ({name: bytes}, e.g. a reward head) are written beside it, before the description."""
    if _is_remote(out_dir) or jax.process_count() > 1:
        # Several processes write one Orbax directory: a per-process staging name cannot be shared, so a local
        # (shared) disk uses the object store's protocol too.
        out = _save_in_place(loaded, _epath(out_dir), overwrite, extra_files)
        return out if _is_remote(out_dir) else Path(out_dir)
    with _Staging(out_dir, overwrite) as tmp:
        _write_converted(loaded, tmp, extra_files)
    return Path(out_dir)


def _save_in_place(loaded: LoadedModel, out, overwrite: bool, extra_files: dict[str, bytes] | None = None):
    # An object store cannot rename a directory atomically: write in place and add the description (META_NAME)
    # last -- until it exists the directory is no checkpoint (is_converted), and the next save replaces it.
    _refuse_existing(out, overwrite)
    if jax.process_index() == 0 and out.exists():
        out.rmtree()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"mstar save_converted {out}")  # nobody writes before the removal
    _write_converted(loaded, out, extra_files)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"mstar saved_converted {out}")  # the description is written
    return out


def _write_converted(loaded: LoadedModel, out, extra_files: dict[str, bytes] | None = None) -> None:
    """Params (Orbax, every process), then extras, HF side files, extra files and the description (process 0)."""
    save_params(loaded.params, out / "params")
    if jax.process_index() == 0:
        for name, data in (extra_files or {}).items():
            (out / name).write_bytes(data)
        if loaded.extras:
            from safetensors.numpy import save

            (out / "extras.safetensors").write_bytes(save(dict(loaded.extras)))  # bytes, since out may be gs://
        _copy_side_files(loaded.hf_files, out / "hf")
        meta = {
            "format": FORMAT_PREFIX + loaded.family.name,
            "family": loaded.family.name,
            "version": 1,
            "config": json.loads(loaded.cfg.to_json()),
            "layout": loaded.layout,
            "param_dtypes": {".".join(map(str, p)): str(a.dtype) for p, a in loaded.params.items()},
        }
        (out / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")


def hf_to_flax(hf_dir: str | Path, out_dir: str | Path, dtype: str | None = None, overwrite: bool = False,
               mesh=None) -> Path:
    """`mstar convert hf-to-flax`: HF safetensors -> Orbax checkpoint + config + tokenizer/processor files."""
    _refuse_existing(out_dir, overwrite)
    loaded = load_hf(hf_dir, mesh, dtype)
    return save_converted(loaded, out_dir, overwrite)


def _refuse_existing(out_dir, overwrite: bool) -> None:
    out = _epath(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"{out}: already exists and is not empty; pass --overwrite to replace it")


# ----------------------------------------------------------------------------------------- HF export


def hf_tensors(cfg, params: dict[tuple, Any], extras: dict[str, np.ndarray],
               layout: str | Layout | None = None) -> dict[str, np.ndarray]:
    """All HF tensors (named in `layout`, default the family's) for our params plus the unused extras, via the
    family's key-map table."""
    fam = family_of_config(cfg)
    if layout is None or isinstance(layout, str):
        by_name = {lay.name: lay for lay in fam.layouts}
        name = layout or fam.default_layout
        if name not in by_name:
            raise CheckpointError(f"unknown key layout {name!r} for {fam.name}; known: {', '.join(by_name)}")
        layout = by_name[name]
    out: dict[str, np.ndarray] = {}
    for rule in fam.rules(cfg):
        count = fam.layer_count(rule, cfg)
        for i in (range(count) if count is not None else [None]):
            key = rule.hf_key(i)
            if not layout.names(key):  # a rule of another format's key map (see mapping.Layout.names)
                break
            m = rule.match(key)
            arrays = [to_host(params[p]) for p in rule.paths(m)]
            out[layout.from_canonical(key)] = rule.to_hf(arrays, cfg)
    for canon, arr in extras.items():
        if layout.names(canon):  # unused tensors of another format have no name in this one
            out[layout.from_canonical(canon)] = np.asarray(arr)
    return out


def export_hf(loaded: LoadedModel, out_dir: str | Path, layout: str | None = None, dtype: str | None = None,
              max_shard_size: str | int = "5GB", overwrite: bool = False,
              extra_files: dict[str, bytes] | None = None) -> Path:
    """Write an HF directory (sharded safetensors + index + config + tokenizer + processor + chat template), plus
    `extra_files` ({name: bytes})."""
    if loaded.hf_files is None or not (Path(loaded.hf_files) / "config.json").is_file():
        raise CheckpointError("the checkpoint has no HF config.json/tokenizer files to export with")
    tensors = hf_tensors(loaded.cfg, loaded.params, loaded.extras, layout or loaded.layout)
    if dtype is not None:
        dt = jnp.dtype(dtype)
        tensors = {k: v.astype(dt) if np.issubdtype(v.dtype, np.floating) or v.dtype.name == "bfloat16" else v
                   for k, v in tensors.items()}
    if jax.process_index() != 0:
        return Path(out_dir)
    with _Staging(out_dir, overwrite) as tmp:
        _copy_side_files(Path(loaded.hf_files), tmp)
        fam = loaded.family
        if fam.export_files is not None:  # e.g. the config.json of a layout in another format than the source's
            for name, data in fam.export_files(loaded.cfg, layout or loaded.layout, Path(loaded.hf_files)).items():
                (tmp / name).write_bytes(data)
        write_safetensors(tensors, tmp, max_shard_size)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return Path(out_dir)


def flax_to_hf(ckpt_dir: str | Path, out_dir: str | Path, layout: str | None = None, dtype: str | None = None,
               max_shard_size: str | int = "5GB", overwrite: bool = False, mesh=None) -> Path:
    """`mstar convert flax-to-hf`: a converted (or trained) checkpoint -> an HF directory."""
    _refuse_existing(out_dir, overwrite)
    loaded = load_any(ckpt_dir, mesh)
    return export_hf(loaded, out_dir, layout, dtype, max_shard_size, overwrite)
