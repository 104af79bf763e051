"""Checkpoints of the train state and loop metadata for long, preemptible runs (Orbax, local or gs://).

One checkpoint per step, written asynchronously and atomically by Orbax:

    DIR/<step>/state/    the train state pytree: params, optimizer state, step, RNG (typed keys as raw key data)
    DIR/<step>/loop/     loop metadata as JSON: iteration, temperature, data iterator state, metrics so far...
    DIR/<step>/format/   our bookkeeping as JSON: format version, which leaves were typed PRNG keys
    DIR/keep.json        steps marked with `mark_keep`; they are never garbage-collected

Orbax writes a step into `<step>.orbax-checkpoint-tmp*` and renames it when complete (on GCS, which has no
rename, it writes `commit_success.txt` last), so a step whose writer was killed is never listed.

How the training loop uses it (the NaN-guard contract: a failed step never reaches disk, so it can never
replace or push out the last good checkpoint):

    ckpt = CheckpointManager(workdir / "checkpoints", max_to_keep=3, save_interval_steps=500)
    ckpt.install_preemption_handler()
    start = 0
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(abstract_state=abstract_state)   # jax.eval_shape(init) with shardings
        start = ckpt.latest_step()
    for step in range(start + 1, total_steps + 1):
        state, loss = train_step(state, batch)
        if not all_finite(loss):           # check first: roll back to ckpt.restore(...), never save
            ...
        if ckpt.should_save(step):         # call it on every step, on every host (preemption sync point)
            ckpt.save(step, state, meta, loss=loss)
        if ckpt.preempted:                 # the save above was the last one: finish it and exit
            ckpt.close()
            sys.exit(0)

`save` refuses (TrainingError, nothing written, nothing deleted) a non-finite `loss` or state, as a backstop.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm

from mstar_jax.errors import CheckpointError, StorageError, TrainingError
from mstar_jax.weights import orbax_path

log = logging.getLogger(__name__)

FORMAT = "mstar-train-state"
VERSION = 1
KEEP_FILE = "keep.json"
_ITEMS = ("state", "loop", "format")
_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_ORBAX_ROOT_ENTRIES = ("metadata",)  # Orbax's root metadata dir (written only with custom root metadata)


# ------------------------------------------------------------------------------ pytree helpers


def _path_name(path) -> str:
    """'opt_state/0/mu/w': the same for a namedtuple field and the dict Orbax restores it as (no target)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def abstract_like(state: Any) -> Any:
    """The abstract state (shape, dtype, sharding per leaf) of a concrete state, for `restore`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        state)


@jax.jit
def _finite(leaves):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.bool_(True)]))


def all_finite(tree: Any) -> bool:
    """True if every floating-point leaf of `tree` (a loss, a state) is free of NaN and inf."""
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    return bool(_finite(leaves)) if leaves else True


def _is_no_space(err: BaseException) -> bool:
    """True if `err` or an exception it came from is a full disk (tensorstore reports it as os_error_code 28)."""
    while err is not None:
        if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _first_line(err: BaseException, limit: int = 300) -> str:
    """The head of an error message (tensorstore appends whole specs of the array it failed on)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


@contextlib.contextmanager
def _quiet_unraisable():
    """Drop the 'Exception ignored in coroutine' reports of Orbax's abandoned reads after a failed restore (each
    prints a tensorstore spec of a page); the failure itself is raised as one CheckpointError."""
    import gc
    import sys

    old = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = old


# ------------------------------------------------------------------------------ retention


@dataclass
class _KeptSteps:
    """Orbax preservation policy: keep the steps in a set we keep mutating (mark_keep)."""

    steps: set[int] = field(default_factory=set)

    def should_preserve(self, checkpoints, *, context) -> Sequence[bool]:
        return [c.step in self.steps for c in checkpoints]


# ------------------------------------------------------------------------------ the manager


