"""The analytic comparison command: runs every requested method on every requested case, writes the tables (every
metric at the end and over the last fifth, the reference samplers beside the methods), the acceptance check and
the figures."""

from __future__ import annotations

import json

import pytest

from fastnabla.compare.methods import main, method_preset, mode_coverage
from fastnabla.compare.shape import TOLERANCES, acceptance, case_table

TINY = ["sampler.num_steps=6", "train.batch_size=8", "train.iterations=5", "gmm.network.hidden=16",
        "gmm.network.layers=2", "method.db.flow_hidden=16", "method.db.flow_layers=2", "eval.every=1",
        "eval.num_samples=64", "eval.final_num_samples=64", "eval.energy_samples=32", "output.figure=false"]
REFERENCE_ROWS = ["reweight-only (target weights, prior components)", "pretrained sampler",
                  "exact target draws (sampling floor)"]


def _rows(table: str) -> list[str]:
    return [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("|---")]


def _first_cells(rows: list[str]) -> list[str]:
    return [r.split("|")[1].strip() for r in rows]


def test_mode_coverage_counts_modes_holding_the_fraction():
    target = [0.4, 0.3, 0.2, 0.1]
    assert mode_coverage(target, target) == 4
    assert mode_coverage([0.7, 0.3, 0.0, 0.0], target) == 2
    assert mode_coverage([0.2, 0.15, 0.1, 0.05], target, fraction=0.5) == 4
    assert mode_coverage([0.19, 0.15, 0.1, 0.05], target, fraction=0.5) == 3


