"""The analytic comparison command: runs every requested method, writes the table and the figures."""

from __future__ import annotations

import json

from fastnabla.compare.methods import main, method_preset, mode_coverage

TINY = ["sampler.num_steps=6", "train.batch_size=8", "train.iterations=3", "gmm.network.hidden=16",
        "gmm.network.layers=2", "method.db.flow_hidden=16", "method.db.flow_layers=2", "eval.every=0",
        "eval.num_samples=64", "eval.final_num_samples=64", "eval.energy_samples=32", "output.figure=false"]


def test_mode_coverage_counts_modes_holding_the_fraction():
    target = [0.4, 0.3, 0.2, 0.1]
    assert mode_coverage(target, target) == 4
    assert mode_coverage([0.7, 0.3, 0.0, 0.0], target) == 2
    assert mode_coverage([0.2, 0.15, 0.1, 0.05], target, fraction=0.5) == 4
    assert mode_coverage([0.19, 0.15, 0.1, 0.05], target, fraction=0.5) == 3


def test_compare_methods_writes_table_and_figures(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["--methods", "nabla-gfn", "dag-db", "refl", "--seeds", "0", "--out", str(out), *TINY]) == 0
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["nabla-gfn", "dag-db", "refl", "pretrained sampler"]
    assert "mode coverage (of 4)" in rows[0] and "energy distance to R^β alone" in rows[0]
    for name in ("samples.png", "tv_curves.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["refl"][0]["seed"] == 0 and summary["dag-db"][0]["energy_distance_reward_only"] > 0
    assert (out / "runs" / f"{method_preset('dag-db')}-s0" / "metrics.json").is_file()
    assert main(["--methods", "refl", "--out", str(out), "train.iteratons=3"]) == 2  # config errors exit 2
    assert "train.iteratons" in capsys.readouterr().err
