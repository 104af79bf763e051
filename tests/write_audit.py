"""Run `mstar` and record every file this process writes, renames onto, removes or creates under ROOT.

Usage: python -m tests.write_audit LOG ROOT ARGS...   (the paths, one per line, go to LOG at exit)
Python's audit hooks see the writes of Python code (open, os.replace, os.remove, mkdir, rmtree); tensorstore's
C++ writes of Orbax array shards are not seen, which is what the multi-process test allows anyway.
"""

from __future__ import annotations

import atexit
import os
import sys

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def main() -> None:
    log, root, args = sys.argv[1], os.path.realpath(sys.argv[2]), sys.argv[3:]
    written: set[str] = set()

    def note(path) -> None:
        if isinstance(path, (str, bytes, os.PathLike)) and not isinstance(path, int):
            full = os.path.realpath(os.fsdecode(path))
            if full == root or full.startswith(root + os.sep):
                written.add(os.path.relpath(full, root))

    def hook(event: str, a: tuple) -> None:
        if event == "open":
            path, mode, flags = a
            if (mode and any(c in mode for c in "wax+")) or (flags or 0) & _WRITE_FLAGS:
                note(path)
        elif event in ("os.rename", "os.replace"):
            note(a[1])
        elif event in ("os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate"):
            note(a[0])

    def dump() -> None:
        with open(log, "w") as f:
            f.write("".join(p + "\n" for p in sorted(written)))

    atexit.register(dump)
    sys.addaudithook(hook)
    sys.argv = ["mstar", *args]
    from mstar_jax.cli import main as mstar_main

    sys.exit(mstar_main())


if __name__ == "__main__":
    main()
