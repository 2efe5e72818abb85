"""Configuration of the Stable Diffusion task (nested by the run config as ``RunConfig.sd``).

Every field has a default (the paper's / the authors' release settings, DESIGN.md section 1) and
help text; :meth:`SDConfig.validate` raises a ``ValueError`` naming the offending field
(``sd.lora.rank``). Runtime-dependent checks (a CUDA-only switch on a CPU run, an unknown reward
name, a missing model directory) happen when the task is built and name the field the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

SAMPLERS = ("ddim", "ddpm")
FROZEN_DTYPES = ("auto", "bf16", "fp16", "fp32")
STORAGE_DTYPES = ("fp32", "bf16", "fp16")
ATTENTION_BACKENDS = ("sdpa", "xformers", "classic")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
REWARD_TRANSFORMS = ("auto", "log", "exp")
TINY_MODEL = "tiny"
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _help(text: str, **kw) -> dict:
    return {"metadata": {"help": text}, **kw}


def torch_dtype(name: str, field_name: str = "dtype") -> torch.dtype:
    """``"bf16" | "fp16" | "fp32"`` -> the torch dtype (a ``ValueError`` naming ``field_name`` otherwise)."""
    if name not in _DTYPES:
        raise ValueError(f"{field_name}={name!r} is not one of {tuple(_DTYPES)}")
    return _DTYPES[name]


def frozen_dtype_for(name: str, device: torch.device) -> torch.dtype:
    """Dtype of the frozen weights: ``auto`` is bf16 on CUDA and fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch_dtype(name, "sd.frozen_dtype")


@dataclass
class LoRAConfig:
    """The LoRA adapters of the fine-tuned UNet (peft)."""

    rank: int = field(default=8, **_help("LoRA rank r"))
    alpha: float = field(default=8.0, **_help("LoRA alpha (the update is scaled by alpha / rank)"))
    target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        **_help("UNet module names (suffixes) that get adapters"),
    )
    dropout: float = field(default=0.0, **_help("LoRA dropout (0: the policy is deterministic given x)"))


@dataclass
class FlowNetConfig:
    """The flow network g_phi: a small prompt-conditioned UNet2DConditionModel (release defaults)."""

    block_out_channels: list[int] = field(
        default_factory=lambda: [64, 128, 256, 256], **_help("channels per resolution level")
    )
    layers_per_block: int = field(default=1, **_help("ResNet layers per block"))
    attention_head_dim: int = field(default=8, **_help("attention head dimension (diffusers' argument)"))
    norm_num_groups: int = field(default=32, **_help("GroupNorm groups (must divide every channel count)"))
    output_init_scale: float = field(
        default=1e-3,
        **_help("the last conv's default-initialised weights are multiplied by this and its bias zeroed: "
                "'tiny weights in the final output layer' (paper section 4.3), a near-zero but already "
                "prompt-dependent flow; 0 gives an exactly zero flow at initialisation"),
    )


@dataclass
class PromptConfig:
    """Where training and evaluation prompts come from."""

    source: str = field(
        default="animals",
        **_help("'animals' (the 45 simple animal prompts of DDPO) or a text file with one prompt per line"),
    )
    eval_prompts: list[str] = field(
        default_factory=list, **_help("fixed evaluation prompts for image grids (empty: the first 4 prompts)")
    )
    eval_seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2, 3], **_help("fixed seeds of the evaluation grid, one row per seed")
    )


@dataclass
class SDRewardConfig:
    """The reward, built by ``fastnabla.rewards.build_reward``; scored with each sample's own prompt."""

    name: str = field(default="aesthetic", **_help("reward registry name (e.g. aesthetic, color-target)"))
    options: dict[str, Any] = field(default_factory=dict, **_help("keyword options of the reward builder"))
    transform: str = field(
        default="auto",
        **_help(f"one of {REWARD_TRANSFORMS}: log R = log(score) ('log'), scale*(score-shift) ('exp'); "
                "'auto' picks 'log' for positive rewards"),
    )
    scale: float = field(default=1.0, **_help("'exp' transform: log R = scale * (score - shift)"))
    shift: float = field(default=0.0, **_help("'exp' transform: score offset"))
    chunk_size: int = field(default=0, **_help("images per reward call (0: the whole batch at once)"))


@dataclass
class SpeedConfig:
    """Speed switches (their measured effects are in docs/stable-diffusion.md)."""

    attention: str = field(
        default="sdpa",
        **_help(f"attention backend, one of {ATTENTION_BACKENDS}: PyTorch scaled_dot_product_attention, "
                "xformers (installed + CUDA only) or diffusers' classic matmul-softmax processor"),
    )
    compile_unet: bool = field(default=False, **_help("torch.compile the (LoRA) UNet"))
    compile_vae_decoder: bool = field(default=False, **_help("torch.compile the VAE decoder"))
    compile_flow: bool = field(default=False, **_help("torch.compile the flow network"))
    compile_mode: str = field(default="default", **_help(f"torch.compile mode, one of {COMPILE_MODES}"))
    cuda_graphs: bool = field(
        default=False,
        **_help("capture the no-grad sampling UNet call in CUDA graphs (torch.compile mode='reduce-overhead'); "
                "CUDA only: an error on other devices"),
    )
    channels_last: bool = field(default=False, **_help("channels_last memory format for UNet, VAE and flow"))
    tf32: bool = field(default=True, **_help("allow TF32 matmuls/convolutions for fp32 work (CUDA only; no-op on CPU)"))
    autocast_bf16: bool = field(default=False, **_help("run UNet and flow forwards under bf16 autocast"))
    vae_slicing: bool = field(default=False, **_help("decode one image at a time (less memory, slower)"))


