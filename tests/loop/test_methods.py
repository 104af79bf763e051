"""The three self-evolving methods at the loop level: what each iteration starts from, checked against an
explicit sequence of optimizer steps on the same batches (tiny model, rollouts written in advance)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mstar_jax.config import load_config
from mstar_jax.errors import TrainingError
from mstar_jax.loop.rollouts import Rollout, write_rollouts
from mstar_jax.loop.self_evolve import LoopState, SelfEvolvingRun, _seed, iteration_slice, training_examples

NUM_QUERIES = 16
SCHEDULE = 12  # the continuous run's one LR schedule (longer than the run: the LR is still warming up)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny HF LLaVA (loaded through the real conversion), synthetic queries and the smoke config."""
    from mstar_jax import sharding
    from mstar_jax.conversion import load_hf
    from mstar_jax.data.readers import read_dataset
    from mstar_jax.data.synth import SynthConfig, generate
    from mstar_jax.loop.base_model import corpus
    from mstar_jax.loop.data import queries_from_records
    from mstar_jax.models.llava.tiny import TinySpec, make_tiny_llava
    from mstar_jax.policy import Policy, load_processor

    root = tmp_path_factory.mktemp("methods")
    generate(root / "data", SynthConfig(seed=0, sizes={"train": NUM_QUERIES}, image_size=28, workers=1))
    records, _ = read_dataset(root / "data" / "train.json", root=root / "data")
    queries = queries_from_records(records, root / "data")
    make_tiny_llava(root / "hf", TinySpec(vocab_size=400), corpus=corpus(queries))
    policy = Policy(load_hf(root / "hf", sharding.make_mesh(1, 1, 1, jax.devices()[:1]), "float32"),
                    load_processor(root / "hf"))
    cfg = load_config("smoke", ["--config.train.interval=0.5", "--config.train.passes=1.0",
                                "--config.train.selection=all", "--config.train.max_per_query=2",
                                "--config.unlabeled.enabled=false", "--config.prm.enabled=false",
                                "--config.dynamics.scorer=mean_logprob",
                                "--config.train.global_batch=4", "--config.train.micro_batch=2",
                                "--config.dynamics.every=0", "--config.adaptive.enabled=false"])
    return policy, queries, cfg


def write_iteration_rollouts(workdir, queries, cfg, iteration, correct=True):
    """Rollouts of an iteration's slice: the reference rationale and a direct answer, both marked `correct`."""
    rollouts = []
    for i in iteration_slice(len(queries), cfg.train.interval, iteration, cfg.seed):
        q = queries[i]
        texts = [q.item.get("rationale") or "Let me think.", f"The answer is {q.item['answer']}."]
        rollouts.append(Rollout(q.id, "prompt", texts, [correct, correct], [[-0.5], [-0.5]]))
    write_rollouts(workdir / "rollouts" / f"iter_{iteration:04d}.jsonl", rollouts)
    return rollouts


def make_run(world, workdir, method, warm_params, num_iterations=2):
    """A SelfEvolvingRun over the tiny world with its own checkpoints and metrics in `workdir`."""
    from mstar_jax.loop.dynamics import MeanLogprobScorer
    from mstar_jax.loop.run import IterationCheckpoints
    from mstar_jax.loop.sft import Trainer
    from mstar_jax.reporting import MetricsLog

    policy, queries, cfg = world
    cfg = cfg.copy_and_resolve_references()
    cfg.train.method = method
    trainer = Trainer(policy, cfg.train, total_steps=SCHEDULE, max_length=160, seed=cfg.seed)
    ckpts = IterationCheckpoints(workdir / "checkpoints", max_to_keep=3)
    run = SelfEvolvingRun(cfg, workdir, policy, trainer, warm_params, queries, [], {"mean_logprob": MeanLogprobScorer()},
                          MetricsLog(workdir, tensorboard=False), ckpts)
    run.num_iterations = num_iterations
    return run, trainer, ckpts


