"""Weight files: lazy safetensors reading (single or sharded), sharded safetensors writing, Orbax params.

Pickled checkpoints (`pytorch_model.bin`, `*.pt`) are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from mstar_jax.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


class SafetensorsReader:
    """Lazy view of a safetensors checkpoint directory: keys, shapes, dtypes and slices, opened on demand."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.dir = Path(directory)
        self._open = safe_open
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: malformed safetensors index ({err})") from err
            self.files = {k: self.dir / v for k, v in weight_map.items()}
        elif (self.dir / SINGLE_NAME).is_file():
            self.files = None
        else:
            # A PRM directory also holds its head (reward_head.safetensors), which is not a model shard.
            shards = [p for p in sorted(self.dir.glob("*.safetensors")) if p.name != "reward_head.safetensors"]
            pickles = [p.name for pat in PICKLE_PATTERNS for p in self.dir.glob(pat)]
            if pickles:
                raise CheckpointError(
                    f"{self.dir}: only pickle weights found ({', '.join(sorted(pickles))}); mstar-jax never "
                    "unpickles checkpoints. Convert them to safetensors first, e.g. in Python: "
                    "`AutoModelForImageTextToText.from_pretrained(DIR).save_pretrained(OUT)` "
                    "(transformers writes safetensors by default).")
            if len(shards) == 1:
                self.files = None
                self._single = shards[0]
            else:
                raise CheckpointError(f"{self.dir}: no {SINGLE_NAME} or {INDEX_NAME} found")
        self._handles: dict[Path, Any] = {}
        if self.files is None:
            single = getattr(self, "_single", self.dir / SINGLE_NAME)
            self.files = {k: single for k in self._handle(single).keys()}
        missing = sorted({str(p) for p in self.files.values() if not p.is_file()})
        if missing:
            raise CheckpointError(f"{index}: shard files listed in the index are missing: {', '.join(missing)}")

    def keys(self) -> list[str]:
        """All tensor names."""
        return list(self.files)

    def file_of(self, key: str) -> Path:
        """The shard file that holds `key`."""
        return self.files[key]

    def _handle(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = self._open(str(path), "np").__enter__()
            except Exception as err:
                raise CheckpointError(f"{path}: cannot read safetensors file ({err})") from err
        return self._handles[path]

    def slice(self, key: str):
        """A lazily sliceable view of one tensor (`view[a:b, c:d]` reads only those bytes)."""
        return self._handle(self.files[key]).get_slice(key)

    def shape(self, key: str) -> tuple[int, ...]:
        """Tensor shape without reading data."""
        return tuple(self.slice(key).get_shape())

    def dtype(self, key: str) -> str:
        """safetensors dtype name (e.g. 'BF16')."""
        return self.slice(key).get_dtype()

    def read(self, key: str) -> np.ndarray:
        """The whole tensor as numpy."""
        return self.slice(key)[:]

    def metadata(self) -> dict[str, str]:
        """The `__metadata__` of the first shard."""
        first = next(iter(self.files.values()))
        return self._handle(first).metadata() or {}


def _parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, re.I)
    if not m:
        raise ValueError(f"bad shard size {size!r}")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def write_safetensors(tensors: dict[str, np.ndarray], out_dir: str | Path, max_shard_size: str | int = "5GB",
                      metadata: dict[str, str] | None = None) -> list[str]:
    """Write tensors as `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json`."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(tensors):
        arr = np.ascontiguousarray(tensors[key])
        if shards[-1] and size + arr.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = arr
        size += arr.nbytes
    n = len(shards)
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt", **(metadata or {})})
        names.append(name)
        weight_map.update({k: name for k in shard})
    total = sum(int(np.asarray(t).nbytes) for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names


def nest(flat: dict[tuple, Any]) -> dict:
    """Nested dict with string keys (Orbax-friendly) from {path: leaf}."""
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(str(p), {})
        node[str(path[-1])] = leaf
    return out


def save_params(flat: dict[tuple, Any], directory: str | Path) -> None:
    """Save a flat {path: array} params dict as an Orbax checkpoint (sharded arrays are written in place)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(orbax_path(directory), nest(flat))
        ckptr.wait_until_finished()


def restore_params(directory: str | Path, abstract: dict[tuple, Any]) -> dict[tuple, Any]:
    """Restore params onto the shardings of `abstract` ({path: jax.ShapeDtypeStruct with sharding})."""
    import orbax.checkpoint as ocp

    target = nest(abstract)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(orbax_path(directory), target)
    except Exception as err:
        raise CheckpointError(f"{directory}: cannot restore parameters ({err})") from err
    return {path: _get(restored, path) for path in abstract}


def orbax_path(directory):
    """The path Orbax is given: gs:// as is, a local path made absolute (Orbax refuses relative ones)."""
    from etils import epath

    return epath.Path(directory) if str(directory).startswith("gs://") else Path(directory).absolute()


def _get(tree: dict, path: tuple) -> Any:
    for p in path:
        tree = tree[str(p)]
    return tree

