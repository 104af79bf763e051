"""Checkpointing: bitwise round trips, resharding on restore, kill -9 and resume, retention, preemption, errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import struct
import numpy as np
import optax
import pytest

from mstar_jax.checkpointing import CheckpointManager, abstract_like, all_finite
from mstar_jax.errors import CheckpointError, TrainingError

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args, devices: int = 1, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run a Python script in a fresh process (own jax device count), from the repo root."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _bitwise_equal(a, b) -> None:
    """Same tree structure, and every leaf has the same dtype, shape and bytes."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert x.dtype == y.dtype
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def _train_state(steps: int = 2):
    """A small params tree (f32 + bf16) with a real adamw state after `steps` real updates."""
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"dense": {"w": jax.random.normal(k1, (4, 3)), "b": jnp.zeros(3)},
              "emb": jax.random.normal(k2, (5, 2)).astype(jnp.bfloat16)}
    opt = optax.adamw(1e-2)
    opt_state = opt.init(params)

    def loss_fn(p):
        return jnp.sum(p["dense"]["w"] ** 2) + jnp.sum(p["dense"]["b"]) + jnp.sum(p["emb"].astype(jnp.float32))

    for _ in range(steps):
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return {"params": params, "opt_state": opt_state, "step": jnp.int32(steps), "rng": jax.random.key(7),
            "raw_rng": jax.random.PRNGKey(3)}


META = {"iteration": 2, "temperature": 0.7, "data": {"epoch": 1, "position": 1234},
        "metrics": [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]}


def test_save_restore_bitwise(tmp_path):
    state = _train_state()
    assert int(state["opt_state"][0].count) == 2  # the adam moments are real, not zeros
    with CheckpointManager(tmp_path / "ckpt") as ckpt:
        ckpt.save(2, state, META)
        ckpt.wait()
        assert ckpt.latest_step() == 2 and ckpt.all_steps() == [2]
        restored, meta = ckpt.restore(abstract_state=abstract_like(state))
    _bitwise_equal(restored, state)
    assert meta == META
    # A fresh manager (after a restart) restores the same, without a target too (then as dicts and lists).
    with CheckpointManager(tmp_path / "ckpt") as ckpt:
        restored, meta = ckpt.restore(2, abstract_state=jax.eval_shape(lambda: state))
        plain, _ = ckpt.restore()
    _bitwise_equal(restored, state)
    assert meta == META
    _bitwise_equal(plain["params"], state["params"])
    _bitwise_equal(plain["rng"], state["rng"])
    assert np.asarray(plain["opt_state"][0]["nu"]["emb"]).tobytes() == np.asarray(
        state["opt_state"][0].nu["emb"]).tobytes()



def test_relative_directory(tmp_path, monkeypatch):
    """`mstar train` defaults to the relative workdir runs/demo; Orbax itself refuses relative paths."""
    monkeypatch.chdir(tmp_path)
    state = _train_state()
    with CheckpointManager("runs/ckpt") as ckpt:
        ckpt.save(1, state, META)
        ckpt.wait()
    with CheckpointManager("runs/ckpt") as ckpt:
        restored, meta = ckpt.restore(abstract_state=abstract_like(state))
    _bitwise_equal(restored, state)
    assert meta == META and (tmp_path / "runs" / "ckpt" / "1").is_dir()


@struct.dataclass
class _State:
    params: dict
    opt_state: object
    step: jax.Array
    rng: jax.Array


def test_dataclass_state_with_tuple_keys(tmp_path):
    # The shape of training.TrainState: a flax struct dataclass, params keyed by module-path tuples.
    params = {("lm", "layers", "0", "kernel"): jnp.arange(6.0).reshape(2, 3), ("lm", "embed"): jnp.ones(4)}
    tx = optax.adam(1e-3)
    state = _State(params=params, opt_state=tx.init(params), step=jnp.int32(4),
                   rng=jax.random.key_data(jax.random.key(2)))
    with CheckpointManager(tmp_path / "ckpt") as ckpt:
        ckpt.save(4, state, {})
        ckpt.wait()
        restored, _ = ckpt.restore(abstract_state=abstract_like(state))
    assert isinstance(restored, _State)
    _bitwise_equal(restored, state)


MESH_WORKER = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from mstar_jax.checkpointing import CheckpointManager

