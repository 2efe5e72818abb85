"""Where every setting of the model presets comes from: tables of ``path -> (value, source, reason)`` with source
"paper" (Liu et al.), "release" (the authors' code, lzzcd001/nabla-gfn), "Flow-GRPO's" or "ours", and the Markdown
tables of docs/presets.md rendered from them (``python -m fastnabla.run.presets --markdown [digits|flow]``;
tests keep the page equal). :mod:`fastnabla.run.presets` composes the presets from these values."""

from __future__ import annotations

from typing import Any

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
    "method.flow_ema_decay": (0.0, "paper", "the forward target reads the live flow (the averaged flow of the analytic "
                                            "presets needs the flow trained by its own target only)"),
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


# The sd15 nabla-GFlowNet presets' cost settings (issue 15, docs/cost.md): ours, measured against the unaccelerated
# layout at equal iterations on digits at the presets' 50 steps (8 seeds, both with a cosine-decayed rate) and on the
# analytic cases (3 seeds); 0.48x the release's FLOPs per trained transition including sampling (python -m
# fastnabla.flops --preset sd15-aesthetic). Not applied to the baselines (sd15-aesthetic-NAME), SDXL or flow models.
SD15_COST_PROVENANCE: dict[str, tuple[Any, str, str]] = {
    "method.fl_decoder": ("surrogate", "ours", "the forward-looking term through TAESD at non-terminal states (a "
                                               "baseline the flow absorbs), the exact VAE decoder at x_T: decoders "
                                               "10.1 -> 1.4 TF per trained transition. Digits, 3 seeds: mean log R "
                                               "6.31 +- 0.25, class TV 0.289 +- 0.003, diversity 0.994 vs 6.32 +- "
                                               "0.40, 0.265 +- 0.024, 0.994; Frechet 333 +- 175 vs 181 +- 18 (one "
                                               "seed 532; docs/cost.md). method.fl_decoder=exact: the release's"),
    "sd.fl_surrogate_decoder": ("madebyollin/taesd", "ours", "TAESD (diffusers AutoencoderTiny) for SD 1.x latents"),
    "train.batch_size": (22, "ours", "22 sampled trajectories per iteration, each trained in 3 passes "
                                     "(train.replay_batches): 66 x 6 trained transitions per pass, as the release's "
                                     "64 x 6, from a third of the sampling: 0.713x -> 0.476x the release with TAESD"),
    "train.replay_batches": (3, "ours", "every pass trains the 3 most recent sampled batches, a fresh subsample of "
                                        "each (the objective is off-policy). Digits at 50 steps, 60 iterations, "
                                        "cosine rate, 8 seeds, with the digits surrogate vs unaccelerated: mean log "
                                        "R 7.06 +- 0.22 vs 7.05 +- 0.20, class TV 0.122 +- 0.043 vs 0.105 +- 0.022 "
                                        "(medians 0.112 / 0.111), diversity 1.011 vs 1.011; analytic cases (3 seeds, "
                                        "600 iterations, their cosine rate): gmm-shift-narrow TV 0.030 +- 0.013 vs "
                                        "0.027 +- 0.011, gmm-default 0.032 +- 0.003 vs 0.034 +- 0.005 (docs/cost.md)"),
    "optim.lr_schedule": ("cosine", "ours", "the rate decays to a tenth over train.iterations, as in the analytic "
                                            "presets: at a constant rate 2 of 8 digits seeds of the replayed layout "
                                            "wandered off late (class TV 0.208 +- 0.136, one at the pretrained "
                                            "reward); decayed, none did, and the unaccelerated layout improved too "
                                            "(0.152 +- 0.071 -> 0.105 +- 0.022, docs/digits.md)"),
    "method.forward_trains_flow": (False, "ours", "the averaged flow needs the flow trained by its own target only "
                                                  "(the analytic and digits presets' setting)"),
    "method.flow_ema_decay": (0.95, "ours", "the forward target reads a Polyak-averaged flow (the analytic and digits "
                                            "presets' default; digits at 50 steps, 8 seeds, unaccelerated: class TV "
                                            "0.152 +- 0.071 vs the live flow's 0.187 +- 0.103); the replayed layout "
                                            "held on the analytic shape case only with it (docs/cost.md)"),
}


