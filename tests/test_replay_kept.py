"""``train.replay_subsample=kept``: replayed batches keep their first pass's transitions, and the constants of the
loss that come from the frozen pretrained network are computed once per batch (methods/nabla_gfn/constants.py).

Checked against independent computations: the kept plan of every batch is the plan its first pass drew; the kept
constants give the parameters the loss reaches when it computes them inline in every pass; the pretrained network
runs only on the newest batch, on exactly the rows the plan names; resume is bit-exact with the constants in the
checkpoint; with one replayed batch the option changes nothing.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from gmm_common import checkpoint_round_trip, small_config, trainable_params

from fastnabla.flops.structure import derive_structure
from fastnabla.run.driver import build_trainer
from fastnabla.tasks.gmm.build import build_gmm_task
from fastnabla.training.plan import StateTable, plan_transitions

KEPT = ("train.replay_batches=3", "train.replay_subsample=kept")
SCORE = "method.reverse_target=score"  # the eq. 17 reverse target: eps# and its VJP are kept too
PATHWISE = "method.reverse_target=pathwise"  # the default gmm method: the FL table over every state is kept


@pytest.mark.parametrize(("num_batches", "local_start", "local_count"), [
    (3, 0, 10), (2, 0, 10), (3, 4, 6), (4, 0, 3),
], ids=["three-batches", "two-batches", "second-rank-of-two", "four-batches-small"])
def test_every_batch_keeps_the_subsample_of_its_first_pass(num_batches, local_start, local_count):
    kw = dict(seed=5, global_batch=10, local_start=local_start, local_count=local_count, num_steps=9,
              fraction=0.35, num_updates=2)
    iteration = 7
    plan = plan_transitions(iteration=iteration, num_batches=num_batches, keep_subsample=True, **kw)
    assert plan.batch_keys == tuple(iteration - j for j in range(num_batches))
    for j in range(num_batches):
        first = plan_transitions(iteration=iteration - j, num_batches=1, **kw)  # the pass that first trained it
        rows, pos = plan.batch_of(j)
        got = sorted(zip((plan.rows[pos] - rows.start).tolist(), plan.steps[pos].tolist(), strict=True))
        want = sorted(zip(first.rows.tolist(), first.steps.tolist(), strict=True))
        assert got == want, j
        assert torch.equal(plan.needed_states[rows], first.needed_states)
    fresh = plan_transitions(iteration=iteration, num_batches=num_batches, **kw)
    assert fresh.batch_keys is None
    older = plan.batch_of(num_batches - 1)[1]
    assert not torch.equal(plan.steps[older].sort().values, fresh.steps[fresh.batch_of(num_batches - 1)[1]]
                           .sort().values)  # fresh subsamples differ from the kept ones


def test_state_tables_concatenate_over_row_blocks():
    a = StateTable.build(torch.tensor([[True, False], [False, True]]), torch.tensor([[1.0], [2.0]]))
    b = StateTable.build(torch.tensor([[False, True]]), torch.tensor([[3.0]]))
    both = StateTable.cat([a, b])
    rows, states = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1])
    assert both.gather(rows, states).flatten().tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(KeyError):
        both.gather(torch.tensor([2]), torch.tensor([0]))


def test_the_pretrained_terms_match_the_frozen_network_and_an_empty_plan_gives_empty_tables():
    """``eps#(x_t)`` and ``J_eps#^T r#`` of the tables equal a brute-force autograd computation, per transition."""
    from fastnabla.methods.nabla_gfn.constants import pretrained_reverse_terms

    cfg = small_config()
    task = build_gmm_task(cfg)
    traj = build_trainer(task, cfg).sample(1)
    starts = torch.zeros(traj.num, cfg.sampler.num_steps + 1, dtype=torch.bool)
    starts[[0, 3, 5], [0, 2, 5]] = True
    tables = pretrained_reverse_terms(task, traj, starts, chunk=2, with_vjp=True)
    for r, t in ((0, 0), (3, 2), (5, 5)):
        x = traj.states[r : r + 1, t].clone().requires_grad_(True)
        step = torch.tensor([t])
        eps = task.pretrained_eps(x, step, None)
        c = task.mdp.gather(step, x.ndim, x.dtype)
        residual = traj.states[r : r + 1, t + 1] - (c["a"] * x + c["b"] * eps)
        (vjp,) = torch.autograd.grad(eps, x, residual.detach())
        got_eps = tables["eps_pretrained"].gather(torch.tensor([r]), torch.tensor([t]))
        got_vjp = tables["vjp_pretrained"].gather(torch.tensor([r]), torch.tensor([t]))
        torch.testing.assert_close(got_eps, eps.detach())
        torch.testing.assert_close(got_vjp, vjp)
    empty = pretrained_reverse_terms(task, traj, torch.zeros_like(starts), chunk=2, with_vjp=False)
    assert empty["eps_pretrained"].values.shape == (0, *traj.states.shape[2:]) and "vjp_pretrained" not in empty
    with pytest.raises(KeyError):
        empty["eps_pretrained"].gather(torch.tensor([0]), torch.tensor([0]))


def _drop_kept_constants(trainer):
    """The same kept plan, but the objective computes every constant inline in every pass (the path without kept
    constants: the FL table of the pass, eps# and its VJP inside the loss)."""
    plan = trainer.plan
    trainer.plan = lambda iteration, num_batches=1: dataclasses.replace(plan(iteration, num_batches),
                                                                        batch_keys=None)


