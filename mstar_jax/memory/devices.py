"""The memory of one accelerator (`mstar plan --device`), and how many of them a common host has."""

from __future__ import annotations

import dataclasses
import os

from mstar_jax.errors import ConfigError

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Device:
    """One accelerator: its memory in bytes and the devices jax sees on one host of the usual slice/node."""

    name: str
    hbm_bytes: int
    per_host: int
    label: str


def _host_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# HBM per device as jax sees it: TPUs from their `memory_stats()["bytes_limit"]` (v5p: one megacore chip),
# GPUs from nvidia-smi's total (H100 SXM 81559 MiB, H200 143771 MiB).
DEVICES = {
    "v5e": Device("v5e", 16 * GIB, 8, "TPU v5e (v5litepod-8: 8 chips of 16 GiB)"),
    "v5p": Device("v5p", 95 * GIB, 4, "TPU v5p (v5p-8: 4 chips of 95 GiB)"),
    "v6e": Device("v6e", 32 * GIB, 8, "TPU v6e (v6e-8: 8 chips of 32 GiB)"),
    "h100": Device("h100", 81559 * 2 ** 20, 8, "NVIDIA H100 SXM (8 x 80 GB)"),
    "h200": Device("h200", 143771 * 2 ** 20, 8, "NVIDIA H200 (8 x 141 GB)"),
}


def device(name: str) -> Device:
    """The named accelerator; `cpu` is this machine's RAM as one device."""
    if name == "cpu":
        return Device("cpu", _host_ram(), 1, "this machine's RAM")
    if name not in DEVICES:
        raise ConfigError(f"unknown device {name!r}; known: {', '.join([*DEVICES, 'cpu'])}")
    return DEVICES[name]
