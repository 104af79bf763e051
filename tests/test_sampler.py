"""The sampler: greedy parity with transformers' generate, cached decode = full forward, the sampling
distribution, seeds, shared prefill, stop criteria, bucketing and an 8-device mesh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mstar_jax
from mstar_jax.sampler import Sampler, bucket, build_prompts, sampler_for
from tests.conftest import make_batch, random_images

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["How many circles are there in the picture? Count them carefully, then answer.", "Which bar?",
             "What is the sum of the numbers shown in the figure?"]


@pytest.fixture(scope="module")
def policies(tiny_models):
    """{name: Policy} loaded once for this module."""
    return {name: mstar_jax.load(path) for name, (path, _) in tiny_models.items()}


def _batch(policy, questions=QUESTIONS):
    return make_batch(policy.processor, prompts=questions)


def _hf_greedy(model, batch, new_tokens):
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(batch["input_ids"]),
                             attention_mask=torch.tensor(batch["attention_mask"]),
                             pixel_values=torch.tensor(batch["pixel_values"]), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
    return out[:, batch["input_ids"].shape[1]:].numpy()


@pytest.mark.parametrize("name", ["clip_llama", "siglip_qwen2", "clip_phi3"])
def test_greedy_tokens_match_transformers_generate(tiny_models, policies, name):
    _, hf_model = tiny_models[name]
    policy = policies[name]
    batch = _batch(policy)
    assert len(set(batch["attention_mask"].sum(-1))) == 3, "prompts must have different lengths"
    new = 12
    ref = _hf_greedy(hf_model, batch, new)
    eos = sampler_for(policy).eos_ids()
    assert not np.isin(ref, list(eos)).any(), "pick prompts whose greedy continuation has no EOS"
    out = policy_generate(policy, batch, n=2, temperature=0.0, max_new_tokens=new)
    for row, samples in zip(ref, out):
        assert len(samples) == 2
        for s in samples:
            assert len(s.token_ids) == new >= 10 and s.finish_reason == "length"
            assert s.token_ids == row.tolist()
            # Greedy log-probs are the model's own (documented); they are finite and <= 0.
            assert np.all(np.isfinite(s.logprobs)) and max(s.logprobs) <= 0


def policy_generate(policy, batch, **kw):
    return sampler_for(policy).generate(policy.params, batch=batch, **kw)


@pytest.mark.parametrize("name", ["clip_llama", "siglip_qwen2"])
def test_cached_decode_logits_equal_full_forward_at_every_step(policies, name):
    policy = policies[name]
    batch = _batch(policy, QUESTIONS[:2])
    n, steps = 2, 10
    rng = np.random.default_rng(0)
    vocab = policy.config.text.vocab_size
    forced = rng.integers(5, vocab, (2 * n, steps)).astype(np.int32)
    got = sampler_for(policy).step_logits(policy.params, forced, batch=batch, n=n)
    assert got.shape == (2 * n, steps + 1, vocab)
    for r in range(2 * n):
        b = r // n
        full = {"input_ids": np.concatenate([batch["input_ids"][b:b + 1], forced[r:r + 1]], 1),
                "attention_mask": np.concatenate([batch["attention_mask"][b:b + 1], np.ones((1, steps), int)], 1),
                "pixel_values": batch["pixel_values"][b:b + 1]}
        ref = policy.logits(full)[0, -steps - 1:]
        err = np.abs(got[r] - ref).max()
        assert err < 1e-5, f"row {r}: max logit error {err}"


def _bins_chi2(counts, probs, bins=10):
    """Chi-square of sample counts vs probabilities over `bins` groups of tokens of about equal expected mass."""
    order = np.argsort(-probs)
    edges = np.searchsorted(np.cumsum(probs[order]), np.linspace(0, 1, bins + 1)[1:-1])
    groups = np.split(order, edges)
    exp = np.array([probs[g].sum() for g in groups]) * counts.sum()
    obs = np.array([counts[g].sum() for g in groups])
    keep = exp > 0
    return float((((obs - exp) ** 2)[keep] / exp[keep]).sum()), int(keep.sum()) - 1


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _nucleus(p, top_p):
    order = np.argsort(-p)
    before = np.cumsum(p[order]) - p[order]
    keep = np.zeros_like(p, bool)
    keep[order[(before < top_p) | (np.arange(p.size) == 0)]] = True
    q = np.where(keep, p, 0)
    return q / q.sum()


def test_first_token_samples_follow_the_sampling_distribution(policies):
    policy = policies["clip_llama"]
    batch = _batch(policy, QUESTIONS[:1])
    logits = policy.logits(batch)[0, -1].astype(np.float64)
    count, t = 4000, 0.7
    sampler = Sampler(policy.graphdef, policy.config, policy.processor, policy.mesh, max_rows=count)
    # 99.9% chi-square critical values for df = 5..12 (no scipy dependency).
    crit = {5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88, 10: 29.59, 11: 31.26, 12: 32.91}

    def draw(**kw):
        out = sampler.generate(policy.params, batch=batch, n=count, max_new_tokens=1, seed=3, model_logprobs=True,
                               **kw)[0]
        toks = np.array([s.token_ids[0] for s in out])
        return np.bincount(toks, minlength=logits.size), out

    right = _softmax(logits / t)
    counts, out = draw(temperature=t)
    chi2, df = _bins_chi2(counts, right)
    assert chi2 < crit[df], f"T={t}: chi2 {chi2:.1f} (df {df})"
    wrong_chi2, df = _bins_chi2(counts, _softmax(logits / 1.0))
    assert wrong_chi2 > crit[df], "the test must tell T=0.7 from T=1.0"
    # Reported log-probs are those of the sampling distribution.
    lp = np.array([s.logprobs[0] for s in out[:50]])
    assert np.allclose(lp, np.log(right[[s.token_ids[0] for s in out[:50]]]), atol=1e-4)

    nucleus = _nucleus(right, 0.8)
    counts, out = draw(temperature=t, top_p=0.8)
    assert counts[nucleus == 0].sum() == 0, "a token outside the top-p nucleus was sampled"
    chi2, df = _bins_chi2(counts, nucleus)
    assert chi2 < crit[df], f"top-p: chi2 {chi2:.1f} (df {df})"
    assert _bins_chi2(counts, right)[0] > crit[df], "the test must tell top-p from no top-p"
    lp = np.array([s.logprobs[0] for s in out[:50]])
    assert np.allclose(lp, np.log(nucleus[[s.token_ids[0] for s in out[:50]]]), atol=1e-4)
    # The model log-prob is the unmodified distribution's.
    out = out[:50]
    full = _softmax(logits)
    assert np.allclose([s.model_logprobs[0] for s in out], np.log(full[[s.token_ids[0] for s in out]]), atol=1e-4)


def test_first_argmax_is_jnp_argmax_with_ties_and_infinities():
    import jax.numpy as jnp

    from mstar_jax.sampler import _first_argmax

    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, size=(64, 257)).astype(np.float32)  # many tied maxima per row
    x[1] = -np.inf
    x[2, 5] = x[2, 200] = np.inf
    x[3, -1] = 100.0
    got = np.asarray(_first_argmax(jnp.asarray(x)))
    assert got.dtype == np.int32
    assert (got == np.argmax(x, axis=-1)).all()


def test_top_k_keeps_only_the_k_best(policies):
    policy = policies["siglip_qwen2"]
    batch = _batch(policy, QUESTIONS[:1])
    logits = policy.logits(batch)[0, -1]
    best = set(np.argsort(-logits)[:3].tolist())
    out = policy_generate(policy, batch, n=64, max_new_tokens=1, temperature=1.0, top_k=3)[0]
    firsts = {s.token_ids[0] for s in out}
    assert firsts <= best and len(firsts) > 1


def test_seeds_reproduce_and_samples_differ(policies):
    policy = policies["clip_llama"]
    batch = _batch(policy, QUESTIONS[:2])
    kw = dict(n=4, temperature=1.0, top_p=0.95, max_new_tokens=6)
    a = policy_generate(policy, batch, seed=5, **kw)
    b = policy_generate(policy, batch, seed=5, **kw)
    c = policy_generate(policy, batch, seed=6, **kw)
    ids = lambda out: [[s.token_ids for s in samples] for samples in out]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    for samples in a:
        assert len({tuple(s.token_ids) for s in samples}) > 1, "the samples of one prompt must differ"
    # Samples do not depend on how prompts are grouped into calls (per-sample keys, per-prompt index).
    small = Sampler(policy.graphdef, policy.config, policy.processor, policy.mesh, max_rows=4)  # 1 prompt a call
    assert ids(small.generate(policy.params, batch=batch, seed=5, **kw)) == ids(a)


def test_n_samples_share_one_prefill_of_b_rows(policies):
    policy = policies["clip_llama"]
    sampler = sampler_for(policy)
    batch = _batch(policy, QUESTIONS[:2])
    items = sampler.prompts_from(batch=batch)
    state = sampler._start(policy.params, items, [0, 1], 8, 16, 0)
    # The prompt cache has one row per prompt; only the generated tokens' cache has B*n rows.
    assert state.cache.prefix[0].k.shape[0] == 2 and state.cache.suffix[0].k.shape[0] == 16
    sampler.prefill_calls = 0
    out = sampler.generate(policy.params, batch=batch, n=8, temperature=1.0, max_new_tokens=4)
    assert sampler.prefill_calls == 1 and [len(s) for s in out] == [8, 8]


def test_stop_token_ids_stop_strings_and_finish_reasons(policies):
    policy = policies["clip_llama"]
    sampler = sampler_for(policy)
    sampler.stop_check_interval = 4  # host checks for stop strings every 4 tokens (not part of any shape)
    tok = policy.processor.tokenizer
    assert tok.eos_token_id in sampler.eos_ids()
    batch = _batch(policy, QUESTIONS[:1])
    greedy = dict(n=1, temperature=0.0)
    full = sampler.generate(policy.params, batch=batch, max_new_tokens=40, **greedy)[0][0]
    assert full.finish_reason == "length" and len(full.token_ids) == 40
    ids = full.token_ids
    short = sampler.generate(policy.params, batch=batch, max_new_tokens=5, **greedy)[0][0]
    assert short.finish_reason == "length" and short.token_ids == ids[:5]

    # A stop token id ends the row on device; it is kept in token_ids but not in the text.
    stop_id = next(t for t in ids[2:] if t not in ids[:2])
    k = ids.index(stop_id)
    s = sampler.generate(policy.params, batch=batch, max_new_tokens=40, stop_token_ids=[stop_id], **greedy)[0][0]
    assert s.finish_reason == "stop" and s.token_ids == ids[:k + 1] and len(s.logprobs) == k + 1
    assert s.text == tok.decode(ids[:k], skip_special_tokens=True)
    assert sampler.decode_steps == k + 1, "the loop must exit once every row finished"

    # A stop string: text cut before it, token ids cut to the shortest prefix containing it, early exit.
    text = full.text
    stop = next(text[i:i + 3] for i in range(len(text) // 3, len(text) - 3) if text[i:i + 3].strip()
                and "\ufffd" not in text[i:i + 3])
    s = sampler.generate(policy.params, batch=batch, max_new_tokens=40, stop=[stop], **greedy)[0][0]
    assert s.finish_reason == "stop" and s.text == text[:text.find(stop)]
    cut = len(s.token_ids)
    assert s.token_ids == ids[:cut] and stop in tok.decode(ids[:cut]) and stop not in tok.decode(ids[:cut - 1])
    assert sampler.decode_steps < 40 and sampler.decode_steps <= cut + sampler.stop_check_interval


def test_bucketing_limits_compiled_shapes(policies):
    policy = policies["siglip_qwen2"]
    sampler = Sampler(policy.graphdef, policy.config, policy.processor, policy.mesh)
    lengths = set()
    for i, new in enumerate([3, 5, 9, 12, 16]):
        questions = [("count " * (2 + 3 * i)).strip() + "?"] + (["Which bar?"] if i % 2 else [])
        batch = _batch(policy, questions)
        lengths.add(batch["input_ids"].shape[1])
        sampler.generate(policy.params, batch=batch, n=2, temperature=0.7, max_new_tokens=new)
    assert len(lengths) == 5
    # 5 prompt lengths, 2 batch sizes and 5 max_new_tokens, but few compiled shapes.
    assert sampler._prefill._cache_size() <= 3 and sampler._decode._cache_size() <= 3
    assert [bucket(x, 32, 4) for x in (20, 33, 620)] == [32, 40, 640]


def test_build_prompts_uses_the_chat_template(policies):
    proc = policies["clip_llama"].processor
    texts = build_prompts(proc, ["Hi?", "Two?"], [random_images(0, [(30, 30)])[0], None])
    assert texts[0] == "<|user|>\n<image>\nHi?</s>\n<|assistant|>\n"
    assert texts[1] == "<|user|>\nTwo?</s>\n<|assistant|>\n"
    assert build_prompts(proc, ["Hi?"], [random_images(0, [(30, 30)])[0]], use_chat_template=False) == \
        ["<image>\nHi?"]


def test_generate_from_images_and_questions_equals_batch_path(policies):
    policy = policies["clip_llama"]
    images = random_images(0, [(40 + 7 * i, 52 - 5 * i) for i in range(2)])
    a = mstar_jax.sampler.generate(policy, images, QUESTIONS[:2], n=2, temperature=0.0, max_new_tokens=6)
    b = policy_generate(policy, _batch(policy, QUESTIONS[:2]), n=2, temperature=0.0, max_new_tokens=6)
    assert [[s.token_ids for s in x] for x in a] == [[s.token_ids for s in x] for x in b]
    # Text-only prompts work too.
    c = mstar_jax.sampler.generate(policy, [None], ["hello"], n=1, temperature=0.0, max_new_tokens=3)
    assert len(c[0][0].token_ids) == 3


def test_cli_sample_prints_json(tiny_models, tmp_path, capsys):
    from mstar_jax.cli import main

    img = tmp_path / "img.png"
    random_images(1, [(30, 40)])[0].save(img)
    path = tiny_models["clip_llama"][0]
    assert main(["sample", str(path), "--image", str(img), "--prompt", "Which bar?", "--n", "3",
                 "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["samples"]) == 3
    for s in out["samples"]:
        assert set(s) >= {"text", "token_ids", "logprobs", "finish_reason"} and len(s["token_ids"]) <= 4
    assert main(["sample", str(path), "--image", str(tmp_path / "missing.png"), "--prompt", "x"]) == 2


def test_sampling_params_cast_a_copy_that_samples_like_a_bf16_load(tiny_models, policies):
    """Rollouts in bf16 from fp32 master weights: the same tokens as a checkpoint loaded in bf16."""
    import jax.numpy as jnp

    name = "clip_llama"
    policy = policies[name]
    sampler = Sampler(policy.graphdef, policy.config, policy.processor, policy.mesh)
    assert sampler.sampling_params(policy.params) is policy.params  # no dtype set: sampled as given
    sampler.param_dtype = "bfloat16"
    cast = sampler.sampling_params(policy.params)
    assert {a.dtype for a in cast.values()} == {jnp.dtype(jnp.bfloat16)}
    assert {a.dtype for a in policy.params.values()} == {jnp.dtype(jnp.float32)}  # the master weights stay
    assert all(cast[p].sharding == a.sharding for p, a in policy.params.items())
    bf16 = mstar_jax.load(tiny_models[name][0], dtype="bfloat16")
    batch = _batch(policy)
    kw = dict(batch=batch, n=2, temperature=0.0, max_new_tokens=8)
    ours = sampler.generate(cast, **kw)
    ref = Sampler(bf16.graphdef, bf16.config, bf16.processor, bf16.mesh).generate(bf16.params, **kw)
    assert [[s.token_ids for s in x] for x in ours] == [[s.token_ids for s in x] for x in ref]


def test_cli_sample_loads_the_requested_dtype(tiny_models, tmp_path, capsys, monkeypatch):
    import jax.numpy as jnp

    from mstar_jax.cli import main

    loaded = []
    real_load = mstar_jax.load
    monkeypatch.setattr(mstar_jax, "load", lambda *a, **kw: loaded.append(real_load(*a, **kw)) or loaded[-1])
    path = tiny_models["clip_llama"][0]
    assert main(["sample", str(path), "--prompt", "Which bar?", "--n", "2", "--max-new-tokens", "3",
                 "--dtype", "bfloat16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["samples"]) == 2 and all(np.isfinite(s["logprobs"]).all() for s in out["samples"])
    assert {a.dtype for a in loaded[0].params.values()} == {jnp.dtype(jnp.bfloat16)}


def _worker(ckpt: str, out: str) -> None:
    """In a subprocess with 8 CPU devices: greedy samples with params sharded on data=2 x fsdp=2 x tensor=2."""
    from mstar_jax.sharding import make_mesh

    policy = mstar_jax.load(ckpt, mesh=make_mesh(data=2, fsdp=2, tensor=2))
    import jax

    assert jax.device_count() == 8
    q = policy.params[("language_model", "layers", 0, "self_attn", "q_proj", "kernel")]
    out_ = policy_generate(policy, _batch(policy), n=2, temperature=0.0, max_new_tokens=10)
    Path(out).write_text(json.dumps({"tokens": [[s.token_ids for s in x] for x in out_],
                                     "q_shards": len({str(s.index) for s in q.addressable_shards})}))


@pytest.mark.parametrize("name", ["siglip_qwen2"])
def test_eight_devices_give_the_same_greedy_tokens(tiny_models, policies, tmp_path, name):
    path = tiny_models[name][0]
    ref = policy_generate(policies[name], _batch(policies[name]), n=2, temperature=0.0, max_new_tokens=10)
    out = tmp_path / "tokens.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-m", "tests.test_sampler", str(path), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads(out.read_text())
    assert got["q_shards"] == 4, "params must really be sharded (fsdp x tensor)"
    assert got["tokens"] == [[s.token_ids for s in x] for x in ref]


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])


@pytest.mark.parametrize("name", ["clip_llama", "siglip_qwen2"])
def test_completions_from_step_prefixes_equal_generate_on_each_prefix(policies, name):
    """`complete` prefills prompt + response once and continues from several cuts of that one cache (the PRM's
    Monte Carlo labels); each cut's samples equal `generate` on prompt + prefix, greedy and sampled."""
    policy = policies[name]
    sampler = sampler_for(policy)
    tok = policy.processor.tokenizer
    imgs = random_images(5, [(40, 52), (33, 30)])
    prompts = ["What does the left die show?", "How many dots?"]
    conts = [tok("The left die shows 3. The right die shows 5. 3 + 5 = 8.", add_special_tokens=False)["input_ids"],
             tok("Count them. There are 4.", add_special_tokens=False)["input_ids"]]
    cuts = [[2, 6, len(conts[0])], [0, 3]]

    def reference(i, c, n, temperature):
        base = sampler.prompts_from([[imgs[i]]], [prompts[i]])[0]
        ids = np.concatenate([base.ids, np.asarray(conts[i][:c], np.int32)])[None]
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), **base.images}
        return sampler.generate(policy.params, batch=batch, n=n, temperature=temperature, max_new_tokens=6,
                                seed=11)[0]

    greedy = sampler.complete(policy.params, [[im] for im in imgs], prompts, conts, cuts, n=1, temperature=0.0,
                              max_new_tokens=6)
    for i in range(2):
        assert [[x.token_ids for x in g] for g in greedy[i]] == [[reference(i, c, 1, 0.0)[0].token_ids]
                                                                for c in cuts[i]]
    # Sample j of cut s draws as sample s*n + j of its prompt index (0 here, as in a one-prompt generate).
    sampled = sampler.complete(policy.params, [[imgs[0]]], prompts[:1], conts[:1], cuts[:1], n=3, temperature=1.0,
                               max_new_tokens=6, seed=11, indices=[0])
    for s_index, c in enumerate(cuts[0]):
        ref = reference(0, c, 3 * (s_index + 1), 1.0)[3 * s_index:]
        assert [x.token_ids for x in sampled[0][s_index]] == [x.token_ids for x in ref]
    assert len({tuple(x.token_ids) for cut in sampled[0] for x in cut}) > 1
