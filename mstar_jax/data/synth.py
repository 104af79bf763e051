"""The embedded default dataset: Pillow-drawn visual math whose answers must be read off the image.

Families (MathVista task analogues): shapes to count (VQA), a 4 x 4 grid of coloured shapes to count and combine
(VQA; its cells line up with the patches of a 4 x 4-patch image), two dice to read, add and multiply (VQA),
bar and line charts to read (FQA), rectangles and triangles with labelled lengths / angles (GPS), small tables
(MWP), clocks (TQA). `SynthConfig.families` picks a subset: digits are illegible at the demo's 56 px, and of
the rest a tiny model learns only the dice within the demo's budget, so the demo draws the dice alone.
Questions and rationales are short and use a small, regular vocabulary so that a tiny model can learn them;
every rationale ends in "The answer is X." (X is the letter for multiple choice).

Splits as in the paper (3.1): `warmup` (answers + rationales), `train` (labeled query set), `unlabeled`
(no answers) in the MathV360K format; `val` (temperature selection), `test_id` (in-domain) and `test_ood`
(unseen question compositions and larger numbers; for the dice, the dice moved to an edge of the image) in
the MathVista format, so the real readers read them.

Determinism: item i of split s is drawn from its own generator seeded by (seed, s, i), so the output does not
depend on the number of worker processes; PNGs carry no timestamps. Same seed + same Pillow/zlib -> identical
bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mstar_jax.io import write_atomic

SPLITS = ("warmup", "train", "unlabeled", "val", "test_id", "test_ood")
MATHV360K_SPLITS = ("warmup", "train", "unlabeled")
HIDDEN_ANSWERS = "unlabeled_answers.json"
DEFAULT_SIZES = {"warmup": 256, "train": 1024, "unlabeled": 256, "val": 128, "test_id": 256, "test_ood": 256}
# MathVista's metadata.task names; evaluation reports them by their usual abbreviations.
TASKS = {"FQA": "figure question answering", "GPS": "geometry problem solving", "MWP": "math word problem",
         "TQA": "textbook question answering", "VQA": "visual question answering"}

COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (30, 160, 60), "orange": (245, 140, 20),
          "purple": (140, 60, 180)}
SHAPES = ("circle", "square", "triangle")
LETTERS = "ABCD"


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Generator settings: image size, difficulty 1 (easy) .. 3 (hard), multiple-choice share, workers."""

    seed: int = 0
    sizes: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_SIZES))
    image_size: int = 224
    difficulty: int = 2
    mc_fraction: float = 0.3
    families: tuple[str, ...] = ()  # empty: every family
    workers: int = 0  # 0: min(2, cpu count); 1: in-process

    def __post_init__(self):
        bad = set(self.sizes) - set(SPLITS)
        if bad:
            raise ValueError(f"unknown synth splits {sorted(bad)}; expected {SPLITS}")
        if not 1 <= self.difficulty <= 3:
            raise ValueError(f"difficulty must be 1, 2 or 3, got {self.difficulty}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if isinstance(self.families, str):  # "blocks,bars" from a command line or config
            object.__setattr__(self, "families", tuple(f.strip() for f in self.families.split(",") if f.strip()))
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown synth families {unknown}; expected some of {sorted(FAMILIES)}")
        if not 0 <= self.mc_fraction <= 1:
            raise ValueError(f"mc_fraction must be in [0, 1], got {self.mc_fraction}")


# ----------------------------------------------------------------------------------------------- drawing

_CANVAS = 224  # everything is drawn at this size and resized, so layouts do not depend on image_size


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _canvas():
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (_CANVAS, _CANVAS), (255, 255, 255))
    return img, ImageDraw.Draw(img)


def _text(draw, xy, s, size=14, fill=(0, 0, 0), anchor="mm"):
    draw.text(xy, s, fill=fill, font=_font(size), anchor=anchor)


def _shape(draw, kind, cx, cy, r, color):
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)


def _place(rng, n, r, margin=8):
    """n non-overlapping centres on a grid of cells (jittered)."""
    cells = int(math.floor((_CANVAS - 2 * margin) / (2 * r + 6)))
    slots = rng.permutation(cells * cells)[:n]
    step = (_CANVAS - 2 * margin) / cells
    out = []
    for s in slots:
        gx, gy = divmod(int(s), cells)
        jitter = rng.uniform(-1, 1, 2) * max(0.0, step / 2 - r - 2)
        out.append((margin + step * (gx + 0.5) + jitter[0], margin + step * (gy + 0.5) + jitter[1]))
    return out


