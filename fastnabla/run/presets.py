"""Named presets: partial configs layered over the defaults of :class:`RunConfig`."""

from __future__ import annotations

from typing import Any

# The paper's settings on the analytic task: w_F = w_B = 1, gamma_t = abar_t, FL through the
# fine-tuned model, the reverse loss of eq. 17, the forward loss training the flow (the release's
# routing), constant learning rate.
_PAPER_METHOD: dict[str, Any] = {
    "weight_forward": "one",
    "weight_reverse": "one",
    "gamma": "alpha_bar",
    "fl_model": "policy",
    "reverse_target": "score",
    "forward_trains_flow": True,
}

_NARROW_BUMP: dict[str, Any] = {"gmm": {"reward": {"kind": "bump", "center": [2.0, 2.0], "width": 2.0}}}
_LOGLINEAR: dict[str, Any] = {
    "gmm": {
        "mixture": {
            "means": [[-2.5, 0.0], [0.0, 0.0], [2.5, 0.0]],
            "stds": [0.4, 0.5, 0.4],
            "weights": [0.2, 0.5, 0.3],
        },
        "reward": {"kind": "loglinear", "weights": [-0.5, 0.3]},
    }
}


def _with(*parts: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of partial configs (later parts win, nested mappings merge key by key)."""

    def merge(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for k, v in new.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    out: dict[str, Any] = {}
    for p in parts:
        out = merge(out, p)
    return out


# The analytic cases whose target moves and reshapes the modes (docs/analytic-benchmark.md, "Shape cases"): narrow
# or strong tilts shrink the components and move their means by one target std or more, so a sampler that only gets
# the mode weights right (the reweight-only reference) fails the shape metrics.
_SHIFT_NARROW: dict[str, Any] = {
    "gmm": {
        "mixture": {"stds": [[0.8, 0.5], [0.6, 0.9], [0.7, 0.7], [0.9, 0.6]]},
        "reward": {"kind": "bump", "center": [0.5, 0.5], "width": 1.0},
    }
}
_BETA3: dict[str, Any] = {
    "gmm": {"mixture": {"stds": 0.7}, "reward": {"kind": "bump", "center": [1.0, 0.5], "width": 2.0}},
    "method": {"beta": 3.0},
}
_LOGLINEAR_SHIFT: dict[str, Any] = {
    "gmm": {
        "mixture": {
            "means": [[0.0, -3.0], [0.0, 0.0], [0.0, 3.0]],
            "stds": [[0.8, 0.4], [1.0, 0.5], [0.7, 0.6]],
            "weights": [0.3, 0.4, 0.3],
        },
        "reward": {"kind": "loglinear", "weights": [1.6, 0.15]},
    }
}
_8D: dict[str, Any] = {
    "gmm": {
        "mixture": {
            "means": [[2.5 if j == k else 0.0 for j in range(8)] for k in range(4)],
            "stds": [0.6, 0.8, 0.7, 0.9],
            "weights": [0.4, 0.3, 0.2, 0.1],
        },
        "reward": {"kind": "bump", "center": [1.0, 0.0, 0.5, 0.0, 0.5, 0.5, 0.5, 0.5], "width": 1.5},
    },
    "method": {"beta": 2.0},
}
# name -> (description, the task's part of the config: mixture, reward, beta)
ANALYTIC_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("4 modes at (+-2, +-2), std 0.5, weights .4/.3/.2/.1; wide bump at (2, 1), width 2.5, beta 1", {}),
    "narrow-bump": ("default mixture; bump at (2, 2) (the rarest mode), width 2, beta 1", _NARROW_BUMP),
    "loglinear": ("3 modes on a line, stds .4/.5/.4, weights .2/.5/.3; exp(-0.5 x1 + 0.3 x2), beta 1", _LOGLINEAR),
    "shift-narrow": ("4 modes at (+-2, +-2), unequal per-axis stds 0.5-0.9; narrow bump between them at (0.5, 0.5), "
                     "width 1, beta 1: components shrink up to 1.35x and move 1.3-1.9 target stds", _SHIFT_NARROW),
    "beta3": ("4 modes at (+-2, +-2), std 0.7; bump at (1, 0.5), width 2, beta 3: stds shrink 1.17x, means move "
              "0.8-1.8 target stds", _BETA3),
    "loglinear-shift": ("3 modes on the x2 axis, unequal per-axis stds 0.4-1.0; exp(1.6 x1 + 0.15 x2), beta 1: "
                        "means move 1.1-1.6 stds (0.8-1.6 units)", _LOGLINEAR_SHIFT),
    "8d": ("8-D, 4 modes at 2.5 e_k, stds .6/.8/.7/.9; bump at (1, 0, .5, 0, .5, .5, .5, .5), width 1.5, beta 2: "
           "stds shrink up to 1.31x, means move 0.9-1.7 target stds", _8D),
}
SHAPE_CASES = ("shift-narrow", "beta3", "loglinear-shift", "8d")

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "gmm-default": ("4-mode 2-D mixture, wide bump reward; the tuned nabla-GFlowNet (the built-in default)", {}),
    "gmm-paper": (
        "same case with the paper's settings (w=1, gamma=abar, eq. 17 reverse loss, constant lr)",
        {"method": _PAPER_METHOD, "optim": {"lr_schedule": "constant"}},
    ),
    "gmm-oracle": (
        "oracle-flow floor: the policy trained against the exact grad log E[R^beta | x] (no learned flow)",
        {"method": {"flow": "oracle"}},
    ),
    "gmm-narrow-bump": ("narrow bump on the rarest mode (prior->target TV 0.44), tuned method", _NARROW_BUMP),
    "gmm-narrow-bump-paper": (
        "narrow bump with the paper's settings",
        _with(_NARROW_BUMP, {"method": _PAPER_METHOD, "optim": {"lr_schedule": "constant"}}),
    ),
    "gmm-narrow-bump-oracle": ("narrow bump, oracle-flow floor", _with(_NARROW_BUMP, {"method": {"flow": "oracle"}})),
    "gmm-loglinear": ("3-mode mixture with a log-linear reward, tuned method", _LOGLINEAR),
    "gmm-loglinear-paper": (
        "log-linear case with the paper's settings",
        _with(_LOGLINEAR, {"method": _PAPER_METHOD, "optim": {"lr_schedule": "constant"}}),
    ),
    "gmm-loglinear-oracle": ("log-linear case, oracle-flow floor", _with(_LOGLINEAR, {"method": {"flow": "oracle"}})),
}
# The shape cases evaluate every 20 iterations (7 evaluations in the last fifth, for the end-of-training averages);
# evaluation draws its own noise, so training is the same as with the default eval.every.
_SHAPE_EVAL: dict[str, Any] = {"eval": {"every": 20}}
for _case in SHAPE_CASES:
    _text, _part = ANALYTIC_CASES[_case]
    PRESETS[f"gmm-{_case}"] = (f"shape case: {_text.split(':')[0]}; tuned method", _with(_part, _SHAPE_EVAL))
    PRESETS[f"gmm-{_case}-oracle"] = (f"shape case {_case}, oracle-flow floor",
                                      _with(_part, _SHAPE_EVAL, {"method": {"flow": "oracle"}}))

# The default analytic case under the rectified-flow SDE (docs/flow-matching.md): Flow-GRPO's SDE step on diffusers'
# FlowMatchEulerDiscreteScheduler with shift 1 (ours: the analytic task has no resolution to shift for), at noise level
# sqrt(2) (ours: sigma_s^2 = 2 s / (1 - s) is the noising process's own diffusion, the one level whose sampler is its
# time reversal, so the closed-form oracle flow is the sampler's exact flow; Flow-GRPO's default 0.7 keeps the
# marginals but not the joint of (x_s, x_T), and gmm-fm-flowgrpo runs it with the learned flow); the residual network
# added to the velocity (ours: what LoRA on an SD3 / FLUX transformer does); everything else the tuned gmm-default.
_FLOW_MATCHING: dict[str, Any] = {
    "sampler": {"sampler": "flow-sde", "flow": {"noise_level": 2**0.5, "scheduler": {"shift": 1.0}}},
    "gmm": {"network": {"residual": "velocity"}},
}
PRESETS.update({
    "gmm-fm-default": ("default case on the rectified-flow SDE at noise level sqrt(2) (exact mixture velocity), tuned "
                       "method, residual on the velocity", _FLOW_MATCHING),
    "gmm-fm-oracle": ("default case on the rectified-flow SDE, oracle-flow floor",
                      _with(_FLOW_MATCHING, {"method": {"flow": "oracle"}})),
    "gmm-fm-flowgrpo": ("gmm-fm-default at Flow-GRPO's noise level 0.7 (the release's default; no closed-form oracle "
                        "there)", _with(_FLOW_MATCHING, {"sampler": {"flow": {"noise_level": 0.7}}})),
})

# Stable Diffusion: every setting of the sd15 presets with where it comes from -- "release" (the authors' code,
# lzzcd001/nabla-gfn), "paper" (Liu et al., section 4 and appendix), "ours" (a choice of this package, with the
# reason) -- and the value. SD_PROVENANCE feeds the preset table in docs/presets.md (tests/test_config.py keeps them
# equal: `python -m fastnabla.run.presets --markdown` writes it).
SD_PROVENANCE: dict[str, tuple[Any, str, str]] = {
    "sd.sampler": ("ddim", "release", "DDIMScheduler with eta = 1: the DDPM-like sampler every compared method uses"),
    "sd.eta": (1.0, "paper", "section 4.3; a stochastic last step (sigma > 0) is what the scores need"),
    "sd.num_steps": (50, "paper", "50 denoising steps (the release's sampling.num_steps)"),
    "sd.guidance_scale": (5.0, "release", "CFG 5 with an empty negative prompt; every UNet call is the CFG pair"),
    "sd.lora.rank": (8, "release", "LoRA r = 8 (alpha = r) on to_q, to_k, to_v, to_out.0"),
    "sd.reward.transform": ("exp", "release", "log R = the raw score (scale 1, shift 0): the release differentiates "
                                              "the score itself, so the paper's beta carries over"),
    "sd.reward.chunk_size": (4, "ours", "bounds the reward's activation memory; results do not depend on it"),
    "sd.trajectory_dtype": ("fp32", "ours", "bf16 storage rounds the late states by a large fraction of sigma_t "
                                            "(docs/fidelity.md)"),
    "method.weight_forward": ("one", "paper", "w_F(t) = 1 (section 4.3)"),
    "method.weight_reverse": ("one", "paper", "w_B(t) = 1"),
    "method.gamma": ("alpha_bar", "paper", "forward-looking strength gamma_t = abar_t"),
    "method.fl_model": ("policy", "release", "x_hat of the forward-looking term from the fine-tuned model"),
    "method.fl_jacobian": ("full", "release", "the reward gradient backpropagated through x_hat's full Jacobian"),
    "method.fl_noise_var": (0.0, "release", "no reward smoothing: one decode per state. The paper's smoothing (c = "
                                            "2e-3, 3 draws) triples the VAE-decoder VJPs (python -m fastnabla.flops)"),
    "method.fl_num_noise": (1, "release", "one forward-looking decode per state (see fl_noise_var)"),
    "method.reverse_target": ("score", "paper", "the reverse loss of eq. 17"),
    "method.forward_trains_flow": (True, "release", "the forward loss trains the flow through g(x_{t+1})"),
    "method.terminal": ("release", "release", "terminal transitions as the release's code treats them (no reverse "
                                              "loss, ||g(x_T)||^2 over terminal rows, strength abar_0; the paper's "
                                              "eqs. 16-18 differ: docs/fidelity.md)"),
    "optim.optimizer": ("adamw", "release", "AdamW, betas (0.9, 0.999), eps 1e-8"),
    "optim.lr_policy": (1e-3, "paper", "LoRA learning rate 1e-3"),
    "optim.lr_flow": (1e-3, "release", "flow learning rate 1e-3"),
    "optim.weight_decay": (1e-4, "release", "the release's LoRA weight decay (its flow group uses 1e-2; one value "
                                            "here for both groups)"),
    "optim.lr_schedule": ("constant", "release", "no schedule"),
    "optim.grad_clip_policy": (1.0, "release", "grad-norm clipping 1, separately per group"),
    "train.iterations": (200, "paper", "200 iterations (figure 1)"),
    "train.batch_size": (64, "release", "64 trajectories per iteration per GPU (4 sampling batches of 16)"),
    "train.sample_batch_size": (16, "release", "16 trajectories per sampling call"),
    "train.transition_fraction": (0.1, "release", "10% of the transitions of each trajectory, the terminal one "
                                                  "always included"),
    "train.updates_per_batch": (2, "release", "one optimizer update per 32 trajectories (train batch 4 x "
                                              "accumulation 8), as paper section 4.3"),
    "train.micro_batch_size": (4, "release", "train batch 4: the transitions of one forward/backward"),
    "train.fl_batch_size": (4, "ours", "bounds the memory of the forward-looking precomputation"),
    "train.checkpoint_every": (5, "release", "a checkpoint every 5 iterations (logging.save_freq)"),
    "eval.every": (5, "paper", "evaluation every 5 updates (section 4.4 curves)"),
    "threads": (0, "ours", "torch's own CPU thread count on a dedicated GPU machine"),
}
SD_REWARD_PROVENANCE: dict[str, dict[str, tuple[Any, str, str]]] = {
    "aesthetic": {
        "method.beta": (1e3, "paper", "beta = 1e3 for Aesthetic Score"),
        "method.output_reg": (1e3, "paper", "lambda = 1e3 for Aesthetic Score"),
        "sd.prompts.source": ("animals", "paper", "the 45 simple animal prompts of DDPO"),
    },
    "hpsv2.1": {
        "method.beta": (1e4, "release", "reward_scale 1e4 (config/hpsv2.py)"),
        "method.output_reg": (1e2, "paper", "lambda = 1e2 for HPSv2"),
        "sd.prompts.source": ("hpdv2-photo+painting", "paper", "HPDv2's photo + painting prompts (the release holds "
                                                               "out the first 10 of each style); sd.prompts.path"),
    },
    "imagereward": {
        "method.beta": (1e4, "ours", "the HPSv2 settings: the paper gives no ImageReward temperature"),
        "method.output_reg": (1e2, "ours", "the HPSv2 settings"),
        "sd.prompts.source": ("drawbench", "release", "DrawBench without its misspelling and rare-word categories, "
                                                      "2 per category held out; sd.prompts.path"),
    },
}


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


_SD_PAPER: dict[str, Any] = _with(
    {"task": "sd", "sd": {"reward": {"scale": 1.0, "shift": 0.0}}, "optim": {"grad_clip_flow": 1.0}},
    _nested({k: v[0] for k, v in SD_PROVENANCE.items()}),
)


def _sd_reward(name: str) -> dict[str, Any]:
    return _with(_SD_PAPER, _nested({k: v[0] for k, v in SD_REWARD_PROVENANCE[name].items()}),
                 {"sd": {"reward": {"name": name}}})


# tiny-sd: a tiny random pipeline (real CLIP tokenizer) and an analytic colour reward, end to end on a CPU in a
# few seconds: 3 iterations = 1 sampling-only + 2 training epochs. It keeps the paper's reward smoothing (c = 2e-3,
# 3 draws), so the smoothed forward-looking path runs in every CPU test of the SD task, and the paper's terminal
# semantics, under which a torchrun update equals a one-process update (the release's averages the terminal term
# per micro-batch, so its gradient depends on how transitions are grouped).
_TINY_SD: dict[str, Any] = _with(
    _SD_PAPER,
    {
        "threads": 1,
        "method": {"beta": 50.0, "output_reg": 1.0, "fl_noise_var": 2e-3, "fl_num_noise": 3, "terminal": "paper"},
        "train": {
            "iterations": 3, "batch_size": 8, "sample_batch_size": 8, "transition_fraction": 0.2,
            "micro_batch_size": 4, "updates_per_batch": 2, "fl_batch_size": 8, "checkpoint_every": 1,
            "device": "cpu",
        },
        "eval": {"every": 0},
        "sd": {
            "model": "tiny",
            "num_steps": 10,
            "trajectory_dtype": "fp32",
            "reward": {"name": "color-target", "transform": "log", "chunk_size": 0},
            "flow": {"block_out_channels": [32, 64]},
            "prompts": {"eval_seeds": [0, 1]},
        },
    },
)

# The sd15 nabla-GFlowNet presets' cost settings (issue 15, docs/cost.md): ours, each measured on the digits
# yardstick (3 seeds, equal iterations) and the analytic default case before it was adopted; together 0.44x the
# release's FLOPs per trained transition including sampling (python -m fastnabla.flops --preset sd15-aesthetic).
# Not applied to the baselines (sd15-aesthetic-NAME), the SDXL presets or the digits preset.
SD15_COST_PROVENANCE: dict[str, tuple[Any, str, str]] = {
    "method.fl_decoder": ("surrogate", "ours", "the forward-looking term through TAESD at non-terminal states (a "
                                               "baseline the flow absorbs), the exact VAE decoder at x_T: decoders "
                                               "10.1 -> 0.8 TF per trained transition. Digits, 3 seeds, with the "
                                               "8 x 10 below: mean log R 6.47 +- 0.42, class TV 0.249 +- 0.014, "
                                               "Frechet 189 +- 41 vs 6.32 +- 0.40, 0.265 +- 0.024, 181 +- 18 "
                                               "(alone: Frechet 333 +- 175; docs/cost.md)"),
    "sd.fl_surrogate_decoder": ("madebyollin/taesd", "ours", "TAESD (diffusers AutoencoderTiny) for SD 1.x latents"),
    "train.batch_size": (16, "ours", "4x fewer sampled trajectories than the release's 64, each with 4x the trained "
                                     "transitions (16 x 24 = 64 x 6 = 384 per iteration; the objective is "
                                     "off-policy): sampling per trained transition 13.9 -> 3.5 TF. Digits 8 x 10: "
                                     "6.20 +- 0.25 / TV 0.271 +- 0.029; the analytic case 64 x 44: TV 0.044 +- "
                                     "0.004 vs 0.038 +- 0.003 (docs/cost.md)"),
    "train.transition_fraction": (0.46, "ours", "23 chunks + the terminal transition = 24 of 50 per trajectory"),
}


def _sd15_nabla(name: str) -> dict[str, Any]:
    return _with(_sd_reward(name), _nested({k: v[0] for k, v in SD15_COST_PROVENANCE.items()}))


PRESETS.update(
    {
        "tiny-sd": ("tiny random Stable Diffusion pipeline + analytic colour reward: end to end on a CPU", _TINY_SD),
        "sd15-aesthetic": (
            "Stable Diffusion 1.5 + LAION Aesthetic Score on the animal prompts, the release's settings with ours "
            "for cost (docs/presets.md); needs the weights (and TAESD's)",
            _sd15_nabla("aesthetic"),
        ),
        "sd15-hpsv2": (
            "Stable Diffusion 1.5 + HPSv2.1 on HPDv2 photo+painting prompts (sd.prompts.path), the release's "
            "settings with ours for cost; needs the weights and the prompts",
            _sd15_nabla("hpsv2.1"),
        ),
        "sd15-imagereward": (
            "Stable Diffusion 1.5 + ImageReward v1.0 on DrawBench (sd.prompts.path), the HPSv2 settings with ours "
            "for cost; needs the weights and the prompts",
            _sd15_nabla("imagereward"),
        ),
    }
)

# SDXL (docs/stable-diffusion.md, "SDXL"): the sd15 presets' settings on SDXL base 1.0 with what SDXL changes, each
# labelled like SD_PROVENANCE (the release has no SDXL run, so every change is ours, with its reason); the rows
# join the preset table of docs/presets.md as "(sdxl)".
SDXL_PROVENANCE: dict[str, tuple[Any, str, str]] = {
    "sd.model": ("stabilityai/stable-diffusion-xl-base-1.0", "ours", "SDXL base 1.0; --model DIR takes a local "
                                                                      "copy (the save_pretrained layout)"),
    "sd.family": ("sdxl", "ours", "an SD 1.x / 2.x directory passed with --model is an error, not an SD run at 1024 "
                                  "px"),
    "sd.resolution": (1024, "ours", "SDXL base's native size (UNet sample_size 128 x VAE factor 8); the size / crop "
                                    "time ids follow it: (1024, 1024, 0, 0, 1024, 1024)"),
    "sd.xl.empty_negative": ("auto", "ours", "model_index.json's force_zeros_for_empty_prompt (true for SDXL base): "
                                             "zero prompt and pooled embeddings in the unconditional half, as "
                                             "StableDiffusionXLPipeline without a negative prompt"),
    "train.micro_batch_size": (1, "ours", "one latent per forward/backward: at 1024 px the policy + pretrained CFG-"
                                          "pair graphs of one latent are ~15 + 10 GiB in bf16, a ~35 GiB peak; two "
                                          "latents ~62 GiB before the CUDA context and transient buffers "
                                          "(estimate: python -m "
                                          "fastnabla.flops.memory_estimate, docs/stable-diffusion.md)"),
    "train.fl_batch_size": (1, "ours", "bounds the forward-looking decode-VJP at 1024 px (~12 GiB per image in "
                                       "bf16, estimate)"),
}


def _sdxl_reward(name: str) -> dict[str, Any]:
    return _with(_sd_reward(name), _nested({k: v[0] for k, v in SDXL_PROVENANCE.items()}))


# tiny-sdxl: tiny-sd on the tiny random SDXL pipeline (two text encoders, pooled embedding, time ids, SDXL's VAE
# scaling and scheduler config), end to end on a CPU in seconds.
PRESETS.update(
    {
        "tiny-sdxl": ("tiny random SDXL pipeline + analytic colour reward: end to end on a CPU",
                      _with(_TINY_SD, {"sd": {"model": "tiny-sdxl"}})),
        "sdxl-aesthetic": (
            "SDXL base 1.0 + LAION Aesthetic Score on the animal prompts at 1024 px, the sd15-aesthetic settings "
            "with SDXL's changes (docs/presets.md); needs the weights",
            _sdxl_reward("aesthetic"),
        ),
        "sdxl-hpsv2": (
            "SDXL base 1.0 + HPSv2.1 on HPDv2 photo+painting prompts (sd.prompts.path) at 1024 px, the sd15-hpsv2 "
            "settings with SDXL's changes; needs the weights and the prompts",
            _sdxl_reward("hpsv2.1"),
        ),
    }
)

# SD3 / SD3.5 and FLUX.1 (docs/flow-matching.md): the flow section instead of sd. tiny-sd3 / tiny-flux are tiny-sd's
# method and training settings on the tiny random SD3 (CFG) / FLUX (guidance embedding) pipelines, Flow-GRPO's SDE
# at its noise level 0.7, 32 T5 tokens (ours: the CPU budget; the pipelines' defaults are 256 / 512).
_TINY_FLOW: dict[str, Any] = _with(
    {k: v for k, v in _TINY_SD.items() if k != "sd"},
    {
        "task": "flow",
        "flow": {
            "model": "tiny-sd3", "family": "sd3", "num_steps": 10, "max_sequence_length": 32,
            "reward": {"name": "color-target", "transform": "log", "chunk_size": 0},
            "flow": {"block_out_channels": [32, 64]},
            "prompts": {"eval_seeds": [0, 1]},
        },
    },
)
PRESETS.update(
    {
        "tiny-sd3": ("tiny random SD3 pipeline (MMDiT, CFG) + analytic colour reward on Flow-GRPO's SDE: end to end "
                     "on a CPU", _TINY_FLOW),
        "tiny-flux": ("tiny random FLUX.1 pipeline (guidance embedding) + analytic colour reward on Flow-GRPO's SDE: "
                      "end to end on a CPU",
                      _with(_TINY_FLOW, {"flow": {"model": "tiny-flux", "family": "flux", "guidance_scale": 3.5}})),
    }
)

# sd35-medium-aesthetic / flux-dev-aesthetic: the sd15-aesthetic method, reward and training settings (SD_PROVENANCE,
# SD_REWARD_PROVENANCE["aesthetic"]: beta, lambda, learning rates, batches) on the flow task, with the sampler and
# LoRA of Flow-GRPO (Liu et al. 2025, github.com/yifan123/flow_grpo, config/base.py, config/grpo.py,
# scripts/train_sd3.py) and what memory needs; every row labelled (docs/presets.md, "The flow presets").
FLOW_PROVENANCE: dict[str, tuple[Any, str, str]] = {
    "task": ("flow", "ours", "the SD3 / FLUX task (docs/flow-matching.md)"),
    "flow.noise_level": (0.7, "Flow-GRPO's", "sample.noise_level of config/base.py: sigma_s = 0.7 sqrt(s / (1 - s)) "
                                             "on every step (its FLUX 'fast' configs use 0.8 on a 3-step SDE window, "
                                             "which fastnabla does not implement)"),
    "flow.resolution": (512, "Flow-GRPO's", "config.resolution = 512 in its SD3.5-M and FLUX.1 configs"),
    "flow.lora.rank": (32, "Flow-GRPO's", "LoRA r = 32, alpha = 64 on the image and context streams' attention "
                                          "projections (scripts/train_sd3.py)"),
    "flow.lora.alpha": (64.0, "Flow-GRPO's", "see flow.lora.rank"),
    "flow.trajectory_dtype": ("fp32", "ours", "as the sd15 presets: bf16 storage rounds the late states"),
    "flow.reward.transform": ("exp", "release", "as sd15-aesthetic: log R = the raw score, so the paper's beta "
                                                "carries over"),
    "flow.reward.chunk_size": (4, "ours", "bounds the reward's activation memory; results do not depend on it"),
    "flow.prompts.source": ("animals", "paper", "the sd15-aesthetic prompts (DDPO's 45 animals)"),
    "flow.speed.gradient_checkpointing": (True, "ours", "the transformer's block activations recomputed in the "
                                                        "backward pass: the 2.5 B / 12 B transformers' graphs of "
                                                        "one CFG pair do not fit beside the weights otherwise"),
    "train.micro_batch_size": (1, "ours", "one latent per forward/backward (memory)"),
    "train.fl_batch_size": (1, "ours", "bounds the forward-looking decode-VJP (memory)"),
}
FLOW_FAMILY_PROVENANCE: dict[str, dict[str, tuple[Any, str, str]]] = {
    "sd35": {
        "flow.model": ("stabilityai/stable-diffusion-3.5-medium", "Flow-GRPO's", "pretrained.model of its SD3.5 "
                                                                                 "configs; --model DIR takes a local "
                                                                                 "copy"),
        "flow.family": ("sd3", "ours", "StableDiffusion3Pipeline (CFG pair per call)"),
        "flow.num_steps": (10, "Flow-GRPO's", "sample.num_steps = 10 for training (it evaluates with 40)"),
        "flow.guidance_scale": (4.5, "Flow-GRPO's", "sample.guidance_scale = 4.5 (CFG, empty negative prompt)"),
    },
    "flux": {
        "flow.model": ("black-forest-labs/FLUX.1-dev", "Flow-GRPO's", "pretrained.model of its FLUX configs (gated: "
                                                                      "accept the licence on the hub); --model DIR "
                                                                      "takes a local copy"),
        "flow.family": ("flux", "ours", "FluxPipeline: the guidance embedding, no CFG pair"),
        "flow.num_steps": (6, "Flow-GRPO's", "sample.num_steps = 6 in its FLUX configs (it evaluates with 28)"),
        "flow.guidance_scale": (3.5, "Flow-GRPO's", "sample.guidance_scale = 3.5, FLUX.1-dev's distilled guidance "
                                                    "embedding"),
    },
}


def _flow_reward(family: str) -> dict[str, Any]:
    sd15 = _sd_reward("aesthetic")
    settings = {**FLOW_PROVENANCE, **FLOW_FAMILY_PROVENANCE[family]}
    return _with({k: v for k, v in sd15.items() if k != "sd"}, {"flow": {"reward": {"name": "aesthetic", "scale": 1.0,
                                                                                    "shift": 0.0}}},
                 _nested({k: v[0] for k, v in settings.items()}))


PRESETS.update(
    {
        "sd35-medium-aesthetic": (
            "SD3.5 Medium + LAION Aesthetic Score on the animal prompts at 512 px, Flow-GRPO's sampler and LoRA with "
            "the sd15-aesthetic method settings (docs/presets.md); needs the weights", _flow_reward("sd35")),
        "flux-dev-aesthetic": (
            "FLUX.1-dev + LAION Aesthetic Score on the animal prompts at 512 px, Flow-GRPO's sampler and LoRA with "
            "the sd15-aesthetic method settings (docs/presets.md); needs the weights", _flow_reward("flux")),
    }
)


def flow_provenance_markdown() -> str:
    """The flow presets' settings (sd35-medium-aesthetic, flux-dev-aesthetic) with source and reason."""
    rows = ["| setting | value | from | why |", "|---|---|---|---|"]
    rows += [f"| `{path}` | `{value}` | {source} | {why} |" for path, (value, source, why) in FLOW_PROVENANCE.items()]
    for family, settings in FLOW_FAMILY_PROVENANCE.items():
        rows += [f"| `{path}` ({family}) | `{value}` | {source} | {why} |"
                 for path, (value, source, why) in settings.items()]
    return "\n".join(rows) + "\n"

DEFAULT_PRESET = "gmm-default"


def get_preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name][1]

