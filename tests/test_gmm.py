"""The analytic GMM benchmark: mixture, rewards, metrics and the task, against autograd and Monte Carlo.

Monte-Carlo checks use self-normalised importance sampling with its delta-method standard error
``se = sqrt(sum w^2 (f - est)^2) / sum w`` and require agreement within 5 standard errors (and that the
standard error is small enough for the check to mean something).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import assert_close_rel
from scipy.stats import energy_distance as scipy_energy_distance

from fastnabla.mdp import build_mdp
from fastnabla.tasks.gmm.metrics import energy_distance, mode_weights, total_variation
from fastnabla.tasks.gmm.mixture import GaussianMixture
from fastnabla.tasks.gmm.model import GMMTask
from fastnabla.tasks.gmm.rewards import GaussianBumpReward, LogLinearReward

F64 = torch.float64
N_MC = 200_000

PRIORS = {
    2: GaussianMixture.create([[-2.0, 0.5], [1.5, 1.0], [0.3, -1.8]], [[0.5, 0.7], [0.8, 0.4], [0.6, 0.6]],
                              [0.5, 0.2, 0.3]),
    3: GaussianMixture.create([[1.0, 0.0, -1.0], [-1.0, 1.0, 0.5]], [0.7, 0.5], [0.4, 0.6]),
}
REWARDS = {
    ("bump", 2): GaussianBumpReward(torch.tensor([0.8, -0.3], dtype=F64), 1.2),
    ("bump", 3): GaussianBumpReward(torch.tensor([0.2, 0.5, -0.4], dtype=F64), 1.5),
    ("loglinear", 2): LogLinearReward(torch.tensor([0.4, -0.3], dtype=F64)),
    ("loglinear", 3): LogLinearReward(torch.tensor([0.3, -0.2, 0.25], dtype=F64)),
}


@pytest.fixture(scope="module")
def prior_samples():
    g = torch.Generator().manual_seed(99)
    return {d: p.sample(N_MC, generator=g) for d, p in PRIORS.items()}


def snis(w, f):
    """Self-normalised IS estimate of E_w[f] and its standard error (``w [N]``, ``f [N, ...]``)."""
    w = w.reshape((-1,) + (1,) * (f.ndim - 1))
    est = (w * f).sum(0) / w.sum(0)
    se = ((w**2 * (f - est) ** 2).sum(0)).sqrt() / w.sum(0)
    return est, se


def assert_within_se(est, se, expected, k=5.0, max_rel_se=0.05):
    scale = expected.abs().clamp(min=0.1)
    assert bool((se / scale < max_rel_se).all()), f"MC too noisy to be a test: se={se}"
    assert bool(((est - expected).abs() <= k * se + 1e-9).all()), f"MC {est} vs exact {expected} (se {se})"


def _x_points(d, n=9, seed=0):
    return 1.5 * torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("ab", [0.37, "per-sample"])
def test_eps_star_and_score_are_autograd_of_log_prob(d, ab):
    prior, x = PRIORS[d], _x_points(d)
    if ab == "per-sample":
        ab = torch.linspace(0.02, 0.98, x.shape[0], dtype=F64)[:, None]
    xi = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(prior.log_prob(xi, ab).sum(), xi)
    ab_t = torch.as_tensor(ab, dtype=F64)
    assert_close_rel(prior.score(x, ab), grad, 1e-12)
    assert_close_rel(prior.eps_star(x, ab), -(1 - ab_t).sqrt() * grad, 1e-12)


@pytest.mark.parametrize("ab", [1.0, 0.6, 0.05])
def test_single_component_log_prob_is_multivariate_normal(ab):
    m, s = torch.tensor([[0.4, -1.2, 2.0]], dtype=F64), torch.tensor([[0.5, 1.3, 0.8]], dtype=F64)
    mix = GaussianMixture(m, s, torch.ones(1, dtype=F64))
    x = _x_points(3)
    mvn = torch.distributions.MultivariateNormal(ab**0.5 * m[0], torch.diag(ab * s[0] ** 2 + 1 - ab))
    assert_close_rel(mix.log_prob(x, ab), mvn.log_prob(x), 1e-13)
    assert_close_rel(mix.noised(ab).log_prob(x), mvn.log_prob(x), 1e-13)


def _mixture_moments(mix):
    w, m, s2 = mix.weights, mix.means, mix.stds**2
    mean = (w[:, None] * m).sum(0)
    second = (w[:, None, None] * (torch.diag_embed(s2) + m[:, :, None] * m[:, None, :])).sum(0)
    return mean, second - mean[:, None] * mean[None, :]


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("ab", [0.15, 0.7])
def test_noised_marginal_matches_monte_carlo(prior_samples, d, ab):
    prior = PRIORS[d]
    y, _ = prior_samples[d]
    e = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    x = ab**0.5 * y + (1 - ab) ** 0.5 * e
    mean, cov = _mixture_moments(prior.noised(ab))
    n = x.shape[0]
    xc = x - x.mean(0)
    prods = xc[:, :, None] * xc[:, None, :]
    ones = torch.ones(n, dtype=F64)
    est_m, se_m = snis(ones, x)
    est_c, se_c = snis(ones, prods)
    assert_within_se(est_m, se_m, mean)
    assert_within_se(est_c, se_c, cov)
    z = _x_points(d)
    assert_close_rel(prior.noised(ab).log_prob(z), prior.log_prob(z, ab), 1e-13)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("ab", [0.3, 0.8])
def test_posterior_matches_importance_sampling(prior_samples, d, ab):
    prior = PRIORS[d]
    y, labels = prior_samples[d]
    x = ab**0.5 * y[:3] + (1 - ab) ** 0.5 * torch.randn(3, d, generator=torch.Generator().manual_seed(6), dtype=F64)
    log_w, mean, var = prior.posterior(x, ab)
    assert log_w.shape == (3, prior.num_components) and mean.shape == var.shape == (3, prior.num_components, d)
    pi = log_w.exp()
    post_mean = (pi[..., None] * mean).sum(1)
    post_var = (pi[..., None] * (var + mean**2)).sum(1) - post_mean**2
    onehot = torch.nn.functional.one_hot(labels, prior.num_components).to(F64)
    for i in range(3):
        lik = torch.exp(-((x[i] - ab**0.5 * y) ** 2).sum(1) / (2 * (1 - ab)))
        assert_within_se(*snis(lik, y), post_mean[i])
        assert_within_se(*snis(lik, (y - post_mean[i]) ** 2), post_var[i])
        assert_within_se(*snis(lik, onehot), pi[i])


@pytest.mark.parametrize("beta", [0.5, 2.0])
@pytest.mark.parametrize(("kind", "d"), [("bump", 2), ("bump", 3), ("loglinear", 2), ("loglinear", 3)])
def test_tilt_matches_importance_weighting(prior_samples, kind, d, beta):
    prior, reward = PRIORS[d], REWARDS[(kind, d)]
    y, labels = prior_samples[d]
    tilted = reward.tilt(prior, beta)
    w = torch.exp(beta * reward.log_reward(y))
    onehot = torch.nn.functional.one_hot(labels, prior.num_components).to(F64)
    assert_within_se(*snis(w, onehot), tilted.weights)
    for k in range(prior.num_components):
        wk = w * (labels == k)
        assert_within_se(*snis(wk, y), tilted.means[k])
        assert_within_se(*snis(wk, (y - tilted.means[k]) ** 2), tilted.stds[k] ** 2)


@pytest.mark.parametrize("beta", [0.5, 2.0])
@pytest.mark.parametrize("ab", [0.2, 0.6, 0.9])
@pytest.mark.parametrize(("kind", "d"), [("bump", 2), ("bump", 3), ("loglinear", 2), ("loglinear", 3)])
def test_log_expected_reward_power_matches_monte_carlo(prior_samples, kind, d, ab, beta):
    prior, reward = PRIORS[d], REWARDS[(kind, d)]
    y, _ = prior_samples[d]
    x = ab**0.5 * y[-3:] + (1 - ab) ** 0.5 * torch.randn(3, d, generator=torch.Generator().manual_seed(7), dtype=F64)
    exact = reward.log_expected_reward_power(prior, x, ab, beta)
    r_beta = torch.exp(beta * reward.log_reward(y))
    for i in range(3):
        lik = torch.exp(-((x[i] - ab**0.5 * y) ** 2).sum(1) / (2 * (1 - ab)))
        est, se = snis(lik, r_beta)
        assert se / est < 0.05, "MC too noisy"
        assert abs(math.log(est) - float(exact[i])) <= 5 * se / est


@pytest.mark.parametrize(("kind", "d"), [("bump", 2), ("loglinear", 3)])
def test_log_expected_reward_power_at_clean_state(kind, d):
    prior, reward, beta = PRIORS[d], REWARDS[(kind, d)], 1.7
    x = _x_points(d)
    assert_close_rel(reward.log_expected_reward_power(prior, x, 1.0, beta), beta * reward.log_reward(x), 1e-14)
    ab = torch.tensor([1.0, 0.5] * 4 + [1.0], dtype=F64)[:, None]  # mixed clean / noisy rows
    mixed = reward.log_expected_reward_power(prior, x, ab, beta)
    clean = ab.reshape(-1) == 1
    assert torch.equal(mixed[clean], beta * reward.log_reward(x)[clean])
    assert_close_rel(mixed[~clean], reward.log_expected_reward_power(prior, x[~clean], 0.5, beta), 1e-14)


def test_mode_weights_of_exact_samples():
    prior = PRIORS[2]
    y, labels = prior.sample(100_000, generator=torch.Generator().manual_seed(8))
    resp = prior.responsibilities(y)
    est, se = resp.mean(0), resp.std(0) / math.sqrt(y.shape[0])
    assert torch.equal(mode_weights(y, prior), est)
    assert bool(((est - prior.weights).abs() <= 5 * se).all())
    counts = torch.bincount(labels, minlength=3).to(F64) / y.shape[0]
    count_se = (prior.weights * (1 - prior.weights) / y.shape[0]).sqrt()
    assert bool(((counts - prior.weights).abs() <= 5 * count_se).all())


def test_total_variation_is_max_event_difference():
    g = torch.Generator().manual_seed(3)
    p, q = torch.rand(5, generator=g, dtype=F64), torch.rand(5, generator=g, dtype=F64)
    p, q = p / p.sum(), q / q.sum()
    brute = max(abs(float(p[list(a)].sum() - q[list(a)].sum()))
                for r in range(6) for a in itertools.combinations(range(5), r))
    assert abs(total_variation(p, q) - brute) < 1e-14
    assert total_variation(p, p) == 0.0
    assert abs(total_variation(torch.tensor([0.3, 0.7, 0.0]), torch.tensor([0.0, 0.0, 1.0])) - 1.0) < 1e-7


def _brute_energy(x, y):
    def mean_dist(u, v):  # explicit differences (no ||u||^2 + ||v||^2 - 2 u.v shortcut), 256 rows at a time
        total = sum(float(((uc[:, None] - v[None]) ** 2).sum(-1).sqrt().sum()) for uc in u.split(256))
        return total / (len(u) * len(v))
    return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)


@pytest.mark.parametrize(("n", "m", "d"), [(40, 53, 3), (2100, 7, 2)], ids=["small", "chunked"])
def test_energy_distance_brute_force(n, m, d):
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(n, d, generator=g, dtype=F64), 0.5 + torch.randn(m, d, generator=g, dtype=F64)
    ours, ref = energy_distance(x, y), _brute_energy(x, y)
    assert ours > 0
    # torch.cdist's matrix-product path leaves ~1e-8 on the zero diagonal of |X - X'|: 1e-8 relative
    assert abs(ours - ref) < 1e-8 * ref


def test_energy_distance_matches_scipy_in_1d():
    g = torch.Generator().manual_seed(5)
    u, v = torch.randn(61, generator=g, dtype=F64), 0.3 + 1.4 * torch.randn(37, generator=g, dtype=F64)
    # scipy: sqrt(2 E|X-Y| - E|X-X'| - E|Y-Y'|) of the empirical distributions
    assert abs(energy_distance(u[:, None], v[:, None]) - scipy_energy_distance(u, v) ** 2) < 1e-12


def test_energy_distance_same_vs_shifted_distribution():
    prior = PRIORS[2]
    g = torch.Generator().manual_seed(10)
    x, y = prior.sample(2500, generator=g)[0], prior.sample(2500, generator=g)[0]
    same = energy_distance(x, y)
    delta = float(torch.cdist(x[:500], x[500:1000]).mean())  # E|X - X'|
    bound = 10 * delta * (1 / 2500 + 1 / 2500)  # the V-statistic's null mean is delta (1/N + 1/M)
    assert 0 <= same < bound
    assert energy_distance(x, y + torch.tensor([1.0, 0.0], dtype=F64)) > 5 * bound


@pytest.mark.parametrize(
    "build",
    [
        lambda: GaussianMixture(torch.zeros(3), torch.ones(3), torch.ones(3) / 3),
        lambda: GaussianMixture(torch.zeros(3, 2), torch.ones(3, 1), torch.ones(3) / 3),
        lambda: GaussianMixture(torch.zeros(3, 2), torch.ones(3, 2), torch.ones(2) / 2),
        lambda: GaussianMixture(torch.zeros(3, 2), -torch.ones(3, 2), torch.ones(3) / 3),
        lambda: GaussianMixture(torch.zeros(3, 2), torch.zeros(3, 2), torch.ones(3) / 3),
        lambda: GaussianMixture(torch.zeros(2, 2), torch.ones(2, 2), torch.tensor([1.5, -0.5])),
        lambda: GaussianMixture(torch.zeros(2, 2), torch.ones(2, 2), torch.tensor([0.5, 0.6])),
        lambda: GaussianMixture.create([[0.0, 1.0], [1.0, 0.0]], [0.5, 0.5, 0.5]),
        lambda: GaussianMixture.create([[0.0, 1.0], [1.0, 0.0]], [0.5, -0.5]),
        lambda: GaussianMixture.create([[0.0, 1.0], [1.0, 0.0]], 0.5, [1.0, -1.0]),
        lambda: GaussianMixture.create([[0.0, 1.0], [1.0, 0.0]], 0.5, [1.0, 1.0, 1.0]),
        lambda: GaussianBumpReward(torch.zeros(2, 2), 1.0),
        lambda: GaussianBumpReward(torch.zeros(2), 0.0),
        lambda: GaussianBumpReward(torch.zeros(2), -1.0),
        lambda: LogLinearReward(torch.zeros(2, 2)),
    ],
    ids=["means-1d", "stds-shape", "weights-shape", "stds-negative", "stds-zero", "weights-negative",
         "weights-not-normalised", "create-stds-count", "create-stds-negative", "create-weights-negative",
         "create-weights-count", "bump-center-matrix", "bump-width-zero", "bump-width-negative",
         "loglinear-matrix"],
)
def test_construction_errors(build):
    with pytest.raises(ValueError):
        build()


# --- the task ------------------------------------------------------------------------------------------


def _task(num_steps=6, kind="bump", beta=1.5):
    sched = {"clip_sample": False, "beta_schedule": "linear", "set_alpha_to_one": False, "steps_offset": 1}
    mdp = build_mdp(sched, num_steps, "ddim", 1.0)
    return GMMTask(PRIORS[2], REWARDS[(kind, 2)], beta, mdp, hidden=16, layers=2)


def _perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def test_task_at_initialisation():
    task = _task()
    x = _x_points(2).float()
    step = torch.tensor([0, 5, 2, 3, 1, 4, 0, 5, 2])
    ref = task.pretrained_eps(x, step)
    ab = task.mdp.alpha_bar[step][:, None]
    assert ref.dtype == torch.float32
    assert_close_rel(ref, PRIORS[2].eps_star(x.double(), ab), 1e-5)
    assert torch.equal(task.policy_eps(x, step), ref)
    state = torch.tensor([0, 6, 2, 3, 1, 4, 5, 6, 2])
    assert torch.equal(task.flow(x, state), torch.zeros_like(x))
    assert torch.equal(task.decode(x), x)


def test_task_perturbed_networks():
    task = _task()
    _perturb(task.residual, 1)
    _perturb(task.flow_net, 2)
    x, step = _x_points(2).float(), torch.tensor([0, 5, 2, 3, 1, 4, 0, 5, 2])
    assert_close_rel(task.policy_eps(x, step) - task.pretrained_eps(x, step), task.residual(x, step), 1e-6)
    state = torch.tensor([0, 6, 2, 3, 1, 4, 5, 6, 1])
    producing = (state - 1).clamp(min=0)  # the step that produced each state (state 0 uses step 0)
    factor = (task.mdp.b.abs() / task.mdp.sigma**2)[producing].float()[:, None]
    assert_close_rel(task.flow(x, state), factor * task.flow_net(x, state), 1e-6)
    assert float(task.flow(x, state).detach().abs().max()) > 0


@pytest.mark.parametrize("kind", ["bump", "loglinear"])
def test_oracle_log_flow_gradient_and_terminal(kind):
    task = _task(kind=kind)
    x = _x_points(2, seed=3)
    state = torch.tensor([0, 1, 2, 3, 4, 5, 6, 6, 3])
    grad = task.oracle_log_flow_grad(x, state)
    xi = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(task.oracle_log_flow(xi, state).sum(), xi)
    assert_close_rel(grad, ref, 1e-13)
    h = 1e-5  # central differences, independent of autograd
    fd = torch.stack([(task.oracle_log_flow(x + h * e, state) - task.oracle_log_flow(x - h * e, state)) / (2 * h)
                      for e in torch.eye(2, dtype=F64)], dim=1)
    assert_close_rel(grad, fd, 1e-7)
    terminal = state == 6
    assert_close_rel(task.oracle_log_flow(x, state)[terminal], task.beta * task.reward.log_reward(x[terminal]), 1e-14)


@pytest.mark.parametrize("kind", ["bump", "loglinear"])
def test_oracle_log_flow_matches_two_stage_monte_carlo(prior_samples, kind):
    """log E[R(x_T)^beta | x_s] with x_T = sqrt(abar_T) y + ..., then x_s | x_T by the VP forward process."""
    task = _task(kind=kind)
    mdp = task.mdp
    y, _ = prior_samples[2]
    ab_T = mdp.alpha_bar_terminal
    x_T = ab_T**0.5 * y + (1 - ab_T) ** 0.5 * torch.randn(y.shape, generator=torch.Generator().manual_seed(12),
                                                          dtype=F64)
    r_beta = torch.exp(task.beta * task.reward.log_reward(x_T))
    for s in (0, 3, 5):
        ab_rel = float(mdp.alpha_bar[s]) / ab_T
        z = torch.randn(2, 2, generator=torch.Generator().manual_seed(s), dtype=F64)
        x_s = ab_rel**0.5 * x_T[:2] + (1 - ab_rel) ** 0.5 * z
        exact = task.oracle_log_flow(x_s, torch.full((2,), s))
        for i in range(2):
            lik = torch.exp(-((x_s[i] - ab_rel**0.5 * x_T) ** 2).sum(1) / (2 * (1 - ab_rel)))
            est, se = snis(lik, r_beta)
            assert se / est < 0.05, "MC too noisy"
            assert abs(math.log(est) - float(exact[i])) <= 5 * se / est, (s, i)


def test_task_errors():
    det = build_mdp({"clip_sample": False, "beta_schedule": "linear", "set_alpha_to_one": True}, 6, "ddim", 1.0)
    with pytest.raises(ValueError, match="sigma"):
        GMMTask(PRIORS[2], REWARDS[("bump", 2)], 1.0, det)
    with pytest.raises(ValueError, match="flow_output_scale"):
        GMMTask(PRIORS[2], REWARDS[("bump", 2)], 1.0, _task().mdp, flow_output_scale="score")
