"""Shared fixtures: tiny random HF LLaVA checkpoints built with transformers (no network), and batches for them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# XLA:CPU's LLVM optimisation off for the tests, set before any backend starts and inherited by the `mstar`
# subprocesses: the tiny programs compile ~20 % faster, and compiling is most of what the suite spends. The
# parity tests still hold to their tolerances, and the bitwise tests compare runs made under the same flags.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

from mstar_jax.models.llava.tiny import TinySpec, make_tiny_llava  # noqa: E402


def pytest_configure(config):
    """Choose the `mstar` subprocesses' compilation cache (tests/loop/cli_helpers.py sets MSTAR_TEST_JAX_CACHE on
    import) before pytest-xdist starts its workers: they inherit it, so a worker loads what the other compiled."""
    import tests.loop.cli_helpers  # noqa: F401

# The three families the foundation must cover, each with a different mix of options.
SPECS = {
    # CLIP + Llama, untied head, Llama-3 rope scaling, CLS dropped ("default"), penultimate layer.
    # head_dim set explicitly (not hidden / heads).
    "clip_llama": TinySpec(vision="clip", text="llama", vision_layers=3, head_dim=24,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # SigLIP + Qwen2 (q/k/v bias), tied embeddings, all patches ("full"), last layer.
    "siglip_qwen2": TinySpec(vision="siglip", text="qwen2", tie_word_embeddings=True, vision_feature_layer=-1,
                             select_strategy="full", projector_act="gelu_pytorch_tanh", kv_heads=1),
    # CLIP + Phi-3 (fused qkv / gate_up), longrope like Phi-3.5 (switches factors past 16 tokens),
    # two vision feature layers concatenated, a projector without biases.
    "clip_phi3": TinySpec(vision="clip", text="phi3", heads=4, kv_heads=4, vision_feature_layer=(-3, -1),
                          projector_bias=False,
                          rope_scaling={"rope_type": "longrope", "original_max_position_embeddings": 16,
                                        "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                        "long_factor": [2.0 + 0.3 * i for i in range(8)]},
                          max_position_embeddings=256),
}

PROMPTS = ["How many circles are there in the picture? Count them carefully.", "Which bar is tallest?"]


def _build(tmp_path_factory, name: str, **kw) -> tuple[Path, object]:
    path = tmp_path_factory.mktemp(name)
    model = make_tiny_llava(path, SPECS[name], **kw)
    return path, model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{name: (hf_dir, torch model)} for every family in SPECS, built once per session."""
    return {name: _build(tmp_path_factory, name) for name in SPECS}


def random_images(seed: int = 0, sizes=((40, 52), (33, 30))):
    """Deterministic random RGB PIL images of different sizes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def make_batch(processor, prompts=PROMPTS, images=None, padding_side="left"):
    """Processor output (numpy) for one image + one prompt per row, through the chat template, padded."""
    images = images if images is not None else random_images(0, [(40 + 7 * i, 52 - 5 * i) for i in range(len(prompts))])
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}], add_generation_prompt=True)
        for p in prompts]
    processor.tokenizer.padding_side = padding_side
    try:
        return dict(processor(images=images, text=texts, return_tensors="np", padding=True))
    finally:
        processor.tokenizer.padding_side = "left"


def hf_logits(model, batch) -> np.ndarray:
    """Reference logits from the HF PyTorch model, with generate-style position ids."""
    import torch

    mask = batch["attention_mask"]
    pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(mask),
                    pixel_values=torch.tensor(batch["pixel_values"]), position_ids=torch.tensor(pos))
    return out.logits.float().numpy()


def kill_log(workdir: Path) -> Path:
    """Where the smoke run logs the kill points it passes: beside its workdir, so copies of the workdir lack it."""
    return workdir.with_name(workdir.name + ".kill_points.log")


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """(workdir, stdout) of one `mstar train --config smoke` run, shared by the session (loop and PRM tests) and,
    under pytest-xdist, by every worker: the first to need it runs it, the others wait and read it. Tests only
    read it (those that rerun or damage a run work on a copy)."""
    from filelock import FileLock

    from tests.loop.cli_helpers import mstar

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the directory every worker's basetemp is in
    workdir, out = root / "smoke_shared" / "run", root / "smoke_shared" / "stdout.txt"
    with FileLock(str(root / "smoke_shared.lock")):
        if not out.exists():
            workdir.parent.mkdir(exist_ok=True)
            # Every kill point it passes is logged: what the fault campaign draws from.
            proc = mstar("train", "--config", "smoke", "--workdir", str(workdir),
                         MSTAR_KILL_LOG=str(kill_log(workdir)))
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            out.write_text(proc.stdout)
    return workdir, out.read_text()
