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


def test_only_complete_matching_rollouts_are_reused(tmp_path, capsys):
    """A rollouts file is reused only when every line is a record of this phase's queries, sampled at its T;
    anything else is named and sampled again (None), never trained on."""
    from mstar_jax.loop.rollouts import Rollout, read_rollouts, reusable_rollouts, write_rollouts

    queries = [Query(str(i), (), {"question": f"q{i}"}) for i in range(3)]
    path = tmp_path / "iter_0001.jsonl"
    records = [Rollout(q.id, "p", ["a", "b"], [True, False], [[-0.5], [-1.0]], [0.1, 0.2], 0.7) for q in queries]
    assert reusable_rollouts(path, queries, 0.7) is None  # absent
    write_rollouts(path, records)
    assert read_rollouts(path) == records and reusable_rollouts(path, queries, 0.7) == records
    assert reusable_rollouts(path, queries[:2], 0.7) is None  # another iteration's queries
    assert reusable_rollouts(path, queries, 1.0) is None  # sampled at another temperature
    lines = path.read_text().splitlines()
    for bad in ('{"query_id": "1", "prompt": "p"', '{"query_id": "1", "prompt": "p", "texts": ["a"], '
                '"correct": [], "logprobs": [[0.0]]}', "[1, 2]"):
        path.write_text("\n".join(lines[:1] + [bad] + lines[2:]) + "\n")
        capsys.readouterr()
        assert reusable_rollouts(path, queries, 0.7) is None, bad
        assert f"{path}: line 2: corrupt rollout record" in capsys.readouterr().out
