"""``python -m fastnabla.tasks.digits.cost_study``: its rows are valid configurations of both pipelines whose layouts
are the ones each row's description names, and its table's cells are the means and ratios of the runs it reads."""

from __future__ import annotations

import json
import statistics

import pytest

from fastnabla.flops.cli import build_run_config
from fastnabla.flops.structure import derive_structure
from fastnabla.tasks.digits import cost_study
from fastnabla.tasks.digits.cost_study import DIGITS_BASE, LEVERS, SD15_BASE


@pytest.mark.parametrize("name", list(LEVERS), ids=list(LEVERS))
def test_every_row_is_a_valid_configuration_of_both_pipelines(name):
    digits, sd15, _ = LEVERS[name]
    d = build_run_config("digits", [*DIGITS_BASE, *digits])
    s = build_run_config("sd15-aesthetic", [*SD15_BASE, *sd15])
    assert d.sd.lora.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]  # the adapter the study measured
    assert d.sd.num_steps == 20  # and its sampler
    # the layouts correspond: trajectories trained per pass over sampled ones (the replayed batches) agree
    assert d.train.replay_batches == s.train.replay_batches
    assert d.train.replay_subsample == s.train.replay_subsample
    assert (d.method.fl_decoder == "surrogate") == (s.method.fl_decoder == "surrogate")
    assert d.method.forward_looking == s.method.forward_looking
    assert (d.method.flow_ema_decay > 0) == (s.method.flow_ema_decay > 0)
    if d.train.replay_subsample == "kept":  # the lever keeps the FL tables: x_hat from the pretrained model in both
        assert d.method.fl_model == s.method.fl_model == "pretrained"
    structure = derive_structure(s)  # the FLOP tool models the row
    assert structure.items_per_trajectory > 0