# ------------------------------------------------------------------------------------------------ items


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def _mc(rng, correct: str, pool: list[str]) -> tuple[list[str], str]:
    """Four choices including `correct` (in a random order) and the correct letter."""
    others = [p for p in dict.fromkeys(pool) if p != correct]
    picks = [others[i] for i in rng.permutation(len(others))[:3]]
    choices = picks + [correct]
    order = rng.permutation(len(choices))
    choices = [choices[i] for i in order]
    return choices, LETTERS[choices.index(correct)]


def _numeric_pool(value: int, lo: int = 0) -> list[str]:
    return [str(v) for v in range(max(lo, value - 4), value + 5)]


def _count(rng, level, ood):
    n_max = {1: 5, 2: 9, 3: 12}[level] + (6 if ood else 0)
    n_min = 10 if ood and level < 3 else 1
    target = SHAPES[rng.integers(len(SHAPES))]
    n = int(rng.integers(n_min, n_max + 1))
    k_other = int(rng.integers(0, 4 + level))
    img, draw = _canvas()
    r = 9 if n + k_other > 14 else 12
    pos = _place(rng, n + k_other, r)
    color_of = list(COLORS)
    if ood:  # unseen composition: colour and shape together
        color = color_of[rng.integers(len(color_of))]
        for (x, y) in pos[:n]:
            _shape(draw, target, x, y, r, COLORS[color])
        for (x, y) in pos[n:]:  # distractors: same shape other colour, or other shape
            other_c = color_of[(color_of.index(color) + 1 + rng.integers(len(color_of) - 1)) % len(color_of)]
            kind = target if rng.random() < 0.5 else SHAPES[(SHAPES.index(target) + 1) % 3]
            _shape(draw, kind, x, y, r, COLORS[other_c if kind == target else color_of[rng.integers(5)]])
        q = f"How many {color} {target}s are there?"
        steps = f"I count the {color} {target}s. There are {n}."
    else:
        for (x, y) in pos[:n]:
            _shape(draw, target, x, y, r, COLORS[color_of[rng.integers(len(color_of))]])
        others = [s for s in SHAPES if s != target]
        for (x, y) in pos[n:]:
            _shape(draw, others[rng.integers(2)], x, y, r, COLORS[color_of[rng.integers(len(color_of))]])
        q = f"How many {target}s are there?"
        steps = f"I count the {target}s. There are {n}."
    return dict(image=img, question=q, value=n, pool=_numeric_pool(n, 0), steps=steps, task="VQA",
                skills=["arithmetic reasoning"], context="synthetic scene")


def _blocks(rng, level, ood):
    """A 4 x 4 grid of cells, some holding one coloured circle or square: count by colour, add, subtract."""
    colours = list(COLORS)[:{1: 3, 2: 4, 3: 5}[level]]
    n = int(rng.integers(4, {1: 9, 2: 12, 3: 15}[level] + 1))
    cells = rng.permutation(16)[:n]
    col = [colours[int(rng.integers(len(colours)))] for _ in cells]
    kind = [SHAPES[int(rng.integers(2))] for _ in cells]  # circles and squares: distinct at 4 px
    img, draw = _canvas()
    cell = _CANVAS / 4
    for c, colour, k in zip(cells, col, kind):
        gy, gx = divmod(int(c), 4)
        _shape(draw, k, cell * (gx + 0.5), cell * (gy + 0.5), cell * 0.32, COLORS[colour])
    count = {c: col.count(c) for c in colours}
    a, b = (colours[int(i)] for i in rng.permutation(len(colours))[:2])
    common = dict(task="VQA", skills=["arithmetic reasoning"], context="synthetic scene")
    if ood:  # unseen compositions: a difference of two colours, or colour and shape together
        if rng.random() < 0.5:
            if count[a] < count[b]:
                a, b = b, a
            d = count[a] - count[b]
            return dict(image=img, question=f"How many more {a} shapes than {b} shapes are there?", value=d,
                        pool=_numeric_pool(d, 0), steps=f"There are {count[a]} {a} shapes. There are {count[b]} "
                        f"{b} shapes. {count[a]} - {count[b]} = {d}.", **common)
        k = SHAPES[int(rng.integers(2))]
        m = sum(1 for c, kk in zip(col, kind) if c == a and kk == k)
        return dict(image=img, question=f"How many {a} {k}s are there?", value=m, pool=_numeric_pool(m, 0),
                    steps=f"I count the {a} {k}s. There are {m}.", **common)
    q = int(rng.integers(3))
    if q == 0:
        return dict(image=img, question=f"How many {a} shapes are there?", value=count[a],
                    pool=_numeric_pool(count[a], 0), steps=f"I count the {a} shapes. There are {count[a]}.", **common)
    if q == 1:
        s = count[a] + count[b]
        return dict(image=img, question=f"How many {a} and {b} shapes are there in total?", value=s,
                    pool=_numeric_pool(s, 0), steps=f"There are {count[a]} {a} shapes. There are {count[b]} {b} "
                    f"shapes. {count[a]} + {count[b]} = {s}.", **common)
    d = n - count[a]
    return dict(image=img, question=f"How many shapes are not {a}?", value=d, pool=_numeric_pool(d, 0),
                steps=f"There are {n} shapes. There are {count[a]} {a} shapes. {n} - {count[a]} = {d}.", **common)


