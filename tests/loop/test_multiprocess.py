"""`mstar train --config smoke` as 2 processes x 2 CPU devices (jax.distributed over gloo) against 1 process x 4
devices: the same samples, answers and metrics, weights within rounding; only process 0 writes the workdir; a
kill -9 of one process stops the run and a rerun resumes to the uninterrupted run's bytes."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest

from tests.loop.cli_helpers import ROOT, copy_after_iteration, differing_outputs, mstar_env, outputs_within

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

TRAIN = ("train", "--config", "smoke", "--workdir")

# What a process other than 0 may write in the shared workdir: its shards of the Orbax directories (every process
# writes its own) and its own rollout-progress journal.
OTHER_PROCESS_MAY_WRITE = ("checkpoints", "checkpoints/*", "warmup_ckpt", "warmup_ckpt/*", "prm/model", "prm/model/*",
                           "prm/ckpt", "prm/ckpt/*", "rollouts", "rollouts/iter_*.p1.progress.jsonl")


def base_model(smoke_run) -> str:
    """The session's smoke run's pre-trained base model, as `--config.model.path`: these runs start from a given
    checkpoint, as a real run does, instead of pre-training the tiny base again on each layout."""
    return f"--config.model.path={smoke_run[0] / 'base_hf'}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(workdir: Path, logs: Path, base: str, kill_at: str | None = None) -> list[tuple[int, str]]:
    """Run `mstar train --config smoke` as processes 0 and 1 of one jax.distributed job (2 CPU devices each),
    each under the write audit, from the model override `base`; (return code, output) per process. `kill_at` is
    process 1's MSTAR_KILL_AT."""
    logs.mkdir(parents=True, exist_ok=True)
    port, procs = _free_port(), []
    for i in range(2):
        env = mstar_env(XLA_FLAGS="--xla_force_host_platform_device_count=2", MSTAR_NUM_PROCESSES="2",
                        MSTAR_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", MSTAR_PROCESS_ID=str(i),
                        MSTAR_HEARTBEAT_TIMEOUT="10", MSTAR_LOCAL_DIR=str(logs / "mirrors"),
                        **({"MSTAR_KILL_AT": kill_at} if kill_at and i == 1 else {}))
        out = open(logs / f"p{i}.log", "w")  # files, not pipes: a full pipe would stall one process of the pair
        procs.append((subprocess.Popen(
            [sys.executable, "-m", "tests.write_audit", str(logs / f"writes_p{i}.txt"), str(workdir), *TRAIN,
             str(workdir), base], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True), out))
    results = []
    for proc, out in procs:
        try:
            proc.wait(timeout=900)
        finally:
            proc.kill()
            out.close()
        results.append((proc.returncode, Path(out.name).read_text()))
    return results


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory, smoke_run) -> Path:
    """The smoke run as one process on 4 simulated CPU devices."""
    workdir = tmp_path_factory.mktemp("one_process") / "run"
    proc = subprocess.run([sys.executable, "-m", "mstar_jax.cli", *TRAIN, str(workdir), base_model(smoke_run)],
                          cwd=ROOT, env=mstar_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, smoke_run) -> tuple[Path, Path]:
    """(workdir, logs) of the smoke run as 2 processes x 2 devices."""
    root = tmp_path_factory.mktemp("two_processes")
    results = two_processes(root / "run", root / "logs", base_model(smoke_run))
    for i, (rc, log) in enumerate(results):
        assert rc == 0, f"process {i}:\n{log[-4000:]}"
    return root / "run", root / "logs"


def test_two_processes_give_the_one_process_run(two_process_run, four_devices):
    """Every sampled text, answer, correctness flag, selection and accuracy is equal; losses, log-probs, PRM
    scores and exported weights agree to rounding (gloo sums across processes in another order than one process
    sums its 4 devices)."""
    workdir, _ = two_process_run
    problems, compared = outputs_within(workdir, four_devices, rtol=1e-4, atol=1e-5)
    assert not problems, "\n".join(problems[:40])
    assert compared > 40 and (workdir / "export" / "config.json").is_file()


def test_only_process_0_writes_the_workdir(two_process_run):
    """Process 1 works in its own mirror: in the shared workdir it writes only its Orbax shards and its journal."""
    workdir, logs = two_process_run
    p0 = (logs / "writes_p0.txt").read_text().split()
    p1 = (logs / "writes_p1.txt").read_text().split()
    for name in ("report.md", "metrics.jsonl", "rollouts/iter_0001.jsonl", "results/final.json"):
        assert any(fnmatch(w, f"*{name}*") for w in p0), f"the audit saw no write of {name} by process 0"
    stray = [w for w in p1 if not any(fnmatch(w, pat) for pat in OTHER_PROCESS_MAY_WRITE)]
    assert not stray, f"process 1 wrote in the shared workdir: {stray[:20]}"
    mirror = [d for d in (logs / "mirrors").iterdir() if d.name.endswith("-p1")]
    assert len(mirror) == 1 and (mirror[0] / "report.md").is_file()  # where process 1's own copies went


def test_kill_9_of_one_process_stops_the_run_and_a_rerun_resumes(two_process_run, smoke_run, tmp_path):
    """Process 1 is killed after sampling its first chunk of iteration 1: process 0 stops (its collective fails)
    instead of hanging; the rerun resumes from the iteration checkpoint and process 1's journal, and ends
    byte-identical to the uninterrupted 2-process run. The killed run starts from that run's workdir as it was
    after iteration 0 (the earlier stages are the first test's)."""
    reference, _ = two_process_run
    workdir = copy_after_iteration(reference, tmp_path / "run", 1)
    (rc0, log0), (rc1, log1) = two_processes(workdir, tmp_path / "killed", base_model(smoke_run), "rollouts:1")
    assert rc1 == -signal.SIGKILL, log1[-3000:]
    assert rc0 != 0, log0[-3000:]
    assert (workdir / "rollouts" / "iter_0001.p1.progress.jsonl").is_file()
    results = two_processes(workdir, tmp_path / "resumed", base_model(smoke_run))
    for i, (rc, log) in enumerate(results):
        assert rc == 0, f"process {i}:\n{log[-4000:]}"
    log1 = results[1][1]
    assert "resuming after iteration" in log1 and "iter_0001.p1.progress.jsonl: resuming after 1 sampled chunk" in log1
    assert differing_outputs(workdir, reference) == []
