"""The run configuration of ``python -m fastnabla.train`` (every field has a default and help text).

The built-in default is the analytic ``gmm`` task with the settings that converge (see
``docs/analytic-benchmark.md``); named presets in :mod:`fastnabla.config.presets` switch to the
paper's settings, the oracle-flow floor, and other analytic cases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastnabla.mdp.schedule import SAMPLERS
from fastnabla.methods.options import DBOptions, DDPOOptions, DRaFTOptions, ReFLOptions
from fastnabla.tasks.sd.config import SDConfig
from fastnabla.training.optim import OptimOptions
from fastnabla.training.options import NablaGFNOptions

TASKS = ("gmm", "sd")
METHODS = ("nabla-gfn", "residual-db", "dag-db", "ddpo", "refl", "draft-k", "draft-lv")


def _help(text: str, **kw) -> dict:
    return {"metadata": {"help": text}, **kw}


@dataclass
class MixtureConfig:
    """The pretrained model's data distribution: a diagonal Gaussian mixture."""

    means: list[list[float]] = field(
        default_factory=lambda: [[-2.0, -2.0], [2.0, -2.0], [-2.0, 2.0], [2.0, 2.0]],
        **_help("component means, K lists of d numbers"),
    )
    stds: float | list[float] | list[list[float]] = field(
        default=0.5, **_help("component std: one number, one per component, or K lists of d")
    )
    weights: list[float] = field(
        default_factory=lambda: [0.4, 0.3, 0.2, 0.1], **_help("component weights (normalised)")
    )


@dataclass
class RewardConfig:
    """The analytic reward ``R`` (positive; ``log R`` is what the methods use)."""

    kind: str = field(default="bump", **_help("'bump': exp(-||x-center||^2/(2 width^2)); 'loglinear': exp(w.x)"))
    center: list[float] = field(default_factory=lambda: [2.0, 1.0], **_help("bump centre (d numbers)"))
    width: float = field(default=2.5, **_help("bump width rho"))
    weights: list[float] = field(default_factory=list, **_help("log-linear weights w (d numbers)"))


@dataclass
class GMMNetworkConfig:
    """MLPs of the residual policy (LoRA analogue) and of the flow g_phi."""

    hidden: int = field(default=128, **_help("hidden width"))
    layers: int = field(default=3, **_help("hidden layers"))
    flow_output_scale: str = field(
        default="none", **_help("'none' or 'eps' (flow output in eps units of the producing step)")
    )
    flow_output_cap: float = field(default=1e9, **_help("upper bound of the 'eps' output factor |b|/sigma^2"))


@dataclass
class GMMConfig:
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    network: GMMNetworkConfig = field(default_factory=GMMNetworkConfig)


@dataclass
class SamplerConfig:
    """The sampler that defines the analytic task's MDP (a diffusers scheduler config + steps); the sd task
    takes its scheduler from the pipeline and its steps from ``sd.num_steps``."""

    sampler: str = field(default="ddim", **_help(f"one of {SAMPLERS}"))
    num_steps: int = field(default=50, **_help("number of denoising steps T"))
    eta: float = field(default=1.0, **_help("DDIM eta (1 = DDPM-like, as in the paper)"))
    scheduler: dict[str, Any] = field(
        default_factory=lambda: {
            "num_train_timesteps": 1000,
            "beta_schedule": "linear",
            "beta_start": 0.0001,
            "beta_end": 0.02,
            "clip_sample": False,
            "set_alpha_to_one": False,
            "steps_offset": 1,
        },
        **_help("diffusers scheduler config keys (beta_schedule, timestep_spacing, ...)"),
    )


@dataclass
class TrainConfig:
    iterations: int = field(default=600, **_help("sampling iterations (the first only fills D_prev)"))
    batch_size: int = field(default=256, **_help("trajectories sampled per iteration"))
    transition_fraction: float = field(
        default=0.2, **_help("fraction of each trajectory's transitions trained on (terminal kept)")
    )
    updates_per_batch: int = field(default=1, **_help("optimizer steps per sampled batch"))
    sample_batch_size: int = field(
        default=0, **_help("trajectories per sampling call (0: this process's whole share of the batch)")
    )
    micro_batch_size: int = field(
        default=0, **_help("transitions per forward/backward; an update accumulates its micro-batches (0: one)")
    )
    fl_batch_size: int = field(
        default=8192, **_help("states per call when precomputing forward-looking gradients / pathwise targets")
    )
    checkpoint_every: int = field(
        default=0, **_help("write a checkpoint every N iterations (0: only on SIGTERM/SIGINT and at the end)")
    )
    keep_checkpoints: int = field(default=2, **_help("checkpoints kept in OUT/checkpoints"))
    device: str = field(default="auto", **_help("'auto' (CUDA when available), 'cuda' or 'cpu'"))


