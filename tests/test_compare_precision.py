"""The storage-precision measurement against a direct computation, and the rule it motivated: states stay fp32."""

from __future__ import annotations

import pytest
import torch

from fastnabla.compare.precision import storage_errors


def test_storage_errors_match_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    n, steps = 6, 4
    states = torch.randn(n, steps + 1, 5, generator=g)
    eps = torch.randn(n, steps, 5, generator=g)
    a, b = torch.rand(steps, generator=g) + 0.5, -torch.rand(steps, generator=g)
    sigma = torch.tensor([0.5, 0.2, 0.05, 0.01])
    rows = storage_errors(states, eps, a, b, sigma, torch.bfloat16)
    for t, row in enumerate(rows):
        r = states[:, t + 1].double() - a[t].double() * states[:, t].double() - b[t].double() * eps[:, t].double()
        bf = lambda v: v.bfloat16().double()  # noqa: E731
        r_q = bf(states[:, t + 1]) - a[t].double() * bf(states[:, t]) - b[t].double() * bf(eps[:, t])
        assert row["residual_over_sigma"] == pytest.approx(float(r.pow(2).mean().sqrt()) / float(sigma[t]))
        error = float((r_q - r).pow(2).mean().sqrt())
        assert row["rounding_error_over_sigma"] == pytest.approx(error / float(sigma[t]))
    assert rows[-1]["rounding_error_over_sigma"] > 10 * rows[0]["rounding_error_over_sigma"]  # grows as sigma shrinks
    assert all(row["rounding_error_over_sigma"] == 0 for row in storage_errors(states, eps, a, b, sigma,
                                                                               torch.float32))


def test_sampled_states_stay_fp32_whatever_the_storage_dtype():
    from test_sd_common import build_tiny_task

    from fastnabla.training.trajectories import sample_trajectories

    traj = sample_trajectories(build_tiny_task(), 2, torch.Generator().manual_seed(0), storage_dtype=torch.bfloat16)
    assert traj.states.dtype == torch.float32 and traj.eps_old.dtype == torch.bfloat16
