"""sample_queries: chunks of prompts, a seed per chunk, and the sampling dtype applied once per phase."""

from __future__ import annotations

import numpy as np
from PIL import Image

from mstar_jax.loop.rollouts import Query, sample_queries


class RecordingSampler:
    """Stands in for `Sampler`: records every generate call, answers with the chunk's prompts."""

    def __init__(self):
        self.calls, self.casts = [], 0

    def sampling_params(self, params):
        self.casts += 1
        return {"cast": params}

    def generate(self, params, images, prompts, **kw):
        self.calls.append((params, len(prompts), kw["seed"], kw["n"]))
        return [[p] * kw["n"] for p in prompts]


def test_chunks_seeds_and_one_cast_per_phase(tmp_path):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    queries = [Query(str(i), (str(image),), {"question": f"q{i}"}) for i in range(10)]
    sampler = RecordingSampler()
    out = sample_queries(sampler, "master", queries, lambda item: item["question"], n=4, temperature=1.0, seed=3,
                         max_new_tokens=8, batch_size=16, progress=False)
    assert out == [[f"q{i}"] * 4 for i in range(10)]
    assert sampler.casts == 1  # not once per chunk
    # 16 rows per call at n=4: 4 prompts per chunk; each chunk seeded by its start (resume-independent).
    assert [(c[0], c[1]) for c in sampler.calls] == [({"cast": "master"}, 4)] * 2 + [({"cast": "master"}, 2)]
    assert len({c[2] for c in sampler.calls}) == 3