# sd15-fast-aesthetic: sd15-aesthetic with 4x fewer sampled trajectories, each trained once on 4x the transitions
# (issue 15, docs/cost.md): 0.44x the release with the surrogate. Not the default: it held on digits but lost on the
# analytic shape case gmm-shift-narrow, and it is unmeasured on real SD.
SD15_FAST_PROVENANCE: dict[str, tuple[Any, str, str]] = {
    "train.batch_size": (16, "ours", "4x fewer sampled trajectories than the release's 64, each with 4x the trained "
                                     "transitions (16 x 24 = 64 x 6 = 384 per iteration; the objective is "
                                     "off-policy): sampling per trained transition 13.9 -> 3.5 TF. Digits 8 x 10: "
                                     "6.20 +- 0.25 / TV 0.271 +- 0.029; the analytic case 64 x 44: TV 0.044 +- "
                                     "0.004 vs 0.038 +- 0.003; but gmm-shift-narrow 64 x 44: TV 0.074 +- 0.011 vs "
                                     "0.039 +- 0.015, worse also at equal compute (docs/cost.md). With the "
                                     "surrogate, digits 3 seeds: 6.47 +- 0.42 / TV 0.249 +- 0.014"),
    "train.transition_fraction": (0.46, "ours", "23 chunks + the terminal transition = 24 of 50 per trajectory"),
    "train.replay_batches": (1, "ours", "each sampled batch trained once: the layout measured (with the averaged "
                                        "flow: digits at 20 steps 6.47 +- 0.45 / TV 0.248 +- 0.059 vs 6.49 +- 0.36 "
                                        "/ 0.243 +- 0.044; gmm-shift-narrow 64 x 44 TV 0.041 +- 0.007 vs 0.027 +- "
                                        "0.011)"),
    "optim.lr_schedule": ("constant", "ours", "the rate of this layout's digits runs; the decayed one is unmeasured "
                                              "for it on digits"),
}


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


def flow_provenance_markdown() -> str:
    """The flow presets' settings (sd35-medium-aesthetic, flux-dev-aesthetic) with source and reason."""
    rows = ["| setting | value | from | why |", "|---|---|---|---|"]
    rows += [f"| `{path}` | `{value}` | {source} | {why} |" for path, (value, source, why) in FLOW_PROVENANCE.items()]
    for family, settings in FLOW_FAMILY_PROVENANCE.items():
        rows += [f"| `{path}` ({family}) | `{value}` | {source} | {why} |"
                 for path, (value, source, why) in settings.items()]
    return "\n".join(rows) + "\n"


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
    "method.beta": (0.5, "ours", "ESS 4,871 of 10,000 importance weights at 50 steps (4,965 at 20); the target keeps "
                                 "every class (8 + 9 at 62 %). Every digits-* preset keeps it: one target for all"),
    "sd.num_steps": (50, "release", "the release's (and the sd15 presets') 50 DDIM steps; the target is estimated with "
                                    "the same sampler (ESS 4,871, pretrained mean log R 5.20, target 7.44). "
                                    "nabla-DB's forward loss fits a noise-averaged tilt whose bias shrinks with the "
                                    "step size: with the averaged flow 8 seeds end at class TV 0.152 +- 0.071, log R "
                                    "7.00 +- 0.15; at 20 steps (the presets before) 0.224 +- 0.019, 6.59 +- 0.23 "
                                    "(6 seeds, live flow); at 10 steps 0.286 +- 0.074 (docs/digits.md). 2.5x the "
                                    "sampling of 20 steps"),
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
    "method.flow_ema_decay": (0.95, "ours", "the analytic presets' Polyak-averaged flow (the forward target reads the "
                                            "average): at 50 steps 8 seeds class TV 0.152 +- 0.071, log R 7.00 +- "
                                            "0.15 against the live flow's 0.187 +- 0.103, 6.74 +- 0.35; the "
                                            "baselines have no such flow"),
    "sd.lora.target_modules": (["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                                "ff.net.2", "conv1", "conv2"], "ours",
                               "the release's attention projections plus the transformer blocks' proj_in/proj_out "
                               "and feed-forward and the ResNet convolutions (rank 8: 180,608 adapter weights "
                               "against 28,928): 6 seeds class TV 0.224 +- 0.019, log R 6.59 +- 0.23 against "
                               "0.258 +- 0.033, 6.35 +- 0.35 on the attention alone (Welch t -2.2 in TV); regressed "
                               "onto a known shift it reached TV 0.121 against 0.178 (docs/digits.md, 'Where the "
                               "value-baseline policy loses the tilt'). Every digits-* preset trains it"),
    "optim.lr_policy": (3e-3, "ours", "LoRA r 8 on a 1.77 M-parameter UNet: 1e-3 moved eval log R by ~1.2 in 40 "
                                      "iterations (tiny-sd layout); a short CPU run needs larger steps"),
    "sd.flow.block_out_channels": ([32, 64], "ours", "4x4 latents take one downsampling"),
    "method.db.flow_channels": ([32, 64], "ours", "the DB baselines' flow network on 4x4 latents"),
    "train.iterations": (30, "ours", "30 iterations: 3.0 CPU-minutes of training at 50 steps, 5.2 with the "
                                    "evaluation (shared 2-core machine)"),
    "train.batch_size": (16, "ours", "16 trajectories per iteration (CPU budget), one update per 8"),
    "train.sample_batch_size": (16, "ours", "one sampling call per iteration"),
    "train.micro_batch_size": (16, "ours", "tiny networks: one forward/backward for many transitions"),
    "train.fl_batch_size": (16, "ours", "as micro_batch_size"),
    "train.transition_fraction": (0.2, "ours", "10 + 1 of 50 transitions per trajectory (the terminal one added): "
                                               "twice the sd15 presets' 5 + 1 of 50 in a short CPU run (4 + 1 of "
                                               "20 before the presets moved to 50 steps)"),
    "train.checkpoint_every": (0, "ours", "runs of minutes; no intermediate checkpoints"),
    "eval.every": (0, "ours", "only the end-of-run evaluation (metrics.json 'digits')"),
    "eval.num_samples": (2000, "ours", "policy and pretrained evaluation sets. The class-TV floor (an exact sampler "
                                      "of the target, with the target's own importance error; metrics.json "
                                      "'class_tv_floor') is 0.023 (95 % below 0.038) at 2,000 samples against "
                                      "0.031 (0.050) at 1,000, so TV <= 0.05 tests the method, not the noise"),
    "eval.final_num_samples": (10000, "ours", "the target's pretrained samples (docs/digits.md's ESS table)"),
    "threads": (1, "ours", "one torch thread: faster than two on the shared 2-core machine (docs/digits.md)"),
}


