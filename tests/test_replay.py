"""``train.replay_batches``: a training pass over the ``k`` most recent sampled batches (docs/cost.md).

Checked against independent bookkeeping: the plan over ``k`` batches split over processes is the one-process plan;
the trainer keeps exactly the ``k`` newest batches and trains every trajectory in ``k`` consecutive passes; resume is
bit-exact with the older batches in the checkpoint; ``k = 1`` is Algorithm 1 step for step; methods that train on
the batch just sampled refuse it.
"""

from __future__ import annotations

import pytest
import torch
from gmm_common import checkpoint_round_trip, small_config, trainable_params

from fastnabla.run.driver import build_trainer
from fastnabla.tasks.gmm.build import build_gmm_task
from fastnabla.training.plan import plan_transitions

KEPT = 3  # transitions per trajectory at fraction 0.4 of 6 steps: 2 strata + the terminal one


@pytest.mark.parametrize(("global_batch", "num_batches", "shares"), [
    (12, 1, [(0, 12)]),
    (12, 3, [(0, 6), (6, 6)]),
    (10, 2, [(0, 5), (5, 5)]),
    (9, 4, [(0, 3), (3, 3), (6, 3)]),
], ids=["one-batch", "three-batches-two-ranks", "two-batches-two-ranks", "four-batches-three-ranks"])
def test_the_plan_over_replayed_batches_partitions_the_global_plan(global_batch, num_batches, shares):
    kw = dict(seed=1, iteration=4, global_batch=global_batch, num_steps=10, fraction=0.3, num_updates=3,
              num_batches=num_batches)
    whole = plan_transitions(local_start=0, local_count=global_batch, **kw)
    total = global_batch * num_batches
    assert whole.needed_states.shape == (total, 11)
    # every trajectory of every batch: 3 strata + the terminal transition, each step once
    per_traj = torch.bincount(whole.rows, minlength=total)
    assert per_traj.tolist() == [4] * total
    got = []
    for start, count in shares:
        part = plan_transitions(local_start=start, local_count=count, **kw)
        assert torch.equal(part.update_sizes, whole.update_sizes)
        assert part.needed_states.shape == (num_batches * count, 11)
        for r, s, u in zip(part.rows.tolist(), part.steps.tolist(), part.update.tolist(), strict=True):
            batch, i = divmod(r, count)  # this process's rows: its share of batch 0, then of batch 1, ...
            got.append((batch * global_batch + start + i, s, u))
        needed = part.needed_states
        assert bool(needed[part.rows, part.steps].all() and needed[part.rows, part.steps + 1].all())
    want = list(zip(whole.rows.tolist(), whole.steps.tolist(), whole.update.tolist(), strict=True))
    assert sorted(got) == sorted(want)


