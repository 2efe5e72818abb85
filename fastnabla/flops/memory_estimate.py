"""A memory *estimate* of one training micro-step of a Stable Diffusion / SDXL run, from the shipped architecture
configs on the meta device (no weights, no GPU): ``python -m fastnabla.flops.memory_estimate --preset
sdxl-aesthetic``.

What it adds up (bytes; docs/stable-diffusion.md, "SDXL", quotes its output):

* **weights**: every frozen network in the frozen dtype (the VAE in fp32 where ``vae_dtype_for`` upcasts it), the
  reward model in fp32, and the trained LoRA and flow weights in fp32 with their gradient and AdamW's two moments
  (16 bytes per trained parameter);
* **graphs**: the bytes autograd saves for the backward pass (``torch.autograd.graph.saved_tensors_hooks``) in
  the forward of one latent through (a) the policy UNet's CFG pair with LoRA and input gradients, (b) the
  pretrained UNet's CFG pair with input gradients, (c) the VAE decoder + reward with input gradients (the
  forward-looking decode-VJP of one image), (d) the flow network with parameter gradients.

The ``sd.memory.*_gradient_checkpointing`` switches that are on are applied to the meta modules as the task applies
them (diffusers' ``enable_gradient_checkpointing``, :func:`fastnabla.rewards.checkpointing.checkpoint_reward_blocks`);
a checkpointed region keeps only its inputs, and those are what is counted. The graphs scale with
``train.micro_batch_size`` (UNet and flow) and ``train.fl_batch_size`` (decode-VJP). ``--vram-budget GB`` (or
``train.vram_budget_gb``) says whether the run fits and, if not, the cheapest extra switches / halved batches that do
(:func:`fit_budget`), as overrides to paste; ``python -m fastnabla.train`` prints :func:`startup_line` before an sd run
on CUDA or when a budget is set (docs/training.md, "Memory estimate and a VRAM budget").

Attention is counted as a flash / memory-efficient kernel saves it (queries, keys, values, output and one
log-sum-exp per row), not as the meta device's math path (which would save the full attention matrix); a saved
tensor object is counted once, parameters (and views of them) only as weights. Not counted: temporaries freed
within the forward, the backward pass's own transient buffers, the CUDA context and allocator fragmentation
(typically a few GiB on top): hence an estimate.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import math
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from fastnabla.flops.archs import ArchSpec, build_reward_model, build_text_encoder, build_unet, build_vae

GiB = 2**30


class _FlashLikeAttention(torch.autograd.Function):
    """SDPA whose saved tensors are what a flash kernel keeps: q, k, v, out and the row log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, kwargs):  # noqa: D102
        with torch.no_grad():
            out = _SDPA(q, k, v, **kwargs)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102 -- never run: the estimate only counts what the forward saves
        raise NotImplementedError


_SDPA = torch.nn.functional.scaled_dot_product_attention


@contextlib.contextmanager
def flash_like_attention() -> Iterator[None]:
    """``F.scaled_dot_product_attention`` replaced by :class:`_FlashLikeAttention` inside the block."""

    def sdpa(q, k, v, **kwargs):
        return _FlashLikeAttention.apply(q, k, v, kwargs)

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = _SDPA


_SEEN: list[dict[int, torch.Tensor]] = []  # the tensors counted by the innermost saved_bytes call
_CHECKPOINT_GENERATOR = torch.utils.checkpoint._checkpoint_without_reentrant_generator


def _is_weight(t: torch.Tensor) -> bool:
    """A parameter or a view of one (a linear layer saves ``weight.t()``): counted in the weights, not the graph."""
    return isinstance(t._base if t._base is not None else t, nn.Parameter)


def _recording_generator(fn, preserve_rng_state=True, *args, **kwargs):
    """torch's non-reentrant checkpoint keeps each region's *inputs* alive (not through a saved-tensor hook) and hides
    the region's saved tensors behind its own hooks: count those inputs; on the meta device skip the RNG capture."""
    leaves = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if _SEEN:
        for t in leaves:
            if not _is_weight(t):
                _SEEN[-1].setdefault(id(t), t)
    if any(t.is_meta for t in leaves):
        preserve_rng_state = False
    return _CHECKPOINT_GENERATOR(fn, preserve_rng_state, *args, **kwargs)


def saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the tensors autograd saves while ``fn`` runs (each tensor object once), flash-like attention; inside a
    gradient-checkpointed region (non-reentrant ``torch.utils.checkpoint``, as diffusers' and the reward's switches
    use) only the region's inputs, which is what checkpointing keeps. Parameters (and views of them) are left out:
    they are the weights."""
    seen: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not _is_weight(t):
            seen.setdefault(id(t), t)
        return t

    _SEEN.append(seen)
    torch.utils.checkpoint._checkpoint_without_reentrant_generator = _recording_generator
    try:
        with flash_like_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
    finally:
        _SEEN.pop()
        if not _SEEN:
            torch.utils.checkpoint._checkpoint_without_reentrant_generator = _CHECKPOINT_GENERATOR
    return sum(t.numel() * t.element_size() for t in seen.values())


def _bytes(module: nn.Module, dtype: torch.dtype | None = None) -> int:
    return sum(p.numel() * (dtype.itemsize if dtype else p.element_size()) for p in module.parameters())


SWITCHES = ("unet", "vae", "reward")  # sd.memory.<name>_gradient_checkpointing
SWITCH_COST = {"reward": 1, "vae": 2, "unet": 3}  # recomputed forward, smallest first (the budget's order of choice)
BATCH_HALVING_COST = 2  # a halved micro-batch (or fl_batch): more, smaller calls


def switch_key(name: str) -> str:
    return f"sd.memory.{name}_gradient_checkpointing"


@dataclasses.dataclass
class MemoryEstimate:
    """Bytes by part: ``weights``, and ``variants``: the graphs (one latent / one image each, see the module
    docstring) for each set of checkpointing switches measured; ``switches``: the configured set (``graphs``)."""

    weights: dict[str, int]
    variants: dict[frozenset[str], dict[str, int]]
    switches: frozenset[str] = frozenset()

    @property
    def graphs(self) -> dict[str, int]:
        return self.variants[self.switches]

    @property
    def available(self) -> frozenset[str]:
        return frozenset().union(*self.variants)

    def peak(self, micro_batch: int, fl_batch: int, switches: frozenset[str] | None = None) -> int:
        """Weights + the larger of the two phases a trained micro-batch runs one after the other: the policy and
        pretrained UNet graphs + flow graphs of ``micro_batch`` latents, or the decode-VJP graphs of ``fl_batch``
        images (the forward-looking precomputation); with the graphs of ``switches`` (default: the configured).
        With ``method.fl_decoder=surrogate`` the decode graphs are still the exact decoder's: the bound for a
        forward-looking batch whose rows are all terminal (the surrogate's rows run in a separate, smaller call)."""
        g = self.variants[self.switches if switches is None else frozenset(switches)]
        unet = micro_batch * (g["unet_policy"] + g["unet_pretrained"] + 2 * g["flow"])
        return sum(self.weights.values()) + max(unet, fl_batch * g["vae_decoder+reward"])


@dataclasses.dataclass
class BudgetChoice:
    """The cheapest settings that fit a budget (``None`` fields of :func:`fit_budget` mean nothing fits)."""

    switches: frozenset[str]
    micro_batch: int
    fl_batch: int
    peak: int
    cost: int

    def overrides(self, est: MemoryEstimate, micro_batch: int, fl_batch: int) -> str:
        """The changes from the configured run, as ``key=value`` overrides to paste (empty: none needed)."""
        out = [f"{switch_key(s)}=true" for s in SWITCHES if s in self.switches and s not in est.switches]
        if self.micro_batch != micro_batch:
            out.append(f"train.micro_batch_size={self.micro_batch}")
        if self.fl_batch != fl_batch:
            out.append(f"train.fl_batch_size={self.fl_batch}")
        return " ".join(out)


def _halvings(n: int) -> list[tuple[int, int]]:
    out, k = [(n, 0)], 0
    while n > 1:
        n, k = (n + 1) // 2, k + 1
        out.append((n, k))
    return out


def fit_budget(est: MemoryEstimate, budget_bytes: float, micro_batch: int, fl_batch: int) -> BudgetChoice | None:
    """The cheapest way to fit ``budget_bytes``: the configured switches plus any of the others (each costing
    :data:`SWITCH_COST`: the recomputed forward, reward < VAE < UNet) and halved micro- / fl-batches
    (:data:`BATCH_HALVING_COST` each); ties go to the smaller peak. ``None`` when even everything on at batch 1
    does not fit."""
    best: BudgetChoice | None = None
    for switches in est.variants:
        if not est.switches <= switches:
            continue
        for m, km in _halvings(micro_batch):
            for f, kf in _halvings(fl_batch):
                peak = est.peak(m, f, switches)
                if peak > budget_bytes:
                    continue
                cost = sum(SWITCH_COST[s] for s in switches - est.switches) + BATCH_HALVING_COST * (km + kf)
                if best is None or (cost, peak) < (best.cost, best.peak):
                    best = BudgetChoice(switches, m, f, peak, cost)
    return best


def estimate(arch: ArchSpec, resolution: int, frozen: torch.dtype, reward: str, lora: dict[str, Any],
             flow: dict[str, Any], family: str, switches: Any = (), all_switches: bool = False) -> MemoryEstimate:
    """The :class:`MemoryEstimate` of ``arch`` at ``resolution`` px with ``frozen`` weights (meta device), with the
    checkpointing ``switches`` (names in :data:`SWITCHES`) really applied to the meta modules; ``all_switches``:
    measure every combination too (for :func:`fit_budget`)."""
    from fastnabla.rewards.checkpointing import checkpoint_reward_blocks
    from fastnabla.tasks.sd.config import FlowNetConfig, LoRAConfig
    from fastnabla.tasks.sd.flow_net import build_flow_net
    from fastnabla.tasks.sd.loading import vae_dtype_for
    from fastnabla.tasks.sd.lora import adapters_disabled, add_lora, lora_layers
    from fastnabla.tasks.sd.switches import enable_unet_checkpointing, enable_vae_decoder_checkpointing

    switches = frozenset(switches)
    if unknown := switches - set(SWITCHES):
        raise ValueError(f"unknown checkpointing switches {sorted(unknown)}: use {SWITCHES}")
    shape = arch.latent_shape(resolution)
    unet = build_unet(arch).to(frozen)
    add_lora(unet, LoRAConfig(**lora))
    trained = [p for p in unet.parameters() if p.requires_grad]
    vae = build_vae(arch)
    vae.to(vae_dtype_for(frozen, arch.vae, family))
    with torch.device("meta"):
        flow_net = build_flow_net(FlowNetConfig(**flow), shape[0], shape[1], arch.text_width)
    model = build_reward_model(reward)
    encoders = [build_text_encoder(c) for c in arch.text_encoders]
    trained_bytes = 16 * (sum(p.numel() for p in trained) + sum(p.numel() for p in flow_net.parameters()))
    weights = {
        "unet": _bytes(unet) - sum(p.numel() * p.element_size() for p in trained),
        "vae": _bytes(vae), "text_encoders": sum(_bytes(e, frozen) for e in encoders), "reward": _bytes(model),
        "trained (LoRA + flow, fp32 + grad + AdamW)": trained_bytes,
    }
    meta = {"device": "meta"}
    rows = 2  # the CFG pair
    embeds = torch.randn(rows, arch.text_length, arch.text_width, dtype=frozen, **meta)
    added = None
    if arch.unet.get("addition_embed_type") == "text_time":
        pooled = int(arch.unet["projection_class_embeddings_input_dim"]) - 6 * int(arch.unet["addition_time_embed_dim"])
        added = {"text_embeds": torch.randn(rows, pooled, dtype=frozen, **meta),
                 "time_ids": torch.randn(rows, 6, dtype=frozen, **meta)}

    def unet_pass() -> None:
        x = torch.randn(rows, *shape, dtype=frozen, requires_grad=True, **meta)
        unet(x, torch.full((rows,), 500.0, **meta), encoder_hidden_states=embeds, added_cond_kwargs=added)

    def pretrained_pass() -> None:
        with adapters_disabled(lora_layers(unet)):
            unet_pass()

    def decode_graph(vae_ck: bool, reward_ck: bool) -> int | None:
        """Fresh meta VAE and reward (a switch cannot be undone); ``None``: the reward has no blocks to checkpoint."""
        decoder = vae
        if vae_ck or reward_ck:
            from diffusers.utils import logging as diffusers_logging

            level = diffusers_logging.get_verbosity()
            diffusers_logging.set_verbosity_error()  # the rebuilt VAE's cast warning was printed once already
            try:
                decoder = build_vae(arch).to(vae.dtype)
            finally:
                diffusers_logging.set_verbosity(level)
        scorer = build_reward_model(reward) if vae_ck or reward_ck else model
        if vae_ck:
            enable_vae_decoder_checkpointing(decoder)
        if reward_ck:
            try:
                checkpoint_reward_blocks(scorer, switch_key("reward"))
            except ValueError:
                if "reward" in switches:
                    raise
                return None

        def decode_pass() -> None:
            z = torch.randn(1, *shape, dtype=decoder.dtype, requires_grad=True, **meta)
            image = decoder.decode(z, return_dict=False)[0].float().clamp(-1, 1) / 2 + 0.5
            scorer.score(image, ["a photo of a cat"])

        return saved_bytes(decode_pass)

    def flow_pass() -> None:
        x = torch.randn(1, *shape, **meta)
        flow_net(x, torch.full((1,), 500.0, **meta), encoder_hidden_states=embeds[:1].float())

    wanted = [switches]
    if all_switches:
        wanted = [frozenset(s for s, on in zip(SWITCHES, bits, strict=True) if on)
                  for bits in itertools.product((False, True), repeat=len(SWITCHES))]
    flow_bytes = saved_bytes(flow_pass)
    unet_by = {}
    for on in (False, True):  # off first: diffusers' switch is not undone
        if any(("unet" in w) == on for w in wanted):
            if on:
                enable_unet_checkpointing(unet, lora_layers(unet))
            unet_by[on] = saved_bytes(unet_pass), saved_bytes(pretrained_pass)
    decode_by = {key: decode_graph(*key) for key in sorted({("vae" in w, "reward" in w) for w in wanted})}
    variants = {}
    for w in wanted:
        decode = decode_by[("vae" in w, "reward" in w)]
        if decode is not None:
            policy, pretrained = unet_by["unet" in w]
            variants[w] = {"unet_policy": policy, "unet_pretrained": pretrained, "vae_decoder+reward": decode,
                           "flow": flow_bytes}
    return MemoryEstimate(weights, variants, switches)


def configured_switches(cfg: Any) -> frozenset[str]:
    """The checkpointing switches ``cfg.sd.memory`` turns on."""
    return frozenset(s for s in SWITCHES if getattr(cfg.sd.memory, f"{s}_gradient_checkpointing"))


def configured_micro_batch(cfg: Any, world: int = 1) -> int:
    """Transitions per forward/backward: ``train.micro_batch_size``, or with 0 (one micro-batch per update) this
    process's share of an update: batch x replayed batches x kept steps per trajectory / updates (rounded up)."""
    t = cfg.train
    if t.micro_batch_size:
        return int(t.micro_batch_size)
    num_steps = int(cfg.sd.num_steps)  # as training.trajectories.stratified_steps
    steps = num_steps if t.transition_fraction >= 1 or num_steps == 1 else max(
        1, min(num_steps - 1, round(t.transition_fraction * num_steps))) + 1
    return max(1, math.ceil(t.batch_size * t.replay_batches * steps / t.updates_per_batch / world))


def frozen_dtype_of(cfg: Any, cuda: bool) -> torch.dtype:
    name = cfg.sd.frozen_dtype if cfg.sd.frozen_dtype != "auto" else ("bf16" if cuda else "fp32")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def estimate_for_config(cfg: Any, arch_name: str | None = None, frozen: torch.dtype | None = None,
                        all_switches: bool = False) -> tuple[MemoryEstimate, ArchSpec, int]:
    """The estimate of run config ``cfg`` (its ``sd.memory`` switches applied), its architecture and resolution."""
    from fastnabla.flops.archs import arch_for_model, load_arch

    arch = load_arch(arch_name or arch_for_model(cfg.sd.model))
    resolution = int(cfg.sd.resolution or arch.default_resolution)
    family = "sdxl" if arch.unet.get("addition_embed_type") == "text_time" else "sd"
    est = estimate(arch, resolution, frozen or frozen_dtype_of(cfg, True), cfg.sd.reward.name,
                   dataclasses.asdict(cfg.sd.lora), dataclasses.asdict(cfg.sd.flow), family,
                   configured_switches(cfg), all_switches)
    return est, arch, resolution


def _gib(n: float) -> str:
    return f"{n / GiB:.1f}" if n >= GiB else f"{n / GiB:.3g}"


def budget_verdict(est: MemoryEstimate, budget_gb: float, micro: int, fl: int) -> str:
    """One sentence: fits, or the override line that makes it fit, or that nothing does."""
    peak = est.peak(micro, fl)
    if peak <= budget_gb * GiB:
        return f"fits the {budget_gb:g} GiB budget"
    choice = fit_budget(est, budget_gb * GiB, micro, fl)
    if choice is None:
        floor = min(est.peak(1, 1, w) for w in est.variants if est.switches <= w)
        return (f"does NOT fit the {budget_gb:g} GiB budget, and nothing does: every checkpointing switch on at "
                f"micro_batch_size=1, fl_batch_size=1 still needs {_gib(floor)} GiB")
    return (f"does NOT fit the {budget_gb:g} GiB budget; to fit ({_gib(choice.peak)} GiB): "
            f"{choice.overrides(est, micro, fl)}")


def startup_line(cfg: Any, cuda: bool, world: int = 1) -> str:
    """The line ``python -m fastnabla.train`` prints before an sd run (the estimate, and the budget verdict when
    ``train.vram_budget_gb`` is set)."""
    budget = float(getattr(cfg.train, "vram_budget_gb", 0) or 0)
    est, arch, resolution = estimate_for_config(cfg, frozen=frozen_dtype_of(cfg, cuda), all_switches=budget > 0)
    micro, fl = configured_micro_batch(cfg, world), int(cfg.train.fl_batch_size)
    on = ", ".join(switch_key(s) for s in SWITCHES if s in est.switches) or "no checkpointing"
    line = (f"memory estimate: {_gib(est.peak(micro, fl))} GiB per GPU ({arch.name}, {resolution} px, "
            f"micro_batch_size={micro}, fl_batch_size={fl}, {on}; + CUDA context and fragmentation)")
    return line + ("; " + budget_verdict(est, budget, micro, fl) if budget > 0 else "")


def main(argv: list[str] | None = None) -> int:
    from fastnabla.config.fields import ConfigError
    from fastnabla.flops.cli import build_run_config

    parser = argparse.ArgumentParser(prog="python -m fastnabla.flops.memory_estimate", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sdxl-aesthetic")
    parser.add_argument("--arch", metavar="ARCH", help="sd15 | sdxl | tiny | tiny-sdxl | a local diffusers pipeline "
                        "directory (default: from sd.model)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="frozen dtype (default: sd.frozen_dtype, "
                        "'auto' counted as on CUDA: bf16)")
    parser.add_argument("--vram-budget", type=float, metavar="GB", help="say whether the run fits GB GiB per GPU, "
                        "and if not the cheapest switches / micro-batch that do, as overrides to paste")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = parser.parse_args(argv)
    try:
        cfg = build_run_config(args.preset, args.overrides)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype] \
            if args.dtype else frozen_dtype_of(cfg, True)
        budget = args.vram_budget if args.vram_budget is not None else float(cfg.train.vram_budget_gb or 0)
        est, arch, resolution = estimate_for_config(cfg, args.arch, dtype, all_switches=budget > 0)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    micro, fl = configured_micro_batch(cfg), int(cfg.train.fl_batch_size)
    on = ", ".join(switch_key(s) for s in SWITCHES if s in est.switches) or "none"
    print(f"memory ESTIMATE of {args.preset} ({arch.name}, {resolution} px, frozen {str(dtype)[6:]}, "
          f"checkpointing: {on}); GiB")
    for name, value in est.weights.items():
        print(f"  weights  {name:45s} {value / GiB:8.2f}")
    for name, value in est.graphs.items():
        print(f"  graph    {name + ' (one latent)':45s} {value / GiB:8.2f}")
    print(f"  peak at micro_batch_size={micro}, fl_batch_size={fl}: {_gib(est.peak(micro, fl))} "
          "(+ CUDA context, transient buffers, fragmentation)")
    if budget > 0:
        print(f"  budget: {budget_verdict(est, budget, micro, fl)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
