"""mstar_jax.io: atomic writes (a full disk loses nothing), images with errors that name the file and record."""

from __future__ import annotations

import errno
import io
import pathlib
import struct
import zlib

import numpy as np
import pytest

from mstar_jax.errors import DataError, StorageError
from mstar_jax.io import load_image, load_images, to_host, write_atomic, write_lines_atomic


def png(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def bomb_png() -> bytes:
    """A valid PNG header for 20000 x 20000 pixels (over twice Pillow's MAX_IMAGE_PIXELS) and no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_write_atomic_replaces_whole_files(tmp_path):
    path = tmp_path / "sub" / "a.jsonl"
    write_lines_atomic(path, ["{}", "[]"])
    assert path.read_text() == "{}\n[]\n"
    write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01" and [p.name for p in path.parent.iterdir()] == ["a.jsonl"]


def test_a_full_disk_is_one_clear_error_and_the_old_file_stays(tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    write_atomic(path, "old")

    def full(self, data):
        self.open("wb").write(data[:3])  # part of it lands, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_bytes", full)
    with pytest.raises(StorageError, match=rf"{path}: cannot write 11 bytes \(No space left on device\); the "
                                           "previous version of the file, if any, is unchanged"):
        write_atomic(path, "new content")
    monkeypatch.undo()
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.md"]  # no temp left


def test_images_load_or_fail_naming_the_file_and_record(tmp_path):
    (tmp_path / "ok.png").write_bytes(png(0))
    (tmp_path / "cut.png").write_bytes(png(1)[:200])
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    (tmp_path / "root").mkdir()
    assert load_image(tmp_path / "ok.png").size == (20, 20)
    assert load_images([png(2)], record="r9")[0].mode == "RGB"  # bytes of an embedded image
    cases = {tmp_path / "cut.png": "cannot read the image (OSError: image file is truncated",
             tmp_path / "bomb.png": "image refused as a decompression bomb (Image size (400000000 pixels)",
             tmp_path / "gone.png": "image file not found"}
    for path, why in cases.items():
        with pytest.raises(DataError) as err:
            load_image(path, record="r7")
        assert str(err.value).startswith(f"{path}: record r7: {why}"), err.value
    escape = tmp_path / "root" / ".." / "ok.png"
    with pytest.raises(DataError, match=r"record r7: image path leaves the dataset root"):
        load_image(escape, root=tmp_path / "root", record="r7")


def test_to_host_gives_numpy():
    import jax.numpy as jnp

    out = to_host(jnp.arange(6).reshape(2, 3))
    assert isinstance(out, np.ndarray) and out.tolist() == [[0, 1, 2], [3, 4, 5]]
