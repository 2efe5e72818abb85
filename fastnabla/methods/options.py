"""Options of the baseline methods (``method.db``, ``method.ddpo``, ``method.refl``, ``method.draft``).

Defaults follow the nabla-GFlowNet paper's section 4.3 and the settings it cites: the DB baselines with output
regularisation ``lambda = 1`` (their learning rate, 3e-4, lives in the presets: ``optim`` is shared by every
method), DDPO's released PPO settings, ReFL's stop steps 35..49 of 50, DRaFT with ``K = 1`` and DRaFT-LV with
two noising-denoising draws. This module has no heavy imports: the run config (``fastnabla.config.schema``)
embeds these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastnabla.losses.forward_looking import GAMMA_SCHEDULES

LOG_PROB_REDUCTIONS = ("sum", "mean")


def _help(text: str, **kw) -> dict:
    return {"metadata": {"help": text}, **kw}


def _check_choice(path: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{path}={value!r} is not one of {allowed}")


@dataclass
class DBOptions:
    """Residual DB (paper eq. 20) and DAG-DB: log-space detailed balance with a forward-looking scalar flow."""

    output_reg: float = field(
        default=1.0, **_help("lambda of the output regulariser ||eps - eps_old||^2 (paper section 4.3: 1)")
    )
    gamma: str = field(
        default="one",
        **_help(f"FL strength gamma_s in log F(x_s) = beta gamma_s log R(x_hat) + g(x_s), one of {GAMMA_SCHEDULES} "
                "('one' as in the DAG-DB release)"),
    )
    fl_model: str = field(
        default="policy", **_help("network predicting x_hat for the FL term: 'policy' (release) or 'reference'")
    )
    log_prob_reduction: str = field(
        default="sum",
        **_help("log P_F / log P_B over latent elements: 'sum' (the exact densities) or 'mean' (the DAG-DB "
                "release; scales every log-density by 1/D)"),
    )
    flow_hidden: int = field(default=128, **_help("width of the scalar flow network's MLP"))
    flow_layers: int = field(default=3, **_help("hidden layers of the scalar flow network's MLP"))
    flow_channels: list[int] = field(
        default_factory=lambda: [64, 128, 256, 256],
        **_help("image states: channels of the strided-conv encoder in front of the MLP (a UNet encoder without "
                "its decoder, paper section 4.3)"),
    )

    def validate(self) -> None:
        _check_choice("method.db.gamma", self.gamma, GAMMA_SCHEDULES)
        _check_choice("method.db.fl_model", self.fl_model, ("policy", "reference"))
        _check_choice("method.db.log_prob_reduction", self.log_prob_reduction, LOG_PROB_REDUCTIONS)
        if self.output_reg < 0:
            raise ValueError(f"method.db.output_reg must be >= 0, got {self.output_reg}")
        if self.flow_hidden < 1 or self.flow_layers < 1:
            raise ValueError("method.db.flow_hidden and method.db.flow_layers must be >= 1")
        if not self.flow_channels or any(c < 1 for c in self.flow_channels):
            raise ValueError(f"method.db.flow_channels must be a non-empty list of positive ints, got "
                             f"{self.flow_channels}")


@dataclass
class DDPOOptions:
    """DDPO (Black et al. 2023): PPO-clipped policy gradient on the Gaussian transitions of fresh samples."""

    clip_range: float = field(default=1e-4, **_help("PPO clip range of the likelihood ratio (DDPO: 1e-4)"))
    adv_clip_max: float = field(default=5.0, **_help("advantages are clipped to [-adv_clip_max, adv_clip_max]"))
    min_count: int = field(
        default=2,
        **_help("a prompt with fewer samples in the batch is normalised with the whole batch's statistics"),
    )
    log_prob_reduction: str = field(
        default="mean",
        **_help("log P_F over latent elements: 'mean' (DDPO's release; the clip range is calibrated for it) or 'sum'"),
    )

    def validate(self) -> None:
        _check_choice("method.ddpo.log_prob_reduction", self.log_prob_reduction, LOG_PROB_REDUCTIONS)
        if not self.clip_range > 0:
            raise ValueError(f"method.ddpo.clip_range must be > 0, got {self.clip_range}")
        if not self.adv_clip_max > 0:
            raise ValueError(f"method.ddpo.adv_clip_max must be > 0, got {self.adv_clip_max}")
        if self.min_count < 2:
            raise ValueError(f"method.ddpo.min_count must be >= 2 (a std needs two samples), got {self.min_count}")


@dataclass
class ReFLOptions:
    """ReFL (Xu et al. 2023): maximise the reward of the one-step prediction at a random late step."""

    stop_min: float = field(
        default=0.7, **_help("earliest stop step as a fraction of T (paper: step 35 of 50 = 0.7)")
    )
    stop_max: float = field(
        default=1.0, **_help("stop steps lie in [floor(stop_min T), ceil(stop_max T) - 1] (paper: 35..49 of 50)")
    )
    relu: bool = field(
        default=False,
        **_help("maximise ReLU(log R) instead of log R: the paper's -ReLU(R) when log R is the raw score "
                "(reward transform 'exp', scale 1); off for rewards with log R < 0 such as the analytic bump"),
    )

    def validate(self) -> None:
        if not 0.0 <= self.stop_min < self.stop_max <= 1.0:
            raise ValueError(
                f"method.refl needs 0 <= stop_min < stop_max <= 1, got stop_min={self.stop_min}, "
                f"stop_max={self.stop_max}"
            )


@dataclass
class DRaFTOptions:
    """DRaFT (Clark et al. 2024): backpropagate the reward through the last K sampling steps; DRaFT-LV."""

    k: int = field(default=1, **_help("draft-k: steps backpropagated through (DRaFT-K; the paper's default K = 1)"))
    lv_samples: int = field(
        default=2, **_help("draft-lv: noising-denoising draws of the final sample averaged per trajectory (n)")
    )
    relu: bool = field(
        default=False,
        **_help("maximise ReLU(log R) instead of log R (the paper's -ReLU(R) when log R is the raw score)"),
    )

    def validate(self) -> None:
        if self.k < 1:
            raise ValueError(f"method.draft.k must be >= 1, got {self.k}")
        if self.lv_samples < 1:
            raise ValueError(f"method.draft.lv_samples must be >= 1, got {self.lv_samples}")
