"""Faults during `mstar train --config smoke`: kill -9 at seeded moments, SIGTERM, a full disk, a corrupt rollouts
file and a checkpoint missing a file. Each run ends bitwise equal to the uninterrupted one, or stops with one
line that names the path, having trained on nothing it could not trust."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from mstar_jax.faults import KILL_POINTS
from tests.conftest import kill_log
from tests.loop.cli_helpers import (ROOT, copy_after_iteration, copy_after_warmup, differing_outputs, mstar,
                                    mstar_env)

SEED, KILLS = 22, 10
# The moments the issue asks the campaign to cover, besides one of every registered kill point.
MUST_COVER = {
    "rollout writing": lambda point, label: point == "atomic_write" and label.startswith("iter_"),
    "SFT of an iteration": lambda point, label: point == "train_step" and label.startswith("iteration"),
    "an Orbax write in flight": lambda point, label: point == "checkpoint_write",
    "report writing": lambda point, label: point == "atomic_write" and label.startswith("report.md:"),
}


def visits(workdir) -> list[tuple[str, str]]:
    """The kill points the uninterrupted run passed, in order, keeping those whose label is unique (a moment
    that a resumed run can be killed at again)."""
    lines = [tuple(line.split("\t", 1)) for line in kill_log(workdir).read_text().splitlines()]
    return [v for v in lines if lines.count(v) == 1]


def choose_moments(moments: list[tuple[str, str]], rng) -> list[tuple[str, str]]:
    """At least one moment of every registered kill point and of every MUST_COVER kind, the rest at random."""
    kinds = {f"kill point {p!r}": (lambda point, label, p=p: point == p) for p in KILL_POINTS} | MUST_COVER
    chosen = set()
    for kind, matches in kinds.items():
        options = [m for m in moments if matches(*m)]
        assert options, f"the smoke run never reaches {kind} with a unique label (see mstar_jax/faults.py)"
        chosen.add(options[rng.integers(len(options))])
    rest = [m for m in moments if m not in chosen]
    for k in rng.permutation(len(rest))[:max(0, KILLS - len(chosen))]:
        chosen.add(rest[k])
    return sorted(chosen, key=moments.index)


@pytest.mark.slow
def test_kill_9_campaign_ends_bitwise_equal_to_the_uninterrupted_run(smoke_run, tmp_path):
    """One chain: each rerun resumes the previous one's workdir and is killed at the next seeded moment (so the
    campaign costs one run plus its restarts); the last rerun finishes. A moment is named by its label (the
    chunk, step, iteration, or file and content hash), which a resumed run reaches again."""
    reference, _ = smoke_run
    moments = choose_moments(visits(reference), np.random.default_rng(SEED))
    assert len(moments) >= KILLS
    workdir = tmp_path / "run"
    for k, (point, label) in enumerate(moments):
        killed = mstar("train", "--config", "smoke", "--workdir", str(workdir), MSTAR_KILL_AT=f"{point}@{label}")
        assert killed.returncode == -signal.SIGKILL, (
            f"kill {k + 1}/{len(moments)} at {point}@{label} was never reached:\n" + killed.stdout[-2000:]
            + killed.stderr[-2000:])
    resumed = mstar("train", "--config", "smoke", "--workdir", str(workdir))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert differing_outputs(workdir, reference) == [], moments


def _run_until_it_prints(args, marker: str, env: dict):
    """Start `mstar ARGS` and return the process once its stdout has printed a line containing `marker`."""
    proc = subprocess.Popen([sys.executable, "-m", "mstar_jax.cli", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return proc, seen
    proc.wait()
    raise AssertionError(f"{marker!r} never printed:\n" + "".join(seen)[-2000:] + proc.stderr.read()[-2000:])


@pytest.mark.slow
def test_sigterm_saves_exits_and_the_same_command_resumes(smoke_run, tmp_path):
    """SIGTERM (a preemption notice) to a real `mstar train`: it finishes the iteration, saves it, exits; the
    same command then resumes to the uninterrupted result."""
    reference, _ = smoke_run
    workdir = copy_after_warmup(reference, tmp_path / "run")
    args = ["train", "--config", "smoke", "--workdir", str(workdir)]
    proc, _ = _run_until_it_prints(args, "self-evolving:", mstar_env())  # the handler is installed by then
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1 and "preempted: saved iteration 1; rerun the same command to resume" in err, err
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
    assert not (workdir / "results" / "final.json").exists()
    resumed = mstar(*args)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming after iteration 1" in resumed.stdout
    assert differing_outputs(workdir, reference) == []


@pytest.mark.slow
def test_corrupt_rollouts_line_is_detected_and_sampled_again(smoke_run, tmp_path):
    reference, _ = smoke_run
    workdir = copy_after_iteration(reference, tmp_path / "run", 1)
    shutil.copy(reference / "rollouts" / "iter_0001.jsonl", workdir / "rollouts")  # as if killed after writing it
    path = workdir / "rollouts" / "iter_0001.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2][:len(lines[2]) // 2] + b"\xff\n"  # half a record and a byte that is not UTF-8
    path.write_bytes(b"".join(lines))
    resumed = mstar("train", "--config", "smoke", "--workdir", str(workdir))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"{path}: line 3: corrupt rollout record" in resumed.stdout and "sampling them again" in resumed.stdout
    assert differing_outputs(workdir, reference) == []


@pytest.mark.slow
def test_checkpoint_missing_a_file_is_refused_with_its_path(smoke_run, tmp_path):
    reference, _ = smoke_run
    workdir = copy_after_iteration(reference, tmp_path / "run", 1)
    (workdir / "checkpoints" / "1" / "state" / "manifest.ocdbt").unlink()
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    proc = mstar("train", "--config", "smoke", "--workdir", str(workdir))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    # Abandoned tensorstore reads may print after it; ours is the one line that says what to do.
    line = [x for x in proc.stderr.splitlines() if x.startswith("mstar train: error: ")]
    assert len(line) == 1 and line[0].startswith(
        f"mstar train: error: {workdir / 'checkpoints' / '1'}: cannot restore the train state"), proc.stderr[-3000:]
    assert f"move {workdir / 'checkpoints' / '1'} away" in line[0]
    # Nothing was trained or written past the refusal (the metrics file is rewritten only after a restore).
    after = sorted(p.relative_to(workdir) for p in workdir.rglob("*") if not p.name.startswith("."))
    assert [p for p in after if p not in before] == []


def _tmpfs_possible() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _tmpfs_possible(), reason="needs `unshare -rm` (user namespaces) for a private tiny tmpfs")
def test_disk_full_while_checkpointing_is_a_clear_error_and_the_previous_checkpoint_restores(smoke_run, tmp_path):
    """A real full disk: checkpoints/ on a tmpfs with room for one iteration's checkpoint, not two."""
    reference, _ = smoke_run
    workdir = copy_after_warmup(reference, tmp_path / "run")
    ckpts, saved = workdir / "checkpoints", tmp_path / "saved"
    ckpts.mkdir()
    one = sum(p.stat().st_size for p in (reference / "checkpoints" / "1").rglob("*") if p.is_file())
    size_kb = int(1.5 * one / 1024) + 64
    cmd = (f"mount -t tmpfs -o size={size_kb}k tmpfs {ckpts} && {sys.executable} -m mstar_jax.cli train --config "
           f"smoke --workdir {workdir}; rc=$?; cp -a {ckpts} {saved}; exit $rc")  # the tmpfs ends with the shell
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], cwd=ROOT, env=mstar_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    # Orbax's threads log the failure too (and may print after us); ours is the one line that says what to do.
    assert (f"mstar train: error: {ckpts}: cannot write the checkpoint of step 2: no space left on device; the "
            "checkpoint of step 1 is intact, and a rerun resumes from it once space is freed"
            ) in proc.stderr.splitlines(), proc.stderr[-3000:]
    shutil.rmtree(ckpts)
    shutil.copytree(saved, ckpts)  # what the full disk held, now with room to spare
    resumed = mstar("train", "--config", "smoke", "--workdir", str(workdir))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming after iteration 1" in resumed.stdout
    assert differing_outputs(workdir, reference) == []
