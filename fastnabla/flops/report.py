"""FLOPs per phase of a run config and of the authors' release: per-pass counts x pass structure.

``FLOPs(phase) = sum over passes of that phase of rows x FLOPs per row`` (UNet rows doubled by classifier-free
guidance), per trained transition; the sampling of a trajectory is amortised over the transitions trained from it
(``..._incl_sampling``). Phases: UNet policy / pretrained forward and backward, VAE decoder forward and backward,
the forward-looking surrogate decoder forward and backward (``method.fl_decoder=surrogate``), reward forward and
backward, flow network forward and backward, text encoder (release sampling only).
"""

from __future__ import annotations

import dataclasses
import textwrap
from typing import Any

from fastnabla.flops.archs import (
    LEARNED_REWARDS,
    ArchSpec,
    arch_for_model,
    fl_surrogate_config,
    flow_arch_for_model,
    load_arch,
    load_flow_arch,
)
from fastnabla.flops.counting import CountSetup, network_pass_flops, release_flow_kwargs
from fastnabla.flops.structure import PassStructure, derive_structure, release_structure

TERA = 1e12
PHASES = (
    "unet_policy_forward", "unet_policy_backward", "unet_pretrained_forward", "unet_pretrained_backward",
    "vae_decoder_forward", "vae_decoder_backward", "fl_surrogate_forward", "fl_surrogate_backward",
    "reward_forward", "reward_backward", "flow_forward",
    "flow_backward", "text_encoder_forward",
)
PHASE_LABELS = {
    "unet_policy_forward": "UNet policy forward", "unet_policy_backward": "UNet policy backward",
    "unet_pretrained_forward": "UNet pretrained forward", "unet_pretrained_backward": "UNet pretrained backward",
    "vae_decoder_forward": "VAE decoder forward", "vae_decoder_backward": "VAE decoder backward (VJP)",
    "fl_surrogate_forward": "FL surrogate decoder forward",
    "fl_surrogate_backward": "FL surrogate decoder backward (VJP)",
    "reward_forward": "reward forward", "reward_backward": "reward backward (VJP)",
    "flow_forward": "flow network forward", "flow_backward": "flow network backward",
    "text_encoder_forward": "text encoder forward",
}
NOT_COUNTED = (
    "elementwise ops, norms, softmax, the reward's bicubic resize and the fused loss ops (FlopCounterMode counts "
    "matmuls, convolutions and attention; the fused ops are < 1 % of a step)",
    "attention as model FLOPs (2 matmuls forward, 4 backward); a flash / memory-efficient attention backward "
    "recomputes Q K^T, so hardware FLOPs are higher by one attention matmul per attention backward",
    "prompt encodings (cached per prompt by the task; HPS caches its text features) and evaluation grids",
)


def phase_of(key: str) -> str:
    """The phase of a pass key (``"unet_policy.input_vjp"`` -> ``"unet_policy_backward"``)."""
    network, kind = key.split(".")
    network = "flow" if network == "db_flow" else network
    return f"{network}_{'forward' if kind == 'forward' else 'backward'}"


def _needed(structures: list[PassStructure]) -> dict[str, set[str]]:
    kinds: dict[str, set[str]] = {}
    for s in structures:
        for key in (*s.per_item, *s.sampling):
            network, kind = key.split(".")
            kinds.setdefault(network, set()).add(kind)
    return kinds


def _pass_table(setup: CountSetup, structures: list[PassStructure]) -> dict[str, float]:
    """FLOPs per row of every pass the structures use."""
    out: dict[str, float] = {}
    for network, kinds in _needed(structures).items():
        for kind, flops in network_pass_flops(setup, network, kinds).items():
            out[f"{network}.{kind}"] = float(flops)
    return out


def _phases(passes: dict[str, float], per_row: dict[str, float], unet_rows: int) -> dict[str, float]:
    out = dict.fromkeys(PHASES, 0.0)
    for key, rows in passes.items():
        factor = unet_rows if key.startswith("unet_") else 1
        out[phase_of(key)] += rows * factor * per_row[key] / TERA
    return {k: v for k, v in out.items() if v}


