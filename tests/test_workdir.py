"""Workdirs: a local one is just the directory; a gs:// one is mirrored locally, uploaded file by file, and pulled
back on a fresh machine. gs:// is served here by a fake fsspec filesystem over a local directory, so these tests
go through etils.epath's real gs:// code path without a network."""

from __future__ import annotations

import json

import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import stringify_path

from mstar_jax import workdir as W
from mstar_jax.errors import MstarError, WorkdirError
from mstar_jax.loop.rollouts import Rollout, write_rollouts
from mstar_jax.io import write_atomic
from mstar_jax.reporting import MetricsLog


class FakeGCS(LocalFileSystem):
    """gs://BUCKET/KEY -> ROOT/BUCKET/KEY; parent directories are made on write, as GCS needs none."""

    protocol = ("gs", "gcs")
    root = ""

    def __init__(self, finalize_on_close=False, **kwargs):
        super().__init__(auto_mkdir=True, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = stringify_path(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                return f"{cls.root}/{path[len(prefix):]}".rstrip("/")
        return super()._strip_protocol(path)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """A fake gs:// (the directory returned holds the buckets) and a private mirror base."""
    import fsspec
    from etils.epath import backend

    root = tmp_path / "gcs"
    root.mkdir()
    monkeypatch.setattr(FakeGCS, "root", str(root))
    for proto in ("gs", "gcs"):
        fsspec.register_implementation(proto, FakeGCS, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()
    monkeypatch.setenv("MSTAR_LOCAL_DIR", str(tmp_path / "mirrors"))
    monkeypatch.delenv("MSTAR_FAKE_REMOTE_ROOT", raising=False)
    yield root
    W.close_all()
    backend.fsspec_backend._get_filesystem.cache_clear()
    from fsspec.registry import _registry

    for proto in ("gs", "gcs"):
        _registry.pop(proto, None)


def test_local_workdir_is_the_directory(tmp_path):
    wd = W.Workdir.open(tmp_path / "run")
    assert not wd.is_remote and wd.local == tmp_path / "run" and wd.local.is_dir()
    assert wd.durable("checkpoints") == tmp_path / "run" / "checkpoints"
    write_atomic(wd.local / "a.json", "{}")  # nothing to upload, nothing registered
    assert W._OPEN == {}
    assert wd.sub("variants/x").local == tmp_path / "run" / "variants" / "x"


def test_remote_writers_upload_each_finished_file(bucket):
    wd = W.Workdir.open("gs://b/run")
    assert wd.is_remote and str(wd.durable("checkpoints")) == "gs://b/run/checkpoints"
    write_atomic(wd.local / "results" / "base.json", '{"a": 1}')
    write_rollouts(wd.local / "rollouts" / "iter_0000.jsonl", [Rollout("q", "p", ["t"], [True], [[0.0]])])
    log = MetricsLog(wd.local, tensorboard=True)
    log.log({"stage": "iteration", "loss": 1.5}, step=3)
    log.close()
    remote = bucket / "b" / "run"
    assert json.loads((remote / "results" / "base.json").read_text()) == {"a": 1}
    rollouts = "rollouts/iter_0000.jsonl"
    assert (remote / rollouts).read_text() == (wd.local / rollouts).read_text()
    assert (remote / "metrics.jsonl").read_text() == (wd.local / "metrics.jsonl").read_text() != ""
    assert list((remote / "tensorboard").glob("events.out.tfevents.*"))
    assert not [p for p in remote.rglob("*") if p.name.startswith(".")], "temporary files were uploaded"


def test_fresh_mirror_pulls_the_remote_but_not_orbax_or_outputs(bucket):
    remote = bucket / "b" / "run"
    for rel in ("config.json", "rollouts/iter_0000.jsonl", "variants/v/results/final.json", "data/images/a.png",
                "checkpoints/1/x", "warmup_ckpt/mstar_checkpoint.json", "export/model.safetensors",
                "tensorboard/events.out.tfevents.1", "variants/v/checkpoints/1/x", "plots/a.png"):
        (remote / rel).parent.mkdir(parents=True, exist_ok=True)
        (remote / rel).write_text(rel)
    stale = W.mirror_dir("gs://b/run") / "stale.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("from an older run")
    wd = W.Workdir.open("gs://b/run/")
    pulled = sorted(str(p.relative_to(wd.local)) for p in wd.local.rglob("*") if p.is_file())
    assert pulled == ["config.json", "data/images/a.png", "rollouts/iter_0000.jsonl", "variants/v/results/final.json"]
    assert (wd.local / "config.json").read_text() == "config.json"
    # A variant's files land under its own remote directory.
    sub = wd.sub("variants/v")
    assert str(sub.durable("checkpoints")) == "gs://b/run/variants/v/checkpoints"
    write_atomic(sub.local / "config.json", "{}")
    assert (remote / "variants" / "v" / "config.json").read_text() == "{}"


def test_directory_upload_skips_unchanged_files_and_puts_the_marker_last(bucket, monkeypatch):
    wd = W.Workdir.open("gs://b/run")
    d = wd.local / "data"
    (d / "images").mkdir(parents=True)
    for name in ("manifest.json", "train.json", "images/1.png"):
        (d / name).write_text(name)
    sent = []
    real = W._copy_to
    monkeypatch.setattr(W, "_copy_to", lambda src, dst: (sent.append(src.name), real(src, dst)))
    W.publish(d, last="manifest.json")
    assert sent == ["1.png", "train.json", "manifest.json"]
    W.publish(d, last="manifest.json")
    assert len(sent) == 3, "unchanged files were uploaded again"


def test_unreadable_remote_is_a_user_error(bucket, monkeypatch):
    from etils import epath

    def boom(self):
        raise PermissionError("403 Forbidden")

    monkeypatch.setattr(type(epath.Path("gs://b/run")), "exists", boom)
    with pytest.raises(WorkdirError, match="gs://b/run: cannot read the remote workdir.*403") as err:
        W.Workdir.open("gs://b/run")
    assert isinstance(err.value, MstarError)


def test_failed_upload_names_the_object(bucket, monkeypatch):
    wd = W.Workdir.open("gs://b/run")

    def refuse(src, dst):
        raise PermissionError("403 Forbidden")

    monkeypatch.setattr(W, "_copy_to", refuse)
    with pytest.raises(WorkdirError, match="gs://b/run/results/base.json: upload failed.*403"):
        write_atomic(wd.local / "results" / "base.json", "{}")


def test_fake_remote_root_maps_gs_urls(tmp_path, monkeypatch):
    monkeypatch.setenv("MSTAR_FAKE_REMOTE_ROOT", str(tmp_path))
    assert str(W.remote_path("gs://b/run")) == str(tmp_path / "b" / "run")
    assert W.is_remote("gs://b/run") and W.is_remote("s3://b")
    assert not W.is_remote("/x") and not W.is_remote("file:///x")
