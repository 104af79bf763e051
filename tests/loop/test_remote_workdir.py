"""`mstar train --workdir gs://...`: everything lands on the remote, and a fresh machine resumes from it alone.

MSTAR_FAKE_REMOTE_ROOT stands a local directory in for gs:// (no network): the run takes the remote-workdir path
(local mirror, uploads, Orbax checkpoints on the remote path) exactly as on GCS."""

from __future__ import annotations

import shutil
import signal

import pytest

from tests.loop.cli_helpers import copy_after_warmup, mstar


@pytest.mark.slow
def test_gs_workdir_is_written_remotely_and_resumes_on_a_fresh_machine(smoke_run, tmp_path):
    reference, _ = smoke_run
    fake = tmp_path / "gcs"
    remote = copy_after_warmup(reference, fake / "bucket" / "run")  # the bucket as the warm-up left it
    args = ("train", "--config", "smoke", "--workdir", "gs://bucket/run")

    vm1 = tmp_path / "vm1"
    killed = mstar(*args, MSTAR_KILL_AT="rollouts:3", MSTAR_FAKE_REMOTE_ROOT=str(fake), MSTAR_LOCAL_DIR=str(vm1))
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert "gs://bucket/run (local mirror" in killed.stdout
    (mirror,) = vm1.iterdir()
    assert not (mirror / "checkpoints").exists() and not (mirror / "warmup_ckpt").exists()
    assert (remote / "checkpoints" / "1").is_dir(), "iteration 1 was not checkpointed on the remote"
    first = remote / "rollouts" / "iter_0000.jsonl"
    assert first.read_text() == (reference / "rollouts" / "iter_0000.jsonl").read_text()
    assert (remote / "metrics.jsonl").read_text() == (mirror / "metrics.jsonl").read_text()
    stamp = first.stat().st_mtime_ns

    shutil.rmtree(vm1)  # preempted: the new VM has nothing but the bucket
    resumed = mstar(*args, MSTAR_FAKE_REMOTE_ROOT=str(fake), MSTAR_LOCAL_DIR=str(tmp_path / "vm2"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "warm-up: reusing" in resumed.stdout and "resuming after iteration 1" in resumed.stdout
    assert first.stat().st_mtime_ns == stamp, "iteration 0's rollouts were generated again"
    assert (remote / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    assert (remote / "rollouts" / "iter_0001.jsonl").read_text() == (
        reference / "rollouts" / "iter_0001.jsonl").read_text()
    for f in sorted(p.name for p in (reference / "export").iterdir()):
        assert (remote / "export" / f).read_bytes() == (reference / "export" / f).read_bytes(), f
    assert (remote / "results" / "final.json").is_file() and (remote / "report.md").is_file()
    assert {p.name for p in (remote / "plots").glob("*.png")} >= {"greedy.png", "pass_at_k.png",
                                                                  "pass_at_k_minus_greedy.png", "reward_pass_at_2.png"}
    assert len(list((remote / "tensorboard").glob("events.out.tfevents.*"))) >= 2  # one per run
    leftovers = [p for p in remote.rglob("*") if p.name.startswith(".") and "checkpoints" not in p.parts]
    assert not leftovers, leftovers

    # Another config is refused from what the bucket holds, naming the URL.
    other = mstar(*args, "--config.train.lr=0.5", MSTAR_FAKE_REMOTE_ROOT=str(fake),
                  MSTAR_LOCAL_DIR=str(tmp_path / "vm3"))
    assert other.returncode == 2 and "gs://bucket/run was made with a different config" in other.stderr
