"""The one home of small I/O helpers: atomic file writes, image loading with clear errors, host gathers."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from mstar_jax.errors import DataError, StorageError

# A full disk or quota, or a file over the size limit: the write can only succeed once space is freed.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def write_atomic(path: str | Path, data: str | bytes, *, publish: bool = True) -> Path:
    """Write a file via a temporary name and a rename, so readers never see half a file.

    With `publish` (the default), a file inside a remote workdir's local mirror is then uploaded. A full disk
    raises StorageError naming the file; the previous version, if any, is left as it was.
    """
    from mstar_jax.faults import kill_point

    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(raw)
        kill_point("atomic_write", f"{path.name}:{hashlib.sha1(raw).hexdigest()[:12]}")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno in _NO_SPACE:
            raise StorageError(f"{path}: cannot write {len(raw)} bytes ({os.strerror(err.errno)}); the previous "
                               "version of the file, if any, is unchanged. Free some space and rerun") from err
        raise
    if publish:
        from mstar_jax.workdir import publish as _publish

        _publish(path)
    return path


def write_lines_atomic(path: str | Path, lines: Sequence[str], *, publish: bool = True) -> Path:
    """Write JSONL-style lines (each gets a trailing newline) atomically."""
    return write_atomic(path, "".join(line + "\n" for line in lines), publish=publish)


def load_image(source: str | Path | bytes, root: str | Path | None = None, record: str | None = None):
    """One RGB PIL image from a file (or a file's bytes); DataError naming the file and `record` when it is
    missing, outside `root`, or cannot be decoded.

    Pillow's decompression-bomb guard stays on: an image over twice `Image.MAX_IMAGE_PIXELS` is reported, never
    decoded.
    """
    import io

    from PIL import Image

    embedded = isinstance(source, (bytes, bytearray))
    name = "embedded image" if embedded else str(source)
    where = f"{name}: record {record}" if record is not None else name
    if root is not None and not embedded:
        try:
            Path(source).resolve().relative_to(Path(root).resolve())
        except ValueError:
            raise DataError(f"{where}: image path leaves the dataset root {root}") from None
    try:
        with Image.open(io.BytesIO(source) if embedded else source) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{where}: image file not found") from None
    except Image.DecompressionBombError as err:
        raise DataError(f"{where}: image refused as a decompression bomb ({err})") from None
    except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for truncated / corrupt files
        raise DataError(f"{where}: cannot read the image ({type(err).__name__}: {err})") from None


def load_images(paths: Sequence[str | Path], root: str | Path | None = None, record: str | None = None) -> list:
    """RGB PIL images in order (see `load_image`)."""
    return [load_image(p, root, record) for p in paths]


def to_host(x) -> np.ndarray:
    """A jax array as numpy on this host, gathered from every process when it spans several."""
    import jax

    if jax.process_count() > 1 and not getattr(x, "is_fully_addressable", True):
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
