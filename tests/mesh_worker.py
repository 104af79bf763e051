"""Run in a subprocess: load a checkpoint on a multi-device (or multi-process) mesh and save its logits.

Usage: python -m tests.mesh_worker CKPT OUT.npz DATA FSDP TENSOR
Multi-process runs set MSTAR_COORDINATOR_ADDRESS / MSTAR_NUM_PROCESSES / MSTAR_PROCESS_ID.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def main() -> None:
    ckpt, out, data, fsdp, tensor = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    from mstar_jax import sharding

    sharding.initialize_distributed()
    import jax

    import mstar_jax
    from tests.conftest import make_batch

    mesh = sharding.make_mesh(data, fsdp, tensor)
    policy = mstar_jax.load(ckpt, mesh=mesh)
    batch = make_batch(policy.processor)
    logits = policy.logits(batch)
    specs = {".".join(map(str, p)): [list(e) if isinstance(e, tuple) else e for e in a.sharding.spec]
             for p, a in policy.params.items()}
    shard_shapes = {".".join(map(str, p)): [list(s.data.shape) for s in a.addressable_shards]
                    for p, a in policy.params.items()}
    if jax.process_index() == 0:
        np.savez(out, logits=logits, mask=batch["attention_mask"])
        with open(out + ".json", "w") as f:
            json.dump({"devices": jax.device_count(), "processes": jax.process_count(), "specs": specs,
                       "shard_shapes": shard_shapes}, f)


if __name__ == "__main__":
    main()
