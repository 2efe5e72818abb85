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

# Stable Diffusion with the paper's / the authors' release settings (paper section 4.3, DESIGN.md section 1):
# DDIM eta=1, 50 steps, CFG 5, LoRA r=8 on the attention projections, AdamW lr 1e-3 (weight decay 1e-4)
# for LoRA and flow with separate clipping at 1, 64 trajectories per iteration sampled 16 at a time, 10% of
# transitions (one per chunk + the terminal one), micro-batches of 4, FL through the policy with gamma_t =
# abar_t, reward smoothing c = 2e-3 with 3 draws, log R = the raw score (the release differentiates the score
# itself), the reverse loss of eq. 17 and the release's gradient routing.
_SD_PAPER: dict[str, Any] = {
    "task": "sd",
    "threads": 0,
    "method": {
        **_PAPER_METHOD,
        "fl_jacobian": "full",
        "fl_noise_var": 2e-3,
        "fl_num_noise": 3,
    },
    "optim": {
        "optimizer": "adamw", "lr_policy": 1e-3, "lr_flow": 1e-3, "weight_decay": 1e-4, "lr_schedule": "constant",
    },
    "train": {
        "iterations": 200,
        "batch_size": 64,
        "sample_batch_size": 16,
        "transition_fraction": 0.1,
        "micro_batch_size": 4,
        "updates_per_batch": 12,
        "fl_batch_size": 4,
        "checkpoint_every": 5,
    },
    "eval": {"every": 5},
    "sd": {"reward": {"transform": "exp", "scale": 1.0, "shift": 0.0, "chunk_size": 4}, "trajectory_dtype": "bf16"},
}


def _sd_reward(name: str, beta: float, output_reg: float) -> dict[str, Any]:
    return _with(_SD_PAPER, {"method": {"beta": beta, "output_reg": output_reg}, "sd": {"reward": {"name": name}}})


# tiny-sd: a tiny random pipeline (real CLIP tokenizer) and an analytic colour reward, end to end on a CPU in
# a few minutes: 3 iterations = 1 sampling-only + 2 training epochs.
_TINY_SD: dict[str, Any] = _with(
    _SD_PAPER,
    {
        "threads": 1,
        "method": {"beta": 50.0, "output_reg": 1.0},
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

PRESETS.update(
    {
        "tiny-sd": ("tiny random Stable Diffusion pipeline + analytic colour reward: end to end on a CPU", _TINY_SD),
        "sd15-aesthetic": (
            "Stable Diffusion 1.5 + LAION Aesthetic Score, paper settings (beta 1e3, lambda 1e3); needs the weights",
            _sd_reward("aesthetic", 1e3, 1e3),
        ),
        "sd15-hpsv2": (
            "Stable Diffusion 1.5 + HPSv2.1, paper settings (beta 1e4, lambda 1e2); needs the weights",
            _sd_reward("hpsv2.1", 1e4, 1e2),
        ),
        "sd15-imagereward": (
            "Stable Diffusion 1.5 + ImageReward v1.0, the HPSv2 settings (beta 1e4, lambda 1e2); needs the weights",
            _sd_reward("imagereward", 1e4, 1e2),
        ),
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
        _with(_sd_reward("aesthetic", 1e3, 1e3), _baseline(_name, sd=True)),
    )
