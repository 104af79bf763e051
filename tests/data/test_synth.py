"""The synthetic dataset: deterministic from its seed, readable by the real readers, answers that check."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from mstar_jax.answers import check_answer
from mstar_jax.data.readers import read_dataset
from mstar_jax.data.synth import SPLITS, SynthConfig, generate, make_item

SIZES = {"warmup": 12, "train": 24, "unlabeled": 8, "val": 8, "test_id": 16, "test_ood": 16}


def digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate(out, SynthConfig(seed=3, sizes=SIZES, image_size=64, workers=1))
    return out


def test_same_seed_identical_bytes_any_worker_count(synth_dir, tmp_path):
    generate(tmp_path / "again", SynthConfig(seed=3, sizes=SIZES, image_size=64, workers=2))
    assert digest(synth_dir) == digest(tmp_path / "again")


def test_different_seed_differs(synth_dir, tmp_path):
    generate(tmp_path / "other", SynthConfig(seed=4, sizes=SIZES, image_size=64, workers=1))
    a, b = digest(synth_dir), digest(tmp_path / "other")
    assert a.keys() == b.keys()
    assert sum(a[k] != b[k] for k in a) > len(a) // 2


def test_real_readers_read_every_split(synth_dir):
    manifest = json.loads((synth_dir / "manifest.json").read_text())
    for split in SPLITS:
        info = manifest["files"][split]
        records, report = read_dataset(synth_dir / info["file"], info["format"], labeled=info["labeled"],
                                       strict=True, image_check="decode")
        assert len(records) == SIZES[split] and report.skipped == 0
        if split == "unlabeled":
            assert all(r.answer is None for r in records)
        else:
            assert all(r.answer is not None for r in records)
        if split in ("val", "test_id", "test_ood"):
            assert {r.metadata["task"] for r in records} <= {
                "figure question answering", "geometry problem solving", "math word problem",
                "textbook question answering", "visual question answering"}


def test_rationales_end_in_the_answer_and_check(synth_dir):
    records, _ = read_dataset(synth_dir / "warmup.json", "mathv360k")
    for r in records:
        assert re.search(r"\. The answer is [^\n]+\.$", r.rationale)
        assert check_answer(r.rationale, r.to_item()), r
    records, _ = read_dataset(synth_dir / "test_id.json", "mathvista")
    assert all(check_answer(f"The answer is {r.answer}.", r.to_item()) for r in records)


def test_items_are_short_and_mixed():
    cfg = SynthConfig(seed=0, sizes=SIZES, image_size=32)
    items = [make_item(0, "train", i, cfg) for i in range(150)]
    assert max(len(it["question"].split()) for it in items) <= 14
    assert max(len(it["rationale"].split()) for it in items) <= 40
    kinds = {(bool(it["choices"]), it["answer_type"]) for it in items}
    assert {(False, "integer"), (True, "text"), (False, "float"), (False, "list")} <= kinds
    assert len({it["family"] for it in items}) == 8


def test_families_and_mc_fraction_pick_what_is_drawn():
    cfg = SynthConfig(seed=0, sizes=SIZES, image_size=56, families="blocks, bars", mc_fraction=0.0)
    assert cfg.families == ("blocks", "bars")
    items = [make_item(0, split, i, cfg) for split in ("train", "test_ood") for i in range(80)]
    assert {it["family"] for it in items} == {"blocks", "bars"}
    # Only "which bar is the tallest" stays multiple choice (its answer is a colour).
    assert all(it["question"] == "Which bar is the tallest?" for it in items if it["choices"])
    with pytest.raises(ValueError, match="unknown synth families"):
        SynthConfig(families=("blocks", "maze"))
    with pytest.raises(ValueError, match="mc_fraction"):
        SynthConfig(mc_fraction=1.5)


def drawn_items(family, count):
    """(item, RGB pixels as int array) for `count` train and `count` test_ood items of one family at 224 px."""
    import io

    import numpy as np
    from PIL import Image

    cfg = SynthConfig(seed=0, sizes=SIZES, image_size=224, families=family)
    for split in ("train", "test_ood"):
        for i in range(count):
            it = make_item(0, split, i, cfg)
            yield split, it, np.asarray(Image.open(io.BytesIO(it["png"])).convert("RGB")).astype(int)


def test_blocks_answers_follow_from_the_drawn_grid():
    """Every blocks answer is recomputed from the image's pixels: one shape per cell of a 4 x 4 grid."""
    import numpy as np

    from mstar_jax.data.synth import COLORS

    for _, it, px in drawn_items("blocks", 40):
        cells = []  # (colour, shape) of each occupied cell, read at its centre and its corner
        for gy in range(4):
            for gx in range(4):
                centre = px[gy * 56 + 28, gx * 56 + 28]
                name = [c for c, rgb in COLORS.items() if np.abs(centre - rgb).max() < 10]
                if name:
                    corner = px[gy * 56 + 28 - 16, gx * 56 + 28 - 16]
                    cells.append((name[0], "square" if np.abs(corner - centre).max() < 10 else "circle"))
        colours = [c for c, _ in cells]
        q, ans = it["question"], int(it["answer"])
        words = q.split()
        if q.startswith("How many more"):
            assert ans == colours.count(words[3]) - colours.count(words[6])
        elif "in total" in q:
            assert ans == colours.count(words[2]) + colours.count(words[4])
        elif "are not" in q:
            assert ans == len(cells) - colours.count(words[-1].rstrip("?"))
        elif words[3] in ("circles", "squares"):
            assert ans == cells.count((words[2], words[3][:-1]))
        else:
            assert ans == colours.count(words[2]), q


