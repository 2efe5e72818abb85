"""The digits presets end to end: a short ``digits`` run on the quick build writes the yardstick's evaluation to
``metrics.json``, and its numbers agree with an independent recomputation from the saved samples, the cached
pretrained samples and the classifier (expected digit, importance weights); the compare command tabulates runs."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from digits_common import quick_build_dir

from fastnabla.config.loader import build_config
from fastnabla.methods.config import METHODS
from fastnabla.run.config import RunConfig
from fastnabla.run.presets import DIGITS_PROVENANCE, PRESETS, get_preset

DIGITS_PRESETS = [n for n in PRESETS if n == "digits" or n.startswith("digits-")]
# a short run: 10 sampler steps, 2 iterations of 4 trajectories, small evaluation sets (~20 s on one thread)
SHORT = ["sd.num_steps=10", "train.iterations=2", "train.batch_size=4", "train.sample_batch_size=4",
         "train.micro_batch_size=4", "train.fl_batch_size=4", "eval.num_samples=64", "eval.final_num_samples=96",
         "sd.prompts.eval_seeds=[0,1]", "output.progress=false", "output.figure=false"]


def test_every_method_has_a_digits_preset_with_the_same_target():
    names = {build_config(RunConfig, get_preset(n)).method.name: n for n in DIGITS_PRESETS}
    assert set(names) == set(METHODS), set(METHODS) ^ set(names)
    for name in DIGITS_PRESETS:
        cfg = build_config(RunConfig, get_preset(name))
        assert cfg.task == "sd" and cfg.sd.model == "digits" and cfg.sd.reward.name == "digits-value"
        assert cfg.method.beta == DIGITS_PROVENANCE["method.beta"][0], name  # one target for every method
        if cfg.method.name in ("residual-db", "dag-db"):  # with 'mean' the exponent would be N beta, another target
            assert cfg.method.db.log_prob_reduction == "sum", name
        assert cfg.sd.prompts.source.startswith("digits:") and cfg.sd.sampler == "ddim" and cfg.sd.eta == 1.0


@pytest.mark.parametrize("path", list(DIGITS_PROVENANCE), ids=list(DIGITS_PROVENANCE))
def test_digits_preset_is_its_provenance_table(path):
    from fastnabla.config.loader import to_dict

    node = to_dict(build_config(RunConfig, get_preset("digits")))
    for part in path.split("."):
        node = node[part]
    assert node == DIGITS_PROVENANCE[path][0]
    assert DIGITS_PROVENANCE[path][1] in ("paper", "release", "ours") and DIGITS_PROVENANCE[path][2]


def test_digits_long_is_digits_with_its_provenance_table():
    from fastnabla.config.loader import to_dict
    from fastnabla.run.presets import DIGITS_LONG_PROVENANCE

    def flat(node, prefix=""):
        if not isinstance(node, dict):
            return {prefix[:-1]: node}
        return {k: v for key, child in node.items() for k, v in flat(child, f"{prefix}{key}.").items()}

    short, long = (flat(to_dict(build_config(RunConfig, get_preset(n)))) for n in ("digits", "digits-long"))
    changed = {k for k in short if short[k] != long[k]}
    assert changed == {k for k, (v, _, _) in DIGITS_LONG_PROVENANCE.items() if short[k] != v} == {
        "method.reverse_target", "train.iterations", "optim.lr_schedule"}  # td_lambda: 0.5 is already the default
    assert all(long[k] == v and src in ("paper", "release", "ours") and why
               for k, (v, src, why) in DIGITS_LONG_PROVENANCE.items())


def test_unknown_digits_prompt_is_an_error():
    from fastnabla.tasks.digits.run import prompt_file

    with pytest.raises(ValueError, match="knows the prompts"):
        prompt_file("digits:a handwritten letter")
    assert prompt_file("animals") == "animals"


def _expected_digit(logits: torch.Tensor) -> torch.Tensor:
    """digits-value's log R, written out independently: sum_k k p(k | x)."""
    return (logits.double().softmax(-1) * torch.arange(10, dtype=torch.float64)).sum(-1)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    from fastnabla.run.driver import run_training

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs") / "digits" / "seed-0"
    cfg = build_config(RunConfig, get_preset("digits"), None,
                       [*SHORT, "name=digits", f"sd.model={quick_build_dir()}", f"output.dir={out}"])
    outcome = run_training(cfg, verbose=False)
    assert outcome.exit_code == 0
    return cfg, out