@pytest.mark.parametrize("extra", [(SCORE,), (PATHWISE,)], ids=["score-target", "pathwise-target"])
def test_kept_constants_are_what_the_loss_computes_inline(extra):
    cfg = small_config(*KEPT, *extra)
    kept = build_trainer(build_gmm_task(cfg), cfg)
    kept.fit(6)
    inline = build_trainer(build_gmm_task(cfg), cfg)
    _drop_kept_constants(inline)
    inline.fit(6)
    a, b = trainable_params(kept.task), trainable_params(inline.task)
    assert not torch.equal(a, trainable_params(build_gmm_task(cfg)))  # it trained
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_keeping_and_recomputing_give_the_same_run_smoothing_draws_included():
    """Recomputing the constants every pass (``keep=False``) draws the FL smoothing noise with the same keys (the
    batch's first pass, its own trajectory ids), so the two runs are bit-identical."""
    cfg = small_config(*KEPT, SCORE, "method.fl_noise_var=0.01", "method.fl_num_noise=2")
    kept = build_trainer(build_gmm_task(cfg), cfg)
    kept.fit(5)
    again = build_trainer(build_gmm_task(cfg), cfg)
    again.objective.constants.keep = False
    again.fit(5)
    assert torch.equal(trainable_params(kept.task), trainable_params(again.task))
    assert sorted(kept.objective.constants.by_batch) == [3, 4, 5] and not again.objective.constants.by_batch


def test_the_pretrained_network_runs_on_the_newest_batch_only():
    """In a pass, the constants are computed for the batch new to training only (its planned states' FL terms and
    its transitions' eps#), and every micro-batch's loss takes eps# and its VJP from them. (The gmm policy calls the
    pretrained network inside its own forward, so the calls are counted in the preparation.)"""
    cfg = small_config(*KEPT, SCORE)
    trainer = build_trainer(build_gmm_task(cfg), cfg)
    trainer.fit(4)  # three stored batches
    rows_seen, extras_seen = [], []
    original_eps, objective = trainer.task.pretrained_eps, trainer.objective
    original_prepare, original_loss = objective.prepare, objective.loss

    def counting(x, step, cond=None):
        rows_seen.append(x.shape[0])
        return original_eps(x, step, cond)

    def prepare(*args):
        trainer.task.pretrained_eps = counting
        try:
            return original_prepare(*args)
        finally:
            trainer.task.pretrained_eps = original_eps

    def loss(task, batch, key):
        extras_seen.append(sorted(batch.extras))
        return original_loss(task, batch, key)

    objective.prepare, objective.loss = prepare, loss
    trainer.step()  # iteration 5: batches sampled at 4 (new to training), 3 and 2 (kept)
    plan = trainer.plan(5, 3)
    rows, pos = plan.batch_of(0)
    T = cfg.sampler.num_steps
    fl_rows = int(plan.needed_states[rows][:, :T].sum())  # x_hat(x_T) = x_T: no network call at the terminal state
    assert sum(rows_seen) == fl_rows + int(pos.numel())  # FL at the new states + eps# at the new transitions
    assert sum(rows_seen) < int(plan.needed_states[:, :T].sum()) + int(plan.rows.numel())  # less than recomputing
    assert extras_seen and all({"eps_pretrained", "vjp_pretrained", "fl_t", "fl_next"} <= set(e)
                               for e in extras_seen)


def test_resume_is_bit_exact_with_the_kept_constants_in_the_checkpoint(tmp_path):
    cfg = small_config(*KEPT, SCORE)
    straight = build_trainer(build_gmm_task(cfg), cfg)
    straight.fit(6)
    _, resumed = checkpoint_round_trip(cfg, 4, tmp_path / "ckpt")
    assert sorted(resumed.objective.constants.by_batch) == [2, 3, 4]
    resumed.fit(6)
    assert torch.equal(trainable_params(resumed.task), trainable_params(straight.task))
    with pytest.raises(ValueError, match="unknown entries"):
        resumed.objective.load_state({"something": 1})


def test_one_replayed_batch_ignores_the_option():
    kept = small_config("train.replay_subsample=kept")
    a = build_trainer(build_gmm_task(kept), kept)
    a.fit(4)
    b = build_trainer(build_gmm_task(small_config()), small_config())
    b.fit(4)
    assert torch.equal(trainable_params(a.task), trainable_params(b.task))
    assert not a.objective.constants.by_batch


def test_the_flop_tool_counts_the_kept_constants_once_per_batch():
    """On the tiny SD config the steady-state pass with kept constants runs fewer pretrained passes, decodes and
    reward passes per trained transition than with fresh subsamples, and the same policy passes."""
    from flops_common import tiny_run_config

    fresh = derive_structure(tiny_run_config("train.replay_batches=3", "method.fl_model=pretrained")).counter_view()
    kept = derive_structure(tiny_run_config("train.replay_batches=3", "method.fl_model=pretrained",
                                            "train.replay_subsample=kept")).counter_view()
    for name in ("vae_decoder_forward", "vae_decoder_backward", "reward_forward", "flow_forward"):
        assert kept[name] <= fresh[name], name
    assert kept["vae_decoder_forward"] < fresh["vae_decoder_forward"]
    assert kept["unet_forward"] < fresh["unet_forward"] and kept["unet_backward"] < fresh["unet_backward"]
