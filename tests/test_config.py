"""Config loading: layering, type checks, errors that name the field, presets, YAML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastnabla.config.loader import ConfigError, build_config, describe, merge_into, parse_override, to_yaml
from fastnabla.run.config import RunConfig
from fastnabla.run.presets import PRESETS, get_preset
from fastnabla.tasks.gmm.build import build_gmm_task


def test_defaults_validate_and_layers_apply_in_order(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  iterations: 77\n  batch_size: 33\nmethod:\n  td_lambda: 0.25\n")
    cfg = build_config(RunConfig, {"train": {"iterations": 5}, "seed": 3}, cfg_file, ["train.batch_size=12"])
    assert (cfg.seed, cfg.train.iterations, cfg.train.batch_size, cfg.method.td_lambda) == (3, 77, 12, 0.25)
    assert cfg.method.reverse_target == "pathwise"  # untouched defaults survive


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.iteratons=5", "unknown config key 'train.iteratons'"),
        ("train.iterations=abc", "train.iterations: expected an integer"),
        ("train.iterations=0", "train.iterations: must be >= 1, got 0"),
        ("method.td_lambda=2", "method.td_lambda: must be >= 0 and <= 1, got 2.0"),
        ("method.gamma=alpha", "method.gamma: 'alpha' is not one of"),
        ("optim.betas=[0.9]", "optim.betas: expected 2 values"),
        ("output.overwrite=maybe", "output.overwrite: expected true/false"),
        ("gmm.mixture.means=3", "gmm.mixture.means: expected a list"),
        ("nonsense", "must look like key.path=value"),
        ("gmm.mixture.stds=-1", "gmm.mixture.stds: must be > 0, got -1.0"),
        ("method.beta=nan", "method.beta: must be a finite number, got 'nan'"),
        ("method.beta=.inf", "method.beta: must be a finite number, got inf"),
        ("optim.lr_policy=inf", "optim.lr_policy: must be a finite number, got 'inf'"),
        ("gmm.mixture.stds=[0.5,.nan,0.5,0.5]", "gmm.mixture.stds[1]: must be a finite number, got nan"),
        ("sampler.scheduler.beta_end=.nan", "sampler.scheduler: must be a finite number, got nan"),
        ("method.beta=-1", "method.beta: must be > 0, got -1.0"),
        ("optim.betas=[0.9,1.5]", "optim.betas: must be >= 0 and < 1 (each value), got (0.9, 1.5)"),
        ("train.transition_fraction=0", "train.transition_fraction: must be > 0 and <= 1, got 0.0"),
        ("method.prior_strength=0.5", "eta_p != 1 needs method.reverse_target='score' (got 'pathwise'"),
    ],
    ids=["typo", "not-int", "range", "lambda", "enum", "tuple-len", "bool", "list", "no-equals", "negative-std",
         "nan", "inf", "inf-string", "nan-in-list", "nan-in-dict", "negative", "betas", "fraction", "eta-p-pathwise"],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        build_config(RunConfig, None, None, [override])
    assert message in str(err.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("gmm.reward.center=[1,2,3]", "gmm.reward.center needs d=2 values"),
        ("gmm.mixture.weights=[1,2]", "gmm.mixture.weights needs 4 values"),
        ("gmm.mixture.stds=[0.5,0.5]", "gmm.mixture.stds needs 1 or 4 values"),
        ("gmm.reward.kind=loglinear", "gmm.reward.weights needs d=2 values"),
        ("sampler.scheduler.set_alpha_to_one=true", "deterministic"),
        ("sampler.scheduler.clip_sample=true", "clip_sample"),
    ],
    ids=["center-dim", "weights-len", "stds-len", "loglinear-weights", "det-last-step", "clip"],
)
def test_inconsistent_task_settings_are_rejected(override, message):
    cfg = build_config(RunConfig, None, None, [override])
    with pytest.raises(ConfigError) as err:
        build_gmm_task(cfg)
    assert message in str(err.value)


def test_dict_fields_merge_instead_of_replacing():
    cfg = build_config(RunConfig, None, None, ["sampler.scheduler.beta_end=0.03"])
    assert cfg.sampler.scheduler["beta_end"] == 0.03
    assert cfg.sampler.scheduler["beta_schedule"] == "linear"  # the other keys survive
    assert cfg.sampler.scheduler["clip_sample"] is False


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(RunConfig, None, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(RunConfig, None, bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        build_config(RunConfig, None, top)


def test_override_parsing_and_yaml_round_trip(tmp_path):
    assert parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}
    cfg = build_config(RunConfig, None, None, ["optim.lr_policy=1e-3", "gmm.reward.center=[1,2]"])
    assert cfg.optim.lr_policy == pytest.approx(1e-3)
    path = tmp_path / "rt.yaml"
    path.write_text(to_yaml(cfg))
    assert build_config(RunConfig, None, path) == cfg
    assert merge_into(cfg, {}) == cfg


GMM_PRESETS = [n for n in PRESETS if n.startswith("gmm")]
# the flow presets (SD3 / FLUX) are checked in tests/test_flow_run.py
SD_PRESETS = [n for n in PRESETS if not n.startswith("gmm") and PRESETS[n][1].get("task") != "flow"]


@pytest.mark.parametrize("name", GMM_PRESETS, ids=GMM_PRESETS)
def test_every_preset_builds_a_valid_task(name):
    cfg = build_config(RunConfig, get_preset(name))
    task = build_gmm_task(cfg)
    assert task.prior.num_components >= 3
    assert task.mdp.num_steps == cfg.sampler.num_steps


@pytest.mark.parametrize("name", SD_PRESETS, ids=SD_PRESETS)
def test_sd_presets_are_what_their_provenance_table_says(name):
    """Every SD preset is a valid config; the sd15-* ones hold exactly the settings of their provenance table
    (docs/presets.md), and the release's facts that matter for cost: no reward smoothing (one decode per state) and
    one update per 192 trained transitions."""
    from fastnabla.config.loader import to_dict
    from fastnabla.run.presets import SD15_COST_PROVENANCE, SD15_FAST_PROVENANCE, SD_PROVENANCE, SD_REWARD_PROVENANCE

    cfg = build_config(RunConfig, get_preset(name))
    assert cfg.task == "sd" and cfg.sd.guidance_scale == 5.0 and cfg.sd.eta == 1.0
    if not name.startswith("sd15"):
        return
    flat = to_dict(cfg)

    def value(path: str):
        node = flat
        for part in path.split("."):
            node = node[part]
        return node

    table = {**SD_PROVENANCE, **SD_REWARD_PROVENANCE[cfg.sd.reward.name]}
    if cfg.method.name == "nabla-gfn":  # the sd15 nabla-GFlowNet presets' cost settings (docs/cost.md)
        table.update(SD15_COST_PROVENANCE)
    if name == "sd15-fast-aesthetic":  # 16 trajectories x 24 transitions (docs/cost.md)
        table.update(SD15_FAST_PROVENANCE)
    baseline_keys = ("method.", "optim.", "train.updates_per_batch", "train.transition_fraction")
    for path, (expected, _, _) in table.items():
        if cfg.method.name != "nabla-gfn" and path.startswith(baseline_keys):
            continue  # the baselines' own settings are checked in tests/test_methods_*.py
        assert value(path) == expected, path
    if cfg.method.name == "nabla-gfn":
        assert cfg.method.fl_noise_var == 0 and cfg.method.fl_num_noise == 1
        # about the release's 192 trained transitions per update (32 trajectories x 6): the replayed batches' 3 x 22
        # trajectories x 6 in 2 updates make 198; sd15-fast-aesthetic 16 x 24 in 2, 192
        per_trajectory = round(cfg.train.transition_fraction * cfg.sd.num_steps) + 1
        trained = cfg.train.replay_batches * cfg.train.batch_size * per_trajectory
        assert 192 <= trained / cfg.train.updates_per_batch <= 198


def test_docs_preset_table_is_the_code_table():
    from fastnabla.run.presets import digits_provenance_markdown, provenance_markdown

    docs = (Path(__file__).resolve().parents[1] / "docs" / "presets.md").read_text()
    assert provenance_markdown() in docs, "regenerate with: python -m fastnabla.run.presets --markdown"
    assert digits_provenance_markdown() in docs, "regenerate with: python -m fastnabla.run.presets --markdown digits"


def test_unknown_preset_and_help_rows():
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("gmm-nope")
    rows = describe(RunConfig)
    paths = {r[0] for r in rows}
    assert {"method.td_lambda", "train.iterations", "gmm.reward.kind"} <= paths
    assert all(text for path, _, text in rows if path.startswith(("method.", "optim.", "train."))), "help text missing"


def test_overrides_never_modify_a_preset():
    """build_config merges the preset first; overrides and YAML must not write into the preset's dicts."""
    import copy

    before = copy.deepcopy(PRESETS)
    build_config(RunConfig, get_preset("tiny-sd"), None, ["train.iterations=2", "sd.reward.name=brightness"])
    build_config(RunConfig, get_preset("gmm-narrow-bump"), None, ["gmm.reward.center=[0,0]"])
    assert before == PRESETS
    assert build_config(RunConfig, get_preset("tiny-sd")).train.iterations == 3


