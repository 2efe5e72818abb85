"""The Polyak-averaged policy (``train.policy_ema_decay``): its weights are the closed-form exponential moving average
of the live weights after every optimizer step; training with it is bit for bit training without it; the run's final
evaluation scores the averaged weights (recomputed independently from the final checkpoint) and the live weights are
restored afterwards; checkpoints carry it; bad settings fail at the config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gmm_common import checkpoint_round_trip, small_config, trainable_params

from fastnabla.config.loader import ConfigError
from fastnabla.run.driver import build_trainer, run_training
from fastnabla.tasks.gmm.build import build_gmm_task
from fastnabla.tasks.gmm.evaluate import evaluate_sampler, target_reference
from fastnabla.tasks.gmm.run import EVAL_SEED_OFFSET, TARGET_SEED_OFFSET
from fastnabla.training.checkpoint import CheckpointManager
from fastnabla.training.policy_average import PolicyAverage

DECAYS = [0.5, 0.9]


def _policy(task) -> list[torch.Tensor]:
    return [p.detach().clone() for p in task.policy_parameters() if p.requires_grad]


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().double().flatten() for t in tensors])


def _recording(trainer) -> list[torch.Tensor]:
    """The live policy weights after every applied optimizer step of ``trainer`` (recorded by the objective's
    per-update hook, which the trainer calls right after the step)."""
    seen: list[torch.Tensor] = []
    hook = trainer.objective.after_update

    def after_update(task):
        seen.append(_flat(_policy(task)))
        return hook(task)

    trainer.objective.after_update = after_update
    return seen


@pytest.mark.parametrize("decay", DECAYS, ids=[f"d{d}" for d in DECAYS])
def test_the_average_is_the_closed_form_moving_average(decay):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 5, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]
    avg = PolicyAverage(params, decay)
    history = [_flat(params)]
    for _ in range(6):
        with torch.no_grad():
            for p in params:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
        history.append(_flat(params))
        avg.update()
    k = len(history) - 1  # theta_bar_k = d^k theta_0 + sum_{j=1..k} (1 - d) d^(k - j) theta_j
    expected = decay**k * history[0] + sum((1 - decay) * decay ** (k - j) * history[j] for j in range(1, k + 1))
    torch.testing.assert_close(_flat(avg.average), expected, rtol=1e-6, atol=1e-6)


def test_swapped_in_holds_the_average_and_restores_the_live_weights_also_on_error():
    g = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float64))]
    avg = PolicyAverage(params, 0.7)
    with torch.no_grad():
        params[0].add_(1.0)
    avg.update()
    live = params[0].detach().clone()
    with avg.swapped_in():
        torch.testing.assert_close(params[0].detach(), avg.average[0].double())
        assert not torch.equal(params[0].detach(), live)
    assert torch.equal(params[0].detach(), live)
    with pytest.raises(RuntimeError, match="inside"), avg.swapped_in():
        raise RuntimeError("inside")
    assert torch.equal(params[0].detach(), live)


@pytest.mark.parametrize("decay", DECAYS, ids=[f"d{d}" for d in DECAYS])
def test_training_updates_the_average_after_every_step_and_trains_as_without_it(decay):
    cfg = small_config(f"train.policy_ema_decay={decay}")
    averaged = build_trainer(build_gmm_task(cfg), cfg)
    start = _flat(_policy(averaged.task))
    seen = _recording(averaged)
    averaged.fit(4)  # the first iteration only samples; 2 optimizer steps (updates_per_batch=2) in each other
    assert len(seen) == 6
    expected = start.clone()
    for live in seen:
        expected = decay * expected + (1 - decay) * live
    torch.testing.assert_close(_flat(averaged.policy_average.average), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected, seen[-1])
    plain_cfg = small_config()
    plain = build_trainer(build_gmm_task(plain_cfg), plain_cfg)
    assert plain.policy_average is None
    plain.fit(4)
    assert torch.equal(trainable_params(plain.task), trainable_params(averaged.task))


def test_the_average_resumes_bit_exact(tmp_path):
    cfg = small_config("train.policy_ema_decay=0.8")
    straight = build_trainer(build_gmm_task(cfg), cfg)
    straight.fit(5)
    _, resumed = checkpoint_round_trip(cfg, 3, tmp_path / "ckpt")
    resumed.fit(5)
    assert torch.equal(trainable_params(resumed.task), trainable_params(straight.task))
    assert torch.equal(_flat(resumed.policy_average.average), _flat(straight.policy_average.average))


@pytest.mark.parametrize(("written", "read"), [("0.8", "0"), ("0", "0.8")],
                         ids=["averaged-into-live", "live-into-averaged"])
def test_a_checkpoint_of_another_setting_is_refused(tmp_path, written, read):
    first_cfg = small_config(f"train.policy_ema_decay={written}")
    first = build_trainer(build_gmm_task(first_cfg), first_cfg)
    first.fit(2)
    manager = CheckpointManager(tmp_path / "ckpt", keep=1)
    manager.save(first)
    cfg = small_config(f"train.policy_ema_decay={read}")
    with pytest.raises(ValueError, match="policy_ema_decay"):
        manager.load(build_trainer(build_gmm_task(cfg), cfg))


def test_the_run_evaluates_the_average_and_keeps_the_live_weights_in_its_checkpoint(tmp_path):
    cfg = small_config("name=averaged", "train.policy_ema_decay=0.6", "train.iterations=4",
                       f"output.dir={tmp_path / 'run'}")
    metrics = run_training(cfg, verbose=False).metrics
    trainer = build_trainer(build_gmm_task(cfg), cfg)
    CheckpointManager(tmp_path / "run" / "checkpoints", keep=1).load(trainer)  # the final checkpoint
    target, _ = target_reference(trainer.task, cfg.eval.energy_samples, cfg.seed + TARGET_SEED_OFFSET)
    seed = cfg.seed + EVAL_SEED_OFFSET
    live = evaluate_sampler(trainer.task, cfg.eval.final_num_samples, seed, target_samples=target)
    with trainer.handed_out_policy():
        averaged = evaluate_sampler(trainer.task, cfg.eval.final_num_samples, seed, target_samples=target)
    saved = torch.from_numpy(np.load(tmp_path / "run" / "samples.npy"))
    torch.testing.assert_close(saved, averaged.samples.float())
    assert not torch.allclose(saved, live.samples.float())
    assert metrics["tv_to_target"] == pytest.approx(averaged.tv_to_target)
    assert metrics["mean_log_reward"] == pytest.approx(averaged.mean_log_reward)


@pytest.mark.parametrize("value", ["1.0", "-0.1"], ids=["one", "negative"])
def test_bad_decays_fail_at_the_config(value):
    with pytest.raises(ConfigError, match="policy_ema_decay"):
        small_config(f"train.policy_ema_decay={value}")
