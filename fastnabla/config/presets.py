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
    out: dict[str, Any] = {}
    for p in parts:
        for k, v in p.items():
            out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
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

DEFAULT_PRESET = "gmm-default"


def get_preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name][1]