assert jax.device_count() == 8
mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", "model"))
w = jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16)
b = jnp.arange(16, dtype=jnp.bfloat16)
state = {"params": {"w": jax.device_put(w, NamedSharding(mesh, P("model", "data"))),
                    "b": jax.device_put(b, NamedSharding(mesh, P("model")))},
         "step": jnp.int32(5), "rng": jax.random.key(3)}
with CheckpointManager(sys.argv[1]) as ckpt:
    ckpt.save(5, state, {"iteration": 1})
# Restore onto a different layout than the one saved.
want = {"params": {"w": NamedSharding(mesh, P("data", "model")), "b": NamedSharding(mesh, P(None))},
        "step": NamedSharding(mesh, P()), "rng": NamedSharding(mesh, P())}
abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, want)
with CheckpointManager(sys.argv[1]) as ckpt:
    restored, meta = ckpt.restore(abstract_state=abstract)
for name in ("w", "b"):
    got = restored["params"][name]
    assert got.sharding == want["params"][name], (name, got.sharding)
    assert np.asarray(got).tobytes() == np.asarray(state["params"][name]).tobytes()
    assert got.dtype == state["params"][name].dtype
# Each device holds only its own shard.
assert {s.data.shape for s in restored["params"]["w"].addressable_shards} == {(4, 4)}
assert restored["step"].sharding == want["step"] and int(restored["step"]) == 5
assert restored["rng"].dtype == state["rng"].dtype and restored["rng"].sharding == want["rng"]
assert (np.asarray(jax.random.key_data(restored["rng"])) == np.asarray(jax.random.key_data(state["rng"]))).all()
assert meta == {"iteration": 1}
print("MESH OK")
"""


def test_restore_onto_mesh_shardings(tmp_path):
    res = _run(MESH_WORKER, tmp_path / "ckpt", devices=8)
    assert res.returncode == 0 and "MESH OK" in res.stdout, res.stderr[-3000:]


TRAIN_WORKER = """
import os, signal, sys
import jax, jax.numpy as jnp, numpy as np, optax
from mstar_jax.checkpointing import CheckpointManager, abstract_like

directory, out, total, every, die_at = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
opt = optax.adamw(1e-2, weight_decay=1e-3)
data = np.random.default_rng(0).normal(size=(64, 16, 8)).astype(np.float32)  # the "dataset"


def init():
    params = {"w": jax.random.normal(jax.random.key(0), (8, 4)), "b": jnp.zeros(4)}
    return {"params": params, "opt_state": opt.init(params), "step": jnp.int32(0), "rng": jax.random.key(1)}


