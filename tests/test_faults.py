"""Crash injection: every kill point the package calls is registered, and MSTAR_KILL_AT / MSTAR_KILL_LOG do what
mstar_jax/faults.py says (in a child process, which the kill ends)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

from mstar_jax.faults import KILL_POINTS
from tests.loop.cli_helpers import ROOT, mstar_env


def test_every_kill_point_in_the_package_is_registered():
    calls = set()
    for path in (ROOT / "mstar_jax").rglob("*.py"):
        text = path.read_text()
        calls |= set(re.findall(r'kill_point\(\s*"(\w+)"', text)) | set(re.findall(r'kill_point_name="(\w+)"', text))
    assert calls and calls <= set(KILL_POINTS), sorted(calls - set(KILL_POINTS))


SCRIPT = """
from mstar_jax.faults import kill_point
for i in range(3):
    kill_point("train_step", f"step {i}")
    print("passed", i, flush=True)
kill_point("not_a_point")
"""


def run(tmp_path, **env):
    return subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=mstar_env(**env), capture_output=True,
                          text=True, timeout=60)


def test_kill_at_the_nth_visit_or_at_a_label_and_log_every_visit(tmp_path):
    assert run(tmp_path).returncode == 0  # no instrumentation: nothing happens, not even the registry check
    by_count = run(tmp_path, MSTAR_KILL_AT="train_step:2")
    assert by_count.returncode == -signal.SIGKILL and by_count.stdout.split("\n")[:-1] == ["passed 0"]
    by_label = run(tmp_path, MSTAR_KILL_AT="train_step@step 2")
    assert by_label.returncode == -signal.SIGKILL and by_label.stdout.count("passed") == 2
    log = tmp_path / "visits.log"
    logged = run(tmp_path, MSTAR_KILL_LOG=str(log))
    assert log.read_text().splitlines() == [f"train_step\tstep {i}" for i in range(3)]
    assert logged.returncode == 1 and "'not_a_point' is not listed in mstar_jax.faults.KILL_POINTS" in logged.stderr
