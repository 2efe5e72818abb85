"""Configuration of the Stable Diffusion task (nested by the run config as ``RunConfig.sd``).

Every field has a default (the paper's / the authors' release settings, docs/presets.md), help text and its
rules (:func:`fastnabla.config.fields.option`); errors name the field (``sd.lora.rank``). Runtime-dependent checks
(a CUDA-only switch on a CPU run, an unknown reward name, a missing model directory) happen when the task is built,
before anything is written, and name the field the same way. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastnabla.config.fields import Section, option, validate_config

SAMPLERS = ("ddim", "ddpm")
FROZEN_DTYPES = ("auto", "bf16", "fp16", "fp32")
STORAGE_DTYPES = ("fp32", "bf16", "fp16")
ATTENTION_BACKENDS = ("sdpa", "xformers", "classic")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
REWARD_TRANSFORMS = ("auto", "log", "exp")
TINY_MODEL = "tiny"
TINY_SDXL_MODEL = "tiny-sdxl"
TINY_MODELS = (TINY_MODEL, TINY_SDXL_MODEL)
FAMILIES = ("auto", "sd", "sdxl")
EMPTY_NEGATIVE = ("auto", "zeros", "encode")
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@dataclass
class LoRAConfig:
    """The LoRA adapters of the fine-tuned UNet (peft)."""

    rank: int = option(8, ge=1, help="LoRA rank r")
    alpha: float = option(8.0, gt=0, help="LoRA alpha (the update is scaled by alpha / rank)")
    target_modules: list[str] = option(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], nonempty=True,
        help="UNet module names (suffixes) that get adapters")
    dropout: float = option(0.0, ge=0, lt=1, help="LoRA dropout (0: the policy is deterministic given x)")
    init: str = option(
        "", help="start the policy from this diffusers-format LoRA (a pytorch_lora_weights.safetensors file or its "
                 "directory, as fastnabla's export and diffusers' save_lora_weights write it; --init-lora PATH); its "
                 "rank and target modules must match rank / target_modules, a different alpha is rescaled exactly. "
                 "The pretrained model (adapters off) stays the base model. Empty: B = 0, the policy starts at the "
                 "pretrained model")


@dataclass
class FlowNetConfig:
    """The flow network g_phi: a small prompt-conditioned UNet2DConditionModel (release defaults)."""

    block_out_channels: list[int] = option(
        default_factory=lambda: [64, 128, 256, 256], ge=1, nonempty=True, help="channels per resolution level")
    layers_per_block: int = option(1, ge=1, help="ResNet layers per block")
    attention_head_dim: int = option(8, ge=1, help="attention head dimension (diffusers' argument)")
    norm_num_groups: int = option(32, ge=1, help="GroupNorm groups (must divide every channel count)")
    output_init_scale: float = option(
        1e-3, ge=0,
        help="the last conv's default-initialised weights are multiplied by this and its bias zeroed: 'tiny weights "
             "in the final output layer' (paper section 4.3), a near-zero but already prompt-dependent flow; 0 gives "
             "an exactly zero flow at initialisation")


@dataclass
class PromptConfig:
    """Where training and evaluation prompts come from."""

    source: str = option(
        "animals",
        help="'animals' (DDPO's 45 simple animals), a published set read from sd.prompts.path "
             "('hpdv2-photo+painting', 'drawbench'), a prompt file (.txt, .json, .jsonl, .csv, .tsv) or a directory "
             "(a Hugging Face datasets directory, or prompt files); docs/stable-diffusion.md")
    path: str = option("", help="where a published prompt set's files are (a folder, or DrawBench's CSV)")
    column: str = option(
        "", help="the field holding the prompt in JSON / CSV / dataset records (empty: prompt, prompts, caption or "
                 "text)")
    repeats: int = option(
        1, ge=1, help="samples per prompt in a sampled batch: batch_size / repeats distinct prompts, each k times "
                      "(per-prompt statistics, as DDPO's tracker and group-relative methods use); 1: every "
                      "trajectory draws its own prompt")
    eval_source: str = option(
        "", help="held-out evaluation prompts, distinct from the training prompts (the same formats as source)")
    eval_prompts: list[str] = option(
        default_factory=list,
        help="fixed evaluation prompts for image grids (empty: the first 4 of eval_source, else of a published "
             "set's held-out prompts, else of the training prompts)")
    eval_seeds: list[int] = option(
        default_factory=lambda: [0, 1, 2, 3], ge=0, nonempty=True,
        help="fixed seeds of the evaluation grid, one row per seed")


@dataclass
class RewardTermConfig:
    """One term of a weighted sum of rewards (``sd.reward.terms``; the list form ``sd.reward: [...]``)."""

    name: str = option("", help="reward registry name or import path package.module:factory")
    weight: float = option(1.0, help="w_i in log R = sum_i w_i log R_i")
    options: dict[str, Any] = option(default_factory=dict, help="keyword options of the reward builder")
    transform: str = option("auto", choices=REWARD_TRANSFORMS, help="this term's log R transform (as sd.reward)")
    scale: float = option(1.0, help="'exp' transform: log R = scale * (score - shift)")
    shift: float = option(0.0, help="'exp' transform: score offset")


@dataclass
class SDRewardConfig:
    """The reward, built by ``fastnabla.rewards.build_reward``; scored with each sample's own prompt."""

    name: str = option(
        "aesthetic",
        help="reward registry name (e.g. aesthetic, hpsv2, color-target), an import path package.module:factory "
             "(a custom reward, docs/rewards.md), or 'sum': log R = sum_i w_i log R_i over sd.reward.terms")
    options: dict[str, Any] = option(default_factory=dict, help="keyword options of the reward builder")
    transform: str = option(
        "auto", choices=REWARD_TRANSFORMS,
        help="log R = log(score) ('log'), scale*(score-shift) ('exp'); 'auto' picks 'log' for positive rewards")
    scale: float = option(1.0, help="'exp' transform: log R = scale * (score - shift)")
    shift: float = option(0.0, help="'exp' transform: score offset")
    chunk_size: int = option(0, ge=0, help="images per reward call (0: the whole batch at once)")
    terms: list[RewardTermConfig] = option(
        default_factory=list,
        help="name 'sum': the weighted terms [{name, weight, options, transform, scale, shift}, ...]; the list form "
             "sd.reward: [{name: hpsv2, weight: 0.7}, {name: aesthetic, weight: 0.3}] sets name 'sum' and these")

    def check(self, prefix: str) -> None:
        """A sum has terms and no transform of its own; a single reward has no terms."""
        if self.name == "sum":
            if not self.terms:
                raise ValueError(f"{prefix}.terms: name 'sum' needs at least one term")
            if (self.transform, self.scale, self.shift) != ("auto", 1.0, 0.0):
                raise ValueError(f"{prefix}.transform/scale/shift: a sum has no transform of its own; set each "
                                 f"term's ({prefix}.terms[i].transform). A preset's {prefix}.transform stays when "
                                 f"only {prefix}.name changes: the list form {prefix}: [...] replaces the section")
            for i, term in enumerate(self.terms):
                validate_config(term, f"{prefix}.terms[{i}]")
                if not term.name.strip() or term.name == "sum":
                    raise ValueError(f"{prefix}.terms[{i}].name: must name a reward (not empty, not 'sum')")
                if term.transform == "exp" and term.scale == 0:
                    raise ValueError(f"{prefix}.terms[{i}].scale: must be non-zero for the 'exp' transform")
        elif self.terms:
            raise ValueError(f"{prefix}.terms is set but {prefix}.name={self.name!r}: set {prefix}.name=sum (the list "
                             f"form {prefix}: [...] does) or remove the terms")


