"""A run's workdir, on a local disk or remote (gs://bucket/run): the loop writes with pathlib either way.

Local workdir: `local` is the directory itself and nothing else happens (outputs are byte-identical to before).

Remote workdir: `local` is a mirror directory ($MSTAR_LOCAL_DIR or the temp dir, /mstar-<hash of the URL>-p<process>)
that start-up empties and refills from the remote -- the remote is the truth, so a fresh VM resumes exactly like
the old one. Every writer of the loop uploads what it has finished writing (`publish`): one object write per
file, which GCS makes atomic, so the bucket never holds half a file. The Orbax directories (`checkpoints/`,
`warmup_ckpt/`) are written to the remote directly (`durable`); they are never mirrored. Only process 0 uploads;
every process pulls.

Local workdir shared by several processes (`jax.distributed` on one machine or over NFS): process 0 works in the
directory itself, every other process in a mirror of it as above, so only process 0 writes the workdir's files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from mstar_jax.errors import WorkdirError

# Written by Orbax straight to the remote (every host writes its own shards there).
REMOTE_ONLY = ("checkpoints", "warmup_ckpt")
# Not pulled at start-up: the remote-only directories, and outputs a resumed run rewrites (export, plots) or adds
# to (tensorboard: a new events file per run; the old ones stay on the remote).
NOT_PULLED = REMOTE_ONLY + ("export", "plots", "tensorboard")
_CHUNK = 8 << 20

_OPEN: dict[Path, "Workdir"] = {}  # mirror root -> its workdir, for publish()


def is_remote(path) -> bool:
    """True for URLs with a scheme (gs://bucket/x, s3://...); local paths and file:// are not remote."""
    s = str(path)
    return "://" in s and not s.startswith("file://")


def remote_path(url: str):
    """The etils.epath of a remote URL.

    MSTAR_FAKE_REMOTE_ROOT=DIR stands a local DIR in for gs:// (gs://B/x -> DIR/B/x), so tests exercise the
    remote-workdir code (mirror, uploads, Orbax on the remote path, resume) without a network."""
    from etils import epath

    fake = os.environ.get("MSTAR_FAKE_REMOTE_ROOT")
    if fake and url.startswith("gs://"):
        return epath.Path(fake) / url[len("gs://"):]
    return epath.Path(url)


class Workdir:
    """Where a run keeps its files: `local` for pathlib code, `remote` (an epath, or None) for the durable copy."""

    def __init__(self, local: Path, remote=None, url: str | None = None):
        self.local, self.remote = Path(local), remote
        self.url = url or str(local)
        self._sent: dict[Path, tuple[int, int]] = {}  # file -> (size, mtime_ns) last uploaded

    @classmethod
    def open(cls, workdir: "Workdir | str | Path") -> "Workdir":
        """The workdir for a path or URL; a remote one gets a fresh mirror, filled from the remote."""
        if isinstance(workdir, Workdir):
            return workdir
        import jax

        from mstar_jax import sharding

        sharding.initialize_distributed()  # before jax.process_index(), which would start a single-process backend
        if not is_remote(workdir):
            local = Path(str(workdir).removeprefix("file://"))
            if jax.process_count() == 1:
                local.mkdir(parents=True, exist_ok=True)
                return cls(local)
            if _is_primary():
                local.mkdir(parents=True, exist_ok=True)
                wd = cls(local)
            else:
                # A disk every process sees (NFS, or one machine): only process 0 writes there, the others keep a
                # private mirror of it as for gs://, so two hosts never write one file.
                url = str(local.absolute())
                wd = cls(mirror_dir(url), remote_path(url), url)
        else:
            url = str(workdir).rstrip("/")
            wd = cls(mirror_dir(url), remote_path(url), url)
        if wd.remote is not None:
            wd.pull()
            _OPEN[wd.local.absolute()] = wd
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"mstar workdir {wd.url}")  # all have pulled before anyone writes
        return wd

    @property
    def is_remote(self) -> bool:
        """True when the files also live in `remote`."""
        return self.remote is not None

    def sub(self, name: str) -> "Workdir":
        """A sub-directory as a workdir of its own (same mirror and remote), e.g. a study variant."""
        wd = Workdir(self.local / name, None if self.remote is None else self.remote / name, f"{self.url}/{name}")
        wd._sent = self._sent
        wd.local.mkdir(parents=True, exist_ok=True)
        return wd

    def durable(self, name: str):
        """Path of an Orbax directory: on the remote for a remote workdir, else in the local directory."""
        return self.local / name if self.remote is None else self.remote / name

    def show(self, name: str = "") -> str:
        """How to name a file of the workdir to the user (the URL for a remote workdir)."""
        return f"{self.url}/{name}" if name else self.url

    def pull(self) -> None:
        """Empty the mirror and copy the remote's files into it (all but NOT_PULLED directories)."""
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True)
        try:
            if not self.remote.exists():
                return
            for src in _remote_files(self.remote):
                dst = self.local / _relative(src, self.remote)
                dst.parent.mkdir(parents=True, exist_ok=True)
                with src.open("rb") as f, dst.open("wb") as g:
                    shutil.copyfileobj(f, g, _CHUNK)
        except Exception as err:  # gcsfs raises OSError, its HttpError, google.auth errors, ImportError...
            raise WorkdirError(f"{self.url}: cannot read the remote workdir ({type(err).__name__}: {err}); check "
                               "the URL, the credentials (gcloud auth application-default login) and that gcsfs "
                               "is installed (pip install -e '.[tpu]')") from err

    def upload(self, path: Path, last: str | None = None) -> None:
        """Copy a finished file (or every new or changed file under a directory) of the mirror to the remote;
        files named `last` go after the others (the marker a resume checks, so it never precedes the data)."""
        if self.remote is None or not _is_primary():
            return
        path = Path(path).absolute()
        files = [path] if path.is_file() else sorted(
            (p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path))),
            key=lambda p: (p.name == last, str(p)))
        for f in files:
            st = f.stat()
            if self._sent.get(f) == (st.st_size, st.st_mtime_ns):
                continue
            dst = self.remote / f.relative_to(self.local.absolute()).as_posix()
            try:
                _copy_to(f, dst)
            except Exception as err:  # as in pull(): any storage error stops the run with the path named
                raise WorkdirError(f"{dst}: upload failed ({type(err).__name__}: {err}); the local copy is {f}. "
                                   "Rerunning the same command resumes from what the remote holds") from err
            self._sent[f] = (st.st_size, st.st_mtime_ns)


