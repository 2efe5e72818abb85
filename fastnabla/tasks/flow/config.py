"""Configuration of the flow-matching task (``RunConfig.flow``): SD3 / SD3.5 (MMDiT) and FLUX.1 pipelines.

Prompts, rewards and the flow network reuse the Stable Diffusion task's sections (:mod:`fastnabla.tasks.sd.config`);
the LoRA section keeps their fields with the transformer's module names. Every setting is labelled in
docs/flow-matching.md (the pipelines', Flow-GRPO's or ours). Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastnabla.config.fields import Section, option
from fastnabla.tasks.sd.config import FlowNetConfig, LoRAConfig, PromptConfig, SDRewardConfig

FAMILIES = ("sd3", "flux")
TINY_MODELS = {"tiny-sd3": "sd3", "tiny-flux": "flux"}
FROZEN_DTYPES = ("auto", "bf16", "fp16", "fp32")
STORAGE_DTYPES = ("fp32", "bf16", "fp16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEFAULT_MODEL = "stabilityai/stable-diffusion-3.5-medium"
# The attention projections of diffusers' SD3 / FLUX LoRA trainers (train_dreambooth_lora_sd3.py, and the attention
# part of train_dreambooth_lora_flux.py's default) and of Flow-GRPO (scripts/train_sd3.py): image and context streams.
TRANSFORMER_LORA_MODULES = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)


@dataclass
class TransformerLoRAConfig(LoRAConfig):
    """LoRA adapters on the transformer (peft); rank and alpha are Flow-GRPO's (r = 32, alpha = 64)."""

    rank: int = option(32, ge=1, help="LoRA rank r")
    alpha: float = option(64.0, gt=0, help="LoRA alpha (the update is scaled by alpha / rank)")
    target_modules: list[str] = option(
        default_factory=lambda: list(TRANSFORMER_LORA_MODULES), nonempty=True,
        help="transformer module names (suffixes) that get adapters: the image stream's attn.to_q/k/v/out.0 and "
             "the context stream's attn.add_q/k/v_proj and attn.to_add_out")
    init: str = option("", help="not supported for SD3 / FLUX yet (the sd task's --init-lora): must stay empty")


@dataclass
class FlowSpeedConfig:
    """Speed and memory switches of the flow-matching task."""

    compile_transformer: bool = option(False, help="torch.compile the (LoRA) transformer")
    compile_vae_decoder: bool = option(False, help="torch.compile the VAE decoder")
    compile_flow: bool = option(False, help="torch.compile the flow network")
    compile_mode: str = option("default", choices=COMPILE_MODES, help="torch.compile mode")
    tf32: bool = option(True, help="allow TF32 matmuls/convolutions for fp32 work (CUDA only; no-op on CPU)")
    autocast_bf16: bool = option(False, help="run the transformer and flow forwards under bf16 autocast")
    gradient_checkpointing: bool = option(
        False, help="recompute the transformer's block activations in the backward pass (diffusers' "
                    "enable_gradient_checkpointing, each block under the adapter state of its forward, so the "
                    "pretrained model's VJPs stay the pretrained model's): less memory, about one more forward per "
                    "backward")
    vae_slicing: bool = option(False, help="decode one image at a time (less memory, slower)")