def _fake_run(root, name, seed, log_r, tv, train_s):
    run = root / name / f"seed-{seed}"
    run.mkdir(parents=True)
    policy = {"mean_log_reward": log_r, "class_tv": tv, "diversity_ratio": 1.0, "frechet": 100.0}
    (run / "metrics.json").write_text(json.dumps({"train_seconds": 10.0, "digits": {"policy": policy}}))
    lines = [{"iteration": 1, "time_sample": 1.0, "time_train": 0.0}]  # the sampling-only first iteration
    lines += [{"iteration": i, "time_sample": 1.0, "time_train": t} for i, t in enumerate(train_s, start=2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_the_table_holds_the_runs_means_and_the_flop_ratios(tmp_path, monkeypatch):
    flops = {name: {"ours": 10.0 + i, "release": 40.0, "per_iteration": 1000.0 * (i + 1)}
             for i, name in enumerate(LEVERS)}
    monkeypatch.setattr(cost_study, "sd15_flops", lambda overrides: next(
        f for name, f in flops.items() if [*SD15_BASE, *LEVERS[name][1]] == [*SD15_BASE, *overrides]))
    _fake_run(tmp_path, "digits", 0, 6.0, 0.30, [2.0, 4.0, 3.0])
    _fake_run(tmp_path, "digits", 1, 7.0, 0.20, [2.0, 2.0, 2.0])
    _fake_run(tmp_path, "cost-replay3", 0, 5.0, 0.40, [1.0, 1.0, 5.0])
    rows = cost_study.collect(tmp_path, [0, 1])
    assert [r["seed"] for r in rows["digits"]["runs"]] == [0, 1] and not rows["cost-terminal"]["runs"]
    assert rows["digits"]["runs"][0]["seconds_train_per_iteration"] == 3.0  # median of 2, 4, 3
    text = cost_study.table(rows)
    line = next(x for x in text.splitlines() if x.startswith("| `digits`"))
    sd = statistics.stdev([6.0, 7.0])
    assert f"6.50 ± {sd:.2f}" in line and "0.250 ± 0.071" in line
    replay = next(x for x in text.splitlines() if x.startswith("| `cost-replay3`"))
    base_wall = (3.0 + 2.0) / 2  # the unaccelerated runs' median training seconds, averaged over seeds
    ours = flops["cost-replay3"]["ours"]
    assert f"| {1.0 / base_wall:.2f} ({2.0 / (base_wall + 1.0):.2f}) |" in replay
    assert f"{ours:.1f} ({ours / 40.0:.3f}×; {ours / flops['digits']['ours']:.2f}× unaccelerated)" in replay
    assert "| `cost-terminal`" in text and "not run" in text
    cost_study.figure(rows, tmp_path / "figure.png")
    assert (tmp_path / "figure.png").stat().st_size > 0
    # quality against compute: RUNS/<name>@<iterations>, x = iterations x sd15 TFLOP per iteration
    _fake_run(tmp_path, "digits@10", 0, 5.5, 0.35, [1.0])
    _fake_run(tmp_path, "digits@10", 1, 6.5, 0.25, [1.0])
    _fake_run(tmp_path, "cost-surrogate-replay3@40", 1, 6.0, 0.3, [1.0])
    curves = cost_study.collect_curves(tmp_path, [0, 1], {n: flops[n] for n in cost_study.CURVES})
    assert [p["iterations"] for p in curves["digits"]] == [10]
    assert curves["digits"][0]["sd15_pflop"] == 10 * flops["digits"]["per_iteration"] / 1000
    assert [(p["iterations"], len(p["runs"])) for p in curves["cost-surrogate-replay3"]] == [(40, 1)]
    curve_lines = cost_study.curve_table(curves).splitlines()
    assert f"| `digits` | 10 | {10 * flops['digits']['per_iteration'] / 1000:.0f} | 2 | 6.00 ± {sd:.2f} |" \
        in curve_lines[2]
    cost_study.curve_figure(curves, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_the_sd15_flops_of_a_row_are_the_flop_tools_per_iteration():
    """``sd15_flops`` runs the FLOP tool as a command; its per-iteration compute is the sampled trajectories times the
    tool's TFLOP per trajectory, for the row's own batch size (22 here, not SD15_BASE's 64)."""
    from fastnabla.flops.report import flop_report

    got = cost_study.sd15_flops(cost_study.SD15_REPLAY3)
    report = flop_report(build_run_config("sd15-aesthetic", [*SD15_BASE, *cost_study.SD15_REPLAY3]))
    assert got["per_iteration"] == pytest.approx(22 * report["tflops_per_trajectory"], rel=1e-9)
    assert got["ours"] == pytest.approx(report["tflops_per_trained_transition_incl_sampling"], rel=1e-9)


def test_the_command_takes_the_curves_seeds_apart_from_the_tables(tmp_path, monkeypatch):
    """``--curve-seeds`` adds seeds to the equal-compute curves without changing the per-lever table's seeds."""
    flops = {name: {"ours": 10.0, "release": 40.0, "per_iteration": 1000.0} for name in LEVERS}
    monkeypatch.setattr(cost_study, "sd15_flops", lambda overrides: flops["digits"])
    runs = tmp_path / "runs"
    _fake_run(runs, "digits", 0, 6.0, 0.30, [2.0])
    _fake_run(runs, "digits", 1, 7.0, 0.20, [2.0])
    (runs / "digits@30").symlink_to(runs / "digits")
    out = tmp_path / "out"
    assert cost_study.main(["--runs", str(runs), "--out", str(out), "--seeds", "0", "--curve-seeds", "0", "1"]) == 0
    table = next(x for x in (out / "table.md").read_text().splitlines() if x.startswith("| `digits`"))
    assert "| 6.00 | 0.300 |" in table  # seed 0 alone
    curve = next(x for x in (out / "curves.md").read_text().splitlines() if x.startswith("| `digits` | 30 |"))
    assert f"| 2 | 6.50 ± {statistics.stdev([6.0, 7.0]):.2f} |" in curve
    assert json.loads((out / "curves.json").read_text())["digits"][0]["iterations"] == 30