@jax.jit
def train_step(state, x):
    rng, noise_key = jax.random.split(state["rng"])

    def loss_fn(p):
        h = x @ p["w"] + p["b"] + 0.1 * jax.random.normal(noise_key, (x.shape[0], 4))
        return jnp.mean((h - 1.0) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": rng}, loss


ckpt = CheckpointManager(directory, max_to_keep=2, save_interval_steps=every)
state, meta = init(), {"data_position": 0}
if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(abstract_state=abstract_like(state))
    print("RESUMED", ckpt.latest_step(), flush=True)
for step in range(int(state["step"]) + 1, total + 1):
    # The data iterator's position travels in the metadata: a resumed run must see the same batches.
    x = data[meta["data_position"] % len(data)]
    meta = {"data_position": meta["data_position"] + 3}
    state, loss = train_step(state, x)
    if ckpt.should_save(step):
        ckpt.save(step, state, meta, loss=loss)
    if step == die_at:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 while the async save may still be writing
ckpt.close()
leaves = jax.tree_util.tree_flatten_with_path(state)[0]
np.savez(out, **{jax.tree_util.keystr(p): np.asarray(jax.random.key_data(x) if x.dtype == state["rng"].dtype else x)
                 for p, x in leaves})
"""


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    full = _run(TRAIN_WORKER, tmp_path / "full", tmp_path / "full.npz", 12, 3, -1)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _run(TRAIN_WORKER, tmp_path / "resumed", tmp_path / "unused.npz", 12, 3, 7)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "unused.npz").exists()
    # Step 3 is complete; the async save of step 6 was usually still writing at the kill (then it is ignored).
    with CheckpointManager(tmp_path / "resumed", max_to_keep=2) as ckpt:
        latest = ckpt.latest_step()
    assert latest in (3, 6)
    resumed = _run(TRAIN_WORKER, tmp_path / "resumed", tmp_path / "resumed.npz", 12, 3, -1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"RESUMED {latest}" in resumed.stdout
    a, b = np.load(tmp_path / "full.npz"), np.load(tmp_path / "resumed.npz")
    assert sorted(a.files) == sorted(b.files) and len(a.files) >= 8
    for k in a.files:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    assert int(a["['step']"]) == 12


KILL_DURING_SAVE = """
import os, signal, sys
import jax.numpy as jnp
from mstar_jax.checkpointing import CheckpointManager

ckpt = CheckpointManager(sys.argv[1])
ckpt.save(1, {"w": jnp.zeros(4)}, {})
ckpt.wait()
ckpt.save(2, {"w": jnp.ones((4096, 4096))}, {})  # 64 MiB: still being written when we die
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_partial_checkpoints_are_ignored(tmp_path):
    d = tmp_path / "ckpt"
    res = _run(KILL_DURING_SAVE, d)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    # Orbax leaves the half-written step under a temporary name (unless it won the race and finished).
    partial = [p.name for p in d.iterdir() if p.name.startswith("2.orbax-checkpoint-tmp")]
    assert partial or (d / "2").exists()
    # A partial step made by hand, newer than everything else.
    fake = d / "9.orbax-checkpoint-tmp"
    (fake / "state").mkdir(parents=True)
    (fake / "state" / "garbage").write_bytes(b"\0" * 10)
    with CheckpointManager(d) as ckpt:
        assert ckpt.latest_step() == (1 if partial else 2) and ckpt.all_steps() == ([1] if partial else [1, 2])
        state, _ = ckpt.restore()
    assert state["w"].shape == ((4,) if partial else (4096, 4096))


def _steps_on_disk(d: Path) -> set[int]:
    return {int(p.name) for p in d.iterdir() if p.name.isdigit()}


def test_max_to_keep_and_mark_keep_survive_restart(tmp_path):
    d = tmp_path / "ckpt"
    state = {"w": jnp.arange(3.0)}
    with CheckpointManager(d, max_to_keep=2) as ckpt:
        for step in range(1, 7):
            ckpt.save(step, {"w": state["w"] + step}, {"step": step})
            if step == 2:
                ckpt.mark_keep(2)
        ckpt.wait()
        assert ckpt.all_steps() == [2, 5, 6]
    assert _steps_on_disk(d) == {2, 5, 6}
    with CheckpointManager(d, max_to_keep=2) as ckpt:
        assert ckpt.all_steps() == [2, 5, 6] and ckpt.kept_steps == {2}
        ckpt.save(7, state, {})
        ckpt.wait()
        restored, meta = ckpt.restore(2)
    assert _steps_on_disk(d) == {2, 6, 7}
    assert np.asarray(restored["w"]).tolist() == [2.0, 3.0, 4.0] and meta == {"step": 2}


def test_nan_guard_keeps_last_good_checkpoint(tmp_path):
    good = {"w": jnp.ones(3)}
    with CheckpointManager(tmp_path / "ckpt", max_to_keep=1) as ckpt:
        ckpt.save(1, good, {}, loss=jnp.float32(0.5))
        with pytest.raises(TrainingError, match="step 2: loss is not finite"):
            ckpt.save(2, good, {}, loss=jnp.float32(jnp.nan))
        with pytest.raises(TrainingError, match="step 3: the train state holds NaN"):
            ckpt.save(3, {"w": jnp.array([1.0, jnp.inf, 0.0])}, {})
        with pytest.raises(CheckpointError, match="step 1 is not after the latest checkpoint 1"):
            ckpt.save(1, good, {})
        ckpt.wait()
        assert ckpt.all_steps() == [1]
        _bitwise_equal(ckpt.restore()[0], good)
    assert all_finite({"a": jnp.ones(2), "k": jax.random.key(0), "i": jnp.int32(1)})
    assert not all_finite({"a": jnp.array([0.0, jnp.nan], jnp.bfloat16)})


SIGTERM_WORKER = """
import os, signal, sys
import jax.numpy as jnp
from mstar_jax.checkpointing import CheckpointManager

ckpt = CheckpointManager(sys.argv[1], save_interval_steps=1000)
ckpt.install_preemption_handler()
state = {"w": jnp.zeros(3)}
for step in range(1, 100):
    state = {"w": state["w"] + 1}
    if step == 4:
        os.kill(os.getpid(), signal.SIGTERM)  # what the TPU VM sends on preemption
    if ckpt.should_save(step):
        assert ckpt.preempted and step >= 4, step
        ckpt.save(step, state, {"preempted_at": step})
    if ckpt.preempted:
        ckpt.close()
        print("SAVED", step, flush=True)
        sys.exit(0)
sys.exit(3)  # never preempted
"""


def test_sigterm_sets_flag_then_loop_saves_and_exits(tmp_path):
    res = _run(SIGTERM_WORKER, tmp_path / "ckpt")
    assert res.returncode == 0, res.stderr[-3000:]
    step = int(res.stdout.split("SAVED")[1])
    with CheckpointManager(tmp_path / "ckpt") as ckpt:
        assert ckpt.all_steps() == [step]
        state, meta = ckpt.restore()
    assert np.asarray(state["w"]).tolist() == [float(step)] * 3 and meta == {"preempted_at": step}


def test_clear_errors(tmp_path):
    hf = tmp_path / "hf_model"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"hf_model: not a checkpoint directory.*config\.json"):
        CheckpointManager(hf)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        CheckpointManager(tmp_path / "file")

    state = _train_state(steps=1)
    with CheckpointManager(tmp_path / "ckpt") as ckpt:
        with pytest.raises(CheckpointError, match="ckpt: no checkpoint to restore"):
            ckpt.restore()
        ckpt.save(1, state, {})
        ckpt.wait()
        with pytest.raises(CheckpointError, match=r"no checkpoint at step 99 \(steps: \[1\]\)"):
            ckpt.restore(99)
        with pytest.raises(CheckpointError, match="no checkpoint at step 5 to keep"):
            ckpt.mark_keep(5)

        bad = abstract_like(state)
        bad["params"]["dense"]["w"] = jax.ShapeDtypeStruct((3, 4), jnp.float32)
        with pytest.raises(CheckpointError, match=r"ckpt/1: leaf params/dense/w is float32\[4, 3\] in the "
                                                  r"checkpoint but the abstract state expects float32\[3, 4\]"):
            ckpt.restore(abstract_state=bad)
        bad = abstract_like(state)
        bad["params"]["emb"] = jax.ShapeDtypeStruct((5, 2), jnp.float32)  # Orbax alone would cast silently
        with pytest.raises(CheckpointError, match=r"leaf params/emb is bfloat16\[5, 2\]"):
            ckpt.restore(abstract_state=bad)
        bad = abstract_like(state)
        bad["rng"] = jax.ShapeDtypeStruct((2,), jnp.uint32)
        with pytest.raises(CheckpointError, match="leaf rng is a typed PRNG key in the checkpoint"):
            ckpt.restore(abstract_state=bad)
        bad = abstract_like(state)
        del bad["raw_rng"]
        with pytest.raises(CheckpointError, match="leaves the abstract state lacks: raw_rng"):
            ckpt.restore(abstract_state=bad)
        bad = abstract_like(state)
        bad["extra"] = jax.ShapeDtypeStruct((1,), jnp.float32)
        with pytest.raises(CheckpointError, match="leaf extra of the abstract state is not in the checkpoint"):
            ckpt.restore(abstract_state=bad)