_PIPS = {1: [(1, 1)], 2: [(0, 0), (2, 2)], 3: [(0, 0), (1, 1), (2, 2)], 4: [(0, 0), (0, 2), (2, 0), (2, 2)],
         5: [(0, 0), (0, 2), (1, 1), (2, 0), (2, 2)], 6: [(0, 0), (0, 2), (1, 0), (1, 2), (2, 0), (2, 2)]}


def _dice(rng, level, ood):
    """Two coloured dice, left and right: read them, then add or multiply."""
    img, draw = _canvas()
    faces = [int(rng.integers(1, 7)) for _ in range(2)]
    names = [list(COLORS)[int(i)] for i in rng.permutation(len(COLORS))[:2]]
    side = 92
    # Out of domain the dice sit at the top or the bottom edge instead of the middle: the in-domain questions
    # under a shift of the image distribution. (Naming the dice by colour instead, a change of wording, was
    # tried too: a 2M-parameter language model does not transfer to it; docs/demo_results.md.)
    top = (8, 124)[int(rng.integers(2))] if ood else 66
    for k, (face, colour) in enumerate(zip(faces, names)):
        x0, y0 = 12 + k * 108, top
        draw.rectangle([x0, y0, x0 + side, y0 + side], fill=COLORS[colour])
        for gy, gx in _PIPS[face]:
            cx, cy = x0 + side * (0.22 + 0.28 * gx), y0 + side * (0.22 + 0.28 * gy)
            draw.ellipse([cx - 9, cy - 9, cx + 9, cy + 9], fill=(255, 255, 255))
    a, b = faces
    reads = f"The left die shows {a}. The right die shows {b}."
    common = dict(task="VQA", skills=["arithmetic reasoning"], context="synthetic scene")
    q = int(rng.integers(3 if level > 1 else 2))
    if q == 0:
        k = int(rng.integers(2))
        side_name = ("left", "right")[k]
        return dict(image=img, question=f"What number does the {side_name} die show?", value=faces[k],
                    pool=[str(v) for v in range(1, 7)], steps=f"The {side_name} die shows {faces[k]}.", **common)
    if q == 1:
        return dict(image=img, question="What is the sum of the two dice?", value=a + b,
                    pool=_numeric_pool(a + b, 2), steps=f"{reads} {a} + {b} = {a + b}.", **common)
    return dict(image=img, question="What is the product of the two dice?", value=a * b,
                pool=_numeric_pool(a * b, 1), steps=f"{reads} {a} * {b} = {a * b}.", **common)


def _chart_axes(draw, x0, y0, x1, y1, vmax) -> float:
    """Grid lines, tick labels and both axes of a chart from 0 to vmax; returns pixels per unit."""
    unit = (y1 - y0) / vmax
    tick = 1 if vmax <= 10 else (2 if vmax <= 20 else 5)
    for t in range(0, vmax + 1, tick):
        y = y1 - t * unit
        draw.line([x0, y, x1, y], fill=(220, 220, 220))
        _text(draw, (x0 - 14, y), str(t), size=11)
    draw.line([x0, y0, x0, y1], fill=(0, 0, 0), width=2)
    draw.line([x0, y1, x1, y1], fill=(0, 0, 0), width=2)
    return unit


