"""FLOP accounting of the Stable Diffusion presets (``fastnabla.flops``), recorded with the benchmarks.

One row per SD 1.5 preset: the benchmark times the report from cached per-pass counts (the pass structure on the
preset's real training plan, 22 trajectories x 3 replayed batches or 16 trajectories, x 50 steps, and the sums; the
first report, which traces the SD 1.5 networks on the meta device, ~10 s, runs before the timing), and
``extra_info`` carries the numbers the team compares runs with: TFLOPs per trained transition with and without the
amortised sampling, per sampled trajectory, per phase, the passes per trained transition, and the same for the
authors' release's layout with the ratio.

These rows have no ``op`` key, so ``bench/summarize.py`` leaves them out of RESULTS.md; read them from the JSON or
with ``-s`` (each row prints its totals). FLOPs do not depend on the machine: a CPU run reports the GPU numbers.
"""

from __future__ import annotations

import pytest
from bench_utils import rounds_for

from fastnabla.flops.cli import build_run_config
from fastnabla.flops.report import flop_report

PRESETS = ["sd15-aesthetic", "sd15-hpsv2", "sd15-imagereward", "sd15-fast-aesthetic"]


def _summary(report: dict) -> dict:
    keys = ("tflops_per_trained_transition", "tflops_per_trained_transition_incl_sampling",
            "tflops_sampling_per_trajectory", "trained_per_trajectory", "tflops_per_trajectory")
    return {**{k: round(report[k], 4) for k in keys}, "phases": {k: round(v, 4) for k, v in report["phases"].items()},
            "passes": report["passes_counter_view"]}


@pytest.mark.parametrize("preset", PRESETS)
def test_bench_flops(benchmark, preset):
    cfg = build_run_config(preset)
    report = flop_report(cfg)  # traces the networks once per process; later reports reuse the per-pass counts

    def run() -> dict:
        return flop_report(cfg)

    benchmark.pedantic(run, rounds=min(rounds_for(run), 20), warmup_rounds=1)
    ours, release = _summary(report), _summary(report["release"])
    benchmark.extra_info.update(
        kind="flops", preset=preset, arch=report["arch"]["name"], resolution=report["resolution"],
        reward=report["reward"], method=report["method"], **ours, release=release,
        ratio_to_release={k: round(v, 4) for k, v in report["ratio_to_release"].items()},
    )
    print(f"\n{preset}: {ours['tflops_per_trained_transition']:.1f} TF per trained transition "
          f"(release {release['tflops_per_trained_transition']:.1f}), "
          f"{ours['tflops_per_trained_transition_incl_sampling']:.1f} incl. sampling "
          f"(release {release['tflops_per_trained_transition_incl_sampling']:.1f}), "
          f"{ours['tflops_per_trajectory']:.0f} per trajectory (release {release['tflops_per_trajectory']:.0f})")
    assert report["tflops_per_trained_transition"] > 0
