"""Small benchmark files in the layouts the releases publish, written by the tests (tiny PNGs, no downloads).

Rows copied from a public release say where they come from; the other rows only follow the release's schema.
"""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.data.conftest import png_bytes

def _write_tsv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(header)
        w.writerows(rows)
    return path


def _write_parquet(path: Path, rows: list[dict], image_seed: int) -> Path:
    """Rows with an HF image struct ({"bytes", "path"}) holding a distinct tiny PNG each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{**r, "image": {"bytes": png_bytes(image_seed + i), "path": None}}
                                         for i, r in enumerate(rows)]), path)
    return path


# --------------------------------------------------------------------------------------------- MathVista
# lupantech/MathVista data/testmini.json, pids 2, 5 and 404, with their data/query.json entries. Pid 404 has
# "11.50 A.M." in its question; pid 2 has a unit.
MATHVISTA_ROWS = {
    "2": {"question": "what is the total volume of the measuring cup?", "image": "images/2.jpg", "choices": None,
          "unit": "g", "precision": None, "answer": "1000", "question_type": "free_form", "answer_type": "integer",
          "pid": "2", "metadata": {"split": "testmini", "language": "english", "img_width": 1024, "img_height": 768,
                                   "source": "TextVQA", "category": "general-vqa", "task": "visual question answering",
                                   "context": "natural image", "grade": "not applicable",
                                   "skills": ["numeric commonsense", "arithmetic reasoning"]}},
    "5": {"question": "Find $m\\angle H$", "image": "images/5.jpg", "choices": ["97", "102", "107", "122"],
          "unit": None, "precision": None, "answer": "97", "question_type": "multi_choice", "answer_type": "text",
          "pid": "5", "metadata": {"split": "testmini", "language": "english", "img_width": 322, "img_height": 245,
                                   "source": "Geometry3K", "category": "math-targeted-vqa",
                                   "task": "geometry problem solving", "context": "geometry diagram",
                                   "grade": "high school", "skills": ["geometry reasoning", "algebraic reasoning"]}},
    "404": {"question": "Look at the following schedule. Which activity begins at 11.50 A.M.?'",
            "image": "images/404.jpg",
            "choices": ["figure skating practice", "private class", "adult class", "children's class"],
            "unit": None, "precision": None, "answer": "children's class", "question_type": "multi_choice",
            "answer_type": "text", "pid": "404",
            "metadata": {"split": "testmini", "language": "english", "img_width": 325, "img_height": 217,
                         "source": "TabMWP", "category": "math-targeted-vqa", "task": "math word problem",
                         "context": "table", "grade": "elementary school",
                         "skills": ["numeric commonsense", "arithmetic reasoning", "statistical reasoning"]}},
}
_MC_HINT = "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end."
MATHVISTA_QUERIES = {
    "2": "Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, "
         "at the end.\nQuestion: what is the total volume of the measuring cup? (Unit: g)",
    "5": _MC_HINT + "\nQuestion: Find $m\\angle H$\nChoices:\n(A) 97\n(B) 102\n(C) 107\n(D) 122",
    "404": _MC_HINT + "\nQuestion: Look at the following schedule. Which activity begins at 11.50 A.M.?'\nChoices:\n"
                      "(A) figure skating practice\n(B) private class\n(C) adult class\n(D) children's class",
}


def write_mathvista_json(folder: Path, *, queries: bool = True) -> Path:
    """testmini.json (+ query.json) and images/<pid>.jpg, as the GitHub release lays them out."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    for i, pid in enumerate(MATHVISTA_ROWS):
        (folder / "images" / f"{pid}.jpg").write_bytes(png_bytes(i))
    path = folder / "testmini.json"
    path.write_text(json.dumps(MATHVISTA_ROWS, indent=4))
    if queries:
        (folder / "query.json").write_text(json.dumps(MATHVISTA_QUERIES, indent=4))
    return path


