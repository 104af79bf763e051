"""tpu_scripts/launch.sh --dry-run: the gcloud commands it would run, with the mstar command quoted intact."""

from __future__ import annotations

import shlex
from pathlib import Path
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


def test_dry_run_creates_the_slice_clones_the_repo_and_sets_up_jax_distributed():
    proc = launch("--tpu", "v5p", "--zone", "us-east5-a", "--create", "v5p-16", "--version", "v2-alpha-tpuv5",
                  "--repo", "https://example.com/m star.git", "--dry-run", "--", "train", "--workdir", "gs://b/r")
    assert proc.returncode == 0, proc.stderr
    lines = [shlex.split(line) for line in proc.stdout.splitlines()]
    assert lines[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "v5p", "--zone", "us-east5-a",
                        "--accelerator-type", "v5p-16", "--version", "v2-alpha-tpuv5"]
    clone = lines[1][lines[1].index("--command") + 1]
    assert "--worker=all" in lines[1] and "git clone" in clone
    assert "https://example.com/m star.git" in shlex.split(clone)  # the URL stays one word on the worker
    remote = lines[2][lines[2].index("--command") + 1]
    assert "MSTAR_DISTRIBUTED=auto python3 -m mstar_jax.cli train --workdir gs://b/r" in remote
    assert proc.stderr == ""  # a gs:// workdir draws no warning


def test_a_local_workdir_is_warned_about_and_repo_with_copy_is_refused():
    proc = launch("--tpu", "t", "--zone", "z", "--dry-run", "--", "train", "--workdir=runs/x")
    assert proc.returncode == 0 and "--workdir runs/x is not a gs:// URL" in proc.stderr
    proc = launch("--tpu", "t", "--zone", "z", "--repo", "u", "--copy", "--dry-run", "--", "train")
    assert proc.returncode == 2 and "give one" in proc.stderr


FAKE_GCLOUD = """#!{python}
# A stand-in for gcloud: logs each call and plays a slice of two workers, each a directory with its own /tmp.
import json, os, shutil, subprocess, sys

args = sys.argv[1:]
root = os.environ["FAKE_SLICE"]
with open(os.path.join(root, "gcloud.log"), "a") as f:
    f.write(json.dumps(args) + "\\n")
workers = [os.path.join(root, f"worker{{w}}") for w in range(2)]
for w in workers:
    os.makedirs(os.path.join(w, "tmp"), exist_ok=True)
verb = args[3]
if verb in ("ssh", "scp"):
    assert "--worker=all" in args, args
if verb == "scp":
    src, dst = args[4], args[5].split(":", 1)[1]
    for w in workers:
        shutil.copy(src, os.path.join(w, dst.lstrip("/")))
elif verb == "ssh":
    command = args[args.index("--command") + 1]
    for i, w in enumerate(workers):
        subprocess.run(["bash", "-c", command.replace("/tmp/", w + "/tmp/")], cwd=w, check=True,
                       env={{**os.environ, "WORKER": str(i)}})
"""

FAKE_PYTHON3 = """#!/usr/bin/env bash
# The workers' python3: logs what it was asked to run, from where, and the jax.distributed switch.
printf '%s\\n' "$(printf '%q ' "$@")| cwd=$PWD | MSTAR_DISTRIBUTED=${{MSTAR_DISTRIBUTED:-}}" >> "{log}.$WORKER"
"""


def test_the_commands_reach_every_worker_with_the_checkout_install_and_arguments(tmp_path):
    import json
    import os
    import sys

    bin_dir, slice_dir = tmp_path / "bin", tmp_path / "slice"
    bin_dir.mkdir()
    slice_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable))
    (bin_dir / "python3").write_text(FAKE_PYTHON3.format(log=slice_dir / "python3.log"))
    for exe in bin_dir.iterdir():
        exe.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SLICE": str(slice_dir)}
    mstar_args = ["train", "--config", "configs/paper.py", "--workdir", "gs://bucket/a run", "--config.seed=1",
                  "--config.train.method=rest_em"]
    proc = subprocess.run(["bash", str(SCRIPT), "--tpu", "pod", "--zone", "z", "--project", "p", "--copy", "--",
                           *mstar_args], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    calls = [json.loads(line) for line in (slice_dir / "gcloud.log").read_text().splitlines()]
    assert [c[3] for c in calls] == ["scp", "ssh", "ssh"]
    assert all(c[:3] == ["compute", "tpus", "tpu-vm"] and c[c.index("--project") + 1] == "p" for c in calls)
    for w in range(2):
        # The checkout arrived (this very file among it) and python3 ran twice there: the install, then mstar.
        checkout = slice_dir / f"worker{w}" / "mstar-jax"
        assert (checkout / "tests" / "tpu_scripts" / "test_launch.py").read_text() == Path(__file__).read_text()
        assert not (checkout / ".git").exists()
        install, run = (slice_dir / f"python3.log.{w}").read_text().splitlines()
        assert install.startswith("-m pip install -q -e .\\[tpu\\] ") and f"cwd={checkout} " in install
        argv, cwd, dist = run.split(" | ")
        assert shlex.split(argv) == ["-m", "mstar_jax.cli", *mstar_args]
        assert cwd == f"cwd={checkout}" and dist == "MSTAR_DISTRIBUTED=auto"