@dataclass
class SpeedConfig:
    """Speed switches (their measured effects are in docs/stable-diffusion.md)."""

    attention: str = option(
        "sdpa", choices=ATTENTION_BACKENDS,
        help="attention backend: PyTorch scaled_dot_product_attention, xformers (installed + CUDA only) or "
             "diffusers' classic matmul-softmax processor")
    compile_unet: bool = option(False, help="torch.compile the (LoRA) UNet")
    compile_vae_decoder: bool = option(False, help="torch.compile the VAE decoder")
    compile_flow: bool = option(False, help="torch.compile the flow network")
    compile_mode: str = option("default", choices=COMPILE_MODES, help="torch.compile mode")
    cuda_graphs: bool = option(
        False,
        help="capture the no-grad sampling UNet call in CUDA graphs (torch.compile mode='reduce-overhead'); CUDA "
             "only: an error on other devices")
    channels_last: bool = option(False, help="channels_last memory format for UNet, VAE and flow")
    tf32: bool = option(True, help="allow TF32 matmuls/convolutions for fp32 work (CUDA only; no-op on CPU)")
    autocast_bf16: bool = option(False, help="run UNet and flow forwards under bf16 autocast")
    vae_slicing: bool = option(False, help="decode one image at a time (less memory, slower)")
    cudnn_benchmark: bool = option(
        True, help="torch.backends.cudnn.benchmark on CUDA: cuDNN times its convolution algorithms once per shape and "
                   "keeps the fastest (no-op elsewhere)")