def summarise(structure: PassStructure, per_row: dict[str, float]) -> dict[str, Any]:
    """TFLOPs per trained item (by phase, total, with sampling amortised) for one structure."""
    phases = _phases(structure.per_item, per_row, structure.unet_rows_per_pass)
    sampling = _phases(structure.sampling, per_row, structure.unet_rows_per_pass)
    per_item, per_traj = sum(phases.values()), sum(sampling.values())
    items = structure.items_per_trajectory
    return {
        "unit": structure.unit,
        "tflops_per_trained_transition": per_item,
        "tflops_per_trained_transition_incl_sampling": per_item + per_traj / items,
        "tflops_sampling_per_trajectory": per_traj,
        "trained_per_trajectory": items,
        "tflops_per_trajectory": per_traj + items * per_item,
        "phases": phases,
        "sampling_phases": sampling,
        "passes": dict(structure.per_item),
        "passes_counter_view": structure.counter_view(),
        "sampling_passes": dict(structure.sampling),
        "unet_rows_per_pass": structure.unet_rows_per_pass,
        "notes": list(structure.notes),
    }


def count_setup(cfg: Any, arch: ArchSpec, resolution: int) -> CountSetup:
    """The per-pass counting setup of a run config on ``arch`` at ``resolution``."""
    sd = cfg.flow if cfg.task == "flow" else cfg.sd
    surrogate = getattr(cfg.method, "fl_decoder", "exact") == "surrogate"
    return CountSetup(
        arch=arch, resolution=resolution, reward=sd.reward.name, lora=dataclasses.asdict(sd.lora),
        flow=("ours", dataclasses.asdict(sd.flow)), db=dataclasses.asdict(cfg.method.db), num_steps=sd.num_steps,
        fl_surrogate=fl_surrogate_config(arch, sd.fl_surrogate_decoder) if surrogate and cfg.task != "flow" else None,
        reward_options=None if sd.reward.name in LEARNED_REWARDS else dict(sd.reward.options),
    )


def flop_report(cfg: Any, arch: str | ArchSpec | None = None, resolution: int | None = None,
                iteration: int | None = None, release: bool = True) -> dict[str, Any]:
    """FLOPs of the Stable Diffusion run ``cfg`` (a ``RunConfig``) per phase, and of the release's layout.

    Args:
        arch: ``sd15``, ``sdxl``, ``tiny``, a pipeline directory or an :class:`ArchSpec` (default: what
            ``sd.model`` points at).
        resolution: image side (default ``sd.resolution``, else the UNet's native size).
        iteration: the training pass whose plan decides plan-dependent passes (default: the first in the steady
            state, 2, or ``k + 1`` with ``train.replay_batches = k``).
        release: also compute the release's layout on the same networks (key ``release``).
    """
    sd = cfg.flow if cfg.task == "flow" else cfg.sd
    if isinstance(arch, ArchSpec):
        spec = arch
    elif cfg.task == "flow":  # SD3 / FLUX: the transformer in the denoiser's slot (archs.ArchSpec.family)
        spec = load_flow_arch(arch or flow_arch_for_model(sd.model, sd.family), sd.max_sequence_length)
    else:
        spec = load_arch(arch or arch_for_model(sd.model))
    res = int(resolution or sd.resolution or spec.default_resolution)
    ours = derive_structure(cfg, iteration)
    setup = count_setup(cfg, spec, res)
    per_row = _pass_table(setup, [ours])
    report: dict[str, Any] = {
        "arch": spec.describe(), "resolution": res, "reward": sd.reward.name, "method": ours.method,
        "guidance_scale": float(sd.guidance_scale), "num_steps": int(sd.num_steps),
        **summarise(ours, per_row),
        "gflops_per_row": {k: v / 1e9 for k, v in sorted(per_row.items())},
        "text_encoder_gflops_per_prompt": network_pass_flops(setup, "text_encoder", {"forward"})["forward"] / 1e9,
        "reward_prompt_gflops_per_prompt": network_pass_flops(setup, "reward", {"prompt_forward"})["prompt_forward"]
        / 1e9,
        "not_counted": list(NOT_COUNTED),
    }
    if release:
        rel = release_structure()
        rel_setup = dataclasses.replace(setup, flow=("release", release_flow_kwargs()))
        rel_rows = _pass_table(rel_setup, [rel])
        report["release"] = {**summarise(rel, rel_rows), "gflops_per_row": {k: v / 1e9 for k, v in
                                                                              sorted(rel_rows.items())}}
        r = report["release"]
        report["ratio_to_release"] = {
            "per_trained_transition": report["tflops_per_trained_transition"] / r["tflops_per_trained_transition"],
            "incl_sampling": report["tflops_per_trained_transition_incl_sampling"]
            / r["tflops_per_trained_transition_incl_sampling"],
            "per_trajectory": report["tflops_per_trajectory"] / r["tflops_per_trajectory"],
        }
    return report


