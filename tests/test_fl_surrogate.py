"""The forward-looking surrogate decoder (``method.fl_decoder=surrogate``, docs/cost.md): the exact decoder at x_T and
the surrogate elsewhere, checked against brute-force autograd on the tiny SD task; the default is unchanged; the FLOP
tool counts what runs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import assert_close_rel
from test_sd_common import build_tiny_task, tiny_config

from fastnabla.methods.nabla_gfn.fl_states import forward_looking_fn
from fastnabla.methods.nabla_gfn.loss import nabla_gfn_loss
from fastnabla.methods.nabla_gfn.options import NablaGFNOptions
from fastnabla.ops.forward_looking import gamma_schedule
from fastnabla.ops.image_postprocess import image_postprocess
from fastnabla.tasks.sd.loading import build_tiny_fl_surrogate, load_fl_surrogate_decoder
from fastnabla.training.interface import select_cond
from fastnabla.training.trajectories import sample_keyed, select_transitions

T = 6


@pytest.fixture(scope="module")
def setup():
    task = build_tiny_task(tiny_config(num_steps=T))
    task.set_fl_surrogate(build_tiny_fl_surrogate(task.vae.config, seed=3))
    traj = sample_keyed(task, seed=0, iteration=1, global_batch=3)
    return task, traj


def _brute_force_fl(task, x, step, terminal, cond, opts, decode_raw):
    """``beta gamma_s grad_x log R(post(decode_raw(x_hat(x))))`` by plain autograd, one row at a time (x_hat through
    the FL network's full Jacobian; at x_T, x_hat = x and gamma = 1)."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1].detach().clone().requires_grad_(True)
        si, ci = step[i : i + 1], select_cond(cond, torch.tensor([i]))
        if bool(terminal[i]):
            x_hat, scale = xi, opts.beta
        else:
            ab = task.mdp.gather(si, x.ndim, x.dtype)["alpha_bar"]
            eps = (task.policy_eps if opts.fl_model == "policy" else task.pretrained_eps)(xi, si, ci)
            x_hat = (xi - (1 - ab).sqrt() * eps) / ab.sqrt()
            scale = opts.beta * float(gamma_schedule(ab, opts.gamma).reshape(()))
        log_r = task.log_reward(image_postprocess(decode_raw(x_hat)), ci)
        (g,) = torch.autograd.grad(log_r.sum(), xi)
        out.append(scale * g)
    return torch.cat(out)


CASES = [pytest.param("policy", id="fl-policy"), pytest.param("pretrained", id="fl-pretrained")]


@pytest.mark.parametrize("fl_model", CASES)
def test_surrogate_rows_match_brute_force(setup, fl_model):
    """Terminal rows go through the exact VAE decoder, the others through the surrogate (a mixed batch)."""
    task, traj = setup
    opts = NablaGFNOptions(beta=2.0, fl_model=fl_model, fl_decoder="surrogate")
    rows, states = torch.tensor([0, 1, 2, 0, 1]), torch.tensor([T, 2, T, 4, 0])
    x = traj.states[rows, states]
    terminal = states == T
    step = states.clamp(max=T - 1)
    ab = task.mdp.gather(step, x.ndim, x.dtype)["alpha_bar"]
    cond = select_cond(traj.cond, rows)
    got = forward_looking_fn(task, opts)(x, step, ab, terminal, cond)
    exact = _brute_force_fl(task, x, step, terminal, cond, opts, task.decode_raw)
    surrogate = _brute_force_fl(task, x, step, terminal, cond, opts, task.fl_surrogate_decode_raw)
    want = torch.where(terminal.reshape(-1, 1, 1, 1), exact, surrogate)
    assert_close_rel(got, want, 1e-4, "FL gradient")
    inner = ~terminal  # the check can fail: the two decoders give different gradients at non-terminal states
    assert float((exact[inner] - surrogate[inner]).abs().max()) > 1e-3 * float(exact[inner].abs().max())


def _batch(traj):
    rows, steps = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, T - 1, 3, T - 1, 4, 1])
    return select_transitions(traj, rows, steps)


