"""Fixtures of the loop tests: one smoke run of `mstar train` shared by the session."""

from __future__ import annotations

import pytest

from tests.loop.cli_helpers import mstar


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("smoke")
    proc = mstar("train", "--config", "smoke", "--workdir", str(workdir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return workdir, proc.stdout