# Baselines (fastnabla.methods, docs/baselines.md) with the paper's section 4.3 settings: residual DB and DAG-DB
# at lr 3e-4 for policy and flow with output regularisation 1 (method.db.output_reg's default); DDPO with its
# released PPO settings (lr 3e-4, two updates per sampled batch, and on the analytic task every transition as in
# its release; on Stable Diffusion the shared 10% of transitions, which keeps the per-iteration cost of every SD
# preset alike); ReFL and DRaFT at the LoRA learning rate 1e-3 (AlignProp's, which the paper follows for DRaFT).
# Constant learning rates throughout.
_BASELINE_OPTIM: dict[str, dict[str, Any]] = {
    "residual-db": {"lr_policy": 3e-4, "lr_flow": 3e-4},
    "dag-db": {"lr_policy": 3e-4, "lr_flow": 3e-4},
    "ddpo": {"lr_policy": 3e-4},
    "refl": {"lr_policy": 1e-3},
    "draft-k": {"lr_policy": 1e-3},
    "draft-lv": {"lr_policy": 1e-3},
}
_BASELINE_TRAIN: dict[str, dict[str, Any]] = {"ddpo": {"transition_fraction": 1.0, "updates_per_batch": 2}}
_BASELINE_TEXT = {
    "residual-db": "residual DB (paper eq. 20, forward-looking scalar flow)",
    "dag-db": "DAG-DB (log-space DB, noising backward policy, forward-looking scalar flow)",
    "ddpo": "DDPO (PPO-clipped policy gradient, per-prompt advantages)",
    "refl": "ReFL (reward of the one-step prediction at a random step in 35..49 of 50)",
    "draft-k": "DRaFT-K (reward backpropagated through the last K=1 steps)",
    "draft-lv": "DRaFT-LV (K=1 with two noising-denoising draws of the final sample)",
}


