"""PRM scoring: aggregation, batching, save/load, the HF export applied with transformers, and bad input."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from mstar_jax.errors import CheckpointError, ConfigError, DataError
from mstar_jax.prm import model as M
from mstar_jax.prm.score import ProcessRewardModel, aggregate, load_prm, same_tokenizer
from tests.conftest import random_images

RESPONSES = ["The left die shows 3. The right die shows 5. 3 + 5 = 8. The answer is 8.",
             "Count the dots. The answer is 4.", "One step.", "A. B. C. D. E. F. The answer is 2."]


def test_aggregations_on_a_fixed_table():
    steps = [0.9, 0.4, 0.7]
    assert aggregate(steps, "min") == 0.4
    assert aggregate(steps, "mean") == pytest.approx(2.0 / 3)
    assert aggregate(steps, "last") == 0.7
    assert aggregate(steps, "product") == pytest.approx(0.9 * 0.4 * 0.7)
    assert aggregate([], "min") == -math.inf
    with pytest.raises(ConfigError, match="aggregation"):
        aggregate(steps, "max")


@pytest.fixture(scope="module")
def prm(tiny_models):
    import mstar_jax

    policy = mstar_jax.load(tiny_models["clip_llama"][0])
    head = M.init_head(policy.graphdef, policy.params)
    # A head away from its initial value, so the scores differ per token and per step.
    rng = np.random.default_rng(0)
    head = {M.HEAD_W: head[M.HEAD_W] + jnp.asarray(rng.normal(0, 0.3, head[M.HEAD_W].shape), jnp.float32),
            M.HEAD_B: jnp.float32(0.25)}
    return ProcessRewardModel(policy.loaded, head, policy.processor, step_rule="sentences", aggregation="min",
                              batch_rows=2, prompt_fn=lambda item: item["query"])


def _items():
    imgs = random_images(3, [(30, 40), (41, 29)])
    return [{"query": "What is the sum?", "image": imgs[0]}, {"query": "How many dots?", "image": imgs[1]}]


def test_batched_scores_equal_rows_scored_alone(prm):
    items = _items()
    responses = [RESPONSES, RESPONSES[1:3]]
    batched = prm.step_scores(items, responses)
    assert [len(s) for s in batched[0]] == [4, 2, 1, 7]
    for item, rs, got in zip(items, responses, batched):
        for r, g in zip(rs, got):
            alone = prm.score_rows([item["query"]], [item["image"]], [r])[0]
            np.testing.assert_allclose(g, alone, rtol=1e-5, atol=1e-6)
    agg = prm.score(items, [[r, ""] for r in RESPONSES[:1]] + [[RESPONSES[1]]])
    assert agg[0][0] == pytest.approx(min(batched[0][0])) and agg[0][1] == -math.inf


def test_save_load_and_hf_export_score_the_same(prm, tmp_path):
    import torch
    import transformers
    from safetensors.torch import load_file

    items = _items()
    ref = prm.step_scores(items, [RESPONSES[:2], RESPONSES[2:]])
    prm.save(tmp_path / "prm")
    again = load_prm(tmp_path / "prm", batch_rows=prm.batch_rows)  # same batches: bitwise the same scores
    again.prompt_fn = prm.prompt_fn
    assert again.step_rule == "sentences" and again.aggregation == "min"
    np.testing.assert_array_equal(np.concatenate([np.concatenate(x) for x in again.step_scores(
        items, [RESPONSES[:2], RESPONSES[2:]])]), np.concatenate([np.concatenate(x) for x in ref]))

    prm.export_hf(tmp_path / "hf")
    # What the README shows: transformers loads the backbone, the head is a Linear(hidden, 1) on the final
    # hidden states, read at each step's end token.
    model, info = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    head = torch.nn.Linear(model.config.text_config.hidden_size, 1)
    head.load_state_dict(load_file(tmp_path / "hf" / "reward_head.safetensors"))
    from mstar_jax.prm.encode import encode
    from mstar_jax.prm.steps import split_steps

    row = encode(prm.processor, items[0]["query"], items[0]["image"], RESPONSES[0],
                 split_steps(RESPONSES[0], "sentences"))
    with torch.no_grad():
        out = model.model(input_ids=torch.tensor(row["input_ids"][None]).long(),
                          pixel_values=torch.tensor(row["images"]["pixel_values"]))
        hf_steps = head(out.last_hidden_state)[0, :, 0][torch.tensor(row["ends"]).long()].numpy()
    np.testing.assert_allclose(hf_steps, ref[0][0], rtol=1e-4, atol=1e-4)
    exported = load_prm(tmp_path / "hf")
    exported.prompt_fn = prm.prompt_fn
    np.testing.assert_allclose(exported.step_scores(items[:1], [RESPONSES[:1]])[0][0], ref[0][0], rtol=1e-5)


def test_score_response_and_bad_input(prm, tmp_path, tiny_models):
    out = prm.score_response("What is the sum?", _items()[0]["image"], RESPONSES[0])
    assert [s["text"] for s in out["steps"]] == ["The left die shows 3.", "The right die shows 5.", "3 + 5 = 8.",
                                                 "The answer is 8."]
    assert out["score"] == min(s["score"] for s in out["steps"])
    with pytest.raises(DataError, match="empty response"):
        prm.score_response("q", None, "   ")
    with pytest.raises(CheckpointError, match="not a PRM"):
        load_prm(tiny_models["clip_llama"][0])
    from mstar_jax.models.llava.tiny import build_tokenizer

    other = build_tokenizer(400, ["a tokenizer trained on other text: zebra quartz jukebox " * 20])
    assert same_tokenizer(prm.tokenizer, prm.tokenizer) is None
    assert same_tokenizer(prm.tokenizer, other) is not None
