"""HF <-> Flax conversion: bitwise round trips, every key layout, sharded inputs, clear errors, nothing partial."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mstar_jax
from mstar_jax.cli import main as cli
from mstar_jax.conversion import flax_to_hf, hf_to_flax
from mstar_jax.errors import CheckpointError
from mstar_jax.models.llava.keymap import LAYOUTS
from mstar_jax.models.llava.tiny import TinySpec, make_tiny_llava
from tests.conftest import hf_logits, make_batch


def read_all(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF directory (single file or shards)."""
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def relayout(src: Path, dst: Path, layout_name: str) -> Path:
    """Copy an HF dir rewriting tensor names into another key layout (as other transformers versions write)."""
    by = {lay.name: lay for lay in LAYOUTS}
    source = next(lay for lay in LAYOUTS if all(lay.to_canonical(k) for k in read_all(src)))
    tensors = {by[layout_name].from_canonical(source.to_canonical(k)): v for k, v in read_all(src).items()}
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def assert_bitwise_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), f"{k} differs"


@pytest.mark.parametrize("name", ["clip_llama", "siglip_qwen2", "clip_phi3"])
def test_round_trip_is_bitwise_and_transformers_loads_the_export(tiny_models, tmp_path, name):
    src, hf_model = tiny_models[name]
    hf_to_flax(src, tmp_path / "flax")
    flax_to_hf(tmp_path / "flax", tmp_path / "hf")
    assert_bitwise_equal(read_all(src), read_all(tmp_path / "hf"))
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(read_all(src))

    import transformers

    model, info = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "hf",
                                                                           output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    assert processor.chat_template
    batch = make_batch(processor)
    np.testing.assert_array_equal(hf_logits(model.eval(), batch), hf_logits(hf_model, batch))
    ours = mstar_jax.load(tmp_path / "flax").logits(batch)
    mask = batch["attention_mask"].astype(bool)
    assert np.abs(ours - hf_logits(hf_model, batch))[mask].max() < 1e-4


@pytest.mark.parametrize("layout", ["hub", "transformers-4.5x", "transformers-5", "transformers-5-state-dict"])
def test_every_key_layout_round_trips_in_its_own_layout(tiny_models, tmp_path, layout):
    src = relayout(tiny_models["siglip_qwen2"][0], tmp_path / "src", layout)
    hf_to_flax(src, tmp_path / "flax")
    assert json.loads((tmp_path / "flax" / "mstar_checkpoint.json").read_text())["layout"] == layout
    flax_to_hf(tmp_path / "flax", tmp_path / "hf")
    assert_bitwise_equal(read_all(src), read_all(tmp_path / "hf"))


def test_sharded_bf16_input_stays_bf16_and_round_trips(tmp_path):
    spec = TinySpec(vision="clip", text="llama", dtype="bfloat16")
    make_tiny_llava(tmp_path / "src", spec, max_shard_size="20KB")
    shards = sorted((tmp_path / "src").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "src" / "model.safetensors.index.json").is_file()
    hf_to_flax(tmp_path / "src", tmp_path / "flax")
    meta = json.loads((tmp_path / "flax" / "mstar_checkpoint.json").read_text())
    assert set(meta["param_dtypes"].values()) == {"bfloat16"}
    policy = mstar_jax.load(tmp_path / "flax", dtype=None)
    assert {str(a.dtype) for a in policy.params.values()} == {"bfloat16"}
    flax_to_hf(tmp_path / "flax", tmp_path / "hf", max_shard_size="20KB")
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 2
    assert_bitwise_equal(read_all(tmp_path / "src"), read_all(tmp_path / "hf"))


def test_siglip_pooling_head_and_unused_layers_are_kept(tmp_path):
    """SigLIP's head and the vision layers after the feature layer are not used, but survive the export."""
    spec = TinySpec(vision="siglip", text="llama", vision_layers=3, vision_feature_layer=-2,
                    select_strategy="full")
    make_tiny_llava(tmp_path / "src", spec)
    tensors = read_all(tmp_path / "src")
    prefix = "vision_tower.vision_model." if any(".vision_model." in k for k in tensors) else "vision_tower."
    tensors[prefix + "head.probe"] = np.ones((1, 1, 32), np.float32)
    tensors[prefix + "head.mlp.fc1.weight"] = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    for f in (tmp_path / "src").glob("*.safetensors"):
        f.unlink()
    save_file(tensors, str(tmp_path / "src" / "model.safetensors"))
    hf_to_flax(tmp_path / "src", tmp_path / "flax")
    policy = mstar_jax.load(tmp_path / "flax")
    assert len(policy.loaded.model().vision_tower.layers) == 2  # hidden_states[-2] needs 2 of 3 layers
    flax_to_hf(tmp_path / "flax", tmp_path / "hf")
    assert_bitwise_equal(tensors, read_all(tmp_path / "hf"))