def _baseline(name: str, *, sd: bool) -> dict[str, Any]:
    optim = {**_BASELINE_OPTIM[name], "lr_schedule": "constant"}
    method: dict[str, Any] = {"name": name}
    train = dict(_BASELINE_TRAIN.get(name, {}))
    if sd:
        if name in ("refl", "draft-k", "draft-lv"):
            method[name.split("-")[0]] = {"relu": True}  # -ReLU(R) with R the raw score (log R = score here)
            train["updates_per_batch"] = 2  # one update per 32 trajectories, as the paper's nabla-DB runs
        if name in ("residual-db", "dag-db"):  # the DAG-DB release: log-densities averaged, gamma = 1, beta 1e2
            method.update(beta=1e2, db={"log_prob_reduction": "mean", "gamma": "one"})
        if name == "ddpo":  # DDPO trains on every timestep of its trajectories, two PPO updates per batch
            train = {"transition_fraction": 1.0, "updates_per_batch": 2}
    return {"method": method, "optim": optim, **({"train": train} if train else {})}


for _name, _text in _BASELINE_TEXT.items():
    PRESETS[f"gmm-{_name}"] = (f"analytic default case, {_text}", _baseline(_name, sd=False))
for _name, _text in _BASELINE_TEXT.items():
    PRESETS[f"sd15-aesthetic-{_name}"] = (
        f"Stable Diffusion 1.5 + Aesthetic Score, {_text}; needs the weights",
        _with(_sd_reward("aesthetic"), _baseline(_name, sd=True)),
    )


