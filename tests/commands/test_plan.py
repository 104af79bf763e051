"""`mstar plan` on the command line: the table, the verdict with its bytes, and bad input named."""

from __future__ import annotations

import re

import pytest

from mstar_jax.cli import main
from mstar_jax.memory.devices import device
from mstar_jax.memory.families import find_preset
from mstar_jax.memory.footprint import Candidate, static_bytes


@pytest.mark.slow
def test_a_preset_that_does_not_fit_says_so_with_its_bytes(capsys):
    # The demo model at 16 rows of 4096 tokens: its attention activations alone outgrow a v5e chip, and the tiny
    # model compiles in seconds where a real preset takes a minute on CPU.
    args = ["plan", "--preset", "demo", "--device", "v5e", "--mesh", "data=1,fsdp=1,tensor=1",
            "--global-batch", "16", "--seq-len", "4096", "--no-search"]
    assert main(args) == 1
    out = capsys.readouterr().out
    found = re.search(r"does NOT fit: [\d.]+ GiB \((\d+) bytes\) per device \(train step\), [\d.]+ GiB \((\d+) bytes\) "
                      r"usable", out)
    assert found, out
    need, usable = map(int, found.groups())
    assert usable == int(device("v5e").hbm_bytes * 0.9)
    # At least the parameters, Adam moments and gradients the step holds, computed here without compiling.
    family, cfg = find_preset("demo")
    assert need >= static_bytes(family, cfg, Candidate("demo", (1, 1, 1), 16, 16, 4096, 2048))
    assert need > usable
    assert "train step peak" in out and "KV cache" in out


@pytest.mark.parametrize("args,message", [
    (["--mesh", "data=2,fsdp=2,tensor=1", "--num-devices", "8"],
     "mesh data=2 x fsdp=2 x tensor=1 spans 4 devices, but there are 8"),
    (["--mesh", "fsdp=4", "--processes", "3"], "global batch 16 does not split over 3 processes (16 % 3 = 1)"),
    (["--mesh", "fsdp=4", "--micro-batch", "6"], "global batch 16 is not a multiple of the micro-batch 6"),
    (["--mesh", "fsdp=4", "--micro-batch", "2"], "micro-batch 2 does not split over data x fsdp = 4 devices"),
    (["--mesh", "fsdp=4,pipeline=2"], "unknown axis 'pipeline'"),
    (["--mesh", "fsdp=four"], "fsdp='four' is not a whole number"),
])
def test_bad_input_is_named_before_anything_is_compiled(capsys, args, message):
    assert main(["plan", "--preset", "demo", "--global-batch", "16", "--seq-len", "256", *args]) == 2
    assert message in capsys.readouterr().err


def test_an_unknown_preset_lists_the_known_ones(capsys):
    assert main(["plan", "--preset", "llava-9b", "--global-batch", "8", "--seq-len", "256"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'llava-9b'" in err and "llava-1.5-7b" in err and "demo" in err
