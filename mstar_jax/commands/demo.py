"""`mstar demo`: build a tiny LLaVA with transformers, convert it, check parity, export it back, reload it.

The most complete job the foundation offers on a fresh CPU machine; it needs torch (the `[test]` extra).
"""

from __future__ import annotations

import time
from pathlib import Path


def register(subparsers) -> None:
    """Add the `demo` command."""
    p = subparsers.add_parser("demo", help="tiny end-to-end check: HF model -> Flax -> parity -> HF export")
    p.add_argument("--workdir", default="runs/demo", help="where the checkpoints are written")
    p.add_argument("--vision", default="clip", choices=["clip", "siglip"])
    p.add_argument("--text", default="llama", choices=["llama", "qwen2", "phi3"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo workdir")
    p.set_defaults(handler=run_demo)


def _step(msg: str, t0: float) -> None:
    print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)


def run_demo(args) -> int:
    """Run the demo; returns 0 when every check passes."""
    import shutil

    import numpy as np
    import torch
    import transformers

    import mstar_jax
    from mstar_jax.conversion import flax_to_hf, hf_to_flax
    from mstar_jax.errors import MstarError
    from mstar_jax.models.llava.tiny import TinySpec, make_tiny_llava
    from mstar_jax.sft_batch import prompt_text

    t0 = time.time()
    work = Path(args.workdir)
    if work.exists() and any(work.iterdir()):
        if not args.overwrite:
            raise MstarError(f"{work} already exists; pass --overwrite or another --workdir")
        shutil.rmtree(work)
    spec = TinySpec(vision=args.vision, text=args.text, vision_layers=3, layers=4, hidden=128, intermediate=256)
    hf_model = make_tiny_llava(work / "hf", spec)
    _step(f"built a random tiny {args.vision}+{args.text} LLaVA with transformers -> {work / 'hf'}", t0)
    hf_to_flax(work / "hf", work / "flax")
    _step(f"converted to an Orbax checkpoint -> {work / 'flax'}", t0)

    policy = mstar_jax.load(work / "flax")
    from PIL import Image, ImageDraw

    images = []
    for i, colour in enumerate(["red", "blue"]):
        img = Image.new("RGB", (64 + 16 * i, 64), "white")
        ImageDraw.Draw(img).ellipse([8, 8, 40 + 8 * i, 40], fill=colour)
        images.append(img)
    prompts = ["How many circles are there?", "What colour is the circle in the picture? Answer briefly."]
    texts = [prompt_text(policy.processor, p) for p in prompts]
    batch = dict(policy.processor(images=images, text=texts, return_tensors="np", padding=True))
    ours = policy.logits(batch)
    mask = batch["attention_mask"]
    pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        ref = hf_model(**{k: torch.tensor(v) for k, v in batch.items()}, position_ids=torch.tensor(pos)).logits
    err = float(np.abs(ours - ref.numpy())[mask.astype(bool)].max())
    _step(f"logits vs transformers (fp32, 2 images, padded batch): max abs error {err:.2e} (limit 1e-4)", t0)

    flax_to_hf(work / "flax", work / "export")
    reloaded, info = transformers.AutoModelForImageTextToText.from_pretrained(work / "export",
                                                                              output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"}
    with torch.no_grad():
        ref2 = reloaded.eval()(**{k: torch.tensor(v) for k, v in batch.items()}, position_ids=torch.tensor(pos)).logits
    same = bool(torch.equal(ref, ref2))
    _step(f"exported back to HF -> {work / 'export'}; transformers loads it "
          f"({'no missing/unexpected keys' if not problems else problems}); identical logits: {same}", t0)
    ok = err < 1e-4 and same and not problems
    print("demo: all checks passed" if ok else "demo: CHECKS FAILED", flush=True)
    return 0 if ok else 1