def _bars(rng, level, ood):
    n_bars = int(rng.integers(3, 5 if level < 3 else 6))
    vmax = {1: 5, 2: 10, 3: 15}[level] + (10 if ood else 0)
    names = [list(COLORS)[i] for i in rng.permutation(len(COLORS))[:n_bars]]
    vals = [int(rng.integers(1, vmax + 1)) for _ in names]
    img, draw = _canvas()
    x0, y0, x1, y1 = 34, 14, 214, 200
    unit = _chart_axes(draw, x0, y0, x1, y1, vmax)
    w = (x1 - x0) / n_bars
    for i, (c, v) in enumerate(zip(names, vals)):
        draw.rectangle([x0 + w * i + 6, y1 - v * unit, x0 + w * (i + 1) - 6, y1], fill=COLORS[c])
    kind = int(rng.integers(4))
    a, b = (int(i) for i in rng.permutation(n_bars)[:2])
    reads = f"The {names[a]} bar is {vals[a]}. The {names[b]} bar is {vals[b]}."
    if ood and kind in (0, 1):  # unseen composition: a difference of two bars
        if vals[a] < vals[b]:
            a, b = b, a
        reads = f"The {names[a]} bar is {vals[a]}. The {names[b]} bar is {vals[b]}."
        return dict(image=img, question=f"How much higher is the {names[a]} bar than the {names[b]} bar?",
                    value=vals[a] - vals[b], pool=_numeric_pool(vals[a] - vals[b]),
                    steps=f"{reads} {vals[a]} - {vals[b]} = {vals[a] - vals[b]}.", task="FQA",
                    skills=["statistical reasoning"], context="bar chart")
    if kind == 0:
        return dict(image=img, question=f"What is the value of the {names[a]} bar?", value=vals[a],
                    pool=_numeric_pool(vals[a], 1), steps=f"The {names[a]} bar is {vals[a]}.", task="FQA",
                    skills=["statistical reasoning"], context="bar chart")
    if kind == 1:
        s = vals[a] + vals[b]
        return dict(image=img, question=f"What is the sum of the {names[a]} and {names[b]} bars?", value=s,
                    pool=_numeric_pool(s, 2), steps=f"{reads} {vals[a]} + {vals[b]} = {s}.", task="FQA",
                    skills=["statistical reasoning", "arithmetic reasoning"], context="bar chart")
    if kind == 2:
        avg = (vals[a] + vals[b]) / 2
        return dict(image=img, question=f"What is the average of the {names[a]} and {names[b]} bars? "
                    "Answer with one decimal.", value=avg, precision=1, pool=None,
                    steps=f"{reads} ({vals[a]} + {vals[b]}) / 2 = {avg:.1f}.", task="FQA",
                    skills=["statistical reasoning"], context="bar chart")
    top = max(range(n_bars), key=lambda i: (vals[i], -i))
    if vals.count(vals[top]) > 1 or rng.random() < 0.5:  # a list answer when "tallest" is ambiguous
        listing = ", ".join(str(v) for v in vals)
        return dict(image=img, question="List the bar values from left to right.", value=None,
                    list_value=f"[{listing}]", steps=f"From left to right the bars are {listing}.", task="FQA",
                    skills=["statistical reasoning"], context="bar chart")
    return dict(image=img, question="Which bar is the tallest?", text_value=names[top], pool=list(names),
                steps=f"The tallest bar is {names[top]} with {vals[top]}.", task="FQA",
                skills=["statistical reasoning"], context="bar chart", force_mc=True)


def _line(rng, level, ood):
    vmax = {1: 5, 2: 10, 3: 15}[level] + (10 if ood else 0)
    n = 5
    vals = [int(rng.integers(0, vmax + 1)) for _ in range(n)]
    img, draw = _canvas()
    x0, y0, x1, y1 = 34, 14, 210, 196
    unit = _chart_axes(draw, x0, y0, x1, y1, vmax)
    xs = [x0 + (x1 - x0) * (i + 0.5) / n for i in range(n)]
    pts = [(x, y1 - v * unit) for x, v in zip(xs, vals)]
    draw.line(pts, fill=COLORS["blue"], width=3)
    for (x, y), i in zip(pts, range(n)):
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=COLORS["red"])
        _text(draw, (x, y1 + 14), str(i + 1), size=12)
    i, j = (int(k) for k in rng.permutation(n)[:2])
    if ood:  # unseen composition: change between two points
        i, j = min(i, j), max(i, j)
        d = vals[j] - vals[i]
        return dict(image=img, question=f"How much does the line change from x = {i + 1} to x = {j + 1}?",
                    value=d, pool=_numeric_pool(d, -vmax),
                    steps=f"At x = {i + 1} it is {vals[i]}. At x = {j + 1} it is {vals[j]}. "
                          f"{vals[j]} - {vals[i]} = {d}.", task="FQA", skills=["algebraic reasoning"],
                    context="line plot")
    return dict(image=img, question=f"What is the value at x = {i + 1}?", value=vals[i], pool=_numeric_pool(vals[i]),
                steps=f"At x = {i + 1} the line is at {vals[i]}.", task="FQA", skills=["algebraic reasoning"],
                context="line plot")


