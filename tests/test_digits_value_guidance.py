"""``docs/digits/value_guidance.py`` (docs/digits.md, "A policy-independent value as the missing signal"): its loss
learns the log of a conditional mean (against the closed form), and on the quick build it fits, guides, evaluates
and never writes into an existing directory."""

from __future__ import annotations

import json
import math

import pytest
import torch
from digits_common import SCRIPT_EVAL, QuadraticValue, docs_script, quick_build_dir

SCRIPT = docs_script("value_guidance")


@pytest.mark.parametrize("means", [(1.0, 5.0), (0.2, 90.0), (3.0, 3.0)], ids=["small", "wide", "equal"])
def test_the_loss_learns_the_log_of_the_conditional_mean(means):
    """Two groups of x with heavy-tailed y (exponential around each group's mean): the fitted u per group is
    log of the group's empirical mean, not the mean of log y."""
    gen = torch.Generator().manual_seed(0)
    group = torch.arange(2000) % 2
    y = torch.tensor(means)[group] * torch.empty(2000).exponential_(generator=gen)
    u = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([u], lr=0.05)
    for _ in range(2000):
        opt.zero_grad()
        loss = SCRIPT.log_mean_loss(u[group], y)
        loss.backward()
        opt.step()
    expected = torch.stack([y[group == g].mean().log() for g in (0, 1)])
    assert u.detach() == pytest.approx(expected, abs=1e-3)
    assert not torch.allclose(expected, torch.stack([y[group == g].log().mean() for g in (0, 1)]), atol=0.1)


@pytest.mark.parametrize("shift", ["score", "db-mean", "db-draw", "db-draw3", "db-policy1", "db-policy3x4",
                                   "db-state"])
@pytest.mark.parametrize("scale", [1.0, 0.7], ids=["scale1", "scale0.7"])
def test_eps_shift_against_its_closed_form(shift, scale):
    """Each guidance form against the closed form of a quadratic value: the point where grad u is read (x_s, the
    pretrained mean, one draw of the next state), the state index (s or s + 1) and the conversion of a mean shift
    to a noise-prediction shift (divide by b)."""
    gen = torch.Generator().manual_seed(3)
    n, shape = 5, (5, 2, 3, 3)
    x, eps, c = (torch.randn(shape, generator=gen) for _ in range(3))
    step = torch.tensor([0, 1, 2, 3, 4])
    coeffs = {k: torch.rand(n, 1, 1, 1, generator=gen) * 0.5 + 0.2 for k in ("a", "sigma", "alpha_bar")}
    coeffs["b"] = -(torch.rand(n, 1, 1, 1, generator=gen) * 0.5 + 0.1)
    a, b, sigma, abar = coeffs["a"], coeffs["b"], coeffs["sigma"], coeffs["alpha_bar"]
    s = step.float().reshape(-1, 1, 1, 1)
    mean = a * x + b * eps
    gen_draws = torch.Generator().manual_seed(9)
    draws = torch.stack([torch.randn(shape, generator=gen_draws) for _ in range(3)])  # the function's draws, in order
    # db-policy: d <- scale sigma^2 (s + 2)(c - mean - d - sigma zbar), k times from d = 0: a geometric series
    ratio, zbar = -scale * sigma**2 * (s + 2), draws.mean(0)
    policy_start = scale * sigma**2 * (s + 2) * (c - mean - sigma * zbar)
    expected = {
        "score": -scale * (1 - abar).sqrt() * (s + 1) * (c - x),
        "db-state": scale * sigma**2 * (s + 1) * (c - x) / b,
        "db-mean": scale * sigma**2 * (s + 2) * (c - mean) / b,
        "db-draw": scale * sigma**2 * (s + 2) * (c - mean - sigma * draws[0]) / b,
        "db-draw3": scale * sigma**2 * (s + 2) * (c - mean - sigma * zbar) / b,
        "db-policy1": scale * sigma**2 * (s + 2) * (c - mean - sigma * draws[0]) / b,
        "db-policy3x4": policy_start * (1 - ratio**4) / (1 - ratio) / b,
    }[shift]
    form, count, iterations = {"db-draw3": ("db-draw", 3, 1), "db-policy1": ("db-policy", 1, 1),
                               "db-policy3x4": ("db-policy", 3, 4)}.get(shift, (shift, 1, 1))
    got = SCRIPT.eps_shift(QuadraticValue(c), x, step, eps, coeffs, form, scale, torch.Generator().manual_seed(9),
                           count, iterations)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("shift", "draws", "iterations", "match"),
                         [("db", 1, 1, "shift must be one of"), ("db-draw", 0, 1, "must be >= 1"),
                          ("db-policy", 1, 0, "must be >= 1")], ids=["form", "draws", "iterations"])