def test_compare_methods_writes_table_and_figures(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["--methods", "nabla-gfn", "dag-db", "refl", "--seeds", "0", "--out", str(out), *TINY]) == 0
    tables = (out / "results.md").read_text().split("\n\n")
    end = _rows(next(t for t in tables if "| sampler |" in t and "train s/run" in t))
    assert _first_cells(end[1:]) == ["nabla-gfn", "dag-db", "refl", *REFERENCE_ROWS]
    for column in ("TV", "mean error (avg)", "worst std factor", "energy distance", "mean log R"):
        assert column in end[0]
    cover = _rows(next(t for t in tables if "mode coverage (of 4)" in t))
    assert _first_cells(cover[1:]) == ["nabla-gfn", "dag-db", "refl", "pretrained sampler"]
    assert "energy distance to R^β alone" in cover[0]
    for name in ("samples.png", "tv_curves.png", "curves.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    runs = summary["runs"]
    assert runs["refl"][0]["seed"] == 0 and runs["dag-db"][0]["energy_distance_reward_only"] > 0
    assert runs["nabla-gfn"][0]["last_fifth"]["tv_to_target"]["count"] == 2  # iterations 4 and 5 of 5
    assert set(summary["references"]) == {"reweight_only", "pretrained", "exact_target"}
    assert summary["acceptance"] == []  # no oracle run: nothing to check against
    assert (out / "runs" / f"{method_preset('dag-db')}-s0" / "metrics.json").is_file()
    assert main(["--methods", "refl", "--out", str(out), "train.iteratons=3"]) == 2  # config errors exit 2
    assert "train.iteratons" in capsys.readouterr().err


def test_compare_methods_over_cases(tmp_path):
    out = tmp_path / "cases"
    argv = ["--cases", "loglinear-shift", "8d", "--methods", "nabla-gfn", "oracle", "ddpo", "--seeds", "0", "1",
            "--baseline-seeds", "0", "--baseline-cases", "8d", "--out", str(out), *TINY]
    assert main(argv) == 0
    for case, baselines in (("loglinear-shift", 0), ("8d", 1)):
        summary = json.loads((out / case / "summary.json").read_text())
        assert [len(summary["runs"].get(m, [])) for m in ("nabla-gfn", "oracle", "ddpo")] == [2, 2, baselines]
        assert [len(v) for v in summary["references"].values()] == [2, 2, 2]
        assert (out / case / "runs" / f"gmm-{case}-oracle-s1" / "metrics.json").is_file()
        assert (out / case / "runs" / f"gmm-{case}-ddpo-s0" / "metrics.json").is_file() == bool(baselines)
        assert {(c["metric"], c["when"]) for c in summary["acceptance"]} == {
            (m, w) for m in TOLERANCES for w in ("end", "last fifth")}
        # the reweight-only reference has the target's weights: its exact TV is 0, its row is there
        assert "reweight-only" in (out / case / "results.md").read_text()
    text = (out / "results.md").read_text()
    assert "**loglinear-shift**" in text and "**8d**" in text and "| 8d | mean_error | last fifth |" in text
    cfg8 = json.loads((out / "8d" / "runs" / "gmm-8d-s0" / "metrics.json").read_text())
    assert len(cfg8["std_ratio_per_mode"][0]) == 8


def _run(tv, err, ed, tail=None):
    tail = tail if tail is not None else (tv, err, ed)
    return {"tv_to_target": tv, "mean_error": err, "energy_distance": ed, "mean_error_max": err,
            "std_ratio_mean": 1.0, "std_ratio_worst": 1.1, "mean_log_reward": -1.0, "train_seconds": 1.0,
            "last_fifth": {k: {"mean": v} for k, v in zip(("tv_to_target", "mean_error", "energy_distance"), tail,
                                                          strict=True)}}


@pytest.mark.parametrize(
    ("ours", "within"),
    [((0.05, 0.30, 0.015), {"tv_to_target": True, "mean_error": True, "energy_distance": True}),
     ((0.07, 0.30, 0.015), {"tv_to_target": False, "mean_error": True, "energy_distance": True}),
     ((0.05, 0.40, 0.025), {"tv_to_target": True, "mean_error": False, "energy_distance": False})],
    ids=["within", "tv-over", "shape-over"],
)
def test_acceptance_against_the_oracle_floor(ours, within):
    oracle = [_run(0.03, 0.10, 0.010), _run(0.03, 0.10, 0.010)]
    runs = {"nabla-gfn": [_run(*ours), _run(*ours)], "oracle": oracle}
    refs = {"reweight_only": [{"tv_to_target": 0.01, "mean_error": 1.5, "energy_distance": 0.2}]}
    checks = acceptance(runs, refs)
    for c in checks:
        assert c["within"] == within[c["metric"]], c
        assert c["excess"] == pytest.approx(c["nabla_gfn"] - c["oracle"])
    rw = {c["metric"]: c["reweight_only_excess"] for c in checks if c["when"] == "end"}
    assert rw["mean_error"] == pytest.approx(1.4) and rw["energy_distance"] == pytest.approx(0.19)
    assert acceptance({"nabla-gfn": runs["nabla-gfn"]}, refs) == []


def test_case_table_means_over_seeds():
    runs = {"nabla-gfn": [_run(0.02, 0.1, 0.01, tail=(0.04, 0.2, 0.02)), _run(0.04, 0.3, 0.03, tail=(0.06, 0.4, 0.04))]}
    ref = {k: 0.5 for k in ("tv_to_target", "mean_error", "mean_error_max", "std_ratio_mean", "std_ratio_worst",
                            "energy_distance", "mean_log_reward")}
    refs = {"reweight_only": [ref], "pretrained": [ref], "exact_target": [ref]}
    end = _rows(case_table(runs, refs, -1.0, tail=False))
    assert end[1].startswith("| nabla-gfn | 2 | 0.030 ± 0.014 | 0.20 ± 0.14 |")
    assert len(end) == 5
    tail = _rows(case_table(runs, refs, -1.0, tail=True))
    assert tail[1].startswith("| nabla-gfn | 2 | 0.050 ± 0.014 | 0.30 ± 0.14 |") and len(tail) == 2


def test_a_diverged_run_is_left_out_and_named(tmp_path):
    out = tmp_path / "div"
    stopped = out / "8d" / "runs" / "gmm-8d-ddpo-s0"
    stopped.mkdir(parents=True)  # a run that diverged and stopped: metrics.json without any evaluation
    (stopped / "metrics.json").write_text(json.dumps({"name": "gmm-8d-ddpo-s0", "diverged": True,
                                                     "stopped_because": "10 consecutive updates skipped",
                                                     "stopped_at_iteration": 4}))
    assert main(["--cases", "8d", "--methods", "nabla-gfn", "ddpo", "--seeds", "0", "--out", str(out), *TINY]) == 0
    report = (out / "8d" / "results.md").read_text()
    assert "ddpo seed 0 at iteration 4 (10 consecutive updates skipped)" in report
    assert "| ddpo |" not in report and "| nabla-gfn |" in report
    summary = json.loads((out / "8d" / "summary.json").read_text())
    assert list(summary["runs"]) == ["nabla-gfn"] and summary["diverged"][0]["method"] == "ddpo"
