"""Package layout pyproject.toml cannot say: the top-level `configs/` ships in the wheel as `mstar_jax/configs`.

Users keep editing `configs/*.py` at the top of a checkout; an installed `mstar train --config NAME` finds the
same files inside the package (mstar_jax.config.CONFIG_DIR).
"""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["mstar_jax", "mstar_jax.*"]) + ["mstar_jax.configs"],
      package_dir={"mstar_jax.configs": "configs"}, package_data={"mstar_jax.configs": ["*.py"]})