def write_mathvista_parquet(folder: Path) -> Path:
    """The HF release's testmini parquet: `decoded_image` bytes, `metadata` a struct, `query` a column."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (pid, row) in enumerate(MATHVISTA_ROWS.items()):
        row = {**row, "precision": None if row["precision"] is None else float(row["precision"]),
               "decoded_image": {"bytes": png_bytes(i), "path": f"{pid}.jpg"}, "query": MATHVISTA_QUERIES[pid]}
        rows.append(row)
    path = folder / "testmini-00000-of-00001-725687bf7a18d64b.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ----------------------------------------------------------------------------------------------- MMBench
# Questions shown in open-compass/MMBench samples/README.md (the index is the sample's image name there):
# 2705 is attribute_reasoning / function_reasoning, 812 is coarse_perception / image_scene.
MMBENCH_QUESTIONS = [
    {"index": 2705, "question": "What's the function of the demonstrated object?", "hint": "",
     "options": ["Tracking and organizing dates, days, weeks, months, and years.",
                 "Displaying and indicating the current time.",
                 "Reflecting and providing a reflection of the viewer's appearance.",
                 "Providing a comfortable sleeping and resting place."],
     "answer": 0, "category": "function_reasoning", "l2": "attribute_reasoning"},
    {"index": 812, "question": "Which scene category matches this image the best?", "hint": "",
     "options": ["rock_arch", "train_interior", "shopfront", "office_cubicles"], "answer": 0,
     "category": "image_scene", "l2": "coarse_perception"},
]
MMBENCH_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                  "l2-category", "comment", "split"]


def mmbench_copies(q: dict) -> list[dict]:
    """The question and its rotated copies at index + k * 1e6, the answer letter moving with its option."""
    out = []
    n = len(q["options"])
    for k in range(n):
        options = [q["options"][(j + k) % n] for j in range(n)]
        out.append({"index": q["index"] + k * 1_000_000, "options": options,
                    "answer": "ABCD"[options.index(q["options"][q["answer"]])], "copy": k})
    return out


def write_mmbench_tsv(folder: Path) -> Path:
    """VLMEvalKit's MMBench_DEV_EN_V11.tsv layout: base64 image in the first copy, later copies refer to its index."""
    rows = []
    for qi, q in enumerate(MMBENCH_QUESTIONS):
        image = base64.b64encode(png_bytes(20 + qi)).decode()
        rows += [[c["index"], q["question"], q["hint"], *c["options"], c["answer"], q["category"],
                  image if c["copy"] == 0 else str(q["index"]), "x", q["l2"], "nan", "dev"] for c in mmbench_copies(q)]
    return _write_tsv(folder / "MMBench_DEV_EN_V11.tsv", MMBENCH_HEADER, rows)


# lmms-lab/MMBench `cn` dev row with index 241 as evalscope's docs show it (docs/en/benchmarks/mm_bench.md in
# modelscope/evalscope): `L2-category` with a capital L, `comment` "nan". The hint / question split is ours.
MMBENCH_LMMS_ROW = {
    "index": "241", "hint": "下面的文章描述了一个实验。阅读文章，然后按照以下说明进行操作。\n\nMadelyn在雪板的底部涂上了一层薄蜡，"
                            "然后直接下坡滑行。然后，她去掉了蜡，再次直接下坡滑行。她重复了这个过程四次，每次都交替使用薄蜡或"
                            "不使用薄蜡滑行。她的朋友Tucker计时每次滑行的时间。Madelyn和Tucker计算了使用薄蜡滑行和不使用薄蜡"
                            "滑行时直接下坡所需的平均时间。\n图：滑雪板下坡。",
    "question": "麦德琳和塔克的实验能最好回答哪个问题？",
    "A": "当麦德琳的雪板上有一层薄蜡或一层厚蜡时，它是否能在较短的时间内滑下山坡？",
    "B": "当麦德琳的雪板上有一层蜡或没有蜡时，它是否能在较短的时间内滑下山坡？", "C": None, "D": None,
    "answer": "B", "category": "identity_reasoning", "source": "scienceqa", "L2-category": "attribute_reasoning",
    "comment": "nan", "split": "dev"}


