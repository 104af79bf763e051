"""The device mesh (`data`, `fsdp`, `tensor`), the one logical-axis rules table, and multi-host start-up.

Modules only name their axes (`axes` metadata on parameters, `constrain(x, names)` on activations);
this file alone decides how those names land on the mesh.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Weights are split over `fsdp` on their model dimension and over `tensor` on
# heads / MLP width / vocabulary (Megatron-style); activations keep the batch over `data` x `fsdp`.
RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "act_embed": None,
    "act_vocab": "tensor",
    "act_heads": "tensor",
    "vocab": "tensor",
    "embed": "fsdp",
    "embed_out": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "vit_embed": "fsdp",
    "vit_heads": "tensor",
    "vit_mlp": "tensor",
    "cache_batch": ("data", "fsdp"),
    "cache_seq": None,
    "cache_heads": "tensor",
    "cache_dim": None,
}

_CURRENT_MESH: list[Mesh] = []


def mesh_shape(data: int = 1, fsdp: int = -1, tensor: int = 1, num_devices: int | None = None) -> tuple[int, ...]:
    """Resolve mesh axis sizes; one axis may be -1 meaning 'all remaining devices'."""
    n = num_devices if num_devices is not None else jax.device_count()
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(f"{n} devices cannot be split with data={data} fsdp={fsdp} tensor={tensor}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs {math.prod(sizes)} "
                         f"devices, but {n} are available")
    return tuple(sizes)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor) over all (or the given) devices."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    try:
        arr = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # e.g. CPU device lists or shapes the topology helper does not know
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES)


def mesh_from_config(cfg: Any) -> Mesh:
    """Build the mesh from a config with `mesh.data`, `mesh.fsdp`, `mesh.tensor` (missing = 1, fsdp -1)."""
    m = getattr(cfg, "mesh", cfg)
    return make_mesh(int(getattr(m, "data", 1)), int(getattr(m, "fsdp", -1)), int(getattr(m, "tensor", 1)))


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec for logical axis names; a dimension a mesh axis does not divide stays replicated."""
    out, used = [], set()
    for i, name in enumerate(axes):
        target = RULES.get(name) if name is not None else None
        if name is not None and name not in RULES:
            raise KeyError(f"logical axis {name!r} has no rule in mstar_jax.sharding.RULES")
        mesh_axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        if mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1)
            if shape is not None and mesh_axes:
                size = math.prod(mesh.shape[a] for a in mesh_axes)
                if shape[i] % size:
                    mesh_axes = ()
        used.update(mesh_axes)
        out.append(None if not mesh_axes else (mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes))
    return PartitionSpec(*out)


def named_sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
    """NamedSharding for an array with the given logical axes and shape."""
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """Map an nnx.State (abstract or concrete) to a same-structured tree of NamedShardings from `axes` metadata."""
    from flax import nnx

    def one(var):
        axes = var.get_metadata().get("axes")
        shape = var.get_value().shape
        if axes is None:
            axes = (None,) * len(shape)
        return var.replace(named_sharding(mesh, axes, shape))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def to_mesh(params: dict, mesh: Mesh) -> dict:
    """Flat params moved onto another mesh with the same partition specs (replicated where a mesh axis no longer
    divides a dimension); arrays that span several processes are gathered to each host one at a time."""
    from mstar_jax.io import to_host

    out = {}
    for path, a in params.items():
        spec = getattr(a.sharding, "spec", PartitionSpec())
        dims = []
        for size, entry in zip(a.shape, tuple(spec) + (None,) * (a.ndim - len(spec))):
            axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
            dims.append(entry if axes and size % math.prod(mesh.shape[x] for x in axes) == 0 else None)
        out[path] = jax.device_put(to_host(a), NamedSharding(mesh, PartitionSpec(*dims)))
    return out


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None) -> Iterator[Mesh | None]:
    """Make `mesh` the target of `constrain` (and jax's abstract mesh) inside the block."""
    if mesh is None:
        yield None
        return
    _CURRENT_MESH.append(mesh)
    try:
        yield mesh
    finally:
        _CURRENT_MESH.pop()


def current_mesh() -> Mesh | None:
    """The mesh set by the innermost `use_mesh`, if any."""
    return _CURRENT_MESH[-1] if _CURRENT_MESH else None


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Annotate an activation with logical axes; a no-op outside `use_mesh`."""
    mesh = current_mesh()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, axes, x.shape))


def initialize_distributed() -> bool:
    """Call `jax.distributed.initialize` when launched as several processes; returns True if it did.

    Explicit settings come from MSTAR_COORDINATOR_ADDRESS / MSTAR_NUM_PROCESSES / MSTAR_PROCESS_ID (a GPU
    launcher, the CPU tests), with MSTAR_LOCAL_DEVICE_IDS and MSTAR_HEARTBEAT_TIMEOUT (seconds, jax's default 100)
    optional; MSTAR_DISTRIBUTED=auto (set by `tpu_scripts/launch.sh`) lets jax read them from the
    TPU VM's metadata, as it also does where GKE sets TPU_WORKER_HOSTNAMES.
    """
    if getattr(initialize_distributed, "_done", False):
        return True
    addr = os.environ.get("MSTAR_COORDINATOR_ADDRESS")
    nproc = int(os.environ.get("MSTAR_NUM_PROCESSES", "1"))
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if addr and nproc > 1:
        pid = int(os.environ["MSTAR_PROCESS_ID"])
        local = os.environ.get("MSTAR_LOCAL_DEVICE_IDS")
        kwargs = {"local_device_ids": [int(i) for i in local.split(",")]} if local else {}
        if os.environ.get("MSTAR_HEARTBEAT_TIMEOUT"):  # how soon the others stop when one process dies
            kwargs["heartbeat_timeout_seconds"] = int(os.environ["MSTAR_HEARTBEAT_TIMEOUT"])
        if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS") == "cpu":
            # CPU multi-process needs a collectives backend for cross-process computations.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=addr, num_processes=nproc, process_id=pid, **kwargs)
    elif os.environ.get("MSTAR_DISTRIBUTED") == "auto" or "," in tpu_hosts:
        jax.distributed.initialize()
    else:
        return False
    initialize_distributed._done = True
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