def test_prior_strength_other_than_one_only_where_every_term_uses_it():
    cfg = build_config(RunConfig, None, None, ["method.prior_strength=0.5", "method.reverse_target=score"])
    assert cfg.method.prior_strength == 0.5
    with pytest.raises(ConfigError, match="needs method.flow='learned'"):
        build_config(RunConfig, None, None, ["method.prior_strength=0.5", "method.reverse_target=score",
                                             "method.flow=oracle"])


@pytest.mark.parametrize("key", ["method.fl_model", "method.db.fl_model"], ids=["nabla-gfn", "db"])
def test_values_under_an_old_name_are_read_as_the_new_one(tmp_path, key):
    """'reference' was the frozen model's name before it became 'pretrained': a config written then (an override,
    or the config.yaml of an earlier run) still loads, with the current name, and writes the current name back."""
    section, field = key.rsplit(".", 1)
    cfg = build_config(RunConfig, None, None, [f"{key}=reference"])
    node = cfg
    for part in section.split("."):
        node = getattr(node, part)
    assert getattr(node, field) == "pretrained"
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(cfg).replace(f"{field}: pretrained", f"{field}: reference"))
    assert "reference" in saved.read_text()
    again = build_config(RunConfig, None, saved, [])
    assert to_yaml(again) == to_yaml(cfg) and "fl_model: reference" not in to_yaml(again)
    with pytest.raises(ConfigError, match="'frozen' is not one of"):
        build_config(RunConfig, None, None, [f"{key}=frozen"])
