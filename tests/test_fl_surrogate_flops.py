"""The FLOP tool counts the forward-looking surrogate decoder (``method.fl_decoder=surrogate``): per-pass counts on
the meta device equal the real tiny decoder's on CPU, TAESD's count equals its convolutions in closed form, and the
exact decoder runs on terminal rows only."""

from __future__ import annotations

import pytest
import torch
from flops_common import tiny_run_config

from fastnabla.flops.archs import fl_surrogate_config, load_arch, load_config
from fastnabla.flops.counting import CountSetup, count_flops, network_pass_flops
from fastnabla.flops.report import count_setup, flop_report
from fastnabla.tasks.sd.loading import build_tiny_fl_surrogate, tiny_fl_surrogate_config

# a run names its surrogate; the counter reads no hub (tiny: the tiny surrogate, sd15: TAESD's shipped config)
SURROGATE = ["method.fl_decoder=surrogate", "sd.fl_surrogate_decoder=madebyollin/taesd"]


def test_meta_counts_equal_the_real_tiny_surrogate_on_cpu():
    from fastnabla.tasks.sd.build import build_sd_task

    cfg = tiny_run_config()
    task = build_sd_task(cfg.sd, "cpu", seed=0)
    task.set_fl_surrogate(build_tiny_fl_surrogate(task.vae.config))
    z = torch.randn(2, *task.latent_shape, requires_grad=True)  # 2 rows: the meta counts are per row
    holder = {}
    real = {"forward": count_flops(lambda: holder.setdefault("img", task.fl_surrogate_decode_raw(z)))}
    img = holder["img"]
    real["input_vjp"] = count_flops(lambda: torch.autograd.grad(img, z, torch.randn_like(img)))
    setup = count_setup(tiny_run_config(*SURROGATE), load_arch("tiny"), task.resolution)
    assert setup.fl_surrogate == tiny_fl_surrogate_config(task.vae.config)
    meta = network_pass_flops(setup, "fl_surrogate", set(real))
    assert all(v > 0 for v in real.values()) and meta == {k: v // 2 for k, v in real.items()}


def _taesd_decoder_flops(side: int) -> int:
    """TAESD's decoder in closed form: ``2 * 9 * C_in * C_out * H * W`` per 3x3 convolution (taesd.py: conv 4 -> 64,
    then per level its blocks of three 64 -> 64 convolutions, an x2 upsampling and a 64 -> 64 convolution; the last
    level's 64 -> 3)."""
    total, hw = 2 * 9 * 4 * 64 * side * side, side * side
    for level, blocks in enumerate((3, 3, 3, 1)):
        total += blocks * 3 * 2 * 9 * 64 * 64 * hw
        if level < 3:
            hw *= 4
            total += 2 * 9 * 64 * 64 * hw
    return total + 2 * 9 * 64 * 3 * hw


def test_taesd_count_is_its_convolutions_in_closed_form():
    arch = load_arch("sd15")
    config = fl_surrogate_config(arch, "madebyollin/taesd")
    assert config == load_config("sd15/taesd.json") and config["_source"].startswith("https://")
    setup = CountSetup(arch, 512, "brightness", {}, fl_surrogate=config)
    counts = network_pass_flops(setup, "fl_surrogate", {"forward"})
    assert counts["forward"] == _taesd_decoder_flops(64)
    vae = network_pass_flops(setup, "vae_decoder", {"forward"})["forward"]
    assert vae / counts["forward"] > 15  # why it is the cheap decoder: SD's VAE decoder is ~18x TAESD's


def test_only_terminal_rows_use_the_exact_decoder():
    exact = flop_report(tiny_run_config(), "tiny", release=False)
    surrogate = flop_report(tiny_run_config(*SURROGATE), "tiny", release=False)
    p, q = exact["passes"], surrogate["passes"]
    for kind in ("forward", "input_vjp"):
        assert q[f"vae_decoder.{kind}"] + q[f"fl_surrogate.{kind}"] == pytest.approx(p[f"vae_decoder.{kind}"])
    # the tiny plan: 3 of 4 steps per trajectory trained, one ending at x_T; K smoothing draws per decoded state
    k = tiny_run_config().method.fl_num_noise
    assert k == 3 and q["vae_decoder.forward"] == pytest.approx(k / 3)
    assert q["fl_surrogate.forward"] == pytest.approx(k * (2 - 1 / 3))
    rows = surrogate["gflops_per_row"]
    assert surrogate["phases"]["fl_surrogate_forward"] == pytest.approx(
        q["fl_surrogate.forward"] * rows["fl_surrogate.forward"] / 1000)
    assert {k: v for k, v in q.items() if "decoder" not in k and "surrogate" not in k} == {
        k: v for k, v in p.items() if "decoder" not in k}


def test_sd15_surrogate_cuts_the_decoder_work():
    exact = flop_report(tiny_run_config(), "sd15", 512, release=False)
    surrogate = flop_report(tiny_run_config(*SURROGATE), "sd15", 512, release=False)
    vae = exact["phases"]["vae_decoder_forward"] + exact["phases"]["vae_decoder_backward"]
    cheap = sum(surrogate["phases"].get(k, 0.0) for k in ("vae_decoder_forward", "vae_decoder_backward",
                                                           "fl_surrogate_forward", "fl_surrogate_backward"))
    assert cheap < vae / 2.5  # 1 of 6 decodes stays exact, the other 5 cost ~1/18
