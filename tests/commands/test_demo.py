"""`mstar demo` through the CLI: every check it prints passes, and it refuses to overwrite without --overwrite."""

from __future__ import annotations

import json

from mstar_jax.cli import main


def test_demo_builds_converts_compares_and_exports(tmp_path, capsys):
    work = tmp_path / "demo"
    assert main(["demo", "--workdir", str(work), "--vision", "siglip", "--text", "qwen2"]) == 0
    out = capsys.readouterr().out
    assert "demo: all checks passed" in out and "identical logits: True" in out
    err = float(out.split("max abs error ")[1].split()[0])
    assert err < 1e-4
    assert json.loads((work / "flax" / "mstar_checkpoint.json").read_text())["layout"]
    assert (work / "export" / "config.json").is_file()
    assert main(["demo", "--workdir", str(work)]) == 2  # exists: refused, one line, nothing replaced
    assert "pass --overwrite" in capsys.readouterr().err
