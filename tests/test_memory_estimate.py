"""The memory estimate follows the config's checkpointing switches and batch sizes, and fits a VRAM budget
(``python -m fastnabla.flops.memory_estimate --vram-budget GB``, ``train.vram_budget_gb``).

The switches' graphs are checked against an *independent* measurement on the real tiny networks (CPU tensors): the
bytes of every storage allocated during the forward that the autograd graph still keeps alive once the forward has
returned (a ``TorchDispatchMode`` records each op's output storage by weak reference; the networks' own parameters
and the outputs are left out) -- no saved-tensor hooks, no flash-like attention, no checkpoint recording, and the
switch applied by the task builder rather than by the estimate. Tolerance: 5 % (the estimate counts attention as a
flash kernel saves it; the real CPU kernel differs by a few kB per attention layer).
"""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastnabla.flops import memory_estimate as me
from fastnabla.flops.archs import load_arch
from fastnabla.flops.cli import build_run_config

TOL = 0.05


class _LiveStorages(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                self.refs.setdefault(s._cdata, (StorageWeakRef(s), s.nbytes()))
        return out


def live_graph_bytes(fn, modules) -> int:
    """Bytes the autograd graph of ``fn()``'s output keeps alive (see the module docstring)."""
    before = {t.untyped_storage()._cdata for m in modules for t in [*m.parameters(), *m.buffers()]}
    mode = _LiveStorages()
    with mode:
        out = fn()
    tensors = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    outputs = {t.untyped_storage()._cdata for t in tensors}
    graph = [t.grad_fn for t in tensors]  # noqa: F841 -- keeps the graph alive while counting
    del out, tensors
    gc.collect()
    return sum(n for k, (ref, n) in mode.refs.items() if not ref.expired() and k not in outputs | before)


def _tiny_task(*switches: str, reward=None):
    from fastnabla.tasks.sd.build import build_sd_task

    cfg = build_run_config("tiny-sd", ["sd.num_steps=4", *[f"{me.switch_key(s)}=true" for s in switches]])
    torch.manual_seed(0)
    return cfg, build_sd_task(cfg.sd, "cpu", seed=0, **({"reward": reward} if reward else {}))


def _estimate(cfg, *switches: str, all_switches: bool = False) -> me.MemoryEstimate:
    return me.estimate(load_arch("tiny"), 32, torch.float32, cfg.sd.reward.name, dataclasses.asdict(cfg.sd.lora),
                       dataclasses.asdict(cfg.sd.flow), "sd", switches, all_switches)


def _unet_bytes(task) -> int:
    cond = task.conditions_for(["a cat", "a dog"])

    def unet_pass():
        x = torch.randn(2, *task.latent_shape, requires_grad=True)
        return task.unet(x, torch.full((2,), 500.0), encoder_hidden_states=cond["prompt_embeds"].clone())

    return live_graph_bytes(unet_pass, [task.unet])


def _decode_bytes(task, reward_model) -> int:
    def decode_pass():
        z = torch.randn(1, *task.latent_shape, requires_grad=True)
        image = task.vae.decode(z, return_dict=False)[0].float().clamp(-1, 1) / 2 + 0.5
        return reward_model.score(image, ["a cat"])

    return live_graph_bytes(decode_pass, [task.vae, reward_model])


def _close(estimated: int, measured: int) -> bool:
    return abs(estimated - measured) <= TOL * measured


def test_unet_and_vae_switches_shrink_the_estimate_as_measured_on_the_real_tiny_networks():
    cfg, _ = _tiny_task()
    est = _estimate(cfg, all_switches=True)
    off, unet_on, vae_on = est.variants[frozenset()], est.variants[frozenset({"unet"})], est.variants[
        frozenset({"vae"})]
    assert unet_on["unet_policy"] < off["unet_policy"] / 2 and unet_on["unet_pretrained"] < off["unet_pretrained"]
    assert vae_on["vae_decoder+reward"] < off["vae_decoder+reward"] / 2
    assert est.peak(2, 2, {"unet", "vae"}) < est.peak(2, 2)
    # the configured switch alone gives the same graphs as the all-combinations run
    assert _estimate(cfg, "unet").graphs == unet_on
    _, task = _tiny_task("unet")
    assert _close(unet_on["unet_policy"], _unet_bytes(task))
    _, task = _tiny_task("vae")
    assert _close(vae_on["vae_decoder+reward"], _decode_bytes(task, task.reward.model))


def test_reward_switch_shrinks_the_estimate_as_measured_on_the_real_tiny_aesthetic_reward(monkeypatch):
    from fastnabla.rewards.base import Reward
    from fastnabla.rewards.tiny import tiny_aesthetic

    def meta_tiny_aesthetic(name):
        with torch.device("meta"):
            return tiny_aesthetic().requires_grad_(False).eval()

    monkeypatch.setattr(me, "build_reward_model", meta_tiny_aesthetic)
    cfg, _ = _tiny_task()
    est = _estimate(cfg, all_switches=True)
    off, on = est.variants[frozenset()], est.variants[frozenset({"reward"})]
    assert on["vae_decoder+reward"] < off["vae_decoder+reward"]
    _, task = _tiny_task("reward", reward=Reward(tiny_aesthetic()))
    model = task.reward.model.requires_grad_(False).eval()
    assert _close(on["vae_decoder+reward"], _decode_bytes(task, model))


def test_an_analytic_reward_has_no_reward_switch_in_the_budget_choices():
    cfg, _ = _tiny_task()
    est = _estimate(cfg, all_switches=True)
    assert "reward" not in est.available and {"unet", "vae"} <= est.available
    with pytest.raises(ValueError, match="reward_gradient_checkpointing"):
        _estimate(cfg, "reward")


def _synthetic() -> me.MemoryEstimate:
    """Weights 10; per latent: UNet pair 8 (2 with the UNet switch), flow 1; decode 6 per image (3 with the VAE
    switch, 5 with the reward switch, 2 with both)."""
    variants = {}
    for unet in (False, True):
        for vae in (False, True):
            for reward in (False, True):
                key = frozenset(n for n, on in (("unet", unet), ("vae", vae), ("reward", reward)) if on)
                decode = {(False, False): 6, (True, False): 3, (False, True): 5, (True, True): 2}[(vae, reward)]
                variants[key] = {"unet_policy": 1 if unet else 4, "unet_pretrained": 1 if unet else 4,
                                 "vae_decoder+reward": decode, "flow": 0.5}
    return me.MemoryEstimate({"all": 10}, variants)


def test_budget_chooser_picks_the_cheapest_fitting_settings_of_a_synthetic_case():
    est = _synthetic()
    # micro 4, fl 4: UNet phase 4 * 9 = 36, decode phase 4 * 6 = 24 -> peak 46
    assert est.peak(4, 4) == 46
    assert me.fit_budget(est, 46, 4, 4).cost == 0
    # 40: the UNet switch (UNet phase 4 * 3 = 12, decode 24 -> 34, cost 3) or micro 2 (18 vs 24 -> 34, cost 2)
    choice = me.fit_budget(est, 40, 4, 4)
    assert (choice.switches, choice.micro_batch, choice.fl_batch, choice.peak) == (frozenset(), 2, 4, 34)
    assert choice.overrides(est, 4, 4) == "train.micro_batch_size=2"
    # 26: needs both phases down: decode <= 16 and UNet <= 16
    choice = me.fit_budget(est, 26, 4, 4)
    assert choice.peak <= 26
    cheapest = min(
        sum(me.SWITCH_COST[s] for s in w) + me.BATCH_HALVING_COST * (km + kf)
        for w in est.variants for m, km in me._halvings(4) for f, kf in me._halvings(4) if est.peak(m, f, w) <= 26)
    assert choice.cost == cheapest
    # 12 < weights 10 + everything on at batch 1 (max(3, 2) = 3): nothing fits
    assert me.fit_budget(est, 12, 4, 4) is None
    assert "nothing does" in me.budget_verdict(est, 12 / me.GiB, 4, 4)
    # an already configured switch stays on
    est.switches = frozenset({"unet"})
    assert "unet" in me.fit_budget(est, 40, 4, 4).switches


def test_cli_prints_the_override_line_that_fits_the_budget(capsys):
    base = ["train.micro_batch_size=4", "train.fl_batch_size=4"]
    est, _, _ = me.estimate_for_config(build_run_config("tiny-sd", base), frozen=torch.float32, all_switches=True)
    budget = (est.peak(4, 4) + est.peak(4, 4, {"unet", "vae"})) / 2 / me.GiB  # fits with some switch, not without
    assert me.main(["--preset", "tiny-sd", "--dtype", "fp32", "--vram-budget", repr(budget), *base]) == 0
    out = capsys.readouterr().out
    assert "memory ESTIMATE of tiny-sd" in out and "peak at micro_batch_size=4, fl_batch_size=4" in out
    line = next(x for x in out.splitlines() if "budget:" in x)
    assert "does NOT fit" in line and "to fit" in line
    overrides = line.split("): ")[-1].split()
    assert overrides and all(o.split("=")[0] in (*map(me.switch_key, me.SWITCHES), "train.micro_batch_size",
                                                 "train.fl_batch_size") for o in overrides)
    cfg = build_run_config("tiny-sd", [*base, *overrides])  # the pasted overrides fit
    est, _, _ = me.estimate_for_config(cfg, frozen=torch.float32)
    assert est.peak(me.configured_micro_batch(cfg), cfg.train.fl_batch_size) <= budget * me.GiB
    assert me.main(["--preset", "tiny-sd", "--dtype", "fp32", "--vram-budget", "1e-9", *base]) == 0
    assert "nothing does" in capsys.readouterr().out


def test_startup_line_states_the_estimate_and_the_verdict():
    cfg = build_run_config("tiny-sd", ["train.micro_batch_size=2", "train.vram_budget_gb=100"])
    line = me.startup_line(cfg, cuda=False)
    assert line.startswith("memory estimate: ") and "micro_batch_size=2" in line and "fits the 100 GiB budget" in line
    cfg = build_run_config("tiny-sd", ["train.micro_batch_size=0", "train.batch_size=8", "sd.num_steps=10",
                                       "train.transition_fraction=0.2", "train.updates_per_batch=1"])
    assert me.configured_micro_batch(cfg) == 8 * 3  # 2 subsampled steps + the terminal, one micro-batch per update


def test_a_run_prints_the_estimate_when_asked_and_a_failing_estimate_only_warns(monkeypatch, capsys):
    from fastnabla.train import print_memory_estimate
    from fastnabla.training.distributed import DistContext

    cfg = build_run_config("tiny-sd", ["train.micro_batch_size=2"])
    cfg.name = "t"
    print_memory_estimate(cfg, DistContext())  # CPU, no budget: a few seconds saved, nothing printed
    assert "memory estimate" not in capsys.readouterr().err
    cfg.train.vram_budget_gb = 100.0
    print_memory_estimate(cfg, DistContext())
    assert "t: memory estimate: " in capsys.readouterr().err

    def broken(*args, **kwargs):
        raise RuntimeError("no meta kernel")

    monkeypatch.setattr(me, "startup_line", broken)
    print_memory_estimate(cfg, DistContext())
    assert "warning: no memory estimate (RuntimeError: no meta kernel)" in capsys.readouterr().err