def _row(label: str, ours: float, ours_total: float, rel: float | None, rel_total: float | None) -> str:
    share = f"{100 * ours / ours_total:5.1f}%" if ours_total else "    -"
    if rel is None:
        return f"{label:38s} {ours:10.3f} {share:>7s}"
    rshare = f"{100 * rel / rel_total:5.1f}%" if rel_total else "    -"
    ratio = f"{ours / rel:6.2f}x" if rel else "     -"
    return f"{label:38s} {ours:10.3f} {share:>7s} {rel:12.3f} {rshare:>7s} {ratio:>8s}"


def format_table(report: dict[str, Any], title: str = "") -> str:
    """The report as a readable table: TFLOP (GFLOP for tiny models) per phase and share of the total, ours vs the
    release, the sampling cost, the amortised totals and the passes."""
    rel = report.get("release")
    unit = report["unit"]
    scale, tag = (1.0, "TF") if report["tflops_per_trajectory"] >= 0.1 else (1e3, "GF")

    def row(label: str, key: str, phase: str | None = None, total_key: str | None = None) -> str:
        def get(r: dict[str, Any] | None, k: str) -> float | None:
            if r is None:
                return None
            return scale * (r["phases"].get(phase, 0.0) if phase else r[k])

        total_key = total_key or key
        return _row(label, get(report, key), get(report, total_key) if not phase else scale * report[total_key],
                    get(rel, key), (scale * rel[total_key]) if rel else None)

    if report["arch"].get("family", "unet") != "unet":  # SD3 / FLUX: the denoiser is a transformer
        labels = {k: v.replace("UNet", "transformer") for k, v in PHASE_LABELS.items()}
    else:
        labels = PHASE_LABELS
    lines = [
        f"FLOPs {title or ''}(arch {report['arch']['name']}, {report['resolution']}x{report['resolution']}, reward "
        f"{report['reward']}, method {report['method']}, {report['num_steps']} steps, "
        f"CFG {'pair' if report['unet_rows_per_pass'] == 2 else 'off'}); {tag} = 1e{12 if tag == 'TF' else 9} FLOPs",
        "",
        f"{'per trained ' + unit:38s} {'ours ' + tag:>10s} {'share':>7s}"
        + (f" {'release ' + tag:>12s} {'share':>7s} {'ours/rel':>8s}" if rel else ""),
    ]
    per_item = "tflops_per_trained_transition"
    for phase in PHASES:
        if report["phases"].get(phase) or (rel and rel["phases"].get(phase)):
            lines.append(row(f"  {labels[phase]}", per_item, phase, per_item))
    lines.append(row(f"total per trained {unit}", per_item))
    lines.append("")
    lines.append(row("sampling per trajectory", "tflops_sampling_per_trajectory"))
    lines.append(f"{'trained ' + unit + 's per trajectory':38s} {report['trained_per_trajectory']:10.3f}"
                 + (f" {'':7s} {rel['trained_per_trajectory']:12.3f}" if rel else ""))
    lines.append(row(f"per trained {unit} incl. sampling", "tflops_per_trained_transition_incl_sampling"))
    lines.append(row("per trajectory (sampling + training)", "tflops_per_trajectory"))
    lines += ["", f"{'passes per trained ' + unit:38s} {'ours':>10s}" + (f" {'':7s} {'release':>12s}" if rel else "")]
    view = report["passes_counter_view"]
    rview = rel["passes_counter_view"] if rel else {}
    for key in sorted(set(view) | set(rview)):
        other = f" {'':7s} {rview.get(key, 0.0):12.3f}" if rel else ""
        lines.append(f"  {key:36s} {view.get(key, 0.0):10.3f}{other}")
    lines.append("  (a CFG pair call is one UNet pass; K smoothing draws of a state are K decodes)")
    notes = [("not counted", report["not_counted"]), ("plan", report["notes"])]
    notes += [("release layout", rel["notes"])] if rel else []
    for head, items in notes:
        lines += ["", f"{head}:"]
        lines += [textwrap.fill(item, 118, initial_indent="  - ", subsequent_indent="    ") for item in items]
    return "\n".join(lines)
