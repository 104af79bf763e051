"""The `mstar` command line: thin sub-commands, each registered by the module that owns it."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each entry is a module with `register(subparsers)`; modules keep heavy imports inside handlers
# so that `mstar --help` stays fast.
_COMMAND_MODULES = (
    "mstar_jax.commands.convert",
    "mstar_jax.commands.sample",
    "mstar_jax.commands.train",
    "mstar_jax.commands.eval",
    "mstar_jax.commands.bench",
    "mstar_jax.data.commands",
    "mstar_jax.commands.study",
    "mstar_jax.commands.demo",
    "mstar_jax.commands.prm",
    "mstar_jax.commands.plan",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every available sub-command."""
    parser = argparse.ArgumentParser(prog="mstar", description="M-STaR self-evolving training in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # command not built yet; any other missing module is a real error
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mstar` console script."""
    import sys as _sys

    from mstar_jax.commands.train import split_config_overrides

    parser = build_parser()
    # `--config.key=value` overrides are free-form: take them out before argparse sees them.
    argv, overrides = split_config_overrides(list(_sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    args.config_overrides = overrides
    if overrides and args.command not in ("train", "study", "prm"):
        parser.error(f"--config.* overrides only apply to `train`, `study` and `prm`, not `{args.command}`")
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # user-facing errors print one clear line, not a traceback
        from mstar_jax.errors import MstarError

        if isinstance(err, MstarError):
            print(f"mstar {args.command}: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