# digits (docs/digits.md, "Fine-tuning it"): the sd15 settings on the small trained digits pipeline, with what a
# 2-core CPU and the yardstick's importance-weighted target need. Every change from the sd15 presets is labelled
# like SD_PROVENANCE (docs/presets.md, "The digits presets": `python -m fastnabla.run.presets --markdown digits`).
DIGITS_PROVENANCE: dict[str, tuple[Any, str, str]] = {
    "sd.model": ("digits", "ours", "the full digits build in the default cache, built on demand the first time (~6 "
                                   "CPU-minutes, progress bar); --model DIR takes another build"),
    "sd.prompts.source": ("digits:a handwritten digit", "ours", "the target p#(x) R(x)^beta is defined for one prompt; "
                                                               "this one's prior covers all ten classes"),
    "sd.reward.name": ("digits-value", "ours", "log R = the expected digit: smooth, bounded, tilts every class. "
                                               "digits-class {3} spans ~30 nats and did not move in 40 iterations "
                                               "at beta 0.25 (eval log R -17.39 -> -17.44; digits-value 5.75 -> 6.90)"),
    "sd.reward.chunk_size": (0, "ours", "16x16 images: the classifier scores a whole batch at once"),
    "method.beta": (0.5, "ours", "ESS 4,965 of 10,000 importance weights at 20 steps (4,871 at 50); the target keeps "
                                 "every class (8 + 9 at 62 %). Every digits-* preset keeps it: one target for all"),
    "sd.num_steps": (20, "ours", "2.5x cheaper sampling than 50 on the CPU; the target is re-estimated with the same "
                                 "sampler (pretrained mean log R 5.17, target 7.44: as at 50 steps)"),
    "method.weight_forward": ("eps", "ours", "the analytic task's tuned setting (docs/analytic-benchmark.md): with the "
                                            "sd15 presets' 'one' (the release's, losses in score units, late steps "
                                            "weighted ~1/sigma^4) 30 iterations moved eval mean log R 5.09 -> 5.31 "
                                            "(3 seeds); eps weights and the four settings below: 5.07 -> 6.74 "
                                            "(seed 0, 500 samples; target 7.44)"),
    "method.weight_reverse": ("eps", "ours", "as method.weight_forward"),
    "method.output_reg": (0.0, "ours", "no output regulariser, as the analytic task's tuned method (eps weights with "
                                       "lambda 0 alone: 5.07 -> 6.10)"),
    "method.gamma": ("one", "ours", "the analytic task's tuned setting (a stationary forward-looking baseline)"),
    "method.fl_model": ("pretrained", "ours", "the analytic task's tuned setting: x_hat from the pretrained model"),
    "method.forward_trains_flow": (False, "ours", "the analytic task's tuned setting: the flow trained by its own "
                                                  "target only"),
    "method.terminal": ("paper", "ours", "the paper's terminal handling (the analytic task's)"),
    "optim.lr_policy": (3e-3, "ours", "LoRA r 8 on a 1.77 M-parameter UNet: 1e-3 moved eval log R by ~1.2 in 40 "
                                      "iterations (tiny-sd layout); a short CPU run needs larger steps"),
    "sd.flow.block_out_channels": ([32, 64], "ours", "4x4 latents take one downsampling"),
    "method.db.flow_channels": ([32, 64], "ours", "the DB baselines' flow network on 4x4 latents"),
    "train.iterations": (30, "ours", "3.0 CPU-minutes for 30 iterations with the evaluation (shared 2-core machine)"),
    "train.batch_size": (16, "ours", "16 trajectories per iteration (CPU budget), one update per 8"),
    "train.sample_batch_size": (16, "ours", "one sampling call per iteration"),
    "train.micro_batch_size": (16, "ours", "tiny networks: one forward/backward for many transitions"),
    "train.fl_batch_size": (16, "ours", "as micro_batch_size"),
    "train.transition_fraction": (0.2, "ours", "4 of 20 transitions per trajectory (the terminal one included): "
                                               "about the sd15 presets' 5 of 50"),
    "train.checkpoint_every": (0, "ours", "runs of minutes; no intermediate checkpoints"),
    "eval.every": (0, "ours", "only the end-of-run evaluation (metrics.json 'digits')"),
    "eval.num_samples": (2000, "ours", "policy and pretrained evaluation sets. The class-TV floor (an exact sampler "
                                      "of the target, with the target's own importance error; metrics.json "
                                      "'class_tv_floor') is 0.023 (95 % below 0.038) at 2,000 samples against "
                                      "0.031 (0.050) at 1,000, so TV <= 0.05 tests the method, not the noise"),
    "eval.final_num_samples": (10000, "ours", "the target's pretrained samples (docs/digits.md's ESS table)"),
    "threads": (1, "ours", "one torch thread: faster than two on the shared 2-core machine (docs/digits.md)"),
}
_DIGITS: dict[str, Any] = _with(
    _SD_PAPER, {"sd": {"prompts": {"eval_seeds": [0, 1, 2, 3, 4, 5, 6, 7]}, "reward": {"transform": "exp"}}},
    _nested({k: v[0] for k, v in DIGITS_PROVENANCE.items()}),
)
# the baselines keep the digits target (beta) and transitions per iteration; their own learning rates and losses
# are _baseline's (the sd15-aesthetic-NAME settings)
PRESETS["digits"] = ("digits pipeline (built on demand) + digits-value reward, beta 0.5, nabla-GFlowNet; ~5 "
                     "CPU-minutes with the end-of-run yardstick evaluation (docs/digits.md)", _DIGITS)