def _geometry(rng, level, ood):
    img, draw = _canvas()
    lmax = {1: 6, 2: 9, 3: 15}[level] + (10 if ood else 0)
    if rng.random() < 0.55:
        w, h = int(rng.integers(2, lmax + 1)), int(rng.integers(2, lmax + 1))
        scale = 150 / max(w, h)
        x0, y0 = 112 - w * scale / 2, 112 - h * scale / 2
        draw.rectangle([x0, y0, x0 + w * scale, y0 + h * scale], outline=(0, 0, 0), width=3)
        _text(draw, (112, y0 + h * scale + 12), str(w), size=16)
        _text(draw, (x0 - 12, 112), str(h), size=16)
        if ood or rng.random() < 0.5:
            p = 2 * (w + h)
            return dict(image=img, question="What is the perimeter of the rectangle?", value=p,
                        pool=_numeric_pool(p, 4), steps=f"The sides are {w} and {h}. 2 * ({w} + {h}) = {p}.",
                        task="GPS", skills=["geometry reasoning", "arithmetic reasoning"], context="geometry diagram")
        a = w * h
        return dict(image=img, question="What is the area of the rectangle?", value=a, pool=_numeric_pool(a, 4),
                    steps=f"The sides are {w} and {h}. {w} * {h} = {a}.", task="GPS",
                    skills=["geometry reasoning", "arithmetic reasoning"], context="geometry diagram")
    step = 10 if not ood else 5
    a = int(rng.integers(3, 9)) * step
    b = int(rng.integers(3, 9)) * step
    c = 180 - a - b
    pts = [(30, 190), (194, 190), (int(rng.integers(70, 155)), 40)]
    draw.polygon(pts, outline=(0, 0, 0), width=3)
    _text(draw, (pts[0][0] + 22, pts[0][1] - 12), f"{a}°", size=14)
    _text(draw, (pts[1][0] - 22, pts[1][1] - 12), f"{b}°", size=14)
    _text(draw, (pts[2][0], pts[2][1] + 24), "x", size=16)
    return dict(image=img, question="What is the angle x in degrees?", value=c, pool=[str(c + d) for d in
                range(-20, 25, 5)], steps=f"The angles are {a} and {b}. 180 - {a} - {b} = {c}.", task="GPS",
                skills=["geometry reasoning"], context="geometry diagram")


def _table(rng, level, ood):
    days = ["Mon", "Tue", "Wed"]
    items = ["apples", "pears"]
    vmax = {1: 5, 2: 9, 3: 20}[level] + (20 if ood else 0)
    grid = [[int(rng.integers(1, vmax + 1)) for _ in days] for _ in items]
    img, draw = _canvas()
    x0, y0, cw, ch = 12, 50, 50, 40
    for r in range(3):
        for c in range(4):
            draw.rectangle([x0 + c * cw, y0 + r * ch, x0 + (c + 1) * cw, y0 + (r + 1) * ch], outline=(0, 0, 0))
    for c, d in enumerate(days):
        _text(draw, (x0 + (c + 1.5) * cw, y0 + 0.5 * ch), d, size=14)
    for r, it in enumerate(items):
        _text(draw, (x0 + 0.5 * cw, y0 + (r + 1.5) * ch), it, size=12)
        for c in range(3):
            _text(draw, (x0 + (c + 1.5) * cw, y0 + (r + 1.5) * ch), str(grid[r][c]), size=16)
    r = int(rng.integers(2))
    c = int(rng.integers(3))
    if ood:  # unseen composition: both rows on one day
        s = grid[0][c] + grid[1][c]
        return dict(image=img, question=f"How many fruits were sold on {days[c]}?", value=s, pool=_numeric_pool(s, 2),
                    steps=f"On {days[c]} there were {grid[0][c]} apples and {grid[1][c]} pears. "
                          f"{grid[0][c]} + {grid[1][c]} = {s}.", task="MWP", skills=["arithmetic reasoning"],
                    context="table")
    if rng.random() < 0.5:
        return dict(image=img, question=f"How many {items[r]} were sold on {days[c]}?", value=grid[r][c],
                    pool=_numeric_pool(grid[r][c], 1), steps=f"The table shows {grid[r][c]} {items[r]} on {days[c]}.",
                    task="MWP", skills=["arithmetic reasoning"], context="table")
    s = sum(grid[r])
    row = " + ".join(str(v) for v in grid[r])
    return dict(image=img, question=f"How many {items[r]} were sold in total?", value=s, pool=_numeric_pool(s, 3),
                steps=f"The {items[r]} row is {', '.join(map(str, grid[r]))}. {row} = {s}.", task="MWP",
                skills=["arithmetic reasoning"], context="table")