@dataclass
class FlowConfig(Section):
    """The flow-matching task: SD3 / SD3.5 or FLUX.1 pipeline, LoRA policy, flow network, SDE sampler, reward."""

    path = "flow"

    family: str = option("sd3", choices=FAMILIES,
                         help="sd3: StableDiffusion3Pipeline (SD3 / SD3.5, CFG); flux: FluxPipeline (FLUX.1, guidance "
                              "embedding instead of CFG)")
    model: str = option(
        DEFAULT_MODEL,
        help="a local diffusers pipeline directory, a hub id (needs a hub; HF_HUB_OFFLINE is respected), or "
             "'tiny-sd3' / 'tiny-flux' for the built-in tiny random pipelines")
    revision: str = option("", help="hub revision (branch, tag or commit); empty: the default")
    variant: str = option("", help="weight variant, e.g. 'fp16' (diffusion_pytorch_model.fp16.*)")
    tiny_seed: int = option(0, ge=0, help="seed of the tiny pipeline's random weights")
    tiny_cache_dir: str = option(
        "", help="directory the tiny pipeline is saved to once and loaded from (empty: in memory)")
    frozen_dtype: str = option(
        "auto", choices=FROZEN_DTYPES,
        help="dtype of transformer base, VAE and text encoders (auto: bf16 on CUDA, fp32 on CPU); LoRA, flow and "
             "reward are always fp32")
    use_t5: bool = option(
        True, help="sd3: load the T5 text encoder (false: zeros in its place, as StableDiffusion3Pipeline does with "
                   "text_encoder_3=None; saves ~9.5 GB of bf16 weights); flux needs T5")
    max_sequence_length: int = option(
        0, ge=0, help="T5 tokens per prompt (0: the pipeline's default, 256 for SD3 and 512 for FLUX)")
    guidance_scale: float = option(
        4.5, ge=0,
        help="sd3: classifier-free guidance w (v_u + w (v_c - v_u); <= 1: the conditional half only, as the "
             "pipeline); flux: the guidance embedding's value (no CFG pair)")
    negative_prompt: str = option("", help="sd3: prompt of the unconditional CFG branch")
    num_steps: int = option(28, ge=1, help="denoising steps T")
    noise_level: float = option(
        0.7, ge=0, help="Flow-GRPO's SDE noise level a, sigma_s = a sqrt(s / (1 - s)) (its default 0.7); 0 is the "
                        "pipelines' deterministic Euler ODE, which the density-based methods cannot train on")
    resolution: int = option(
        0, ge=0, help="image size in pixels (a multiple of VAE factor x patch size); 0: the transformer's native size")
    trajectory_dtype: str = option(
        "fp32", choices=STORAGE_DTYPES,
        help="storage dtype of the eps recorded with sampled trajectories (the states are always fp32)")
    lora: TransformerLoRAConfig = option(default_factory=TransformerLoRAConfig, help="")
    flow: FlowNetConfig = option(default_factory=FlowNetConfig, help="")
    prompts: PromptConfig = option(default_factory=PromptConfig, help="")
    reward: SDRewardConfig = option(default_factory=SDRewardConfig, help="")
    speed: FlowSpeedConfig = option(default_factory=FlowSpeedConfig, help="")

    def check(self, prefix: str) -> None:
        """Rules over several fields; raises ``ValueError`` naming the field."""

        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{prefix}.{name}: {why}")

        if not self.model.strip():
            raise bad("model", "must name a local directory, a hub id, 'tiny-sd3' or 'tiny-flux'")
        if self.model in TINY_MODELS and TINY_MODELS[self.model] != self.family:
            raise bad("family", f"{self.family!r} does not match model {self.model!r} "
                                f"(family {TINY_MODELS[self.model]!r})")
        if self.lora.init:
            raise bad("lora.init", "starting from a saved LoRA is not supported for SD3 / FLUX yet (sd task only)")
        if not all(isinstance(m, str) and m for m in self.lora.target_modules):
            raise bad("lora.target_modules", "must be a non-empty list of module names")
        if self.reward.transform == "exp" and self.reward.scale == 0:
            raise bad("reward.scale", "must be non-zero for the 'exp' transform")
        if self.family == "flux" and not self.use_t5:
            raise bad("use_t5", "FLUX.1 has no T5-free mode (its transformer reads only T5 tokens)")
        if any(c % self.flow.norm_num_groups for c in self.flow.block_out_channels):
            raise bad("flow.norm_num_groups", f"{self.flow.norm_num_groups} must divide every entry of "
                                              f"flow.block_out_channels {self.flow.block_out_channels}")
        if not self.prompts.source.strip():
            raise bad("prompts.source", "must be 'animals' or a prompt file path")
        if not self.reward.name.strip():
            raise bad("reward.name", "must name a registered reward")