def write_mmbench_parquet(folder: Path) -> Path:
    """lmms-lab/MMBench's layout: index as a string, image struct, `L2-category`; one perception row added."""
    q = MMBENCH_QUESTIONS[1]
    perception = {"index": str(q["index"]), "hint": None, "question": q["question"],
                  **dict(zip("ABCD", q["options"])), "answer": "A", "category": q["category"], "source": "x",
                  "L2-category": q["l2"], "comment": "nan", "split": "dev"}
    return _write_parquet(folder / "dev-00000-of-00001.parquet", [MMBENCH_LMMS_ROW, perception], 30)


# ------------------------------------------------------------------------------------------------- MMStar
# Lin-Chen/MMStar index 0 as evalscope's docs show it (docs/en/benchmarks/mm_star.md in modelscope/evalscope).
# Rows 1-3 follow the schema only: one per other core category kind (perception, reasoning, math).
MMSTAR_ROWS = [
    {"index": 0, "question": "Which option describe the object relationship in the image correctly?\nOptions: "
                             "A: The suitcase is on the book., B: The suitcase is beneath the cat., "
                             "C: The suitcase is beneath the bed., D: The suitcase is beneath the book.",
     "answer": "A", "category": "coarse perception", "l2_category": "image scene and topic",
     "meta_info": {"source": "MMBench", "split": "val", "image_path": "images/0.jpg"}},
    {"index": 1, "question": "What color is the umbrella?\nOptions: A: red, B: blue, C: green, D: black", "answer": "B",
     "category": "fine-grained perception", "l2_category": "attribute recognition",
     "meta_info": {"source": "SEEDBench_IMG", "split": "val", "image_path": "images/1.jpg"}},
    {"index": 2, "question": "What will happen next?\nOptions: A: The egg will fall, B: The egg will be broken, "
                             "C: Nothing, D: The egg will be cooked", "answer": "B", "category": "logical reasoning",
     "l2_category": "future prediction",
     "meta_info": {"source": "MMBench", "split": "val", "image_path": "images/2.jpg"}},
    {"index": 3, "question": "Find x.\nOptions: A: 3, B: 4, C: 5, D: 6", "answer": "C", "category": "math",
     "l2_category": "geometry", "meta_info": {"source": "MathVista", "split": "val", "image_path": "images/3.jpg"}},
]


def write_mmstar_parquet(folder: Path, rows=MMSTAR_ROWS) -> Path:
    """Lin-Chen/MMStar's mmstar.parquet: options inside the question, image struct, meta_info struct."""
    return _write_parquet(folder / "mmstar.parquet", rows, 40)


# --------------------------------------------------------------------------------------------------- AI2D
# Row 0 of lmms-lab/ai2d test as evalscope's docs show it (docs/en/benchmarks/ai2d.md in modelscope/evalscope:
# target B = answer "1"); the AI2D release's question 0.png-0 ("correctAnswer": 3, quoted in QHX-BNU/master
# Edudata/AI2D.md). The third row is ours: letter-named options in another order, where a letter answer must be
# read as a position, not matched against the options' text.
AI2D_ROWS = [{"question": "which of these define dairy item", "options": ["c", "D", "b", "a"], "answer": "1"},
             {"question": "What is A in the diagram?", "options": ["ears", "nose", "mouth", "face"], "answer": "3"},
             {"question": "Which label marks the yolk?", "options": ["D", "C", "B", "A"], "answer": "0"}]


def write_ai2d_parquet(folder: Path) -> Path:
    """lmms-lab/ai2d: question, options, answer = the 0-based option index as a string, image struct."""
    return _write_parquet(folder / "test-00000-of-00001.parquet", AI2D_ROWS, 50)