def _clock(rng, level, ood):
    img, draw = _canvas()
    h = int(rng.integers(1, 13))
    cx, cy, r = 112, 112, 96
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(0, 0, 0), width=3)
    for k in range(1, 13):
        ang = math.radians(k * 30 - 90)
        _text(draw, (cx + 0.8 * r * math.cos(ang), cy + 0.8 * r * math.sin(ang)), str(k), size=15)
    ang = math.radians(h * 30 - 90)
    draw.line([cx, cy, cx + 0.5 * r * math.cos(ang), cy + 0.5 * r * math.sin(ang)], fill=(0, 0, 0), width=6)
    draw.line([cx, cy, cx, cy - 0.75 * r], fill=(0, 0, 0), width=3)
    if ood:  # unseen composition: time arithmetic on the read hour
        k = int(rng.integers(2, 6))
        later = (h + k - 1) % 12 + 1
        return dict(image=img, question=f"What hour will it be {k} hours later?", value=later,
                    pool=[str(v) for v in range(1, 13)],
                    steps=f"The clock shows {h} o'clock. {k} hours later it is {later} o'clock.", task="TQA",
                    skills=["numeric commonsense"], context="clock")
    return dict(image=img, question="What hour does the clock show?", value=h, pool=[str(v) for v in range(1, 13)],
                steps=f"The short hand points to {h}. It is {h} o'clock.", task="TQA", skills=["numeric commonsense"],
                context="clock")


FAMILIES: dict[str, Callable] = {"count": _count, "blocks": _blocks, "dice": _dice, "bars": _bars, "line": _line,
                                 "geometry": _geometry, "table": _table, "clock": _clock}
_SPLIT_INDEX = {s: i for i, s in enumerate(SPLITS)}


