"""tpu_scripts/launch.sh --dry-run: the gcloud commands it would run, with the mstar command quoted intact."""

from __future__ import annotations

import shlex
import subprocess

from tests.loop.cli_helpers import ROOT

SCRIPT = ROOT / "tpu_scripts" / "launch.sh"


def launch(*args):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_dry_run_prints_one_ssh_per_step_on_every_worker():
    mstar_args = ["train", "--config", "configs/paper.py", "--workdir", "gs://bucket/a run", "--config.seed=1"]
    proc = launch("--tpu", "v5-pod", "--zone", "us-central2-b", "--project", "p1", "--copy", "--dry-run", "--",
                  *mstar_args)
    assert proc.returncode == 0, proc.stderr
    lines = [shlex.split(line) for line in proc.stdout.splitlines()]
    assert [line[:5] for line in lines[1:]] == [["gcloud", "compute", "tpus", "tpu-vm", x] for x in
                                                 ("scp", "ssh", "ssh")]
    assert lines[0][0] == "tar" and all("--worker=all" in line and "p1" in line for line in lines[1:])
    remote = lines[-1][lines[-1].index("--command") + 1]
    # What each worker's shell runs: the install, then exactly the mstar arguments given (spaces kept).
    assert "pip install -q -e '.[tpu]'" in remote
    assert shlex.split(remote.split("mstar_jax.cli", 1)[1]) == mstar_args


def test_missing_zone_or_command_is_a_usage_error():
    assert launch("--tpu", "v5", "--dry-run", "--", "train").returncode == 2
    proc = launch("--tpu", "v5", "--zone", "z", "--dry-run")
    assert proc.returncode == 2 and "missing the mstar command" in proc.stderr
