"""One smoke `mstar train` per released-checkpoint family (Phi-3.5-vision, MiniCPM-Llama3-V-2.5): every stage of
the loop from a tiny random checkpoint in the release's layout, exports in that layout."""

from __future__ import annotations

import json

import pytest

from tests.loop.cli_helpers import mstar


def _tiny(family: str, path):
    if family == "phi3_v":
        from mstar_jax.models.phi3_v.tiny import make_tiny_phi3_v

        return make_tiny_phi3_v(path)
    from mstar_jax.models.minicpmv.tiny import make_tiny_minicpmv

    return make_tiny_minicpmv(path)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["phi3_v", "minicpmv"])
def test_smoke_train_runs_every_stage_and_exports_the_release_layout(family, tmp_path):
    from safetensors import safe_open

    src = _tiny(family, tmp_path / "base")
    workdir = tmp_path / "run"
    proc = mstar("train", "--config", "smoke", "--workdir", str(workdir), f"--config.model.path={src}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("base eval", "warm-up SFT", "PRM trained", "PRM verifier", "iteration 2/2", "final eval",
                  "exported the PRM"):
        assert stage in proc.stdout, stage
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {"iteration", "eval/final", "prm/train"} <= {r["stage"] for r in records}

    def keys(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            if f.name == "reward_head.safetensors":
                continue
            with safe_open(str(f), "np") as h:
                out.update({k: h.get_slice(k).get_shape() for k in h.keys()})
        return out

    want = keys(src)
    for export in (workdir / "export", workdir / "prm" / "export"):
        assert keys(export) == want, export  # every tensor of the release, under its name and shape
        assert json.loads((export / "config.json").read_text())["model_type"] == family
    assert (workdir / "prm" / "export" / "reward_head.safetensors").is_file()
