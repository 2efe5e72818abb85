"""The trainer moves a small analytic case towards its closed-form target within CI time."""

from __future__ import annotations

from fastnabla.config.loader import build_config
from fastnabla.run.config import RunConfig
from fastnabla.run.driver import run_training

SMALL_CASE = [
    "sampler.num_steps=20",
    "train.batch_size=128",
    "train.iterations=120",
    "train.transition_fraction=0.25",
    "gmm.network.hidden=64",
    "gmm.mixture.means=[[-2,0],[2,0],[0,2.5]]",
    "gmm.mixture.weights=[0.5,0.3,0.2]",
    "gmm.reward.center=[1.5,1.5]",
    "gmm.reward.width=1.5",
    "eval.every=60",
    "eval.num_samples=2000",
    "eval.final_num_samples=4000",
    "eval.energy_samples=500",
    "output.figure=false",
    "output.progress=false",
]


def test_tuned_trainer_lowers_tv_and_raises_reward(tmp_path):
    cfg = build_config(RunConfig, None, None, [*SMALL_CASE, "name=small", f"output.dir={tmp_path / 'run'}"])
    m = run_training(cfg, verbose=False).metrics
    assert m["tv_prior_to_target"] > 0.35  # the case is far from its target to begin with
    assert m["tv_to_target"] < 0.5 * m["tv_prior_to_target"]
    assert m["tv_to_target"] < 0.18
    assert m["mean_log_reward"] > m["mean_log_reward_prior"] + 0.5
    assert m["energy_distance"] < 0.5 * m["energy_distance_prior"]
