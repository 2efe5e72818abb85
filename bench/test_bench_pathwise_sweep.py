"""The pathwise flow targets' sweep on the Stable Diffusion task: one sweep vs an FL table and then the sweep.

``method.reverse_target=pathwise`` needs, once per training pass, the forward-looking (FL) gradient at every state
of every trajectory and one VJP of the frozen UNet per state (:mod:`fastnabla.methods.nabla_gfn.pathwise`). Two
providers compute the same tensors from the same trajectories:

* ``table`` -- the FL table first (:func:`~fastnabla.methods.nabla_gfn.fl_states.forward_looking_table`: a UNet
  forward + VJP, a decode and a reward VJP per state), then the sweep (:func:`pathwise_flow_targets`: another UNet
  forward + VJP per state);
* ``one-sweep`` -- :func:`pathwise_targets_and_forward_looking`, what the trainer runs: each state's FL gradient and
  the sweep's VJP from one UNet forward (two VJPs).

Both take the trainer's ``chunk`` (``train.fl_batch_size`` = the 4 trajectories here: the table in calls of 4
states, the sweep 4 trajectories at a time, 51 FL calls each) and are timed round-robin in one process (one call of
each per round) on sampled trajectories of the tiny test pipeline and of a larger 3-level UNet
(``bench/test_bench_sd_switches.py``'s sizes, 50 steps, CFG pairs, the brightness reward; the larger one is a
``long`` case on CPU); ``extra_info["ratio_to_table"]`` is the median over rounds of ``one-sweep`` / ``table`` in the
same round (printed with ``-s``), and ``unet_rows`` the UNet rows (CFG pairs) each provider runs per call.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from bench_utils import timed_call
from test_bench_sd_switches import SIZES, make_task

from fastnabla.methods.nabla_gfn.fl_states import forward_looking_table
from fastnabla.methods.nabla_gfn.options import NablaGFNOptions
from fastnabla.methods.nabla_gfn.pathwise import pathwise_flow_targets, pathwise_targets_and_forward_looking
from fastnabla.training.trajectories import sample_trajectories

TRAJECTORIES = 4
FL_BATCH = TRAJECTORIES  # train.fl_batch_size, as the digits presets set it (= the batch)
TD_LAMBDA = 0.5
# the digits-long preset's forward-looking settings: x_hat of the pretrained model, full Jacobian, gamma 1, no smoothing
OPTS = NablaGFNOptions(fl_model="pretrained", reverse_target="pathwise", td_lambda=TD_LAMBDA, beta=1.0, gamma="one",
                       fl_noise_var=0.0, fl_num_noise=1)
PROVIDERS = ["table", "one-sweep"]


def table_then_sweep(task, traj):
    fl = forward_looking_table(task, traj, OPTS, chunk=FL_BATCH, noise_key=(0, 0)).dense()
    return fl, pathwise_flow_targets(task, traj, fl, TD_LAMBDA, chunk=FL_BATCH)


def one_sweep(task, traj):
    return pathwise_targets_and_forward_looking(task, traj, OPTS, TD_LAMBDA, chunk=FL_BATCH, noise_key=(0, 0))


def unet_rows(task, fn) -> int:
    """UNet rows (CFG pairs) ``fn`` runs, counted on the frozen network's calls."""
    rows = []
    pretrained_eps = task.pretrained_eps
    task.pretrained_eps = lambda x, step, cond=None: rows.append(x.shape[0]) or pretrained_eps(x, step, cond)
    try:
        fn()
    finally:
        del task.pretrained_eps
    return sum(rows)


@pytest.mark.parametrize("size", [pytest.param("tiny-2x4x8x8"),
                                  pytest.param("small-2x4x16x16", marks=pytest.mark.long)])
def test_pathwise_sweep_interleaved(benchmark, device, size):
    task = make_task(SIZES[size], "eager", str(device))
    with torch.no_grad():
        traj = sample_trajectories(task, TRAJECTORIES, torch.Generator().manual_seed(0))
    targets = {"table": lambda: table_then_sweep(task, traj), "one-sweep": lambda: one_sweep(task, traj)}
    calls = {p: timed_call(targets[p], device) for p in PROVIDERS}
    (fl_a, g_a), (fl_b, g_b) = targets["table"](), targets["one-sweep"]()
    torch.testing.assert_close(fl_b, fl_a, rtol=1e-4, atol=1e-4 * float(fl_a.abs().max()))
    torch.testing.assert_close(g_b, g_a, rtol=1e-4, atol=1e-4 * float(g_a.abs().max()))
    rows = {p: unet_rows(task, targets[p]) for p in PROVIDERS}
    times: dict[str, list[float]] = {p: [] for p in PROVIDERS}

    def one_round() -> None:
        for provider in PROVIDERS:
            start = time.perf_counter()
            calls[provider]()
            times[provider].append(time.perf_counter() - start)

    start = time.perf_counter()
    one_round()
    rounds = int(min(30, max(5, 20.0 / (time.perf_counter() - start))))
    for p in PROVIDERS:
        times[p].clear()
    benchmark.group = f"pathwise sweep interleaved {size}"
    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=0)
    ratio = statistics.median(b / a for a, b in zip(times["table"], times["one-sweep"], strict=True))
    medians = {p: statistics.median(times[p]) for p in PROVIDERS}
    benchmark.extra_info.update(kind="interleaved", shape_name=size, device=str(device), rounds=rounds,
                                trajectories=TRAJECTORIES, steps=task.mdp.num_steps, median_s=medians,
                                unet_rows=rows, ratio_to_table=ratio)
    print(f"\npathwise sweep {size} ({rounds} rounds, {TRAJECTORIES} x {task.mdp.num_steps} steps): table "
          f"{medians['table']:.2f} s, one-sweep {medians['one-sweep']:.2f} s, ratio {ratio:.3f}; UNet rows {rows}")
    assert rows["one-sweep"] < rows["table"]