@dataclass
class SDConfig:
    """The Stable Diffusion task: model, LoRA policy, flow network, sampler, prompts, reward, speed."""

    model: str = field(
        default=DEFAULT_MODEL,
        **_help("a local diffusers pipeline directory, a hub id (needs a hub; HF_HUB_OFFLINE is respected), or "
                "'tiny' for the built-in tiny random pipeline"),
    )
    revision: str = field(default="", **_help("hub revision (branch, tag or commit); empty: the default"))
    variant: str = field(default="", **_help("weight variant, e.g. 'fp16' (diffusion_pytorch_model.fp16.*)"))
    tiny_seed: int = field(default=0, **_help("seed of the tiny pipeline's random weights (model: tiny)"))
    tiny_cache_dir: str = field(
        default="", **_help("directory the tiny pipeline is saved to once and loaded from (empty: in memory)")
    )
    frozen_dtype: str = field(
        default="auto", **_help(f"dtype of UNet base, VAE and text encoder, one of {FROZEN_DTYPES} (auto: bf16 on "
                                "CUDA, fp32 on CPU); LoRA, flow and reward are always fp32")
    )
    guidance_scale: float = field(default=5.0, **_help("classifier-free guidance w: eps_u + w (eps_c - eps_u)"))
    negative_prompt: str = field(default="", **_help("prompt of the unconditional CFG branch"))
    sampler: str = field(default="ddim", **_help(f"sampler, one of {SAMPLERS}"))
    num_steps: int = field(default=50, **_help("denoising steps T"))
    eta: float = field(default=1.0, **_help("DDIM eta (1: the DDPM-like sampler of the paper)"))
    resolution: int = field(
        default=0, **_help("image size in pixels (a multiple of the VAE factor); 0: the UNet's native size")
    )
    trajectory_dtype: str = field(
        default="fp32", **_help(f"storage dtype of sampled trajectories (states, eps_old), one of {STORAGE_DTYPES}")
    )
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    flow: FlowNetConfig = field(default_factory=FlowNetConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    reward: SDRewardConfig = field(default_factory=SDRewardConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)

    def validate(self, prefix: str = "sd") -> None:
        """Static checks; raises ``ValueError`` naming the field (``sd.lora.rank``)."""

        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{prefix}.{name}: {why}")

        if not self.model.strip():
            raise bad("model", "must name a local directory, a hub id or 'tiny'")
        checks = [
            ("frozen_dtype", self.frozen_dtype, FROZEN_DTYPES),
            ("sampler", self.sampler, SAMPLERS),
            ("trajectory_dtype", self.trajectory_dtype, STORAGE_DTYPES),
            ("reward.transform", self.reward.transform, REWARD_TRANSFORMS),
            ("speed.attention", self.speed.attention, ATTENTION_BACKENDS),
            ("speed.compile_mode", self.speed.compile_mode, COMPILE_MODES),
        ]
        for name, value, allowed in checks:
            if value not in allowed:
                raise bad(name, f"{value!r} is not one of {allowed}")
        if self.num_steps < 1:
            raise bad("num_steps", f"must be >= 1, got {self.num_steps}")
        if self.eta < 0:
            raise bad("eta", f"must be >= 0, got {self.eta}")
        if self.guidance_scale < 0:
            raise bad("guidance_scale", f"must be >= 0, got {self.guidance_scale}")
        if self.resolution < 0:
            raise bad("resolution", f"must be >= 0 (0: native), got {self.resolution}")
        lora = self.lora
        if lora.rank < 1:
            raise bad("lora.rank", f"must be >= 1, got {lora.rank}")
        if not lora.alpha > 0:
            raise bad("lora.alpha", f"must be > 0, got {lora.alpha}")
        if not lora.target_modules or not all(isinstance(m, str) and m for m in lora.target_modules):
            raise bad("lora.target_modules", "must be a non-empty list of module names")
        if not 0 <= lora.dropout < 1:
            raise bad("lora.dropout", f"must be in [0, 1), got {lora.dropout}")
        flow = self.flow
        if not flow.block_out_channels or any(c < 1 for c in flow.block_out_channels):
            raise bad("flow.block_out_channels", f"must be positive channel counts, got {flow.block_out_channels}")
        if flow.norm_num_groups < 1 or any(c % flow.norm_num_groups for c in flow.block_out_channels):
            raise bad(
                "flow.norm_num_groups",
                f"{flow.norm_num_groups} must divide every entry of flow.block_out_channels {flow.block_out_channels}",
            )
        if flow.layers_per_block < 1 or flow.attention_head_dim < 1:
            raise bad("flow.layers_per_block", "flow.layers_per_block and flow.attention_head_dim must be >= 1")
        if flow.output_init_scale < 0:
            raise bad("flow.output_init_scale", f"must be >= 0, got {flow.output_init_scale}")
        if not self.prompts.source.strip():
            raise bad("prompts.source", "must be 'animals' or a prompt file path")
        if not self.prompts.eval_seeds or any(s < 0 for s in self.prompts.eval_seeds):
            raise bad("prompts.eval_seeds", f"must be a non-empty list of seeds >= 0, got {self.prompts.eval_seeds}")
        if not self.reward.name.strip():
            raise bad("reward.name", "must name a registered reward")
        if self.reward.chunk_size < 0:
            raise bad("reward.chunk_size", f"must be >= 0 (0: no chunking), got {self.reward.chunk_size}")
        if self.reward.transform == "exp" and self.reward.scale == 0:
            raise bad("reward.scale", "must be non-zero for the 'exp' transform")