def _loss(task, traj, opts):
    per_sample, _ = nabla_gfn_loss(task, _batch(traj), opts)
    return per_sample.detach()


@pytest.mark.parametrize("fold", [pytest.param(True, id="folded"), pytest.param(False, id="unfolded")])
def test_exact_default_is_bit_identical(fold):
    """The default (exact) is today's loss bit for bit, with or without a surrogate attached to the task."""
    assert NablaGFNOptions().fl_decoder == "exact"
    plain = build_tiny_task(tiny_config(num_steps=T))
    with_surrogate = build_tiny_task(tiny_config(num_steps=T))
    with_surrogate.set_fl_surrogate(build_tiny_fl_surrogate(with_surrogate.vae.config, seed=3))
    traj = sample_keyed(plain, seed=0, iteration=1, global_batch=3)
    opts = NablaGFNOptions(fold_fl_vjp=fold)
    assert torch.equal(_loss(plain, traj, opts), _loss(with_surrogate, traj, opts))


def test_surrogate_loss_folded_equals_unfolded_and_differs_from_exact(setup):
    """With the surrogate, the folded FL VJP at x_t (always non-terminal) gives the unfolded loss; it is not the
    exact decoder's loss."""
    task, traj = setup
    base = NablaGFNOptions(fl_decoder="surrogate", beta=100.0)  # beta 1: the residuals cancel to ~1e-7 in fp32
    folded = _loss(task, traj, base)
    unfolded = _loss(task, traj, dataclasses.replace(base, fold_fl_vjp=False))
    assert_close_rel(folded, unfolded, 1e-4, "per-transition loss")
    exact = _loss(task, traj, dataclasses.replace(base, fl_decoder="exact"))
    assert float((folded - exact).abs().max()) > 0.05 * float(exact.abs().max())


@pytest.mark.parametrize("fold", [pytest.param(True, id="folded"), pytest.param(False, id="unfolded")])
def test_decoder_rows_follow_the_pass_structure(setup, fold, monkeypatch):
    """Rows decoded by each decoder in one loss call equal what the FLOP tool's structure derives."""
    from fastnabla.flops.structure import _nabla_loss, _Tally

    task, traj = setup
    counted = {"vae_decoder": 0, "fl_surrogate": 0}
    for name, attr in (("vae_decoder", "decode_raw"), ("fl_surrogate", "fl_surrogate_decode_raw")):
        original = getattr(task, attr)

        def counting(x, _name=name, _original=original):
            counted[_name] += x.shape[0]
            return _original(x)

        monkeypatch.setattr(task, attr, counting)
    opts = NablaGFNOptions(fl_decoder="surrogate", fold_fl_vjp=fold)
    batch = _batch(traj)
    nabla_gfn_loss(task, batch, opts)
    tally = _Tally()
    _nabla_loss(tally, opts, batch.step.numel(), int((batch.step == T - 1).sum()), table=False)
    assert counted == {k: tally.rows[f"{k}.forward"] for k in counted}
    assert counted["vae_decoder"] == 2  # the two terminal rows


def test_surrogate_needs_a_decoder():
    task = build_tiny_task(tiny_config(num_steps=T))
    with pytest.raises(ValueError, match="sd.fl_surrogate_decoder"):
        forward_looking_fn(task, NablaGFNOptions(fl_decoder="surrogate"))


def test_loading_errors_name_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"sd.fl_surrogate_decoder=.*missing: config.json"):
        load_fl_surrogate_decoder(str(tmp_path), torch.float32, "cpu")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not an AutoencoderTiny"):
        load_fl_surrogate_decoder(str(tmp_path), torch.float32, "cpu")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_fl_surrogate_decoder(str(tmp_path / "a" / "b" / "c"), torch.float32, "cpu")


def test_loading_round_trip(tmp_path, setup):
    task, _ = setup
    task.fl_surrogate.save_pretrained(tmp_path)
    loaded = load_fl_surrogate_decoder(str(tmp_path), torch.float32, "cpu")
    z = torch.randn(2, *task.latent_shape)
    assert torch.equal(loaded.decode(z).sample, task.fl_surrogate.decode(z).sample)
