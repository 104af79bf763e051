"""The demo base model's pre-training mix: direct answers, CoT rationales and hinted rationales."""

from __future__ import annotations

from pathlib import Path

from mstar_jax.loop import prompts as P
from mstar_jax.loop.base_model import pretrain_examples
from mstar_jax.loop.rollouts import Query


def queries(n):
    return [Query(f"q{i}", (), {"question": f"What is {i} + 1?", "answer": str(i + 1), "choices": None,
                                 "rationale": f"{i} + 1 = {i + 1}. The answer is {i + 1}."}) for i in range(n)]


def test_fractions_pick_the_prompt_forms():
    qs = queries(400)
    mix = pretrain_examples(qs, cot_fraction=0.0, seed=0, hint_fraction=0.25)
    direct = [e for e in mix if e[1] == P.direct_prompt(e[0].item)]
    hinted = [e for e in mix if e[1] == P.hinted_prompt(e[0].item)]
    assert len(direct) == 400 and all(r == f"The answer is {q.item['answer']}." for q, _, r in direct)
    assert 70 <= len(hinted) <= 130 and all(r == q.item["rationale"] for q, _, r in hinted)
    assert len(mix) == len(direct) + len(hinted)  # cot_fraction 0: the plain CoT prompt is never trained
    both = pretrain_examples(qs, cot_fraction=1.0, seed=0, hint_fraction=1.0)
    assert len(both) == 3 * 400
    assert pretrain_examples(qs, 0.3, seed=5, hint_fraction=0.3) == pretrain_examples(qs, 0.3, 5, 0.3)


def test_cot_direct_fraction_pairs_the_cot_prompt_with_the_direct_answer():
    qs = queries(400)
    mix = pretrain_examples(qs, cot_fraction=0.0, seed=1, cot_direct_fraction=0.5)
    cot = [e for e in mix if e[1] == P.cot_prompt(e[0].item)]
    assert 160 <= len(cot) <= 240 and all(r == f"The answer is {q.item['answer']}." for q, _, r in cot)
    # A query whose rationale is drawn for the CoT prompt is not also given the direct answer there.
    both = pretrain_examples(qs, cot_fraction=1.0, seed=1, cot_direct_fraction=1.0)
    cot = [e for e in both if e[1] == P.cot_prompt(e[0].item)]
    assert len(cot) == 400 and all(r == q.item["rationale"] for q, _, r in cot)


def test_base_model_and_data_seeds_are_separate_from_the_run_seed(tmp_path):
    from mstar_jax.config import load_config_file, resolve_config_path, section_seed
    from mstar_jax.loop.data import load_splits

    def seeds(cfg):  # (synthetic data, base model)
        return section_seed(cfg, cfg.data), section_seed(cfg, cfg.model.pretrain)

    cfg = load_config_file(resolve_config_path("smoke"))
    assert (cfg.data.seed, cfg.model.pretrain.seed) == (0, 0)
    runs = []
    for seed in (0, 3):
        cfg.seed = seed
        assert seeds(cfg) == (0, 0)  # the run seed does not redraw them
        splits = load_splits(cfg, tmp_path / f"run{seed}", lambda msg: None)
        runs.append({name: [(q.id, q.item["question"], q.item["answer"]) for q in qs] for name, qs in splits.items()})
    assert runs[0] == runs[1]  # one benchmark, one base model's pre-training data across run seeds
    cfg.data.seed, cfg.model.pretrain.seed = -1, -1  # -1: follow the run seed (the old behaviour)
    assert seeds(cfg) == (3, 3)
    changed = load_splits(cfg, tmp_path / "follow", lambda msg: None)
    assert [q.item["question"] + q.item["answer"] for q in changed["test_id"]] != \
        [q + a for _, q, a in runs[0]["test_id"]]


def test_pretrain_ood_fraction_draws_that_share_from_the_ood_generator(tmp_path):
    import pytest

    from mstar_jax.config import load_config_file, resolve_config_path
    from mstar_jax.errors import DataError
    from mstar_jax.loop.data import load_splits

    def generator(q):  # the synthetic split whose generator drew the item (its image folder)
        return Path(q.images[0]).parent.name

    cfg = load_config_file(resolve_config_path("smoke"))
    n = int(cfg.model.pretrain.queries)
    plain = load_splits(cfg, tmp_path / "plain", lambda msg: None)
    assert [generator(q) for q in plain["pretrain"]] == ["warmup"] * n  # default: in-domain only
    cfg.model.pretrain.ood_fraction = 0.25
    mixed = load_splits(cfg, tmp_path / "mixed", lambda msg: None)
    kinds = [generator(q) for q in mixed["pretrain"]]
    assert len(kinds) == n and kinds.count("test_ood") == round(n * 0.25)
    # The in-domain part is the same draws as without the option; the OOD part is drawn under the pre-training
    # seed, not the evaluated test set's items.
    def items(qs):
        return [(q.item["question"], q.item["answer"], Path(q.images[0]).read_bytes()) for q in qs]

    assert items(q for q in mixed["pretrain"] if generator(q) == "warmup") == items(plain["pretrain"])[:n - round(n * 0.25)]
    ood = items(q for q in mixed["pretrain"] if generator(q) == "test_ood")
    assert ood != items(mixed["test_ood"])[:len(ood)]
    assert [q.item["question"] for q in mixed["test_ood"]] == [q.item["question"] for q in plain["test_ood"]]
    cfg.model.pretrain.ood_fraction = 1.5
    with pytest.raises(DataError, match="ood_fraction"):
        load_splits(cfg, tmp_path / "bad", lambda msg: None)