class CheckpointManager:
    """Async, atomic checkpoints of (train state, loop metadata); keeps the last N plus steps marked kept."""

    def __init__(self, directory: str | epath.PathLike, *, max_to_keep: int | None = 3,
                 save_interval_steps: int = 1000, async_save: bool = True):
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        self.directory = orbax_path(directory)
        self.save_interval_steps = save_interval_steps
        self._check_directory()
        self._kept = _KeptSteps(self._read_kept())
        policy = ocm.AnyPreservationPolicy([ocm.LatestN(max_to_keep), self._kept])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=async_save, create=True,
            # Half-written steps of a killed run are invisible anyway; this just reclaims their space.
            cleanup_tmp_directories=True)
        # Handlers named up front: a fresh manager (after a restart) otherwise has no metadata for its items.
        handlers = {"state": ocp.StandardCheckpointHandler(), "loop": ocp.JsonCheckpointHandler(),
                    "format": ocp.JsonCheckpointHandler()}
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._signal_flag = threading.Event()
        self._synced_preemption = False
        self._old_handlers: dict[int, Any] = {}
        self._saving: int | None = None

    # -------------------------------------------------------------- directory checks

    def _check_directory(self) -> None:
        d = self.directory
        if d.exists() and not d.is_dir():
            raise CheckpointError(f"{d}: is a file, not a checkpoint directory")
        if not d.exists():
            return
        for entry in d.iterdir():
            name = entry.name
            ours = (name.isdigit() or _TMP_SUFFIX in name or name.startswith(".")
                    or name in (KEEP_FILE, *_ORBAX_ROOT_ENTRIES))
            if not ours:
                raise CheckpointError(
                    f"{d}: not a checkpoint directory of mstar-jax training (it holds {name!r}; expected only "
                    f"step directories and {KEEP_FILE}); point the run at an empty or checkpoint directory")

    def _read_kept(self) -> set[int]:
        path = self.directory / KEEP_FILE
        if not path.exists():
            return set()
        try:
            return {int(s) for s in json.loads(path.read_text())["keep"]}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: malformed list of kept steps ({err})") from err

    def _write_kept(self) -> None:
        if jax.process_index() != 0:
            return
        # Write then rename so a kill never leaves a truncated keep.json behind.
        tmp = self.directory / f".{KEEP_FILE}.tmp"
        tmp.write_text(json.dumps({"keep": sorted(self._kept.steps)}) + "\n")
        tmp.rename(self.directory / KEEP_FILE)

    # -------------------------------------------------------------- queries

    def all_steps(self) -> list[int]:
        """Steps with a complete checkpoint (plus the one being saved), ascending."""
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete (or currently saving) step, or None."""
        return self._mgr.latest_step()

    @property
    def kept_steps(self) -> set[int]:
        """Steps marked with `mark_keep`."""
        return set(self._kept.steps)

    # -------------------------------------------------------------- saving

    def should_save(self, step: int) -> bool:
        """True on the save interval or once preempted (call every step on every host: a sync point)."""
        if self._mgr.reached_preemption(step):
            self._synced_preemption = True
        latest = self.latest_step()
        if latest is not None and step <= latest:
            return False
        return self.preempted or step % self.save_interval_steps == 0

    @property
    def preempted(self) -> bool:
        """True once a preemption signal arrived (or all hosts reached JAX's preemption sync point)."""
        return self._synced_preemption or self._signal_flag.is_set()

    def save(self, step: int, state: Any, metadata: dict | None = None, *, loss: Any = None) -> None:
        """Start an async, atomic save of `state` and JSON `metadata` as `step`; refuse non-finite loss/state."""
        if loss is not None and not all_finite(loss):
            raise TrainingError(f"step {step}: loss is not finite; not saving it (the last good checkpoint in "
                                f"{self.directory} stays the latest)")
        if not all_finite(state):
            raise TrainingError(f"step {step}: the train state holds NaN/inf; not saving it (the last good "
                                f"checkpoint in {self.directory} stays the latest)")
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise CheckpointError(f"{self.directory}: step {step} is not after the latest checkpoint {latest}; "
                                  "refusing to overwrite it")
        try:
            # A deep copy now: the caller may change its dicts while the async save runs.
            loop = json.loads(json.dumps(metadata or {}))
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"step {step}: loop metadata is not JSON-serializable ({err})") from err
        keys = {}

        def to_data(path, x):
            if _is_key(x):
                keys[_path_name(path)] = str(jax.random.key_impl(x))
                return jax.random.key_data(x)
            return x

        arrays = jax.tree_util.tree_map_with_path(to_data, state)
        fmt = {"format": FORMAT, "version": VERSION, "prng_keys": keys}
        self._saving = step
        with self._space_errors():
            self._mgr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(arrays), loop=ocp.args.JsonSave(loop), format=ocp.args.JsonSave(fmt)),
                force=True)

    def mark_keep(self, step: int) -> None:
        """Never garbage-collect `step` (mark it right after saving it); remembered across restarts."""
        if step not in self._mgr.all_steps():
            raise CheckpointError(f"{self.directory}: no checkpoint at step {step} to keep "
                                  f"(steps: {self.all_steps()})")
        self._kept.steps.add(step)
        self._write_kept()

    def wait(self) -> None:
        """Block until the pending async save is complete on disk (StorageError if the disk filled up)."""
        with self._space_errors():
            self._mgr.wait_until_finished()

    @contextlib.contextmanager
    def _space_errors(self):
        """Turn a full disk under an (async) save into a StorageError naming the step and what is left intact."""
        try:
            yield
        except Exception as err:
            if not _is_no_space(err):
                raise
            done = [s for s in self.all_steps() if s != self._saving]
            kept = f"the checkpoint of step {done[-1]} is intact" if done else "no earlier checkpoint exists"
            raise StorageError(f"{self.directory}: cannot write the checkpoint of step {self._saving}: no space left "
                               f"on device; {kept}, and a rerun resumes from it once space is freed") from err

    def close(self) -> None:
        """Finish pending saves, release Orbax resources and restore the previous signal handlers."""
        self._mgr.close()
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------- preemption

    def install_preemption_handler(self, sigint: bool = False) -> None:
        """On SIGTERM (and SIGINT if asked) only set a flag; `should_save` then says save, `preempted` says exit."""
        if jax.process_count() > 1:
            # Hosts see the signal at different steps; a save on some hosts only would hang in Orbax's barriers.
            # JAX's preemption service (jax.distributed) catches SIGTERM itself and `should_save` asks it for a
            # step all hosts agree on, so we must not replace its handler.
            log.info("multi-host run: preemption comes from JAX's preemption sync point, not a signal handler")
            return
        for sig in (signal.SIGTERM, signal.SIGINT) if sigint else (signal.SIGTERM,):
            # Saving inside a handler could interrupt a save or a jitted step; the loop saves at its next step.
            self._old_handlers[sig] = signal.signal(sig, lambda signum, frame: self._signal_flag.set())

    # -------------------------------------------------------------- restoring

    def restore(self, step: int | None = None, abstract_state: Any = None) -> tuple[Any, dict]:
        """(state, metadata) of `step` (default latest), on `abstract_state`'s shardings and tree if given."""
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"{self.directory}: no checkpoint to restore")
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(f"{self.directory}: no checkpoint at step {step} (steps: {steps or 'none'})")
        step_dir = self.directory / str(step)
        if not all((step_dir / item).exists() for item in _ITEMS):
            raise CheckpointError(f"{step_dir}: not an mstar-jax train-state checkpoint (needs {', '.join(_ITEMS)})")
        # A damaged step (a file lost or cut short) raises here: tensorstore never fills missing data in.
        moved = f"; move {step_dir} away to resume from an earlier checkpoint"
        try:
            fmt = self._mgr.restore(step, args=ocp.args.Composite(format=ocp.args.JsonRestore()))["format"]
        except Exception as err:
            raise CheckpointError(f"{step_dir}: unreadable checkpoint description ({_first_line(err)}){moved}") from err
        if fmt.get("format") != FORMAT:
            raise CheckpointError(f"{step_dir}: format {fmt.get('format')!r} is not {FORMAT!r}")
        keys = fmt.get("prng_keys", {})
        try:
            with _quiet_unraisable():
                target = None if abstract_state is None else self._target(step, abstract_state, keys)
                out = self._mgr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), loop=ocp.args.JsonRestore()))
        except CheckpointError:
            raise
        except Exception as err:
            hint = "" if abstract_state is not None else "; pass abstract_state to place it on the current devices"
            raise CheckpointError(f"{step_dir}: cannot restore the train state ({_first_line(err)}){hint}{moved}"
                                  ) from err

        def to_key(path, x):
            impl = keys.get(_path_name(path))
            return x if impl is None else jax.random.wrap_key_data(x, impl=impl)

        return jax.tree_util.tree_map_with_path(to_key, out["state"]), out["loop"]

    def _target(self, step: int, abstract_state: Any, keys: dict[str, str]) -> Any:
        """`abstract_state` with typed keys as key data, checked leaf by leaf against what is on disk."""
        saved = {_path_name(p): m for p, m in jax.tree_util.tree_flatten_with_path(
            self._mgr.item_metadata(step)["state"].tree)[0]}
        where = f"{self.directory / str(step)}"

        def convert(path, sds):
            name = _path_name(path)
            if name not in saved:
                raise CheckpointError(f"{where}: leaf {name} of the abstract state is not in the checkpoint")
            want_key = _is_key(sds)
            if want_key != (name in keys):
                has = "a typed PRNG key" if name in keys else "plain array data"
                raise CheckpointError(f"{where}: leaf {name} is {has} in the checkpoint but the abstract state "
                                      f"has dtype {sds.dtype}")
            if want_key:
                data = jax.eval_shape(jax.random.key_data, sds)
                sds = jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sds.sharding)
            m = saved[name]
            if tuple(m.shape) != tuple(sds.shape) or jnp.dtype(m.dtype) != jnp.dtype(sds.dtype):
                raise CheckpointError(f"{where}: leaf {name} is {m.dtype}{list(m.shape)} in the checkpoint but "
                                      f"the abstract state expects {sds.dtype}{list(sds.shape)}")
            return sds

        target = jax.tree_util.tree_map_with_path(convert, abstract_state)
        extra = sorted(set(saved) - {_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(target)[0]})
        if extra:
            raise CheckpointError(f"{where}: the checkpoint has leaves the abstract state lacks: {', '.join(extra)}")
        return target