def make_item(seed: int, split: str, index: int, cfg: SynthConfig) -> dict[str, Any]:
    """One item as a plain dict (image as PNG bytes), fully determined by (seed, split, index, cfg)."""
    import io

    rng = np.random.default_rng([seed, _SPLIT_INDEX[split], index])
    ood = split == "test_ood"
    names = list(cfg.families or FAMILIES)
    family = names[int(rng.integers(len(names)))]
    raw = FAMILIES[family](rng, cfg.difficulty, ood)
    question, choices, precision = raw["question"], None, raw.get("precision")
    want_mc = raw.get("force_mc") or (raw.get("pool") and rng.random() < cfg.mc_fraction)
    if raw.get("list_value") is not None:
        answer, answer_type, final = raw["list_value"], "list", raw["list_value"]
    elif want_mc:
        correct = raw.get("text_value") or str(raw["value"])
        choices, letter = _mc(rng, correct, raw["pool"])
        answer, answer_type, final = correct, "text", letter
    elif precision:
        answer, answer_type = f"{raw['value']:.{precision}f}", "float"
        final = answer
    else:
        answer, answer_type, final = str(raw["value"]), "integer", str(raw["value"])
    steps = raw["steps"]
    if choices:
        steps += f" {answer} is option {final}."
    rationale = f"{steps} The answer is {final}."
    img = raw["image"]
    if cfg.image_size != _CANVAS:
        from PIL import Image

        img = img.resize((cfg.image_size, cfg.image_size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return {"id": f"{split}-{index:06d}", "family": family, "question": question, "choices": choices,
            "answer": answer, "answer_type": answer_type, "precision": precision, "final": final,
            "rationale": rationale, "task": raw["task"], "skills": raw["skills"], "context": raw["context"],
            "png": buf.getvalue()}


def _query(item: dict) -> str:
    """The prompt text: the question, then the choices as benchmarks show them."""
    if not item["choices"]:
        return item["question"]
    return item["question"] + "\nChoices:\n" + "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(item["choices"]))


def _mathv360k_row(item: dict, split: str, image: str) -> dict:
    conv = [{"from": "human", "value": "<image>\n" + _query(item)}]
    if split == "warmup":
        conv.append({"from": "gpt", "value": item["rationale"]})
    elif split == "train":
        conv.append({"from": "gpt", "value": f"The answer is {item['final']}"})
    # `unlabeled` keeps only the question, as the paper hides the answers of that half.
    return {"id": item["id"], "image": image, "conversations": conv,
            "metadata": {"task": TASKS[item["task"]], "family": item["family"], "source": "synth"}}


def _mathvista_row(item: dict, split: str, image: str, size: int) -> dict:
    mc = bool(item["choices"])
    return {"question": item["question"], "image": image, "choices": item["choices"], "unit": None,
            "precision": float(item["precision"]) if item["precision"] else None, "answer": item["answer"],
            "question_type": "multi_choice" if mc else "free_form", "answer_type": item["answer_type"],
            "pid": item["id"], "query": _query(item), "rationale": item["rationale"],
            "metadata": {"split": split, "language": "english", "img_width": size, "img_height": size,
                         "source": "synth", "context": item["context"], "category":
                         "math-targeted-vqa", "task": TASKS[item["task"]], "grade": "elementary school",
                         "skills": item["skills"], "family": item["family"]}}


def _gen_chunk(args):
    seed, split, start, stop, cfg = args
    return [make_item(seed, split, i, cfg) for i in range(start, stop)]


def generate(out: str | Path, cfg: SynthConfig | None = None, *, log: Callable[[str], None] | None = None) -> dict:
    """Write every split under `out` (images/<split>/*.png, <split>.json) and a manifest; returns the manifest."""
    cfg = cfg or SynthConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    workers = cfg.workers or min(2, os.cpu_count() or 1)
    # `workers` does not change the output, so it stays out of the manifest (identical bytes for any count).
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "workers"}
    manifest = {"generator": "mstar_jax.data.synth", "config": settings, "files": {}}
    jobs = []
    for split in SPLITS:
        n = int(cfg.sizes.get(split, 0))
        for start in range(0, n, 64):
            jobs.append((cfg.seed, split, start, min(n, start + 64), cfg))
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        # spawn: safe with the threads JAX / grain may have started in the parent.
        with mp.get_context("spawn").Pool(workers) as pool:
            chunks = pool.map(_gen_chunk, jobs, chunksize=1)
    else:
        chunks = [_gen_chunk(j) for j in jobs]
    by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for job, chunk in zip(jobs, chunks):
        by_split[job[1]].extend(chunk)
    for split in SPLITS:
        if split not in cfg.sizes:
            continue
        items = by_split[split]
        img_dir = out / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        for it in items:
            rel = f"images/{split}/{it['id']}.png"
            (out / rel).write_bytes(it["png"])
            rows.append(_mathv360k_row(it, split, rel) if split in MATHV360K_SPLITS
                        else _mathvista_row(it, split, rel, cfg.image_size))
        data: Any = rows if split in MATHV360K_SPLITS else {r["pid"]: r for r in rows}
        path = out / f"{split}.json"
        write_atomic(path, json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False), publish=False)
        manifest["files"][split] = {"file": path.name, "format": "mathv360k" if split in MATHV360K_SPLITS
                                    else "mathvista", "count": len(rows), "labeled": split != "unlabeled"}
        if split == "unlabeled":
            # The hidden answers, apart from the questions: read only by the oracle variant and to measure how
            # often pseudo labels are right (paper 3.4), never to train.
            hidden = {it["id"]: {k: it[k] for k in ("answer", "answer_type", "choices", "precision")} for it in items}
            write_atomic(out / HIDDEN_ANSWERS, json.dumps(hidden, indent=1, sort_keys=True), publish=False)
            manifest["files"]["unlabeled_answers"] = {"file": HIDDEN_ANSWERS, "count": len(hidden)}
        if log:
            log(f"synth: wrote {len(rows)} {split} items to {path}")
    # Last, and atomically: the manifest marks the dataset complete.
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True), publish=False)
    return manifest
