"""`--dry-run`: every shipped config loads, validates and prints its plan; bad values are refused up front."""

from __future__ import annotations

import re

import pytest

from mstar_jax.cli import main
from mstar_jax.config import CONFIG_DIR

CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.py"))


def dry_run(capsys, *args) -> tuple[int, str, str]:
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_prints_its_plan_without_running(tmp_path, capsys, name):
    workdir = tmp_path / "run"
    rc, out, err = dry_run(capsys, "train", "--config", name, "--workdir", str(workdir), "--dry-run")
    assert rc == 0, err
    for stage in ("1. data", "2. base model", "3. base evaluation", "4. warm-up", "5. self-evolving",
                  "6. final evaluation", "7. report.md"):
        assert stage in out, (name, stage)
    # The length in iterations (or the step budget that decides it), and the schedule's (unknown until the data
    # is given, for a template without train.total_steps).
    assert re.search(r"\d+ iterations \(|iterations until the \d+-step schedule is spent", out), out
    assert re.search(r"LR schedule of \d+ steps|schedule every iteration|known once data.train is set", out), out
    assert not workdir.exists()  # a dry run writes nothing
    if "study" in name:
        rc, out, err = dry_run(capsys, "study", "--config", name, "--workdir", str(workdir), "--dry-run")
        assert rc == 0, err
        assert out.count("pct_") >= 2 and "study.md" in out
    if name in ("paper", "study_paper"):  # templates: the paths a real run needs are named
        assert "a real run needs: model.path (empty), data.warmup (empty), data.train (empty)" in out


def test_dry_run_plan_is_what_the_run_does(smoke_run, capsys):
    """The smoke run's own stage line gives the iterations and schedule length the dry run printed."""
    _, run_out = smoke_run
    _, out, _ = dry_run(capsys, "train", "--config", "smoke", "--dry-run")
    iterations = re.search(r"(\d+) iterations \(", out)[1]
    schedule = re.search(r"LR schedule of (\d+) steps", out)[1]
    assert f"{iterations} iterations of" in run_out and f"LR schedule of {schedule} steps" in run_out


@pytest.mark.parametrize("override, named", [("--config.train.method=rest", "train.method"),
                                             ("--config.train.interval=0.0", "train.interval"),
                                             ("--config.train.schedule=linear", "linear"),
                                             ("--config.sampling.dtype=int8", "sampling.dtype"),
                                             ("--config.data.families=dice,stars", "stars")])
def test_bad_values_are_refused_by_the_dry_run(capsys, override, named):
    rc, _, err = dry_run(capsys, "train", "--config", "smoke", override, "--dry-run")
    assert rc == 2 and named in err and "Traceback" not in err