def host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def assert_same(a, b):
    la, lb = host(a), host(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


def differs(a, b) -> bool:
    return any(not np.array_equal(x, y) for x, y in zip(host(a), host(b)))


def train_on(trainer, state, examples, cfg, iteration, schedule):
    """The explicit reference: the iteration's batches through the jitted step of a schedule length."""
    step = trainer.step_fn(schedule)
    for batch in trainer.batches(examples, cfg.train.epochs, _seed(cfg.seed, 23, iteration)):
        state, _ = step(state, batch)
    return state


@pytest.fixture(scope="module")
def rollouts_dir(world, tmp_path_factory):
    policy, queries, cfg = world
    d = tmp_path_factory.mktemp("rollouts")
    examples = [training_examples(queries, write_iteration_rollouts(d, queries, cfg, i), cfg) for i in range(2)]
    assert all(len(e) > cfg.train.global_batch for e in examples)  # several steps per iteration
    return d, examples


def fresh_workdir(tmp_path, rollouts_dir):
    import shutil

    shutil.copytree(rollouts_dir[0] / "rollouts", tmp_path / "rollouts")
    return tmp_path


def test_continuous_equals_one_uninterrupted_optimizer_across_a_restart(world, rollouts_dir, tmp_path):
    policy, queries, cfg = world
    warm = policy.params
    # Iteration 0 in one process-like run, then a new run restored from its checkpoint does iteration 1.
    run, trainer, ckpts = make_run(world, fresh_workdir(tmp_path, rollouts_dir), "continuous", warm,
                                   num_iterations=1)
    template = trainer.fresh_state(warm, copy=True)
    state, loop = run.run(trainer.fresh_state(warm, copy=True), LoopState(temperature=1.0))
    ckpts.close()
    run, trainer, ckpts = make_run(world, tmp_path, "continuous", warm)
    restored, meta = ckpts.restore(template)
    assert meta["iteration"] == 1
    state, loop = run.run(restored, LoopState(**meta))
    ckpts.close()

    ex0, ex1 = rollouts_dir[1]
    ref0 = train_on(trainer, trainer.fresh_state(warm, copy=True), ex0, cfg, 0, SCHEDULE)
    after0 = jax.tree.map(np.array, ref0.params)  # a host copy: the next step donates ref0
    ref = train_on(trainer, ref0, ex1, cfg, 1, SCHEDULE)
    assert_same(state.params, ref.params)
    assert_same(state.opt_state, ref.opt_state)  # Adam moments and the schedule position carried over
    assert int(state.step) == int(ref.step) == trainer.num_steps(len(ex0), 1) + trainer.num_steps(len(ex1), 1)
    # The warm-up params survive (rest_em and the study restart from them).
    assert all(np.isfinite(np.asarray(a)).all() for a in warm.values())

    # A reset between the iterations gives something else: the test can tell the methods apart.
    reset = train_on(trainer, trainer.fresh_state(jax.tree.map(jax.numpy.asarray, after0), SCHEDULE), ex1, cfg, 1,
                     SCHEDULE)
    assert differs(reset.params, ref.params)


def run_two_iterations(world, rollouts_dir, tmp_path, method):
    """Both iterations of `method` from the warm-up params in one run; returns (final state, trainer)."""
    run, trainer, ckpts = make_run(world, fresh_workdir(tmp_path, rollouts_dir), method, world[0].params)
    state, _ = run.run(trainer.fresh_state(world[0].params, copy=True), LoopState(temperature=1.0))
    ckpts.close()
    return state, trainer


def test_iterative_rft_resets_the_optimizer_but_not_the_params(world, rollouts_dir, tmp_path):
    policy, queries, cfg = world
    warm = policy.params
    state, trainer = run_two_iterations(world, rollouts_dir, tmp_path, "iterative_rft")
    ex0, ex1 = rollouts_dir[1]
    n0, n1 = trainer.num_steps(len(ex0), 1), trainer.num_steps(len(ex1), 1)
    ref = train_on(trainer, trainer.fresh_state(warm, n0, copy=True), ex0, cfg, 0, n0)
    after0 = ref.params
    ref = train_on(trainer, trainer.fresh_state(after0, n1), ex1, cfg, 1, n1)
    assert_same(state.params, ref.params)
    assert_same(state.opt_state, ref.opt_state)
    # Continuing the first optimizer instead would differ.
    cont = train_on(trainer, train_on(trainer, trainer.fresh_state(warm, n0 + n1, copy=True), ex0, cfg, 0, n0 + n1),
                    ex1, cfg, 1, n0 + n1)
    assert differs(cont.params, state.params)


def test_rest_em_restarts_params_and_optimizer_from_the_warm_up(world, rollouts_dir, tmp_path):
    policy, queries, cfg = world
    warm = policy.params
    state, trainer = run_two_iterations(world, rollouts_dir, tmp_path, "rest_em")
    _, ex1 = rollouts_dir[1]
    n1 = trainer.num_steps(len(ex1), 1)
    ref = train_on(trainer, trainer.fresh_state(warm, n1, copy=True), ex1, cfg, 1, n1)
    assert_same(state.params, ref.params)
    assert_same(state.opt_state, ref.opt_state)


def test_iteration_without_a_correct_response_keeps_the_policy(world, tmp_path, capsys):
    policy, queries, cfg = world
    write_iteration_rollouts(tmp_path, queries, cfg, 0, correct=False)
    run, trainer, ckpts = make_run(world, tmp_path, "continuous", policy.params, num_iterations=1)
    start = trainer.fresh_state(policy.params, copy=True)
    state, loop = run.run(start, LoopState(temperature=0.7))
    ckpts.close()
    out = capsys.readouterr().out
    assert "iteration 0: no correct response among the 8 queries' 4 samples at T=0.7" in out
    assert_same(state.params, policy.params)
    assert loop.iteration == 1 and ckpts.manager.latest_step() == 1  # still checkpointed
    rec = [r for r in loop.records if r["stage"] == "iteration"][0]
    assert rec["examples"] == 0 and rec["queries_with_correct"] == 0


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(world, rollouts_dir, tmp_path):
    policy, queries, cfg = world
    warm = policy.params
    run, trainer, ckpts = make_run(world, fresh_workdir(tmp_path, rollouts_dir), "continuous", warm,
                                   num_iterations=1)
    template = trainer.fresh_state(warm, copy=True)
    run.run(trainer.fresh_state(warm, copy=True), LoopState(temperature=1.0))
    ckpts.close()

    run, trainer, ckpts = make_run(world, tmp_path, "continuous", warm)
    good, meta = ckpts.restore(template)
    good_host = jax.tree.map(np.array, good.params)  # the step donates what it is given
    # A diverged model: one weight matrix full of NaN makes the loss NaN.
    key = next(k for k in good.params if "lm_head" in "/".join(map(str, k)))
    bad_params = {k: (v * np.nan if k == key else v) for k, v in good.params.items()}
    with pytest.raises(TrainingError) as err:
        run.run(good.replace(params=bad_params), LoopState(**meta))
    msg = str(err.value)
    assert "iteration 1 (continuous, T=1) training" in msg and "non-finite loss" in msg
    assert "checkpoint of the 1 completed iteration(s)" in msg and "intact" in msg
    assert ckpts.manager.latest_step() == 1
    ckpts.close()
    _, _, again = make_run(world, tmp_path, "continuous", warm)
    restored, meta = again.restore(template)
    assert meta["iteration"] == 1
    assert_same(restored.params, good_host)
    again.close()


def test_batches_of_one_fit_share_one_shape(world, rollouts_dir):
    """Short answers and long rationales in one fit: one padded length, so the step compiles once."""
    from mstar_jax.loop.sft import Trainer

    policy, _, cfg = world
    trainer = Trainer(policy, cfg.train, total_steps=SCHEDULE, max_length=160)
    batches = list(trainer.batches(rollouts_dir[1][0], 2.0, seed=0))
    assert len(batches) > 2 and len({b["input_ids"].shape for b in batches}) == 1
    lengths = np.concatenate([b["attention_mask"].sum(1) for b in batches])
    assert lengths.max() > lengths.min() + 8  # the examples themselves differ in length