def test_a_full_disk_under_an_async_save_is_one_error_and_the_last_step_restores(tmp_path):
    """How tensorstore reports a full disk (a ValueError naming os_error_code 28) becomes a StorageError naming the
    step and the checkpoint that is intact. The real thing, on a tiny tmpfs, is in tests/loop/test_fault_campaign.py."""
    from mstar_jax.errors import StorageError

    state = _train_state()
    with CheckpointManager(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, state, META)
        ckpt.wait()

        def full():
            raise ValueError('RESOURCE_EXHAUSTED: Error writing "params" in OCDBT database: Failed to write 1024 '
                             "bytes to file 4: No space left on device [os_error_code='28']")

        ckpt.save(2, state, META)
        real = ckpt._mgr.wait_until_finished
        ckpt._mgr.wait_until_finished = full
        with pytest.raises(StorageError, match=r"ckpt: cannot write the checkpoint of step 2: no space left on device; "
                                               r"the checkpoint of step 1 is intact"):
            ckpt.wait()
        ckpt._mgr.wait_until_finished = real
        ckpt.wait()
        ckpt._mgr.wait_until_finished = lambda: (_ for _ in ()).throw(ValueError("another failure"))
        with pytest.raises(ValueError, match="another failure"):  # other errors pass through as they are
            ckpt.wait()
        ckpt._mgr.wait_until_finished = real
    with CheckpointManager(tmp_path / "ckpt") as ckpt:
        restored, meta = ckpt.restore(1, abstract_state=abstract_like(state))
    _bitwise_equal(restored, state)
