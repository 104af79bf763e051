"""Sharding: mesh sizes, the rules table, and identical logits on 1 device, 8 devices and 2 processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mstar_jax
from mstar_jax import sharding
from tests.conftest import make_batch

ROOT = Path(__file__).resolve().parents[1]


def test_mesh_shape_resolves_minus_one_and_rejects_bad_sizes():
    assert sharding.mesh_shape(1, -1, 2, num_devices=8) == (1, 4, 2)
    assert sharding.mesh_shape(2, 2, -1, num_devices=8) == (2, 2, 2)
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.mesh_shape(1, 3, 2, num_devices=8)
    with pytest.raises(ValueError, match="at most one"):
        sharding.mesh_shape(-1, -1, 1, num_devices=8)


def test_logical_rules_map_axes_and_replicate_indivisible_dims():
    from jax.sharding import PartitionSpec as P

    assert sharding.logical_to_spec(("embed", "heads")) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("batch", None)) == P(("data", "fsdp"), None)
    with pytest.raises(KeyError, match="no rule"):
        sharding.logical_to_spec(("nonsense",))


def _run(args, env_extra, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **env_extra}
    return subprocess.Popen([sys.executable, "-m", "tests.mesh_worker", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _reference(path):
    policy = mstar_jax.load(path)
    batch = make_batch(policy.processor)
    return policy.logits(batch), batch["attention_mask"].astype(bool)


@pytest.mark.parametrize("name", ["clip_llama", "siglip_qwen2"])
def test_eight_devices_give_the_same_logits_with_sharded_params(tiny_models, tmp_path, name):
    path = tiny_models[name][0]
    ref, mask = _reference(path)
    out = tmp_path / "logits.npz"
    proc = _run([path, out, 1, 4, 2], {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    got = np.load(out)["logits"]
    info = json.loads(Path(str(out) + ".json").read_text())
    assert info["devices"] == 8
    assert np.abs(got - ref)[mask].max() < 1e-5
    specs = info["specs"]
    # Weights really are split: fsdp on the model dimension, tensor on heads / mlp / vocab.
    assert specs["language_model.layers.0.self_attn.q_proj.kernel"] == ["fsdp", "tensor"]
    assert specs["language_model.layers.0.mlp.down_proj.kernel"] == ["tensor", "fsdp"]
    assert specs["vision_tower.layers.0.fc1.kernel"] == ["fsdp", "tensor"]
    q_shards = info["shard_shapes"]["language_model.layers.0.self_attn.q_proj.kernel"]
    assert len(q_shards) == 8 and q_shards[0][0] * 4 == 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_initialise_jax_distributed_and_agree(tiny_models, tmp_path):
    """Two local CPU processes x 2 devices form one 4-device mesh through jax.distributed."""
    path = tiny_models["clip_llama"][0]
    ref, mask = _reference(path)
    out = tmp_path / "logits.npz"
    port = _free_port()
    procs = [
        _run([path, out, 1, 2, 2], {"XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                                    "MSTAR_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                    "MSTAR_NUM_PROCESSES": "2", "MSTAR_PROCESS_ID": str(i)})
        for i in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    info = json.loads(Path(str(out) + ".json").read_text())
    assert info["processes"] == 2 and info["devices"] == 4
    # Each process holds only its own shards (2 of the 4 devices).
    assert len(info["shard_shapes"]["language_model.layers.0.self_attn.q_proj.kernel"]) == 2
    assert np.abs(np.load(out)["logits"] - ref)[mask].max() < 1e-5


def test_mstar_distributed_auto_leaves_the_slice_to_jax(monkeypatch):
    """tpu_scripts/launch.sh sets MSTAR_DISTRIBUTED=auto: initialize() with no arguments (jax reads the TPU VM
    metadata), where a plain TPU VM sets no TPU_WORKER_HOSTNAMES."""
    import jax

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(sharding.initialize_distributed, "_done", False, raising=False)
    for name in ("MSTAR_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MSTAR_DISTRIBUTED", raising=False)
    assert not sharding.initialize_distributed() and calls == []
    monkeypatch.setenv("MSTAR_DISTRIBUTED", "auto")
    assert sharding.initialize_distributed() and calls == [((), {})]