for _name, _text in _BASELINE_TEXT.items():
    PRESETS[f"digits-{_name}"] = (
        f"digits pipeline + digits-value, {_text}",
        _with(_DIGITS, _baseline(_name, sd=True),
              {"method": {"beta": DIGITS_PROVENANCE["method.beta"][0]},
               "train": {"transition_fraction": DIGITS_PROVENANCE["train.transition_fraction"][0],
                         "updates_per_batch": 2}}),
    )


def analytic_preset(case: str, method: str) -> tuple[str, dict[str, Any]]:
    """The run name and partial config of ``method`` on the analytic ``case`` (a key of :data:`ANALYTIC_CASES`).

    ``nabla-gfn`` runs the case's tuned preset (``gmm-default``, ``gmm-CASE``), ``oracle`` its oracle-flow floor
    (``gmm-oracle``, ``gmm-CASE-oracle``), a baseline ``NAME`` its ``gmm-NAME`` settings on the case's task
    (``gmm-NAME`` on the default case, else ``gmm-CASE-NAME``, composed here)."""
    if case not in ANALYTIC_CASES:
        raise ValueError(f"unknown analytic case {case!r}; available: {', '.join(ANALYTIC_CASES)}")
    if method not in ("nabla-gfn", "oracle", *_BASELINE_TEXT):
        raise ValueError(f"unknown method {method!r} for an analytic case")
    base = "gmm-default" if case == "default" else f"gmm-{case}"
    if method == "nabla-gfn":
        name = base
    elif case == "default":
        name = f"gmm-{method}"
    else:
        name = f"{base}-{method}"
    if name in PRESETS:
        return name, get_preset(name)
    extra = _SHAPE_EVAL if case in SHAPE_CASES else {}
    return name, _with(ANALYTIC_CASES[case][1], extra, _baseline(method, sd=False))


