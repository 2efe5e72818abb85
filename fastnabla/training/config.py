"""Configuration of the trainer (``train.*``) and of its optimizers (``optim.*``), beside the trainer.

Torch-free: the run config is built and checked without importing torch (fast ``--help-config`` and errors).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastnabla.config.fields import Section, option

OPTIMIZERS = ("adam", "adamw", "adamw8bit")
LR_SCHEDULES = ("constant", "cosine")
DEVICES = ("auto", "cuda", "cpu")
REPLAY_SUBSAMPLES = ("fresh", "kept")


@dataclass
class OptimOptions(Section):
    """Optimizer settings (separate parameter groups, learning rates and clipping for policy and flow)."""

    path = "optim"

    optimizer: str = option("adam", choices=OPTIMIZERS,
                            help="Adam, AdamW, or 8-bit AdamW ('adamw8bit': bitsandbytes states)")
    lr_policy: float = option(1e-3, gt=0, help="learning rate of the policy (residual / LoRA)")
    lr_flow: float = option(1e-3, gt=0, help="learning rate of the flow network g_phi")
    betas: tuple[float, float] = option((0.9, 0.999), ge=0, lt=1, help="Adam betas")
    weight_decay: float = option(0.0, ge=0, help="weight decay (AdamW: decoupled)")
    eps: float = option(1e-8, gt=0, help="Adam epsilon")
    grad_clip_policy: float = option(1.0, ge=0, help="max grad norm of the policy (0: off)")
    grad_clip_flow: float = option(1.0, ge=0, help="max grad norm of the flow (0: off)")
    lr_schedule: str = option(
        "constant", choices=LR_SCHEDULES, help="learning-rate schedule (cosine decays to lr_min_ratio)")
    lr_min_ratio: float = option(0.1, ge=0, le=1, help="final lr / initial lr of the cosine schedule")


@dataclass
class TrainConfig(Section):
    """The training loop (Algorithm 1): batch, transition subsample, updates, checkpoints, divergence guard."""

    path = "train"

    iterations: int = option(600, ge=1, help="sampling iterations (the first only fills D_prev)")
    batch_size: int = option(256, ge=1, help="trajectories sampled per iteration, over all processes")
    transition_fraction: float = option(
        0.2, gt=0, le=1, help="fraction of each trajectory's transitions trained on (terminal kept)")
    updates_per_batch: int = option(1, ge=1, help="optimizer steps per sampled batch")
    replay_batches: int = option(
        1, ge=1,
        help="how many of the most recent sampled batches each pass trains on (1: the previous batch, Algorithm 1). "
             "k > 1 trains every trajectory in k consecutive passes, each on a fresh subsample of its transitions (the "
             "objective is off-policy): k times the trained transitions per sampled trajectory (docs/cost.md); "
             "nabla-GFlowNet and the DB baselines only")
    replay_subsample: str = option(
        "fresh", choices=REPLAY_SUBSAMPLES,
        help="with replay_batches > 1, which transitions a replayed batch trains on: a 'fresh' stratified subsample "
             "in every pass, or the one of its first pass, 'kept' (ours: then the constants that do not depend on the "
             "trained networks -- the forward-looking tables with method.fl_model=pretrained, eps# and its reverse "
             "VJP -- are computed once per trajectory, not once per pass; at k = 3 it lost quality on digits and "
             "gmm-shift-narrow: docs/cost.md)")
    policy_ema_decay: float = option(
        0.0, ge=0, lt=1,
        help="d of a Polyak average of the trained policy weights, theta_bar <- d theta_bar + (1 - d) theta "
             "after every optimizer step from the starting weights; the final evaluation, periodic evaluations and "
             "the exported LoRA use the average, sampling and training the live weights (0: the live weights, the "
             "paper's and the release's)")
    sample_batch_size: int = option(
        0, ge=0, help="trajectories per sampling call (0: this process's whole share of the batch)")
    micro_batch_size: int = option(
        0, ge=0, help="transitions per forward/backward; an update accumulates its micro-batches (0: one)")
    fl_batch_size: int = option(
        8192, ge=1, help="states per call when precomputing forward-looking gradients / pathwise targets")
    checkpoint_every: int = option(
        0, ge=0, help="write a checkpoint every N iterations (0: only on SIGTERM/SIGINT and at the end)")
    keep_checkpoints: int = option(2, ge=1, help="checkpoints kept in OUT/checkpoints")
    max_skipped_updates: int = option(
        10, ge=1,
        help="an update whose loss, gradient or rewards are not finite is skipped (the reason logged); after this "
             "many consecutive skips the run stops with exit status 3, keeping its last good checkpoint")
    device: str = option("auto", choices=DEVICES, help="sd task: where to train ('auto': CUDA when available)")
    vram_budget_gb: float = option(
        0.0, ge=0,
        help="sd task: GPU memory per process in GiB; before the run the printed memory estimate says whether it fits "
             "and, if not, the cheapest sd.memory switches / micro-batch that do (0: no verdict; an estimate only, "
             "never enforced)")
