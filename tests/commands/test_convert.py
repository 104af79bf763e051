"""`mstar convert` through the CLI: hf-to-flax, then flax-to-hf in another key layout that transformers loads."""

from __future__ import annotations

import json

import numpy as np

from mstar_jax.cli import main
from mstar_jax.models.llava.keymap import LAYOUTS
from tests.test_conversion import read_all


def test_flax_to_hf_writes_the_layout_asked_for(tiny_models, tmp_path, capsys):
    import transformers

    src = tiny_models["clip_llama"][0]
    assert main(["convert", "hf-to-flax", str(src), str(tmp_path / "flax")]) == 0
    source = json.loads((tmp_path / "flax" / "mstar_checkpoint.json").read_text())["layout"]
    by = {layout.name: layout for layout in LAYOUTS}
    target = next(name for name in by if name != source)
    assert main(["convert", "flax-to-hf", str(tmp_path / "flax"), str(tmp_path / "out"), "--layout", target]) == 0
    assert f"exported {tmp_path / 'flax'}" in capsys.readouterr().out
    written, original = read_all(tmp_path / "out"), read_all(src)
    # Every tensor under its name in the target layout, bit for bit the source's.
    assert set(written) == {by[target].from_canonical(by[source].to_canonical(k)) for k in original}
    for k, v in original.items():
        assert np.array_equal(written[by[target].from_canonical(by[source].to_canonical(k))], v), k
    model, info = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "out",
                                                                           output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert main(["convert", "flax-to-hf", str(tmp_path / "flax"), str(tmp_path / "bad"), "--layout", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