def provenance_markdown() -> str:
    """The sd15 presets' settings, value and source (paper / release / ours) with the reason, then the sdxl presets'
    changes: docs/presets.md."""
    rows = ["| setting | value | from | why |", "|---|---|---|---|"]
    for path, (value, source, why) in SD_PROVENANCE.items():
        rows.append(f"| `{path}` | `{value}` | {source} | {why} |")
    for reward, settings in SD_REWARD_PROVENANCE.items():
        for path, (value, source, why) in settings.items():
            rows.append(f"| `{path}` ({reward}) | `{value}` | {source} | {why} |")
    for path, (value, source, why) in SD15_COST_PROVENANCE.items():
        rows.append(f"| `{path}` (sd15 nabla-GFlowNet) | `{value}` | {source} | {why} |")
    for path, (value, source, why) in SDXL_PROVENANCE.items():
        rows.append(f"| `{path}` (sdxl) | `{value}` | {source} | {why} |")
    return "\n".join(rows) + "\n"


def digits_provenance_markdown() -> str:
    """The digits preset's settings that differ from the sd15 presets, with source and reason: docs/presets.md."""
    rows = ["| setting | value | from | why |", "|---|---|---|---|"]
    rows += [f"| `{path}` | `{value}` | {source} | {why} |" for path, (value, source, why) in DIGITS_PROVENANCE.items()]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--markdown", "flow"]:
        sys.exit(print(flow_provenance_markdown(), end=""))
    if sys.argv[1:] not in (["--markdown"], ["--markdown", "digits"]):
        sys.exit("usage: python -m fastnabla.run.presets --markdown [digits]   (the sd15 / digits presets' settings "
                 "and their sources)")
    print(digits_provenance_markdown() if sys.argv[2:] else provenance_markdown(), end="")