def test_ood_has_larger_numbers_and_new_questions():
    cfg = SynthConfig(seed=0, sizes=SIZES, image_size=32)
    def stats(split):
        items = [make_item(0, split, i, cfg) for i in range(200)]
        nums = [int(it["answer"]) for it in items if it["answer_type"] == "integer"]
        return sum(nums) / len(nums), {re.sub(r"\d+|red|blue|green|orange|purple|circle|square|triangle|apples|pears"
                                              r"|Mon|Tue|Wed", "_", it["question"]) for it in items}
    id_mean, id_templates = stats("test_id")
    ood_mean, ood_templates = stats("test_ood")
    assert ood_mean > id_mean * 1.3
    assert len(ood_templates - id_templates) >= 4


def test_config_validation():
    with pytest.raises(ValueError):
        SynthConfig(sizes={"bogus": 3})
    with pytest.raises(ValueError):
        SynthConfig(difficulty=5)


def test_cli_synth(tmp_path, capsys):
    from mstar_jax.cli import main

    rc = main(["data", "synth", str(tmp_path / "d"), "--seed", "1", "--sizes",
               "warmup=2,train=2,unlabeled=1,val=1,test_id=1,test_ood=1", "--config", "image_size=32",
               "--config", "workers=1"])
    assert rc == 0 and (tmp_path / "d" / "test_ood.json").exists()
    assert main(["data", "synth", str(tmp_path / "e"), "--config", "difficulty=9"]) == 2
    assert "difficulty must be" in capsys.readouterr().err


def test_dice_answers_follow_from_the_drawn_pips():
    """Every dice answer is recomputed from the image: white pips counted inside each coloured die."""
    import numpy as np
    from scipy import ndimage

    from mstar_jax.data.synth import COLORS

    for split, it, px in drawn_items("dice", 30):
        faces, tops = [], []
        for x0 in (12, 120):  # the two dice (out of domain they may sit at the top or the bottom)
            top = int(np.flatnonzero((px[:, x0 + 3] < 240).any(-1))[0])
            die = px[top:top + 93, x0:x0 + 93]
            assert any(np.abs(die[3, 3] - v).max() < 10 for v in COLORS.values())
            tops.append(top)
            faces.append(ndimage.label((die > 240).all(-1))[1])
        a, b = faces
        q, ans = it["question"], int(it["answer"])
        expected = {"What is the sum of the two dice?": a + b, "What is the product of the two dice?": a * b,
                    "What number does the left die show?": a, "What number does the right die show?": b}
        assert ans == expected[q], (q, faces)
        assert tops[0] == tops[1] and (tops[0] != 66) == (split == "test_ood")  # OOD: moved to an edge
