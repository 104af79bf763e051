"""The iteration's query stream: same samples as sample_queries, per-process chunks, exact resume mid-iteration."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mstar_jax.data.stream import Progress, chunk_dataset, chunk_iterator, sample_stream, start_state
from mstar_jax.loop.rollouts import Query, sample_queries
from mstar_jax.sampler import Sample


class SeededSampler:
    """Stands in for `Sampler`: a sample's text is a function of (prompt, seed, k); records the chunks it sampled;
    raises after `fail_after` calls (what a kill leaves)."""

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after = [], fail_after

    def sampling_params(self, params):
        return params

    def process_local(self):
        return self

    def adopt(self, params):
        return params

    def generate(self, params, images, prompts, **kw):
        if self.fail_after is not None and len(self.calls) == self.fail_after:
            raise KeyboardInterrupt("killed")
        assert all(isinstance(im, Image.Image) for ims in images for im in ims)  # decoded by the pipeline
        self.calls.append((tuple(prompts), kw["seed"]))
        return [[Sample([k], f"{p}|{kw['seed']}|{k}", [-0.25 * k], "stop") for k in range(kw["n"])] for p in prompts]


@pytest.fixture
def queries(tmp_path):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    return [Query(f"q{i}", (str(image),), {"question": f"question {i}"}) for i in range(23)]


def prompt(item):
    return item["question"]


KW = dict(n=4, temperature=1.0, seed=5, max_new_tokens=8, batch_size=12)  # 3 queries per chunk


def test_same_samples_as_sample_queries(queries, tmp_path):
    idx = np.random.default_rng(0).permutation(len(queries))[:17]
    ref = sample_queries(SeededSampler(), None, [queries[i] for i in idx], prompt, progress=False, **KW)
    out = sample_stream(SeededSampler(), None, queries, idx, prompt, progress_path=tmp_path / "it.jsonl", **KW)
    assert [[s.text for s in ss] for ss in out] == [[s.text for s in ss] for ss in ref]
    assert out[0][1].logprobs == [-0.25] and len(out) == 17


def test_processes_sample_disjoint_chunks_that_cover_the_slice(queries):
    idx = list(range(3, 20))
    seen = []
    for p in range(3):
        seen += [(e["start"], [q.id for q in e["queries"]]) for e in chunk_dataset(queries, idx, 3, p, 3)]
    assert sorted(s for s, _ in seen) == list(range(0, 17, 3))
    assert sorted(i for _, ids in seen for i in ids) == sorted(f"q{i}" for i in idx)
    assert [e["start"] for e in chunk_dataset(queries, idx, 3, 1, 3)] == [3, 12]
    with pytest.raises(ValueError, match="process_index 3"):
        chunk_dataset(queries, idx, 3, 3, 3)


def test_killed_stream_resumes_with_exactly_the_remaining_chunks(queries, tmp_path, capsys):
    idx = list(range(len(queries)))
    path = tmp_path / "iter_0001.jsonl"
    full = sample_stream(SeededSampler(), None, queries, idx, prompt, progress_path=tmp_path / "ref.jsonl", **KW)
    killed = SeededSampler(fail_after=3)
    with pytest.raises(KeyboardInterrupt):
        sample_stream(killed, None, queries, idx, prompt, progress_path=path, **KW)
    progress = tmp_path / "iter_0001.p0.progress.jsonl"
    lines = progress.read_bytes().split(b"\n")
    assert len([x for x in lines if x]) == 1 + 3  # header + the 3 sampled chunks, durable
    progress.write_bytes(b"\n".join(lines[:-1]) + b'\n{"start": 9, "samp')  # a line cut by the kill
    resumed = SeededSampler()
    out = sample_stream(resumed, None, queries, idx, prompt, progress_path=path, **KW)
    assert "resuming after 3 sampled chunk(s)" in capsys.readouterr().out
    assert [c[0][0] for c in resumed.calls] == [f"question {i}" for i in range(9, 23, 3)]  # only the rest
    assert [[s.text for s in ss] for ss in out] == [[s.text for s in ss] for ss in full]


def test_progress_of_other_settings_is_not_reused(queries, tmp_path, capsys):
    idx = list(range(9))
    path = tmp_path / "it.jsonl"
    with pytest.raises(KeyboardInterrupt):
        sample_stream(SeededSampler(fail_after=1), None, queries, idx, prompt, progress_path=path, **KW)
    again = SeededSampler()
    sample_stream(again, None, queries, idx, prompt, progress_path=path, **{**KW, "temperature": 0.5})
    assert len(again.calls) == 3 and "sampling the iteration again" in capsys.readouterr().out


def test_iterator_state_restores_the_remaining_chunks(queries, tmp_path):
    ds = chunk_dataset(queries, list(range(23)), 3)
    it = chunk_iterator(ds)
    assert it.get_state() == start_state()
    next(it), next(it)
    state = json.loads(json.dumps(it.get_state()))  # as stored in a checkpoint's JSON metadata
    rest = [e["start"] for e in it]
    again = chunk_iterator(ds)
    again.set_state(state)
    assert [e["start"] for e in again] == rest == list(range(6, 23, 3))
    assert Progress(tmp_path / "none.jsonl", "k").state is None
