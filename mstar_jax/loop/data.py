"""The loop's query sets: the synthetic default (generated into the workdir) or the user's data (files, ArrayRecord
shards of `mstar data prepare`, TFDS datasets)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mstar_jax.config import section_seed
from mstar_jax.data.synth import HIDDEN_ANSWERS
from mstar_jax.errors import DataError
from mstar_jax.loop.rollouts import Query
from mstar_jax.workdir import publish

SPLITS = ("warmup", "train", "unlabeled", "val", "test_id", "test_ood")


def queries_from_records(records, root: Path) -> list[Query]:
    """Records -> loop queries with absolute image paths (records without an image are not usable here)."""
    out = []
    for r in records:
        if not r.images:
            raise DataError(f"record {r.id}: the loop needs an image per question")
        out.append(Query(r.id, tuple(str((root / p).resolve()) for p in r.images), r.to_item()))
    return out


def _synth(out: Path, seed: int, sizes: dict, d, say) -> Path:
    """Generate the synthetic splits of the `data` section `d` into `out` (once)."""
    from mstar_jax.data.synth import SynthConfig, generate

    if not (out / "manifest.json").exists():
        generate(out, SynthConfig(seed=seed, sizes=dict(sizes), image_size=d.image_size, difficulty=d.difficulty,
                                  mc_fraction=d.mc_fraction, families=d.families))
        publish(out, last="manifest.json")  # the manifest marks the data complete
        say(f"synthetic data: generated {sum(sizes.values())} items in {out}")
    return out


def _read_queries(path: Path, root: Path, say, labeled: bool = True) -> list[Query]:
    """One data file through the real readers (skipped records reported) -> loop queries."""
    from mstar_jax.data.readers import read_dataset

    try:
        records, report = read_dataset(path, root=root, labeled=labeled)
    except UnicodeDecodeError as err:  # until the readers report it themselves
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); convert it to UTF-8") from None
    if report.skipped:
        say(report.summary())  # it names the file
    return queries_from_records(records, root)


def load_splits(cfg, workdir: Path, say) -> dict[str, Sequence[Query]]:
    """Every split the run needs (plus `pretrain` for the demo's own base model) as query sources: dataset files
    through the real readers, `mstar data prepare` shards or a TFDS dataset (`mstar_jax.data.sources`)."""
    from mstar_jax.data.sources import TFDS_PREFIX, is_shard_spec, open_queries

    d = cfg.data
    if d.source == "synthetic":
        root = _synth(workdir / "data", section_seed(cfg, d), d.synth_sizes.to_dict(), d, say)
        files = {s: str(root / f"{s}.json") for s in SPLITS if d.synth_sizes.get(s)}
    elif d.source == "files":
        root = Path(d.root) if d.root else None
        files = {s: str(getattr(d, s)) for s in SPLITS if getattr(d, s)}
        for s in ("train", "test_id"):
            if s not in files:
                raise DataError(f"data.source=files needs --config.data.{s}=PATH")
    else:
        raise DataError(f"data.source must be 'synthetic' or 'files', got {d.source!r}")
    splits = {}
    for name, spec in files.items():
        if not (spec.startswith(TFDS_PREFIX) or is_shard_spec(spec) or Path(spec).is_file()):
            raise DataError(f"{spec}: data file for split {name!r} not found")
        splits[name] = open_queries(spec, root=root, cache_dir=workdir / "data" / "_image_cache",
                                    labeled=name != "unlabeled",
                                    read_file=lambda path, r, labeled: _read_queries(path, r, say, labeled))
    if "unlabeled" in splits:
        answers = root / HIDDEN_ANSWERS if d.source == "synthetic" else (Path(d.unlabeled_answers)
                                                                          if d.unlabeled_answers else None)
        splits["unlabeled"] = with_hidden_answers(splits["unlabeled"], answers, root, say)
    if not cfg.model.path:
        splits["pretrain"] = _pretrain_queries(cfg, workdir, say)
    return splits


def with_hidden_answers(queries: Sequence[Query], path: Path | None, root: Path | None, say) -> list[Query]:
    """Unlabeled queries with their hidden answers attached, when a file has them: a JSON {id: answer or
    {answer, answer_type, choices, precision}} or a dataset file the readers know. The loop reads them only for
    the oracle variant and to measure pseudo labels."""
    import json

    if path is None:
        return queries
    if not path.is_file():
        raise DataError(f"{path}: hidden answers of the unlabeled split not found")
    table: dict[str, dict] = {}
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raw = None
    if isinstance(raw, dict) and all(isinstance(v, (str, int, float, dict)) for v in raw.values()) and \
            not any(isinstance(v, dict) and "question" in v for v in raw.values()):
        table = {str(k): (v if isinstance(v, dict) else {"answer": str(v)}) for k, v in raw.items()}
    else:
        for q in _read_queries(path, root if root is not None else path.parent, say):
            table[q.id] = {k: q.item.get(k) for k in ("answer", "answer_type", "choices", "precision",
                                                       "question_type")}
    out, found = [], 0
    for q in queries:
        extra = table.get(q.id)
        found += extra is not None
        out.append(Query(q.id, q.images, {**q.item, **extra}) if extra else q)
    say(f"unlabeled split: hidden answers of {found}/{len(queries)} queries (for monitoring and the oracle only)")
    return out


def _pretrain_queries(cfg, workdir: Path, say) -> list[Query]:
    """The demo base model's pre-training questions: in-domain draws plus an `ood_fraction` from the OOD generator.

    Like the paper's base LMMs, whose pre-training covered the domains of their out-of-domain benchmarks, the
    base may see the OOD image distribution (direct answers); warm-up and self-evolving queries stay in-domain,
    so the OOD test measures whether what the recipe teaches transfers to a domain the base already knows.
    Drawn under their own seed (data seed + 1000), so none is an item of the evaluated splits.
    """
    p = cfg.model.pretrain
    n = int(p.queries)
    fraction = float(p.ood_fraction)
    if not 0.0 <= fraction <= 1.0:
        raise DataError(f"model.pretrain.ood_fraction must be in [0, 1], got {fraction}")
    n_ood = int(round(n * fraction))
    sizes = {"warmup": n - n_ood, "test_ood": n_ood}
    sizes = {k: v for k, v in sizes.items() if v}
    proot = _synth(workdir / "data_pretrain", section_seed(cfg, cfg.data) + 1000, sizes, cfg.data, say)
    return [q for split in sizes for q in _read_queries(proot / f"{split}.json", proot, say)]