# digits-long: the digits preset with the pathwise flow target over 60 cosine-decayed iterations (docs/digits.md,
# "The pathwise flow target at 50 steps"): class TV 0.089 +- 0.033 over 7 seeds (eq. 17 at its length: 0.110 over 5),
# at about 2.7x the CPU cost of digits (14 CPU-minutes with the evaluation on the shared 2-core machine).
DIGITS_LONG_PROVENANCE: dict[str, tuple[Any, str, str]] = {
    "method.reverse_target": ("pathwise", "ours", "the flow at step t regresses on the pretrained Jacobian times "
                                                  "the flow (and, with weight lambda, the pathwise target) at t+1 "
                                                  "instead of waiting for the policy at t to move (eq. 17): credit "
                                                  "crosses the 50 steps faster. 60 decayed iterations, seeds 0-4: "
                                                  "class TV 0.075 +- 0.028, log R 7.16 +- 0.12 against eq. 17's "
                                                  "0.110 +- 0.021, 7.03 +- 0.14; seeds 5 / 6 later 0.110 / 0.136 "
                                                  "(seven runs 0.089 +- 0.033). 1.5x the CPU time per run (the "
                                                  "target sweeps all 51 states of each trajectory; 1.7x before it "
                                                  "shared the FL term's UNet forwards). Not in digits: over its 30 "
                                                  "constant-rate iterations "
                                                  "it wandered (seed 0: 0.348 against 0.116), over 30 decayed ones "
                                                  "it did not help (0.126 / 0.102, seeds 0 / 1)"),
    "method.td_lambda": (0.5, "ours", "the analytic presets' lambda (docs/analytic-benchmark.md); 0.8 ended nine "
                                      "runs of seeds 0-7 at class TV 0.104 +- 0.048, not better (docs/digits.md)"),
    "train.iterations": (60, "ours", "twice digits' iterations: the pathwise target needs the decayed run's length "
                                     "(above)"),
    "optim.lr_schedule": ("cosine", "ours", "the rate decays to a tenth over the run: constant-rate digits runs "
                                            "wander around their plateau (docs/digits.md)"),
}


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
    for path, (value, source, why) in SD15_FAST_PROVENANCE.items():
        rows.append(f"| `{path}` (sd15-fast-aesthetic) | `{value}` | {source} | {why} |")
    for path, (value, source, why) in SDXL_PROVENANCE.items():
        rows.append(f"| `{path}` (sdxl) | `{value}` | {source} | {why} |")
    return "\n".join(rows) + "\n"


def digits_provenance_markdown() -> str:
    """The digits preset's settings that differ from the sd15 presets, then digits-long's changes to it, with source and
    reason: docs/presets.md."""
    rows = ["| setting | value | from | why |", "|---|---|---|---|"]
    rows += [f"| `{path}` | `{value}` | {source} | {why} |" for path, (value, source, why) in DIGITS_PROVENANCE.items()]
    rows += [f"| `{path}` (digits-long) | `{value}` | {source} | {why} |"
             for path, (value, source, why) in DIGITS_LONG_PROVENANCE.items()]
    return "\n".join(rows) + "\n"