def test_short_run_writes_the_digits_evaluation(short_run):
    from safetensors.torch import load_file

    from fastnabla.rewards.digits_classifier import CLASSIFIER_FILE, load_classifier
    from fastnabla.tasks.digits.run import SAMPLES_FILE
    from fastnabla.tasks.digits.target import pretrained_samples

    cfg, out = short_run
    d = json.loads((out / "metrics.json").read_text())["digits"]
    assert d["evaluated"] and d["num_samples"] == 64 and d["beta"] == 0.5
    classifier = load_classifier(quick_build_dir() / CLASSIFIER_FILE)
    # the policy's numbers from its saved samples (all 64 are saved)
    images = load_file(str(out / SAMPLES_FILE))["images"]
    assert images.shape == (64, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    with torch.no_grad():
        logits = classifier.logits_and_features(images.float())[0]
    assert d["policy"]["mean_log_reward"] == pytest.approx(float(_expected_digit(logits).mean()), abs=1e-3)
    hist = torch.bincount(logits.argmax(1), minlength=10).double() / 64
    assert d["policy"]["histogram"] == pytest.approx(hist.tolist(), abs=1e-9)
    # the target: self-normalised weights exp(beta log R) over the run's cached pretrained samples (seed 0)
    base = pretrained_samples(quick_build_dir(), "a handwritten digit", 96, 5.0, 10, 1.0, seed=0, progress=False)
    log_r = _expected_digit(base.logits)
    w = torch.softmax(0.5 * log_r, 0)
    t = d["target"]
    assert t["num_samples"] == 96
    assert t["ess"] == pytest.approx(float(1 / (w**2).sum()), rel=1e-6)
    assert t["mean_log_reward"] == pytest.approx(float((w * log_r).sum()), abs=1e-3)
    target_hist = torch.zeros(10, dtype=torch.float64).index_add_(0, base.logits.argmax(1), w)
    assert t["histogram"] == pytest.approx(target_hist.tolist(), abs=1e-6)
    tv = 0.5 * float((hist - target_hist).abs().sum())
    assert d["policy"]["class_tv"] == pytest.approx(tv, abs=1e-6)
    for who in ("policy", "pretrained"):
        assert all(math.isfinite(d[who][k]) for k in ("mean_log_reward", "class_tv", "diversity_ratio", "frechet"))


def test_compare_tabulates_runs(short_run, tmp_path):
    from fastnabla.tasks.digits.compare import compare, mean_std

    _, out = short_run
    runs = out.parents[1]
    table = compare(["digits"], [0], tmp_path / "cmp", runs, train=False)
    d = json.loads((out / "metrics.json").read_text())["digits"]
    assert f"{d['policy']['class_tv']:.3f}" in table.splitlines()[2] and "| 1 |" in table.splitlines()[2]
    assert (tmp_path / "cmp" / "digits.png").stat().st_size > 0
    assert json.loads((tmp_path / "cmp" / "results.json").read_text())["presets"]["digits"][0]["seed"] == 0
    assert mean_std([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, statistics.stdev([1.0, 2.0, 4.0])))
    with pytest.raises(FileNotFoundError):
        compare(["digits"], [1], tmp_path / "cmp", runs, train=False)  # no run for seed 1
    assert compare(["digits"], [0, 1], tmp_path / "cmp2", runs, train=False, available=True) == table
    with pytest.raises(FileNotFoundError, match="no finished run"):
        compare(["digits"], [1, 2], tmp_path / "cmp3", runs, train=False, available=True)


def test_docs_digits_preset_table_is_the_code_table():
    from pathlib import Path

    from fastnabla.run.presets import digits_provenance_markdown

    docs = (Path(__file__).resolve().parents[1] / "docs" / "presets.md").read_text()
    assert digits_provenance_markdown() in docs, "regenerate with: python -m fastnabla.run.presets --markdown digits"


def test_digits_long_trains_the_flow_by_the_pathwise_target(tmp_path):
    """digits-long end to end on the quick build (pathwise targets over every state of the SD task's trajectories),
    against the same run with eq. 17: the same first forward loss (same networks and trajectories), another
    reverse loss (another flow target), and the yardstick's evaluation written."""
    from fastnabla.run.driver import run_training

    torch.set_num_threads(1)
    first_losses = {}
    for target in ("pathwise", "score"):
        out = tmp_path / target
        cfg = build_config(RunConfig, get_preset("digits-long"), None, [
            *SHORT, "train.updates_per_batch=1", f"method.reverse_target={target}", "name=digits-long",
            f"sd.model={quick_build_dir()}", f"output.dir={out}"])
        assert run_training(cfg, verbose=False).exit_code == 0
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        first_losses[target] = next((r["loss_forward"], r["loss_reverse"]) for r in records if "loss_forward" in r)
        d = json.loads((out / "metrics.json").read_text())["digits"]
        assert d["evaluated"] and math.isfinite(d["policy"]["class_tv"])
    (fwd_pathwise, rev_pathwise), (fwd_score, rev_score) = first_losses["pathwise"], first_losses["score"]
    assert fwd_pathwise == pytest.approx(fwd_score, rel=1e-6)
    assert abs(rev_pathwise - rev_score) > 1e-3 * rev_score
