"""``python -m fastnabla.compare.eval_noise``: re-evaluates a finished run's final sampler with fresh evaluation noise
and sets the estimator's spread beside the run's own swings; and ``python -m fastnabla.compare.shape``'s references
table."""

from __future__ import annotations

import json

from fastnabla import train
from fastnabla.compare import eval_noise, shape

TINY = ["sampler.num_steps=6", "train.batch_size=8", "train.iterations=10", "gmm.network.hidden=16",
        "gmm.network.layers=2", "eval.every=2", "eval.num_samples=300", "eval.final_num_samples=300",
        "eval.energy_samples=100", "output.figure=false", "output.progress=false"]


def test_eval_noise_of_a_finished_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--preset", "gmm-beta3", f"output.dir={out}", *TINY]) == 0
    r = eval_noise.measure(out, repeats=3)
    assert r["num_samples"] == 300
    for m in ("tv_to_target", "mean_error", "energy_distance"):
        assert r["noise_trained"][m] > 0 and r["noise_exact"][m] > 0  # fresh noise each repeat
    metrics = json.loads((out / "metrics.json").read_text())
    assert r["last_fifth_std"]["tv_to_target"] == metrics["last_fifth"]["tv_to_target"]["std"]
    tvs = [p["tv_to_target"] for p in metrics["eval_curve"] if p["iteration"] >= 100]
    assert r["tv_range_from_100"] is None and tvs == []  # 10 iterations: nothing from iteration 100 on
    assert r["mean_exact"]["mean_error"] < r["mean_trained"]["mean_error"]  # 10 iterations are far from the target
    md = tmp_path / "noise.md"
    assert eval_noise.main([str(out), "--repeats", "2", "--out", str(md)]) == 0
    assert md.read_text().startswith("| run | TV end |")
    assert eval_noise.main([str(tmp_path / "missing")]) == 2
    assert eval_noise.main([str(out), "--repeats", "1"]) == 2
    capsys.readouterr()


def test_references_table_rows():
    text = shape.references_table(["loglinear-shift"], [0])
    rows = [r for r in text.splitlines()[2:] if r.startswith("| loglinear-shift |")]
    assert [r.split("|")[3].strip() for r in rows] == [shape.REFERENCE_NAMES[n] for n in shape.REFERENCES]
    assert all(r.split("|")[2].strip() == "0.143" for r in rows)  # exact prior -> target mode-weight TV