def write_ai2d_tsv(folder: Path) -> Path:
    """VLMEvalKit's AI2D_TEST.tsv: index, question, A-D, the answer letter, base64 image."""
    rows = [[i, r["question"], *r["options"], "ABCD"[int(r["answer"])], "diagram",
             base64.b64encode(png_bytes(50 + i)).decode()] for i, r in enumerate(AI2D_ROWS)]
    return _write_tsv(folder / "AI2D_TEST.tsv", ["index", "question", "A", "B", "C", "D", "answer", "category",
                                                 "image"], rows)


# -------------------------------------------------------------------------------------------------- M3CoT
# LightChen233/M3CoT experiment/zero-shot/gpt4v/direct.jsonl rows physics-1074 and physical-commonsense-1398
# (id, category, context, question, choices, image_id, answer, domain, topic); split and rationale are ours.
M3COT_ROWS = [
    {"id": "physics-1074", "category": "Materials", "context": "Select the best answer.",
     "question": "Which property do these three objects have in common?", "choices": ["fragile", "sticky", "fuzzy"],
     "image_id": "1074", "answer": "C", "domain": "commonsense", "topic": "physical-commonsense", "split": "test",
     "rationale": "Each object is covered in soft hair. The answer is C."},
    {"id": "physical-commonsense-1398", "category": "Usage Purpose", "context": "",
     "question": "What is the likely purpose of the troll statue under the bridge?",
     "choices": ["To scare away trespassers", "To bring attention to the city's tourist attractions",
                 "To honor a local legend", "To discourage people from walking across the bridge"],
     "image_id": "1498", "answer": "B", "domain": "commonsense", "topic": "physical-commonsense", "split": "test",
     "rationale": "The statue is a landmark for visitors. The answer is B."},
]


def write_m3cot_jsonl(data_dir: Path) -> Path:
    """The jsonl release in data/: `image` is written from the folder above ("data/images/<id>.png")."""
    (data_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, r in enumerate(M3COT_ROWS):
        (data_dir / "images" / f"{r['id']}.png").write_bytes(png_bytes(60 + i))
        lines.append(json.dumps({**r, "image": f"data/images/{r['id']}.png"}))
    path = data_dir / "test.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_m3cot_parquet(folder: Path) -> Path:
    """LightChen2333/M3CoT's parquet: the image as an HF image struct."""
    return _write_parquet(folder / "test-00000-of-00001.parquet", M3COT_ROWS, 60)


# ---------------------------------------------------------------------------------------------- MathV360K
# Schema of Zhiqiang007/MathV360K train_samples_all_tuning.json with images in data_images/<Source>/images/ as the
# Math-LLaVA README lays them out (HZQ950419/Math-LLaVA README.md, "Data structure"); the rows are ours.
MATHV360K_ROWS = [
    {"id": "tabmwp-1", "image": "TabMWP/images/1.png", "conversations": [
        {"from": "human", "value": "<image>\n" + _MC_HINT + "\nQuestion: Which activity begins at 11.50 A.M.?\n"
                                   "Choices:\n(A) private class\n(B) children's class\n(C) adult class"},
        {"from": "gpt", "value": "The answer is B"}]},
    {"id": "iconqa-7", "image": "IconQA/images/7.png", "conversations": [
        {"from": "human", "value": "<image>\nHint: Please answer the question requiring an integer answer and provide "
                                   "the final value, e.g., 1, 2, 3, at the end.\nQuestion: How many dots are there?"},
        {"from": "gpt", "value": "The answer is 7"}]},
]


def write_mathv360k(folder: Path) -> Path:
    """train_samples_all_tuning.json beside data_images/."""
    for i, r in enumerate(MATHV360K_ROWS):
        image = folder / "data_images" / r["image"]
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(png_bytes(70 + i))
    path = folder / "train_samples_all_tuning.json"
    path.write_text(json.dumps(MATHV360K_ROWS))
    return path