def test_eps_shift_refuses_bad_arguments(shift, draws, iterations, match):
    x = torch.zeros(1, 1, 2, 2)
    coeffs = {k: torch.ones(1, 1, 1, 1) for k in ("a", "b", "sigma", "alpha_bar")}
    with pytest.raises(ValueError, match=match):
        SCRIPT.eps_shift(QuadraticValue(x), x, torch.zeros(1, dtype=torch.int64), x, coeffs, shift, draws=draws,
                         iterations=iterations)


def test_db_policy_reaches_the_exact_tilted_mean_of_a_quadratic_value():
    """For ``u = -k |x' - c|^2 / 2`` the tilted step ``N(mu#, sigma^2) e^u`` is Gaussian with mean
    ``mu# + sigma^2 k (c - mu#) / (1 + sigma^2 k)`` (a product of Gaussians). The db-policy iteration converges to
    that shift (with one draw ``z``, to the shift towards ``c - sigma z``), while db-mean overshoots it by the factor
    ``1 + sigma^2 k``."""
    x, eps, c = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0)
    coeffs = {"a": torch.ones(1, 1, 1, 1), "b": torch.full((1, 1, 1, 1), -0.5), "sigma": torch.full((1, 1, 1, 1), 0.6),
              "alpha_bar": torch.full((1, 1, 1, 1), 0.5)}
    k, sigma2, b = 2.0, 0.36, -0.5  # step 0 reads u at state 1, where k = s + 1 = 2; mu# = a x + b eps = 0
    value, step = QuadraticValue(c), torch.zeros(1, dtype=torch.int64)
    got = SCRIPT.eps_shift(value, x, step, eps, coeffs, "db-policy", draws=1, iterations=60,
                           generator=torch.Generator().manual_seed(0))
    z = torch.randn((1, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, sigma2 * k * (c - 0.6 * z) / (1 + sigma2 * k) / b)
    exact = sigma2 * k * c / (1 + sigma2 * k) / b
    torch.testing.assert_close(SCRIPT.eps_shift(value, x, step, eps, coeffs, "db-mean"), exact * (1 + sigma2 * k))


@pytest.mark.parametrize("args", [["--draws", "0", "--shift", "db-draw"], ["--draws", "3"],
                                  ["--iterations", "0", "--shift", "db-policy"], ["--iterations", "2"]],
                         ids=["zero", "not-db-draw", "zero-iterations", "not-db-policy"])
def test_the_script_refuses_a_count_it_would_not_use(tmp_path, args):
    with pytest.raises(SystemExit):
        SCRIPT.main([str(tmp_path / "out"), *args])
    assert not (tmp_path / "out").exists()


def test_the_db_draw_form_runs_end_to_end(tmp_path):
    threads = torch.get_num_threads()
    SCRIPT.main([str(tmp_path / "g"), "--trajectories", "20", "--steps", "4", "--shift", "db-draw", "--draws", "2",
                 f"sd.model={quick_build_dir()}", *SCRIPT_EVAL])
    info = json.loads((tmp_path / "g" / "value_guidance.json").read_text())
    assert info["value_guidance"]["shift"] == "db-draw" and info["value_guidance"]["draws"] == 2
    assert info["evaluated"] and math.isfinite(info["policy"]["class_tv"])
    torch.set_num_threads(threads)


def test_value_guidance_fits_guides_and_writes_the_evaluation(tmp_path):
    out = tmp_path / "guided"
    threads = torch.get_num_threads()  # the script runs on one thread, as every digits command
    result = SCRIPT.main([str(out), "--trajectories", "20", "--steps", "4", f"sd.model={quick_build_dir()}",
                             *SCRIPT_EVAL])
    written = json.loads((out / "value_guidance.json").read_text())
    info = written["value_guidance"]
    assert info["trajectories"] == 20 and info["steps"] == 4 and math.isfinite(info["final_loss"])
    assert set(info["held_out_loss"]) == {"0", "1", "2", "3", "5"}  # states 0, T/4, T/2, 3T/4, T of 5 steps
    assert written["evaluated"] and written["num_samples"] == 32
    assert written["policy"]["class_tv"] == pytest.approx(result["policy"]["class_tv"])
    before = (out / "value_guidance.json").read_bytes()
    with pytest.raises(FileExistsError):
        SCRIPT.main([str(out), f"sd.model={quick_build_dir()}", *SCRIPT_EVAL])
    assert (out / "value_guidance.json").read_bytes() == before
    torch.set_num_threads(threads)
