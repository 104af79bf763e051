"""Qwen2-VL / Qwen2.5-VL through every command: `mstar convert`, `mstar sample` (and its refusal of an image over
max_pixels), `mstar eval`, `mstar bench sampler --family`, `mstar plan`'s presets, and one smoke loop
(`mstar train --config smoke --config.model.path=<converted Qwen2.5-VL>`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mstar_jax
from mstar_jax.cli import main
from mstar_jax.models.qwen2_vl.tiny import TinySpec, make_tiny_qwen_vl
from tests.conftest import random_images
from tests.loop.cli_helpers import mstar


def _tensors(path):
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(HF dir, converted checkpoint) of a tiny Qwen2-VL, converted through the CLI."""
    root = tmp_path_factory.mktemp("qwen_cmd")
    make_tiny_qwen_vl(root / "hf", TinySpec(model_type="qwen2_vl"))
    assert main(["convert", "hf-to-flax", str(root / "hf"), str(root / "flax")]) == 0
    return root / "hf", root / "flax"


def test_cli_convert_exports_the_other_layout_bitwise(ckpt, tmp_path, capsys):
    import transformers

    hf, flax = ckpt
    assert json.loads((flax / "mstar_checkpoint.json").read_text())["layout"] == "hub"
    assert main(["convert", "flax-to-hf", str(flax), str(tmp_path / "out"), "--layout", "transformers-4.5x"]) == 0
    written, original = _tensors(tmp_path / "out"), _tensors(hf)
    renamed = {("model.language_model." + k[len("model."):] if k.startswith("model.") else
                "model." + k if k.startswith("visual.") else k): v for k, v in original.items()}
    assert sorted(written) == sorted(renamed)
    for k, v in renamed.items():
        assert np.array_equal(written[k], v), k
    _, info = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert main(["convert", "flax-to-hf", str(flax), str(tmp_path / "bad"), "--layout", "nope"]) == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_cli_sample_prints_json(ckpt, tmp_path, capsys):
    img = tmp_path / "img.png"
    random_images(1, [(40, 90)])[0].save(img)
    assert main(["sample", str(ckpt[1]), "--image", str(img), "--prompt", "Which bar?", "--n", "3",
                 "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["samples"]) == 3 and all(1 <= len(s["token_ids"]) <= 4 for s in out["samples"])


def test_cli_sample_refuses_an_image_over_max_pixels(ckpt, tmp_path, capsys):
    from PIL import Image

    img = tmp_path / "thin.png"
    Image.fromarray(np.zeros((8, 1000, 3), np.uint8)).save(img)
    assert main(["sample", str(ckpt[1]), "--image", str(img), "--prompt", "What?", "--n", "1", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing sampled or printed
    assert "max_pixels=4096" in captured.err and "Traceback" not in captured.err


def test_cli_eval_on_synthetic_items(ckpt, tmp_path):
    from mstar_jax.data.synth import SynthConfig, generate

    generate(tmp_path / "synth", SynthConfig(seed=3, sizes={"test_ood": 6}, image_size=40, workers=1))
    out = tmp_path / "out"
    assert main(["eval", str(ckpt[1]), "--benchmark", "synthetic", "--data", str(tmp_path / "synth" /
                 "test_ood.json"), "--n", "2", "--temperature", "1.0", "--max-new-tokens", "6", "--batch-size", "6",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    lines = [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]
    rows = json.loads((tmp_path / "synth" / "test_ood.json").read_text())
    assert results["n"] == 6 and len(lines) == 6 and all(len(x["responses"]) == 3 for x in lines)
    greedy = [mstar_jax.check_answer(x["responses"][0], rows[x["id"]]) for x in lines]
    assert results["greedy_accuracy"] == pytest.approx(100 * sum(greedy) / 6)


def test_cli_bench_sampler_family(tmp_path, capsys):
    assert main(["bench", "sampler", "--family", "qwen2_5_vl", "--size", "tiny", "--workdir", str(tmp_path),
                 "--n", "3", "--max-new-tokens", "6", "--repeats", "1", "--stream-mb", "0", "--modes", "greedy"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads((tmp_path / "qwen2_5_vl-tiny-hf" / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    assert rec["greedy_identical"] is True and rec["ours_tokens"] == rec["hf_tokens"] > 0 and rec["ratio"] > 0


def test_plan_finds_the_qwen_presets():
    from mstar_jax.memory.families import find_preset

    fam, cfg = find_preset("qwen2.5-vl-7b")
    assert fam.name == "qwen2_vl" and cfg.vision.fullatt_block_indexes == (7, 15, 23, 31)
    batch = fam.batch(cfg, 4, 1024)
    assert batch["pixel_values"][0] == (4, 1, 5120, 1176) and batch["image_grid_thw"][0] == (4, 1, 3)
    assert "M-RoPE" in fam.describe(cfg)


def _pretrained_checkpoint(root):
    """A tiny Qwen2.5-VL pre-trained on the smoke config's queries (as the demo's own base model is), converted
    to our format: a random model never answers a hinted warm-up question."""
    from mstar_jax import sharding
    from mstar_jax.config import load_config, section_seed
    from mstar_jax.conversion import load_hf, save_converted
    from mstar_jax.loop import data as loop_data
    from mstar_jax.loop.base_model import _PretrainCfg, corpus, pretrain_examples
    from mstar_jax.loop.sft import Trainer
    from mstar_jax.policy import Policy, load_processor

    cfg = load_config("smoke")
    queries = loop_data.load_splits(cfg, root / "data_run", lambda *a: None)["pretrain"]
    seed = section_seed(cfg, cfg.model.pretrain)
    make_tiny_qwen_vl(root / "init", TinySpec(model_type="qwen2_5_vl", vision_layers=3, vocab_size=400, seed=seed),
                      corpus=corpus(queries))
    loaded = load_hf(root / "init", sharding.make_mesh(), "float32")
    policy = Policy(loaded, load_processor(root / "init"))
    p = cfg.model.pretrain
    examples = pretrain_examples(queries, p.cot_fraction, seed, p.hint_fraction, p.cot_direct_fraction)
    trainer = Trainer(policy, _PretrainCfg(lr=p.lr, global_batch=p.batch_size, micro_batch=p.batch_size),
                      total_steps=p.steps, max_length=cfg.data.max_prompt_tokens)
    state, metrics = trainer.fit(trainer.fresh_state(policy.params), examples,
                                 epochs=p.steps * p.batch_size / len(examples), seed=seed)
    assert metrics["train_steps"] == p.steps and np.isfinite(metrics["loss"])
    loaded.params = state.params
    save_converted(loaded, root / "base")
    return root / "base"


@pytest.mark.slow
def test_smoke_loop_on_a_converted_qwen2_5_vl(tmp_path):
    base = _pretrained_checkpoint(tmp_path)
    workdir = tmp_path / "run"
    proc = mstar("train", "--config", "smoke", "--workdir", str(workdir), f"--config.model.path={base}",
                 timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("base eval", "warm-up", "PRM trained", "self-evolving", "final eval", "report"):
        assert stage in proc.stdout, f"no line for stage {stage!r}"
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {"iteration", "eval/base", "eval/warmup", "eval/final", "prm/train"} <= {r["stage"] for r in records}
    # The trained policy is exported as a Qwen2.5-VL checkpoint that loads back; self-evolving changed its weights.
    export = workdir / "export"
    assert json.loads((export / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    trained, start = mstar_jax.load(export).params, mstar_jax.load(base).params
    for key in (("language_model", "layers", 0, "self_attn", "q_proj", "kernel"),
                ("vision_tower", "layers", 0, "attn", "qkv", "kernel")):
        assert not np.array_equal(np.asarray(trained[key]), np.asarray(start[key])), key
    assert mstar_jax.load_prm(workdir / "prm" / "export") is not None