@dataclass
class EvalConfig:
    every: int = field(default=50, **_help("evaluate every N iterations (0: only at the end)"))
    num_samples: int = field(default=4000, **_help("samples for periodic evaluation"))
    final_num_samples: int = field(default=20000, **_help("samples for the final evaluation"))
    energy_samples: int = field(default=2000, **_help("samples used for the O(N^2) energy distance"))


@dataclass
class OutputConfig:
    dir: str = field(default="runs/{preset}", **_help("output directory ({preset} is substituted)"))
    overwrite: bool = field(default=False, **_help("reuse a directory that holds a finished run"))
    figure: bool = field(default=True, **_help("write the PNG figure / image grids"))
    progress: bool = field(default=True, **_help("show a progress bar"))
    tensorboard: bool = field(default=True, **_help("also log to TensorBoard (OUT/tensorboard) when it is installed"))
    export_lora: bool = field(default=True, **_help("sd task: write the trained LoRA in diffusers format (OUT/lora)"))


@dataclass
class MethodConfig(NablaGFNOptions):
    """The training method: its name, the options of residual nabla-DB (eqs. 15-19) and of each baseline.

    ``beta`` is shared (the target temperature of the GFlowNet methods); each baseline reads its own section
    (``fastnabla.methods``)."""

    name: str = field(default="nabla-gfn", **_help(f"training method, one of {METHODS} (--method NAME)"))
    db: DBOptions = field(default_factory=DBOptions)
    ddpo: DDPOOptions = field(default_factory=DDPOOptions)
    refl: ReFLOptions = field(default_factory=ReFLOptions)
    draft: DRaFTOptions = field(default_factory=DRaFTOptions)

    def validate(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"method.name={self.name!r} is not one of {METHODS}")
        super().validate()
        for section in (self.db, self.ddpo, self.refl, self.draft):
            section.validate()


def _tuned_method() -> MethodConfig:
    return MethodConfig(
        weight_forward="eps",
        weight_reverse="eps",
        gamma="one",
        fl_model="reference",
        fl_jacobian="full",
        reverse_target="pathwise",
        td_lambda=0.5,
        forward_trains_flow=False,
    )


@dataclass
class RunConfig:
    """Everything ``python -m fastnabla.train`` needs."""

    task: str = field(default="gmm", **_help(f"task, one of {TASKS}"))
    seed: int = field(default=0, **_help("seed of networks, sampling and subsampling"))
    threads: int = field(
        default=1,
        **_help("torch CPU threads (0: torch's default); the analytic task's tensors are tiny, and 2 threads "
                "on a 2-core machine run 5-23x slower as soon as another process holds a core"),
    )
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    gmm: GMMConfig = field(default_factory=GMMConfig)
    sd: SDConfig = field(default_factory=SDConfig)
    method: MethodConfig = field(default_factory=_tuned_method)
    optim: OptimOptions = field(default_factory=lambda: OptimOptions(lr_schedule="cosine"))
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} is not one of {TASKS}")
        if self.seed < 0 or self.threads < 0:
            raise ValueError("seed and threads must be >= 0")
        if self.sampler.sampler not in SAMPLERS:
            raise ValueError(f"sampler.sampler={self.sampler.sampler!r} is not one of {SAMPLERS}")
        if self.sampler.num_steps < 1:
            raise ValueError(f"sampler.num_steps must be >= 1, got {self.sampler.num_steps}")
        if self.sampler.eta < 0:
            raise ValueError(f"sampler.eta must be >= 0, got {self.sampler.eta}")
        t = self.train
        for name in ("iterations", "batch_size", "updates_per_batch", "fl_batch_size", "keep_checkpoints"):
            if getattr(t, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(t, name)}")
        for name in ("sample_batch_size", "micro_batch_size", "checkpoint_every"):
            if getattr(t, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(t, name)}")
        if t.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"train.device={t.device!r} is not one of ('auto', 'cuda', 'cpu')")
        if not 0 < t.transition_fraction <= 1:
            raise ValueError(f"train.transition_fraction must be in (0, 1], got {t.transition_fraction}")
        e = self.eval
        if e.every < 0:
            raise ValueError(f"eval.every must be >= 0, got {e.every}")
        for name in ("num_samples", "final_num_samples", "energy_samples"):
            if getattr(e, name) < 2:
                raise ValueError(f"eval.{name} must be >= 2, got {getattr(e, name)}")
        net = self.gmm.network
        if net.hidden < 1 or net.layers < 1:
            raise ValueError("gmm.network.hidden and gmm.network.layers must be >= 1")
        if not net.flow_output_cap > 0:
            raise ValueError(f"gmm.network.flow_output_cap must be > 0, got {net.flow_output_cap}")
        if net.flow_output_scale not in ("none", "eps"):
            raise ValueError(f"gmm.network.flow_output_scale={net.flow_output_scale!r} is not 'none' or 'eps'")
        self.method.validate()
        self.optim.validate()
        if self.task == "sd":
            self.sd.validate()