def publish(path: str | Path, last: str | None = None) -> None:
    """Upload a file or directory the run has finished writing, when it lies in a remote workdir's mirror
    (a no-op anywhere else); `last` names a directory's completion marker, uploaded after the rest."""
    if not _OPEN:
        return
    path = Path(path).absolute()
    for root, wd in _OPEN.items():
        if path.is_relative_to(root):
            wd.upload(path, last)
            return


def share(path: str | Path, last: str | None = None) -> None:
    """Make a file or directory that only process 0 wrote (an HF export) readable by every process at the same
    path: process 0 publishes it, all processes wait for each other, and in a remote workdir the others then
    copy it from the remote into their own mirrors. One process: the same as `publish`."""
    import jax

    publish(path, last)
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    path = Path(path).absolute()
    roots = [root for root in _OPEN if path.is_relative_to(root)]
    name = path.relative_to(roots[0]).as_posix() if roots else path.name  # the mirrors differ per process
    multihost_utils.sync_global_devices(f"mstar share {name}")  # process 0 has written and uploaded it
    if _is_primary():
        return
    for root, wd in _OPEN.items():
        if path.is_relative_to(root):
            src = wd.remote / path.relative_to(root).as_posix()
            try:
                files = [src] if src.is_file() else list(_remote_files(src))
                for f in files:
                    dst = path / _relative(f, src) if f != src else path
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    with f.open("rb") as a, dst.open("wb") as b:
                        shutil.copyfileobj(a, b, _CHUNK)
            except Exception as err:
                raise WorkdirError(f"{src}: cannot copy what process 0 wrote ({type(err).__name__}: {err})") from err
            return


def journal_path(path: str | Path) -> Path:
    """Where this process keeps a journal of its own (e.g. its rollout progress) for a file of the workdir: in
    the shared directory itself when a non-primary process mirrors a local disk every process sees, so a rerun
    finds it; else `path` (a gs:// mirror starts empty, and appends cannot go to an object store)."""
    path = Path(path).absolute()
    for root, wd in _OPEN.items():
        if path.is_relative_to(root) and not is_remote(wd.url):
            return Path(str(wd.remote)) / path.relative_to(root)
    return path


def close_all() -> None:
    """Forget the open remote workdirs (their mirrors stay on disk until the next start-up)."""
    _OPEN.clear()


def mirror_dir(url: str) -> Path:
    """The local mirror of a remote workdir: one per URL and process, under $MSTAR_LOCAL_DIR or the temp dir."""
    import jax

    base = Path(os.environ.get("MSTAR_LOCAL_DIR") or tempfile.gettempdir())
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    return base / f"mstar-{digest}-p{jax.process_index()}"


def _is_primary() -> bool:
    import jax

    return jax.process_index() == 0


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)  # a writer's temporary file or staging directory


def _relative(path, root) -> str:
    return str(path)[len(str(root)):].lstrip("/")


def _remote_files(root):
    """Every file under `root` (iterdir, since fsspec walk drops the gs:// prefix), skipping NOT_PULLED dirs."""
    for entry in root.iterdir():
        if entry.name.startswith("."):
            continue  # temporary files of a writer
        if entry.is_dir():
            if entry.name not in NOT_PULLED:
                yield from _remote_files(entry)
        else:
            yield entry


def _copy_to(src: Path, dst) -> None:
    """Stream a local file to an epath; a local stand-in for the remote gets write-then-rename, like GCS's
    atomic object writes."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst if is_remote(dst) else dst.parent / f".{dst.name}.upload-{os.getpid()}"
    with src.open("rb") as f, tmp.open("wb") as g:
        shutil.copyfileobj(f, g, _CHUNK)
    if tmp != dst:
        os.replace(tmp, dst)
