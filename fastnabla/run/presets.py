"""Named presets: partial configs layered over the defaults of :class:`RunConfig`."""

from __future__ import annotations

from typing import Any

from fastnabla.run.provenance import (
    DIGITS_LONG_PROVENANCE,
    DIGITS_PROVENANCE,
    FLOW_FAMILY_PROVENANCE,
    FLOW_PROVENANCE,
    SD15_COST_PROVENANCE,
    SD15_FAST_PROVENANCE,
    SD_PROVENANCE,
    SD_REWARD_PROVENANCE,
    SDXL_PROVENANCE,
    digits_provenance_markdown,
    flow_provenance_markdown,
    provenance_markdown,
)

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
    "flow_ema_decay": 0.0,
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


# The sd15 nabla-GFlowNet presets: the release's settings (SD_PROVENANCE, SD_REWARD_PROVENANCE) with the cost
# setting of SD15_COST_PROVENANCE (issue 15, docs/cost.md); the tables, labelled, are in fastnabla/run/provenance.py.
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
        "sd15-fast-aesthetic": (
            "sd15-aesthetic with 16 sampled trajectories x 24 trained transitions instead of 64 x 6: 0.44x the "
            "release's FLOPs per trained transition incl. sampling; held on digits, lost on gmm-shift-narrow "
            "(docs/cost.md); needs the weights (and TAESD's)",
            _with(_sd15_nabla("aesthetic"), _nested({k: v[0] for k, v in SD15_FAST_PROVENANCE.items()})),
        ),
    }
)


# SDXL: the sd15 release settings (SD_PROVENANCE; not the sd15 nabla-GFlowNet cost layout) + SDXL_PROVENANCE.
def _sdxl_reward(name: str) -> dict[str, Any]:
    return _with(_sd_reward(name), _nested({k: v[0] for k, v in SDXL_PROVENANCE.items()}))


# tiny-sdxl: tiny-sd on the tiny random SDXL pipeline (two text encoders, pooled embedding, time ids, SDXL's VAE
# scaling and scheduler config), end to end on a CPU in seconds.
PRESETS.update(
    {
        "tiny-sdxl": ("tiny random SDXL pipeline + analytic colour reward: end to end on a CPU",
                      _with(_TINY_SD, {"sd": {"model": "tiny-sdxl"}})),
        "sdxl-aesthetic": (
            "SDXL base 1.0 + LAION Aesthetic Score on the animal prompts at 1024 px, the sd15 release settings "
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


# sd35-medium-aesthetic / flux-dev-aesthetic: the sd15-aesthetic method, reward and training settings on the flow task
# with Flow-GRPO's sampler and LoRA (FLOW_PROVENANCE, FLOW_FAMILY_PROVENANCE; docs/presets.md, "The flow presets").
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
            "the sd15 release settings (docs/presets.md); needs the weights", _flow_reward("sd35")),
        "flux-dev-aesthetic": (
            "FLUX.1-dev + LAION Aesthetic Score on the animal prompts at 512 px, Flow-GRPO's sampler and LoRA with "
            "the sd15 release settings (docs/presets.md); needs the weights", _flow_reward("flux")),
    }
)


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


# digits (docs/digits.md, "Fine-tuning it"): the sd15 settings on the small trained digits pipeline with
# DIGITS_PROVENANCE's changes (what a 2-core CPU and the yardstick's importance-weighted target need).
_DIGITS: dict[str, Any] = _with(
    _SD_PAPER, {"sd": {"prompts": {"eval_seeds": [0, 1, 2, 3, 4, 5, 6, 7]}, "reward": {"transform": "exp"}}},
    _nested({k: v[0] for k, v in DIGITS_PROVENANCE.items()}),
)
# the baselines keep the digits target (beta) and transitions per iteration; their own learning rates and losses
# are _baseline's (the sd15-aesthetic-NAME settings), except that the DB baselines sum their log-densities: with the
# DAG-DB release's mean over the N = 64 latent elements their exponent is N beta (residual DB's fixed point
# p# R^(N beta), DAG-DB's R^(N beta); docs/baselines.md), a different target
PRESETS["digits"] = ("digits pipeline (built on demand) + digits-value reward, beta 0.5, nabla-GFlowNet; ~5 "
                     "CPU-minutes with the end-of-run yardstick evaluation (docs/digits.md)", _DIGITS)
PRESETS["digits-long"] = ("digits with the pathwise flow target over 60 cosine-decayed iterations, nabla-GFlowNet; "
                          "class TV 0.089 +- 0.033 over 7 seeds, ~14 CPU-minutes with the evaluation (docs/digits.md)",
                          _with(_DIGITS, _nested({k: v[0] for k, v in DIGITS_LONG_PROVENANCE.items()})))
for _name, _text in _BASELINE_TEXT.items():
    PRESETS[f"digits-{_name}"] = (
        f"digits pipeline + digits-value, {_text}",
        _with(_DIGITS, _baseline(_name, sd=True),
              {"method": {"beta": DIGITS_PROVENANCE["method.beta"][0],
                          **({"db": {"log_prob_reduction": "sum"}} if _name in ("residual-db", "dag-db") else {})},
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


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--markdown", "flow"]:
        sys.exit(print(flow_provenance_markdown(), end=""))
    if sys.argv[1:] not in (["--markdown"], ["--markdown", "digits"]):
        sys.exit("usage: python -m fastnabla.run.presets --markdown [digits]   (the sd15 / digits presets' settings "
                 "and their sources)")
    print(digits_provenance_markdown() if sys.argv[2:] else provenance_markdown(), end="")