def test_cli_refuses_existing_output_unless_overwrite(tiny_models, tmp_path, capsys):
    src = tiny_models["clip_llama"][0]
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert cli(["convert", "hf-to-flax", str(src), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"
    assert cli(["convert", "hf-to-flax", str(src), str(out), "--overwrite"]) == 0
    assert (out / "mstar_checkpoint.json").is_file() and not (out / "precious.txt").exists()


# ----------------------------------------------------------------------------------------- bad inputs


def broken_copy(src: Path, dst: Path, edit) -> Path:
    """Copy an HF dir, let `edit` change its tensor dict, write it back as one file."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = read_all(src)
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def expect_error(src: Path, out: Path, match: str):
    with pytest.raises(CheckpointError, match=match) as info:
        hf_to_flax(src, out)
    assert not out.exists(), "nothing may be written on failure"
    assert not list(out.parent.glob(f".{out.name}.partial-*")), "no partial directory may remain"
    return str(info.value)


def test_missing_key_is_named(tiny_models, tmp_path):
    src = broken_copy(tiny_models["clip_llama"][0], tmp_path / "src",
                      lambda t: t.pop("language_model.model.layers.1.mlp.up_proj.weight"))
    msg = expect_error(src, tmp_path / "out", "missing")
    assert "layers.1.mlp.up_proj" in msg and str(src) in msg


def test_unexpected_key_is_named(tiny_models, tmp_path):
    src = broken_copy(tiny_models["clip_llama"][0], tmp_path / "src",
                      lambda t: t.__setitem__("language_model.model.layers.0.mystery.weight", np.zeros(3, np.float32)))
    assert "mystery" in expect_error(src, tmp_path / "out", "unexpected")


def test_shape_contradicting_config_is_named(tiny_models, tmp_path):
    key = "language_model.model.layers.0.self_attn.k_proj.weight"
    src = broken_copy(tiny_models["clip_llama"][0], tmp_path / "src",
                      lambda t: t.__setitem__(key, np.zeros((7, 64), np.float32)))
    msg = expect_error(src, tmp_path / "out", "shape")
    assert key in msg and "config.json" in msg and "model.safetensors" in msg


def test_pickle_only_checkpoint_is_refused(tiny_models, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_models["clip_llama"][0], src, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    msg = expect_error(src, tmp_path / "out", "pickle")
    assert "safetensors" in msg and "save_pretrained" in msg


def test_remote_code_model_type_is_refused(tiny_models, tmp_path):
    """A model_type no family reads (here a remote-code one) is refused, never handed to trust_remote_code."""
    src = tmp_path / "src"
    shutil.copytree(tiny_models["clip_llama"][0], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "deepseek_vl_remote"
    cfg["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekVLConfig"}
    (src / "config.json").write_text(json.dumps(cfg))
    assert "remote code" in expect_error(src, tmp_path / "out", "trust_remote_code|remote code")


def test_corrupt_safetensors_is_named(tiny_models, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_models["clip_llama"][0], src)
    (src / "model.safetensors").write_bytes(b"garbage" * 10)
    expect_error(src, tmp_path / "out", "model.safetensors")


def test_object_store_save_writes_in_place_with_the_description_last(tiny_models, tmp_path, monkeypatch):
    """On gs:// (no atomic directory rename) save_converted replaces a killed save's leftovers in place and
    writes mstar_checkpoint.json last, so a half-written directory is never taken for a checkpoint."""
    from etils import epath

    from mstar_jax import conversion

    src, _ = tiny_models["siglip_qwen2"]
    loaded = conversion.load_hf(src)
    out = epath.Path(tmp_path / "ckpt")
    (out / "params").mkdir(parents=True)  # what a save killed mid-way leaves
    real_save_params = conversion.save_params

    def save_params(params, directory):
        assert not (out / conversion.META_NAME).exists()
        real_save_params(params, directory)

    monkeypatch.setattr(conversion, "_is_remote", lambda path: True)  # take the gs:// branch on a local path
    monkeypatch.setattr(conversion, "save_params", save_params)
    with pytest.raises(CheckpointError, match="already exists"):
        conversion.save_converted(loaded, out)
    conversion.save_converted(loaded, out, overwrite=True)
    assert not [p for p in Path(out).parent.iterdir() if p.name.startswith(".")], "no staging on object stores"
    back = conversion.load_converted(out)
    assert_bitwise_equal({".".join(map(str, k)): np.asarray(v) for k, v in loaded.params.items()},
                         {".".join(map(str, k)): np.asarray(v) for k, v in back.params.items()})
    assert sorted(back.extras) == sorted(loaded.extras)
    assert (out / "hf" / "config.json").exists()
