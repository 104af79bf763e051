"""`mstar convert hf-to-flax|flax-to-hf`."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add the `convert` command."""
    p = subparsers.add_parser("convert", help="convert checkpoints between HF safetensors and mstar-jax (Orbax)")
    sub = p.add_subparsers(dest="direction", required=True)

    a = sub.add_parser("hf-to-flax", help="HF LLaVA directory -> mstar-jax checkpoint")
    a.add_argument("hf_dir")
    a.add_argument("out_dir")
    a.add_argument("--dtype", default=None, help="cast parameters (default: keep the checkpoint dtype)")
    a.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it already holds something")
    _mesh_flags(a)
    a.set_defaults(handler=_hf_to_flax)

    b = sub.add_parser("flax-to-hf", help="mstar-jax checkpoint -> HF directory loadable by transformers")
    b.add_argument("ckpt_dir")
    b.add_argument("out_dir")
    b.add_argument("--dtype", default=None, help="cast tensors on export (default: keep)")
    b.add_argument("--layout", default=None,
                   help="key layout to write (hub, transformers-4.5x, transformers-5, ...; default: the source's)")
    b.add_argument("--max-shard-size", default="5GB")
    b.add_argument("--overwrite", action="store_true")
    _mesh_flags(b)
    b.set_defaults(handler=_flax_to_hf)


def _mesh_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh-data", type=int, default=1)
    p.add_argument("--mesh-fsdp", type=int, default=-1)
    p.add_argument("--mesh-tensor", type=int, default=1)


def _mesh(args):
    from mstar_jax import sharding

    sharding.initialize_distributed()
    return sharding.make_mesh(args.mesh_data, args.mesh_fsdp, args.mesh_tensor)


def _hf_to_flax(args) -> int:
    from mstar_jax.conversion import hf_to_flax

    out = hf_to_flax(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite, mesh=_mesh(args))
    print(f"converted {args.hf_dir} -> {out}")
    return 0


def _flax_to_hf(args) -> int:
    from mstar_jax.conversion import flax_to_hf

    out = flax_to_hf(args.ckpt_dir, args.out_dir, layout=args.layout, dtype=args.dtype,
                     max_shard_size=args.max_shard_size, overwrite=args.overwrite, mesh=_mesh(args))
    print(f"exported {args.ckpt_dir} -> {out}")
    return 0
