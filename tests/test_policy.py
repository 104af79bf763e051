"""The library runs on JAX alone: torch is only needed for reference comparisons and for making tiny models."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.loop.cli_helpers import ROOT, mstar_env

# Run in a fresh interpreter where torch does not exist: find_spec says so (transformers then takes its
# torch-free paths) and any import of it fails.
NO_TORCH = textwrap.dedent("""
    import importlib.abc, importlib.util, sys

    def _blocked(name):
        return name == "torch" or name.startswith("torch.")

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if _blocked(name):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    _find_spec = importlib.util.find_spec
    importlib.util.find_spec = lambda name, *a, **k: None if _blocked(name) else _find_spec(name, *a, **k)
    sys.meta_path.insert(0, NoTorch())
""")


def test_load_logits_and_sampling_without_torch(tiny_models, tmp_path):
    from mstar_jax.conversion import hf_to_flax

    hf_to_flax(tiny_models["clip_llama"][0], tmp_path / "flax")
    script = NO_TORCH + textwrap.dedent(f"""
        import numpy as np
        from PIL import Image

        import mstar_jax
        from mstar_jax.sft_batch import prompt_text

        policy = mstar_jax.load({str(tmp_path / "flax")!r})
        image = Image.fromarray(np.full((40, 40, 3), 200, np.uint8))
        batch = policy.processor(images=[image], text=[prompt_text(policy.processor, "How many?")], return_tensors="np")
        logits = policy.logits(batch)
        samples = policy.generate([image], ["How many?"], n=2, temperature=0.7, max_new_tokens=4)
        assert np.isfinite(logits).all() and len(samples[0]) == 2
        assert "torch" not in sys.modules
        print("ok without torch")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=mstar_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "ok without torch" in proc.stdout, proc.stderr[-3000:]