@dataclass
class MemoryConfig:
    """Gradient checkpointing (activations recomputed in the backward pass instead of kept): less memory, more
    compute, the same losses and gradients (tests/test_memory_switches.py)."""

    unet_gradient_checkpointing: bool = option(
        False, help="the UNet's (policy and pretrained) activations: diffusers' enable_gradient_checkpointing")
    vae_gradient_checkpointing: bool = option(
        False, help="the VAE decoder's activations in the forward-looking decode-VJP (and ReFL / DRaFT): diffusers' "
                    "gradient checkpointing of the decoder's blocks")
    reward_gradient_checkpointing: bool = option(
        False, help="the reward model's activations: each transformer block of its image tower recomputed in the "
                    "backward pass (torch.utils.checkpoint)")


@dataclass
class SDXLConfig:
    """SDXL's extra conditioning (docs/stable-diffusion.md, "SDXL"): the size / crop micro-conditioning of the
    UNet's ``add_time_ids`` = (original height, original width, crop top, crop left, target height, target width),
    the same for both CFG halves, as ``StableDiffusionXLPipeline`` uses by default. Ignored by SD 1.x / 2.x."""

    original_size: list[int] = option(
        default_factory=list, ge=1,
        help="(height, width) the UNet is told the training image had; empty: the sampled image size (the "
             "pipeline's default)")
    crop_top_left: list[int] = option(
        default_factory=lambda: [0, 0], ge=0,
        help="(top, left) crop coordinates the UNet is told; (0, 0), the pipeline's default, asks for uncropped "
             "images")
    target_size: list[int] = option(
        default_factory=list, ge=1, help="(height, width) target size; empty: the sampled image size (the pipeline's "
                                         "default)")
    empty_negative: str = option(
        "auto", choices=EMPTY_NEGATIVE,
        help="unconditional CFG branch when sd.negative_prompt is empty: 'zeros' (zero prompt and pooled embeddings, "
             "what StableDiffusionXLPipeline does without a negative prompt when the pipeline's "
             "force_zeros_for_empty_prompt is set, as in SDXL base 1.0), 'encode' (encode the empty prompt), 'auto' "
             "(the pipeline's model_index.json decides; true when it does not say)")


