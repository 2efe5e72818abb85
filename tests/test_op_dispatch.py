"""The one dispatch path shared by every fused op (``fastnabla.ops.dispatch.FusedOp``): one decision per call,
carried through the custom op under ``torch.compile``; kernels that import nothing from fastnabla; the training
sampler stepping through the fused denoising step.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from fastnabla.mdp.schedule import SD15_SCHEDULER_CONFIG, build_mdp
from fastnabla.ops import dispatch, transition_scores_fused
from fastnabla.ops.denoise_step import DENOISE_STEP
from fastnabla.ops.forward_looking import FL_ACCUMULATE, FL_NOISY_COPIES
from fastnabla.ops.image_postprocess import IMAGE_POSTPROCESS
from fastnabla.ops.nabla_db_loss import NABLA_DB_LOSS
from fastnabla.ops.transition_scores import TRANSITION_SCORES

ROOT = Path(__file__).resolve().parents[1]
OPS = [DENOISE_STEP, TRANSITION_SCORES, NABLA_DB_LOSS, IMAGE_POSTPROCESS, FL_NOISY_COPIES, FL_ACCUMULATE]
MDP = build_mdp(SD15_SCHEDULER_CONFIG, 50, "ddim", 1.0)

pytestmark = pytest.mark.usefixtures("clean_backend_env")


def scores_case(batch: int = 3) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    states = [torch.randn(batch, 2, 4, 3, generator=gen).requires_grad_() for _ in range(5)]
    steps = torch.tensor([3, 20, 41][:batch])
    coeffs = [getattr(MDP, k)[steps].float() for k in ("a", "b", "sigma", "alpha_bar")]
    return states, coeffs


def test_every_op_is_registered_with_the_helper():
    for op in OPS:
        assert op.op is getattr(torch.ops.fastnabla, op.name).default, op
        if op.autograd is not None:
            assert op.backward_op is getattr(torch.ops.fastnabla, f"{op.name}_backward").default, op
            assert op.function.__name__.endswith("Function") and issubclass(op.function, torch.autograd.Function)


def test_select_is_the_backend_rule_plus_the_compile_threshold(monkeypatch):
    x = torch.zeros(2, 4)
    assert TRANSITION_SCORES.select(x) == DENOISE_STEP.select(x) == "reference"
    monkeypatch.setenv("FASTNABLA_COMPILE", "on")
    assert TRANSITION_SCORES.select(x) == NABLA_DB_LOSS.select(x) == "compiled"
    assert DENOISE_STEP.select(x) == IMAGE_POSTPROCESS.select(x) == "reference"  # no compiled form: never
    monkeypatch.setenv("FASTNABLA_COMPILE", "auto")
    assert TRANSITION_SCORES.select(torch.zeros(1, TRANSITION_SCORES.min_numel)) == "compiled"  # measured threshold
    assert TRANSITION_SCORES.select(torch.zeros(1, TRANSITION_SCORES.min_numel - 1)) == "reference"
    monkeypatch.setenv("FASTNABLA_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTNABLA_BACKEND='bogus' is not one of"):
        DENOISE_STEP.select(x)


def test_select_on_the_triton_backend(interpret):
    assert DENOISE_STEP.select(torch.zeros(2, 3)) == "triton"
    assert DENOISE_STEP.select(torch.zeros(0, 3)) == "reference"  # nothing to launch
    assert IMAGE_POSTPROCESS.select(torch.zeros(2, 3, dtype=torch.float64)) == "reference"  # no fp64 kernels


def test_one_decision_per_call_forward_and_backward(monkeypatch):
    """The eager fused path selects once; its backward runs on the forward's path without selecting again."""
    monkeypatch.setattr(dispatch, "use_compiled", lambda *a: True)
    monkeypatch.setattr(dispatch, "compiled", lambda fn: fn)
    calls = []
    select = dispatch.select_backend
    monkeypatch.setattr(dispatch, "select_backend", lambda device: calls.append(device) or select(device))
    states, coeffs = scores_case()
    out = transition_scores_fused(*states[:4], *coeffs, 0.8, states[4])
    assert out.score_fwd.grad_fn.name() == "TransitionScoresFunctionBackward"
    torch.autograd.grad(sum(o.sum() for o in out), states)
    assert len(calls) == 1


def test_compiled_graph_carries_the_path_into_the_custom_op(monkeypatch):
    """Under ``torch.compile`` the public entry calls the custom op with the path chosen while tracing."""
    monkeypatch.setattr(dispatch, "use_compiled", lambda *a: True)
    monkeypatch.setattr(dispatch, "compiled", lambda fn: fn)
    states, coeffs = scores_case()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def loss(*leaves):
        return sum(o.sum() for o in transition_scores_fused(*leaves[:4], *coeffs, 0.8, leaves[4]))

    got = torch.compile(loss, fullgraph=True, backend=backend)(*states)
    torch.testing.assert_close(got, loss(*states))
    (call,) = [n for g in graphs for n in g.graph.nodes if n.target is torch.ops.fastnabla.transition_scores.default]
    assert call.args[-1] == "compiled"


def test_kernels_import_nothing_from_fastnabla():
    """``kernels/`` is the lowest layer: its modules import each other relatively, never ``fastnabla``."""
    files = sorted((ROOT / "kernels").glob("*.py"))
    assert {f.stem for f in files} >= {"triton_utils", "denoise_step", "transition_scores", "nabla_db_loss",
                                       "forward_looking", "image_postprocess"}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            assert not any(n == "fastnabla" or n.startswith("fastnabla.") for n in names), f"{path.name}: {names}"


class _AffineTask:
    """The smallest ``DiffusionTask`` the sampler needs: 2-D states, an affine eps, the SD1.5 DDIM schedule."""

    mdp = build_mdp(SD15_SCHEDULER_CONFIG, 6, "ddim", 1.0)

    def initial_noise(self, n, generator=None):
        return torch.randn(n, 2, generator=generator)

    def sample_conditions(self, n, generator=None):
        return None

    def policy_eps(self, x, step, cond):
        return 0.3 * x + 0.01 * step.to(x.dtype)[:, None]

    def decode(self, x):
        return x

    def log_reward(self, decoded, cond):
        return -decoded.square().sum(1)


def test_training_sampler_steps_through_the_fused_op(monkeypatch):
    """``sample_trajectories`` (and so ``sample_keyed``) runs every step through ``denoise_step_fused``; on CPU
    the states equal the eager step ``a x + b eps + sigma z`` bit for bit."""
    from fastnabla.training import trajectories

    calls = []
    fused = trajectories.denoise_step_fused
    monkeypatch.setattr(trajectories, "denoise_step_fused", lambda *a, **k: calls.append(1) or fused(*a, **k))
    task = _AffineTask()
    traj = trajectories.sample_trajectories(task, 5, torch.Generator().manual_seed(4))
    assert len(calls) == task.mdp.num_steps

    gen = torch.Generator().manual_seed(4)
    x = task.initial_noise(5, gen)
    for t in range(task.mdp.num_steps):
        step = torch.full((5,), t, dtype=torch.int64)
        c = task.mdp.gather(step, 2, torch.float32)
        eps = task.policy_eps(x, step, None)
        x = c["a"] * x + c["b"] * eps + c["sigma"] * torch.randn(x.shape, generator=gen)
        assert torch.equal(traj.states[:, t + 1], x), t
