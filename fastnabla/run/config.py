"""The run configuration of ``python -m fastnabla.train``: the task, method, trainer and output sections composed.

Each section lives beside the code it configures (the trainer's in :mod:`fastnabla.training.config`, the methods'
in :mod:`fastnabla.methods.config`, each task's in ``fastnabla.tasks.<task>.config``); this module only composes
them. Every field has a default, help text and its rules (:func:`fastnabla.config.fields.option`). The built-in
default is the analytic ``gmm`` task with the settings that converge (docs/analytic-benchmark.md); named presets
(:mod:`fastnabla.run.presets`) switch to the paper's settings, the oracle-flow floor, other cases and Stable
Diffusion. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastnabla.config.fields import Section, option
from fastnabla.methods.config import NEEDS_STOCHASTIC_STEPS, ON_POLICY_METHODS, MethodConfig
from fastnabla.tasks.flow.config import FlowConfig
from fastnabla.tasks.gmm.config import GMMConfig, SamplerConfig
from fastnabla.tasks.sd.config import SDConfig
from fastnabla.training.config import OptimOptions, TrainConfig

TASKS = ("gmm", "sd", "flow")
REPORTERS = ("tensorboard", "wandb")  # fastnabla.training.trackers.REPORTERS (this module stays torch-free)


@dataclass
class EvalConfig:
    every: int = option(50, ge=0, help="evaluate every N iterations (0: only at the end)")
    num_samples: int = option(4000, ge=2, help="gmm: samples for periodic evaluation")
    final_num_samples: int = option(20000, ge=2, help="gmm: samples for the final evaluation")
    energy_samples: int = option(2000, ge=2, help="gmm: samples used for the O(N^2) energy distance")


@dataclass
class OutputConfig:
    dir: str = option("runs/{name}", help="output directory ({name} is replaced by the run's name)")
    overwrite: bool = option(
        False, help="replace the run in output.dir (its files are deleted first) instead of using a numbered sibling "
                    "directory (finished runs) or refusing (unfinished runs)")
    figure: bool = option(True, help="write the PNG figure / image grids")
    progress: bool = option(True, help="show a progress bar")
    report_to: list[str] = option(
        default_factory=lambda: ["tensorboard"],
        help=f"experiment trackers besides metrics.jsonl, any of {REPORTERS}: tensorboard (OUT/tensorboard, when "
             "installed), wandb (pip install \"fastnabla[wandb]\"; WANDB_MODE=offline works without a network); [] "
             "for none")
    tensorboard: bool = option(
        True, help="older spelling, kept so that configs written before output.report_to load: false removes "
                   "'tensorboard' from output.report_to (use output.report_to)")
    wandb_project: str = option("fastnabla", help="W&B project of output.report_to: [wandb] (the run's name is the "
                                                  "W&B run name)")
    export_lora: bool = option(
        True, help="sd / flow task: write the trained LoRA in diffusers format with a model card "
                   "(OUT/lora/README.md)")
    push_to_hub: str = option(
        "", help="sd / flow task: after the run, upload OUT/lora (LoRA + model card) to this Hugging Face hub "
                 "repository (--push-to-hub REPO; needs a reachable hub and a token: HF_TOKEN or huggingface-cli "
                 "login)")
    hub_private: bool = option(True, help="create the --push-to-hub repository as private (ours: never publish by "
                                          "accident)")

    def check(self, prefix: str) -> None:
        """``output.tensorboard: false`` (the older spelling) is read as removing tensorboard from ``report_to``;
        trackers listed once; --push-to-hub needs the LoRA export."""
        bad = [r for r in self.report_to if r not in REPORTERS]
        if bad:
            raise ValueError(f"{prefix}.report_to: {bad} not among {REPORTERS}")
        if not self.tensorboard:
            self.report_to = [r for r in self.report_to if r != "tensorboard"]
            self.tensorboard = True
        self.report_to = list(dict.fromkeys(self.report_to))
        if self.push_to_hub and not self.export_lora:
            raise ValueError(f"{prefix}.push_to_hub={self.push_to_hub!r} uploads the exported LoRA: it needs "
                             f"{prefix}.export_lora=true")


def _tuned_method() -> MethodConfig:
    return MethodConfig(
        weight_forward="eps",
        weight_reverse="eps",
        gamma="one",
        fl_model="pretrained",
        fl_jacobian="full",
        reverse_target="pathwise",
        td_lambda=0.5,
        forward_trains_flow=False,
        flow_ema_decay=0.95,
    )


@dataclass
class RunConfig(Section):
    """Everything ``python -m fastnabla.train`` needs."""

    name: str = option("", help="run name, used in output.dir and logs (empty: the preset's name)")
    task: str = option("gmm", choices=TASKS, help="task")
    seed: int = option(0, ge=0, help="seed of networks, sampling and subsampling")
    threads: int = option(
        1, ge=0,
        help="torch CPU threads (0: torch's default); the analytic task's tensors are tiny, and 2 threads on a "
             "2-core machine run 5-23x slower as soon as another process holds a core")
    sampler: SamplerConfig = option(default_factory=SamplerConfig, help="")
    gmm: GMMConfig = option(default_factory=GMMConfig, help="")
    sd: SDConfig = option(default_factory=SDConfig, help="")
    flow: FlowConfig = option(default_factory=FlowConfig, help="")
    method: MethodConfig = option(default_factory=_tuned_method, help="")
    optim: OptimOptions = option(default_factory=lambda: OptimOptions(lr_schedule="cosine"), help="")
    train: TrainConfig = option(default_factory=TrainConfig, help="")
    eval: EvalConfig = option(default_factory=EvalConfig, help="")
    output: OutputConfig = option(default_factory=OutputConfig, help="")

    def check(self, prefix: str) -> None:
        """Batches that split into groups of k samples per prompt; DDIM with eta = 0, which is deterministic, refused
        at once for the methods that divide by sigma^2 (other zero-variance steps depend on the model's scheduler and
        are found when the task is built)."""
        section = "flow" if self.task == "flow" else "sd"
        repeats = getattr(self, section).prompts.repeats
        if self.task in ("sd", "flow") and self.train.batch_size % repeats:
            raise ValueError(f"train.batch_size={self.train.batch_size} must be a multiple of "
                             f"{section}.prompts.repeats={repeats} (k samples per prompt)")
        if self.task == "flow" and self.method.name in NEEDS_STOCHASTIC_STEPS and self.flow.noise_level == 0:
            raise ValueError(f"flow.noise_level=0 is the deterministic Euler ODE (sigma = 0), and method.name="
                             f"{self.method.name!r} divides by sigma^2: use flow.noise_level > 0 (Flow-GRPO's: 0.7), "
                             "or a method that needs no densities (refl, draft-k, draft-lv)")
        if self.train.replay_batches > 1 and self.method.name in ON_POLICY_METHODS:
            raise ValueError(f"train.replay_batches={self.train.replay_batches}: method.name={self.method.name!r} "
                             "trains on the batch it has just sampled, so it cannot replay older batches; use 1")
        if self.method.fl_decoder == "surrogate" and (self.task != "sd" or not self.sd.fl_surrogate_decoder):
            raise ValueError(
                "method.fl_decoder=surrogate needs a surrogate decoder: " + (
                    "set sd.fl_surrogate_decoder (a diffusers AutoencoderTiny directory or hub id, e.g. "
                    "madebyollin/taesd for SD 1.x; 'digits' on a digits pipeline)" if self.task == "sd" else
                    f"task {self.task!r} has none (the Stable Diffusion task only): use method.fl_decoder=exact"))
        eta, sampler, field = (self.sd.eta, self.sd.sampler, "sd.eta") if self.task == "sd" else (
            self.sampler.eta, self.sampler.sampler, "sampler.eta")
        if self.task != "flow" and self.method.name in NEEDS_STOCHASTIC_STEPS and sampler == "ddim" and eta == 0:
            raise ValueError(
                f"{field}=0 makes every DDIM step deterministic (sigma = 0), and method.name={self.method.name!r} "
                f"divides by sigma^2: use {field} > 0 (the paper's: 1), or a method that needs no densities "
                "(refl, draft-k, draft-lv)")

    def output_dir(self) -> str:
        """``output.dir`` with the run's name substituted (``{preset}`` is accepted as an older spelling)."""
        return self.output.dir.replace("{name}", self.name).replace("{preset}", self.name)
