"""Options of the baseline methods (``method.db``, ``method.ddpo``, ``method.refl``, ``method.draft``).

Defaults follow the nabla-GFlowNet paper's section 4.3 and the settings it cites: the DB baselines with output
regularisation ``lambda = 1`` (their learning rate, 3e-4, lives in the presets: ``optim`` is shared by every
method), DDPO's released PPO settings, ReFL's stop steps 35..49 of 50, DRaFT with ``K = 1`` and DRaFT-LV with
two noising-denoising draws. Torch-free: the run config embeds these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastnabla.config.fields import Section, option
from fastnabla.methods.nabla_gfn.options import FL_MODELS, FL_MODELS_RENAMED, GAMMA_SCHEDULES

LOG_PROB_REDUCTIONS = ("sum", "mean")


@dataclass
class DBOptions(Section):
    """Residual DB (paper eq. 20) and DAG-DB: log-space detailed balance with a forward-looking scalar flow."""

    path = "method.db"

    output_reg: float = option(1.0, ge=0, help="lambda of the output regulariser ||eps - eps_old||^2 (paper "
                                               "section 4.3: 1)")
    gamma: str = option(
        "one", choices=GAMMA_SCHEDULES,
        help="FL strength gamma_s in log F(x_s) = beta gamma_s log R(x_hat) + g(x_s) ('one' as in the DAG-DB release)")
    fl_model: str = option("policy", choices=FL_MODELS, renamed=FL_MODELS_RENAMED,
                           help="network predicting x_hat for the FL term ('policy': the release's)")
    log_prob_reduction: str = option(
        "sum", choices=LOG_PROB_REDUCTIONS,
        help="log P_F / log P_B over latent elements: 'sum' (the exact densities: the target is R^beta) or 'mean' "
             "(the DAG-DB release: every log-density / N, so the target is R^(N beta); docs/baselines.md)")
    flow_hidden: int = option(128, ge=1, help="width of the scalar flow network's MLP")
    flow_layers: int = option(3, ge=1, help="hidden layers of the scalar flow network's MLP")
    flow_channels: list[int] = option(
        default_factory=lambda: [64, 128, 256, 256], ge=1, nonempty=True,
        help="image states: channels of the strided-conv encoder in front of the MLP (a UNet encoder without its "
             "decoder, paper section 4.3)")


@dataclass
class DDPOOptions(Section):
    """DDPO (Black et al. 2023): PPO-clipped policy gradient on the Gaussian transitions of fresh samples."""

    path = "method.ddpo"

    clip_range: float = option(1e-4, gt=0, help="PPO clip range of the likelihood ratio (DDPO: 1e-4)")
    adv_clip_max: float = option(5.0, gt=0, help="advantages are clipped to [-adv_clip_max, adv_clip_max]")
    buffer_size: int = option(
        16, ge=1, help="rewards kept per prompt across iterations for its advantage statistics (DDPO: 16)")
    min_count: int = option(
        16, ge=2, help="a prompt whose buffer holds fewer rewards is normalised with the whole batch's statistics "
                       "(DDPO: 16)")
    log_prob_reduction: str = option(
        "mean", choices=LOG_PROB_REDUCTIONS,
        help="log P_F over latent elements: 'mean' (DDPO's release; the clip range is calibrated for it) or 'sum'")


@dataclass
class ReFLOptions(Section):
    """ReFL (Xu et al. 2023): maximise the reward of the one-step prediction at a random late step."""

    path = "method.refl"

    stop_min: float = option(0.7, ge=0, le=1, help="earliest stop step as a fraction of T (paper: step 35 of 50)")
    stop_max: float = option(
        1.0, ge=0, le=1, help="stop steps lie in [floor(stop_min T), ceil(stop_max T) - 1] (paper: 35..49 of 50)")
    relu: bool = option(
        False,
        help="maximise ReLU(log R) instead of log R: the paper's -ReLU(R) when log R is the raw score (reward "
             "transform 'exp', scale 1); off for rewards with log R < 0 such as the analytic bump")

    def check(self, prefix: str) -> None:
        if not self.stop_min < self.stop_max:
            raise ValueError(f"{prefix} needs stop_min < stop_max, got stop_min={self.stop_min}, "
                             f"stop_max={self.stop_max}")


@dataclass
class DRaFTOptions(Section):
    """DRaFT (Clark et al. 2024): backpropagate the reward through the last K sampling steps; DRaFT-LV."""

    path = "method.draft"

    k: int = option(1, ge=1, help="draft-k: steps backpropagated through (DRaFT-K; the paper's default K = 1)")
    lv_samples: int = option(
        2, ge=1, help="draft-lv: noising-denoising draws of the final sample averaged per trajectory (n)")
    relu: bool = option(
        False, help="maximise ReLU(log R) instead of log R (the paper's -ReLU(R) when log R is the raw score)")
