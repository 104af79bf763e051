"""`mstar sample` with an image it cannot use: one line naming the file, before the checkpoint is loaded."""

from __future__ import annotations

from mstar_jax.cli import main
from tests.test_io import bomb_png, png


def test_bad_images_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "cut.png").write_bytes(png(1)[:200])
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    for name, why in (("cut.png", "image file is truncated"), ("bomb.png", "decompression bomb"),
                      ("gone.png", "image file not found")):
        # The checkpoint does not exist either: the image is checked first, so its error is the one shown.
        assert main(["sample", str(tmp_path / "no-ckpt"), "--image", str(tmp_path / name), "--prompt", "x"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"mstar sample: error: {tmp_path / name}: ") and why in err and "Traceback" not in err
