"""`mstar data synth` (make the embedded dataset), `mstar data prepare` (dataset file -> ArrayRecord shards) and
`mstar data tfds` (a TFDS dataset as ArrayRecord from a local download).

Shards are written with `array_record` (no TensorFlow needed) and read back with grain's
`ArrayRecordDataSource` (`mstar_jax.data.pipeline.shard_dataset`); each entry embeds its images.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    """Add the `data` command and its sub-commands."""
    data = subparsers.add_parser("data", help="make or prepare datasets")
    sub = data.add_subparsers(dest="data_command", required=True)

    synth = sub.add_parser("synth", help="write the synthetic visual-math dataset (all splits)")
    synth.add_argument("out", help="output folder")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--sizes", default="", help="split sizes, e.g. warmup=256,train=1024,test_ood=0")
    synth.add_argument("--config", action="append", default=[],
                       help="generator setting key=value (image_size, difficulty, mc_fraction, families, workers) "
                            "or a JSON file of them; repeatable")
    synth.set_defaults(handler=_synth)

    prep = sub.add_parser("prepare", help="read a dataset file and write ArrayRecord shards")
    prep.add_argument("src", help="dataset file (json, jsonl, parquet, tsv)")
    prep.add_argument("out", help="output folder")
    prep.add_argument("--format", default="auto", help="mathv360k, mathvista, m3cot, mmstar, mmbench, ai2d, records")
    prep.add_argument("--root", default=None, help="dataset root for image paths (default: the file's folder)")
    prep.add_argument("--shards", type=int, default=1)
    prep.add_argument("--unlabeled", action="store_true", help="drop gold answers (unlabeled prompts)")
    prep.add_argument("--strict", action="store_true", help="fail on the first malformed record")
    prep.set_defaults(handler=_prepare)

    tf = sub.add_parser("tfds", help="build a TFDS dataset (ArrayRecord, no TensorFlow) from a local download")
    tf.add_argument("name", choices=("mstar_synth", "mathv360k", "mathvista"))
    tf.add_argument("--manual-dir", required=True,
                    help="the download: `mstar data synth` output, MathV360K's JSON + data_images/, MathVista's files")
    tf.add_argument("--data-dir", default=None, help="TFDS data dir (default: TFDS's, ~/tensorflow_datasets)")
    tf.set_defaults(handler=_tfds)


def _parse_sizes(text: str) -> dict[str, int]:
    from mstar_jax.errors import DataError

    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not value.strip().isdigit():
            raise DataError(f"--sizes: expected split=count, got {part!r}")
        out[key.strip()] = int(value)
    return out


def _synth(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from mstar_jax.data.synth import DEFAULT_SIZES, SynthConfig, generate
    from mstar_jax.errors import DataError

    settings: dict = {}
    for entry in args.config:
        if entry.endswith(".json") and Path(entry).is_file():
            settings.update(json.loads(Path(entry).read_text()))
            continue
        key, sep, value = entry.partition("=")
        if not sep:
            raise DataError(f"--config: expected key=value or a JSON file, got {entry!r}")
        settings[key.strip()] = json.loads(value) if value.strip()[:1] in "0123456789-[{.tf" else value
    known = {f.name for f in dataclasses.fields(SynthConfig)} - {"seed", "sizes"}
    unknown = set(settings) - known - {"sizes"}
    if unknown:
        raise DataError(f"--config: unknown synth settings {sorted(unknown)}; known: {sorted(known)}")
    sizes = dict(DEFAULT_SIZES)
    sizes.update(settings.pop("sizes", {}))
    sizes.update(_parse_sizes(args.sizes))
    try:
        cfg = SynthConfig(seed=args.seed, sizes=sizes, **settings)
    except (ValueError, TypeError) as err:
        raise DataError(f"synth config: {err}") from err
    generate(args.out, cfg, log=print)
    return 0


def _tfds(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mstar_jax.data.tfds_builders import build

    data_dir = args.data_dir or str(Path.home() / "tensorflow_datasets")
    out = build(args.name, args.manual_dir, data_dir)
    print(f"tfds: wrote {args.name} to {out}; read it with --config.data.<split>=tfds:{args.name}:<split> "
          f"--config.data.root={data_dir}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from array_record.python import array_record_module

    from mstar_jax.data.readers import read_dataset
    from mstar_jax.data.records import encode_entry
    from mstar_jax.errors import DataError
    from mstar_jax.io import write_atomic

    if args.shards < 1:
        raise DataError(f"--shards must be >= 1, got {args.shards}")
    src = Path(args.src)
    root = Path(args.root) if args.root else src.parent
    records, report = read_dataset(src, args.format, root=root, labeled=not args.unlabeled, strict=args.strict)
    print(report.summary())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for s in range(args.shards):
        name = f"{src.stem}-{s:05d}-of-{args.shards:05d}.array_record"
        tmp = out / f".{name}.tmp"
        # group_size:1 keeps random access cheap (one record per chunk), which grain's sampler needs.
        writer = array_record_module.ArrayRecordWriter(str(tmp), "group_size:1")
        for rec in records[s::args.shards]:
            writer.write(encode_entry(rec, [(root / rel).read_bytes() for rel in rec.images]))
        writer.close()
        tmp.replace(out / name)
        names.append(name)
    manifest = {"source": str(src), "format": args.format, "shards": names, "records": len(records),
                "report": report.to_json()}
    write_atomic(out / f"{src.stem}.manifest.json", json.dumps(manifest, indent=1), publish=False)
    print(f"prepare: wrote {len(records)} records to {args.shards} shard(s) in {out}")
    return 0
