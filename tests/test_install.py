"""`pip install .` (not editable) ships configs/: the installed `mstar` finds `--config smoke` outside the checkout.

The wheel is built from a copy of the working tree into a fresh venv that sees this interpreter's packages
(--system-site-packages, --no-deps, --no-build-isolation), so no network is needed; every command then runs
from an empty directory with no PYTHONPATH, so nothing can come from the source tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.loop.cli_helpers import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv, an empty working directory, env) with mstar-jax installed from a copy of the working tree."""
    base = tmp_path_factory.mktemp("install")
    src = base / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("mstar_jax", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    venv = base / "venv"
    # --without-pip: the venv's python runs this interpreter's pip and setuptools (ensurepip's older setuptools
    # cannot build a wheel without the `wheel` package, which --no-build-isolation would not fetch).
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["JAX_PLATFORMS"] = "cpu"
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                          "--no-index", "--force-reinstall", str(src)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    work = base / "elsewhere"
    work.mkdir()
    return venv, work, env


def run(installed, *args):
    venv, work, env = installed
    return subprocess.run(list(args), cwd=work, env=env, capture_output=True, text=True, timeout=300)


def test_the_package_and_its_configs_come_from_the_venv(installed):
    venv = installed[0]
    proc = run(installed, str(venv / "bin" / "python"), "-c",
               "import mstar_jax, mstar_jax.config as c; print(mstar_jax.__file__); print(c.CONFIG_DIR)")
    assert proc.returncode == 0, proc.stderr
    package, config_dir = proc.stdout.split()
    site = str(venv / "lib")
    assert package.startswith(site) and config_dir.startswith(site), proc.stdout
    assert config_dir.endswith("mstar_jax/configs")
    shipped = sorted(p.name for p in (ROOT / "configs").glob("*.py"))
    assert sorted(name for name in os.listdir(config_dir) if name.endswith(".py")) == shipped


def test_installed_mstar_train_runs_the_smoke_config_by_name(installed):
    venv, work, _ = installed
    proc = run(installed, str(venv / "bin" / "mstar"), "train", "--config", "smoke", "--dry-run",
               "--workdir", str(work / "run"))
    assert proc.returncode == 0, proc.stderr
    assert "config: valid" in proc.stdout and "K=4 samples" in proc.stdout  # smoke's train.num_samples
    assert not (work / "run").exists()  # a dry run writes nothing


def test_installed_mstar_train_takes_a_config_path(installed):
    venv, work, _ = installed
    # A user's config beside a copy of the demo it extends, as configs/ is laid out in a checkout.
    user = work / "myconfigs"
    user.mkdir()
    shutil.copy(ROOT / "configs" / "demo.py", user / "demo.py")
    (user / "mine.py").write_text(
        (ROOT / "configs" / "smoke.py").read_text() + "\n\n_smoke = get_config\n\n\n"
        "def get_config():  # noqa: F811\n    c = _smoke()\n    c.train.num_samples = 3\n    return c\n")
    proc = run(installed, str(venv / "bin" / "mstar"), "train", "--config", str(user / "mine.py"), "--dry-run",
               "--workdir", str(work / "run2"))
    assert proc.returncode == 0, proc.stderr
    assert "K=3 samples" in proc.stdout


def test_an_unknown_config_name_lists_the_installed_ones(installed):
    venv = installed[0]
    proc = run(installed, str(venv / "bin" / "mstar"), "train", "--config", "smokee", "--dry-run")
    assert proc.returncode == 2
    assert "smokee" in proc.stderr and "smoke" in proc.stderr.split("has:")[1]