@dataclass
class SDConfig(Section):
    """The Stable Diffusion task: model, LoRA policy, flow network, sampler, prompts, reward, speed."""

    path = "sd"

    model: str = option(
        DEFAULT_MODEL,
        help="a local diffusers pipeline directory (SD 1.x / 2.x or SDXL), a hub id (needs a hub; HF_HUB_OFFLINE is "
             "respected), 'tiny' for the built-in tiny random SD pipeline or 'tiny-sdxl' for the tiny random SDXL "
             "pipeline")
    family: str = option(
        "auto", choices=FAMILIES,
        help="model family: 'auto' detects it from the pipeline (model_index.json's _class_name, a text_encoder_2/ "
             "folder); 'sd' or 'sdxl' also require it (an error names the family found)")
    vae: str = option(
        "", help="a VAE replacing the pipeline's vae/: a directory holding config.json + weights (or a pipeline "
                 "directory's vae/) or a hub id, e.g. the fp16-fix SDXL VAE; empty: the pipeline's own")
    fl_surrogate_decoder: str = option(
        "", help="the cheap decoder of the forward-looking term at non-terminal states (method.fl_decoder=surrogate): "
                 "a diffusers AutoencoderTiny directory or hub id, e.g. madebyollin/taesd (SD 1.x) or "
                 "madebyollin/taesdxl (SDXL); 'digits' on a digits pipeline: its distilled decoder, built on demand; "
                 "empty: none")
    revision: str = option("", help="hub revision (branch, tag or commit); empty: the default")
    variant: str = option("", help="weight variant, e.g. 'fp16' (diffusion_pytorch_model.fp16.*)")
    tiny_seed: int = option(0, ge=0, help="seed of the tiny pipeline's random weights (model: tiny)")
    tiny_cache_dir: str = option(
        "", help="directory the tiny pipeline is saved to once and loaded from (empty: in memory)")
    frozen_dtype: str = option(
        "auto", choices=FROZEN_DTYPES,
        help="dtype of UNet base, VAE and text encoders (auto: bf16 on CUDA, fp32 on CPU); LoRA, flow and reward are "
             "always fp32. A VAE whose config sets force_upcast (SDXL's: it overflows in fp16) stays fp32 under fp16")
    guidance_scale: float = option(5.0, ge=0, help="classifier-free guidance w: eps_u + w (eps_c - eps_u)")
    negative_prompt: str = option("", help="prompt of the unconditional CFG branch")
    sampler: str = option("ddim", choices=SAMPLERS, help="sampler")
    num_steps: int = option(50, ge=1, help="denoising steps T")
    eta: float = option(1.0, ge=0, help="DDIM eta (1: the DDPM-like sampler of the paper)")
    resolution: int = option(
        0, ge=0, help="image size in pixels (a multiple of the VAE factor); 0: the UNet's native size")
    height: int = option(0, ge=0, help="image height in pixels for non-square images; 0: sd.resolution")
    width: int = option(0, ge=0, help="image width in pixels for non-square images; 0: sd.resolution")
    trajectory_dtype: str = option(
        "fp32", choices=STORAGE_DTYPES,
        help="storage dtype of the eps recorded with sampled trajectories (eps_old, for the output regulariser); the "
             "states are always kept in fp32: in bf16 the last steps' states move by more than sigma_t "
             "(docs/fidelity.md)")
    lora: LoRAConfig = option(default_factory=LoRAConfig, help="")
    flow: FlowNetConfig = option(default_factory=FlowNetConfig, help="")
    prompts: PromptConfig = option(default_factory=PromptConfig, help="")
    reward: SDRewardConfig | list[RewardTermConfig] = option(default_factory=SDRewardConfig, help="")
    speed: SpeedConfig = option(default_factory=SpeedConfig, help="")
    memory: MemoryConfig = option(default_factory=MemoryConfig, help="")
    xl: SDXLConfig = option(default_factory=SDXLConfig, help="")

    def check(self, prefix: str) -> None:
        """Rules over several fields; raises ``ValueError`` naming the field (``sd.flow.norm_num_groups``).

        The list form of ``sd.reward`` becomes ``{name: sum, terms: [...]}`` here (then checked as a section)."""
        if isinstance(self.reward, list):
            self.reward = SDRewardConfig(name="sum", terms=list(self.reward))
            validate_config(self.reward, f"{prefix}.reward")

        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{prefix}.{name}: {why}")

        if not self.model.strip():
            raise bad("model", "must name a local directory, a hub id or 'tiny'")
        if not all(isinstance(m, str) and m for m in self.lora.target_modules):
            raise bad("lora.target_modules", "must be a non-empty list of module names")
        flow = self.flow
        if any(c % flow.norm_num_groups for c in flow.block_out_channels):
            raise bad("flow.norm_num_groups",
                      f"{flow.norm_num_groups} must divide every entry of flow.block_out_channels "
                      f"{flow.block_out_channels}")
        if not self.prompts.source.strip():
            raise bad("prompts.source", "must be 'animals' or a prompt file path")
        if not self.reward.name.strip():
            raise bad("reward.name", "must name a registered reward")
        if self.reward.transform == "exp" and self.reward.scale == 0:
            raise bad("reward.scale", "must be non-zero for the 'exp' transform")
        for name in ("original_size", "crop_top_left", "target_size"):
            value = getattr(self.xl, name)
            if value and (len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
                raise bad(f"xl.{name}", f"must be two integers (height, width) or (top, left), got {value!r}")
        if not self.xl.crop_top_left:
            raise bad("xl.crop_top_left", "must be two integers (top, left)")
        if self.model in TINY_MODELS and self.family != "auto" and (self.family == "sdxl") != (
                self.model == TINY_SDXL_MODEL):
            raise bad("family", f"{self.family!r} does not match sd.model={self.model!r}")