def test_the_plan_of_one_batch_is_unchanged_by_the_option():
    kw = dict(seed=3, iteration=2, global_batch=8, local_start=0, local_count=8, num_steps=6, fraction=0.4,
              num_updates=2)
    a, b = plan_transitions(**kw), plan_transitions(**kw, num_batches=1)
    for name in ("rows", "steps", "update", "update_sizes", "needed_states"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_the_trainer_replays_the_k_newest_batches_each_pass():
    cfg = small_config("train.replay_batches=3")
    tr = build_trainer(build_gmm_task(cfg), cfg)
    sampled = []
    original = tr.sample

    def recording_sample(iteration):
        out = original(iteration)
        sampled.append(out)
        return out

    tr.sample = recording_sample
    seen = []
    original_train_on = tr.train_on

    def recording_train_on(traj, iteration=None, num_batches=1):
        seen.append((iteration, num_batches, traj.states.clone(), traj.index.clone()))
        return original_train_on(traj, iteration, num_batches)

    tr.train_on = recording_train_on
    transitions = []
    tr.fit(6, on_step=lambda s: transitions.append(s.get("transitions")))
    # pass i trains on the min(3, i - 1) batches sampled before it, newest first
    assert [n for _, n, _, _ in seen] == [1, 2, 3, 3, 3]
    assert transitions == [None] + [8 * KEPT * n for n in (1, 2, 3, 3, 3)]
    for iteration, n, states, index in seen:
        older = [sampled[iteration - 2 - j] for j in range(n)]  # iteration i's pass: batches i-1, i-2, ...
        assert torch.equal(states, torch.cat([b.states for b in older]))
        assert index.tolist() == list(range(8 * n))  # global ids offset by 8 per older batch: distinct draws
    assert len(tr.history) == 3 and all(h is sampled[5 - j] for j, h in enumerate(tr.history))
    assert tr.previous is sampled[5]


def test_one_replayed_batch_is_algorithm_1():
    """``replay_batches=1`` (the default) is the loop: sample D_curr, train on D_prev, D_prev <- D_curr."""
    cfg = small_config()
    tr = build_trainer(build_gmm_task(cfg), cfg)
    tr.fit(4)
    manual = build_trainer(build_gmm_task(cfg), cfg)
    previous = None
    for iteration in range(1, 5):
        current = manual.sample(iteration)
        if previous is not None:
            manual.train_on(previous, iteration)
        previous = current
    assert torch.equal(trainable_params(tr.task), trainable_params(manual.task))
    assert torch.equal(tr.previous.states, previous.states) and len(tr.history) == 1


def test_replay_changes_training_and_resumes_exactly(tmp_path):
    cfg = small_config("train.replay_batches=2", "method.fl_noise_var=0.01", "method.fl_num_noise=2")
    straight = build_trainer(build_gmm_task(cfg), cfg)
    straight.fit(5)
    plain = build_trainer(build_gmm_task(small_config()), small_config())
    plain.fit(5)
    assert not torch.equal(trainable_params(straight.task), trainable_params(plain.task))  # the option is not a no-op

    first, resumed = checkpoint_round_trip(cfg, 3, tmp_path / "ckpt")
    assert resumed.iteration == 3 and len(resumed.history) == 2  # both batches came back from the checkpoint
    for a, b in zip(resumed.history, first.history, strict=True):
        assert torch.equal(a.states, b.states) and torch.equal(a.log_reward, b.log_reward)
    resumed.fit(5)
    assert torch.equal(trainable_params(resumed.task), trainable_params(straight.task))


@pytest.mark.parametrize("method", ["ddpo", "refl", "draft-k", "draft-lv"])
def test_methods_that_train_on_the_batch_just_sampled_refuse_replay(method):
    with pytest.raises(ValueError, match=r"train.replay_batches=2.*cannot replay"):
        small_config(f"method.name={method}", "train.replay_batches=2", "sampler.eta=1.0").check("")
    from fastnabla.methods import build_objective

    cfg = small_config(f"method.name={method}")
    task = build_gmm_task(cfg)
    from fastnabla.training.trainer import Trainer

    with pytest.raises(ValueError, match="cannot replay older batches"):
        Trainer(task, build_objective(cfg.method, task, cfg.seed), cfg.optim, 8, replay_batches=2)


def test_train_on_checks_the_number_of_batches():
    cfg = small_config("train.replay_batches=2")
    tr = build_trainer(build_gmm_task(cfg), cfg)
    with pytest.raises(ValueError, match="8 trajectories, but 2 batch"):
        tr.train_on(tr.sample(1), 2, num_batches=2)


def test_the_on_policy_method_list_matches_the_objectives():
    """``ON_POLICY_METHODS`` (what the config check refuses at start-up) names exactly the objectives that train on
    the batch just sampled."""
    from fastnabla.methods import build_objective
    from fastnabla.methods.config import METHODS, ON_POLICY_METHODS

    for name in METHODS:
        cfg = small_config(f"method.name={name}")
        objective = build_objective(cfg.method, build_gmm_task(cfg), cfg.seed)
        assert (objective.on_policy or objective.per_trajectory) == (name in ON_POLICY_METHODS), name
