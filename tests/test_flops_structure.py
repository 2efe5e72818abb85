"""The pass structure ``fastnabla.flops`` derives from a config equals what real tiny runs count, pass for pass and
FLOP for FLOP, for every method and the switches that change the structure."""

from __future__ import annotations

import json

import pytest
from flops_common import FAST, build_tiny_trainer, counted_per_item, tiny_run_config
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastnabla.flops.counting import flop_counter
from fastnabla.flops.report import flop_report
from fastnabla.flops.structure import RELEASE_TRAINED_PER_TRAJECTORY, derive_structure, release_structure
from fastnabla.tasks.sd.counters import count_task_passes

# (id, overrides): each changes which passes a trained transition runs
CASES = [
    ("default", []),  # fold, K = 3 smoothing draws, CFG pairs, FL through the policy; one all-terminal micro-batch
    ("no-smoothing", ["method.fl_noise_var=0"]),
    ("two-draws", ["method.fl_num_noise=2"]),
    ("unfolded", ["method.fold_fl_vjp=false"]),
    ("no-cfg", ["sd.guidance_scale=1"]),
    ("fl-reference-table", ["method.fl_model=pretrained"]),
    ("pathwise", ["method.reverse_target=pathwise", "method.fl_model=pretrained"]),
    ("fl-terminal-only", ["method.forward_looking=terminal"]),
    ("fl-terminal-only-table", ["method.forward_looking=terminal", "method.fl_model=pretrained"]),
    ("tweedie-jacobian", ["method.fl_jacobian=tweedie"]),
    ("no-reverse-loss", ["method.reverse_scale=0"]),
    ("averaged-flow", ["method.flow_ema_decay=0.9", "method.forward_trains_flow=false"]),  # + g_phi_bar(x_{t+1})
    ("averaged-flow-pathwise", ["method.flow_ema_decay=0.9", "method.forward_trains_flow=false",
                                "method.reverse_target=pathwise", "method.fl_model=pretrained"]),
    ("all-transitions", ["train.transition_fraction=1.0", "train.fl_batch_size=3"]),
    ("residual-db", ["method.name=residual-db"]),
    ("dag-db-reference", ["method.name=dag-db", "method.db.fl_model=pretrained"]),
    ("ddpo", ["method.name=ddpo"]),
    ("refl", ["method.name=refl"]),
    ("draft-k2", ["method.name=draft-k", "method.draft.k=2"]),
    ("draft-lv", ["method.name=draft-lv"]),
]


@pytest.fixture(autouse=True)
def _eager_reference_ops(monkeypatch):
    monkeypatch.setenv("FASTNABLA_COMPILE", "off")  # the fused ops' compiled forms cost seconds to build here
    monkeypatch.setenv("FASTNABLA_BACKEND", "reference")


@pytest.mark.parametrize("overrides", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_derived_structure_equals_counted_passes_and_flops(overrides):
    cfg = tiny_run_config(*overrides)
    task, trainer = build_tiny_trainer(cfg)
    traj = trainer.sample(1)
    # the math attention path is what FlopCounterMode counts on CPU (and what the meta device runs)
    with sdpa_kernel(SDPBackend.MATH), count_task_passes(task) as counter, flop_counter() as flops:
        module = trainer.objective.module
        if module is not None:
            counter.watch_module("db_flow", module)
        stats = trainer.train_on(traj, 2)
    items = stats["transitions"]
    structure = derive_structure(cfg, iteration=2)
    assert structure.items_per_trajectory * cfg.train.batch_size == items
    counted = counted_per_item(counter, items, cfg.sd.guidance_scale)
    derived = {k: v for k, v in structure.counter_view().items() if v}
    assert derived == pytest.approx(counted, rel=1e-12), (derived, counted)
    report = flop_report(cfg, "tiny", release=False)
    predicted = report["tflops_per_trained_transition"] * 1e12 * items
    assert predicted == pytest.approx(flops.get_total_flops(), rel=1e-9)
    assert flops.get_total_flops() > 0


KEPT = ["train.replay_subsample=kept", "method.fl_model=pretrained"]


@pytest.mark.parametrize("overrides", [[], ["method.fl_model=pretrained"], KEPT,
                                       [*KEPT, "method.reverse_target=pathwise"]],
                         ids=["fl-policy", "fl-reference-table", "kept-constants", "kept-constants-pathwise"])
def test_replayed_batches_are_counted_and_amortise_sampling(overrides):
    """``train.replay_batches=2``: the derived steady-state pass (iteration 3, two batches) equals what a real pass
    over two stored batches counts, and each sampled trajectory carries twice the trained transitions. With kept
    subsamples the older batch's constants come from iteration 2's pass (not recounted)."""
    cfg = tiny_run_config("train.replay_batches=2", *overrides)
    task, trainer = build_tiny_trainer(cfg)
    trainer.fit(2)  # samples batches 1 and 2, trains on batch 1 (keeping its constants when kept)
    assert len(trainer.history) == 2
    with sdpa_kernel(SDPBackend.MATH), count_task_passes(task) as counter, flop_counter() as flops:
        stats = trainer.train_on(trainer.replayed(), 3, num_batches=2)
    items = stats["transitions"]
    structure = derive_structure(cfg)  # the default: the first steady-state pass, iteration 3
    single = derive_structure(tiny_run_config(*overrides))
    assert structure.items_per_trajectory * cfg.train.batch_size == items
    assert structure.items_per_trajectory == 2 * single.items_per_trajectory
    counted = counted_per_item(counter, items, cfg.sd.guidance_scale)
    assert {k: v for k, v in structure.counter_view().items() if v} == pytest.approx(counted, rel=1e-12)
    report = flop_report(cfg, "tiny", release=False)
    assert report["tflops_per_trained_transition"] * 1e12 * items == pytest.approx(flops.get_total_flops(), rel=1e-9)


def test_switches_change_the_structure_as_documented():
    base = derive_structure(tiny_run_config("method.fl_noise_var=0")).counter_view()
    smoothed = derive_structure(tiny_run_config()).counter_view()  # K = 3 draws: three decodes per state
    assert smoothed["vae_decoder_backward"] == 3 * base["vae_decoder_backward"]
    unfolded = derive_structure(tiny_run_config("method.fold_fl_vjp=false")).counter_view()
    assert unfolded["unet_forward"] == pytest.approx(smoothed["unet_forward"] + 1)  # x_hat(x_t): its own network call
    assert unfolded["unet_backward"] == pytest.approx(smoothed["unet_backward"] + 1)  # and its own VJP
    # more optimizer updates per batch move no pass
    assert derive_structure(tiny_run_config("train.updates_per_batch=1")).per_item == derive_structure(
        tiny_run_config("train.updates_per_batch=3")).per_item


@pytest.mark.parametrize("fl_decoder", ["exact", "surrogate"])
def test_the_logged_passes_of_a_real_run_equal_the_derived_structure(tmp_path, monkeypatch, fl_decoder):
    """Through ``python -m fastnabla.train``: metrics.jsonl's ``passes_per_transition`` of iteration 3 (with the
    forward-looking surrogate decoder: its passes are logged as ``fl_surrogate_*``, the exact decoder's at ``x_T``)."""
    monkeypatch.setenv("FASTNABLA_COMPILE", "off")
    from fastnabla import train

    overrides = []
    if fl_decoder == "surrogate":
        from fastnabla.tasks.sd.loading import build_tiny_fl_surrogate
        from fastnabla.tasks.sd.tiny import build_tiny_components

        build_tiny_fl_surrogate(build_tiny_components(seed=0).vae.config).save_pretrained(tmp_path / "surrogate")
        overrides = ["method.fl_decoder=surrogate", f"sd.fl_surrogate_decoder={tmp_path / 'surrogate'}"]
    out = tmp_path / "run"
    extra = ["sd.prompts.eval_seeds=[0]", "sd.prompts.eval_prompts=['a cat']", "output.progress=false",
             "output.tensorboard=false", "output.figure=false", "output.export_lora=false"]
    assert train.main(["--preset", "tiny-sd", *FAST, *overrides, *extra, "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = next(r for r in records if r["iteration"] == 3)["passes_per_transition"]
    derived = derive_structure(tiny_run_config(*overrides), iteration=3).counter_view()
    assert {k: v for k, v in logged.items() if v} == pytest.approx(derived, rel=1e-12)
    if fl_decoder == "surrogate":
        assert logged["fl_surrogate_forward"] > 0 and logged["vae_decoder_forward"] > 0


def test_release_structure_is_the_documented_3_plus_5_layout():
    from fastnabla.tasks.sd.run import RELEASE_PASSES

    release = release_structure()
    view = release.counter_view()
    assert {k: view[k] for k in RELEASE_PASSES} == RELEASE_PASSES  # the repo's own statement of the release
    assert view["unet_forward"] == 3 and view["unet_backward"] == 5 and view["flow_backward"] == 2
    assert release.items_per_trajectory == RELEASE_TRAINED_PER_TRAJECTORY == 6
    assert release.sampling["unet_policy.forward"] == 50 and release.unet_rows_per_pass == 2


def test_the_paper_subsampling_trains_six_transitions_per_trajectory():
    """10 % of 50 steps: 5 chunks + the terminal transition, as in the release."""
    cfg = tiny_run_config("sd.num_steps=50", "train.transition_fraction=0.1", "train.batch_size=8",
                          "train.micro_batch_size=4", "train.updates_per_batch=2")
    assert derive_structure(cfg).items_per_trajectory == 6


@pytest.mark.parametrize(
    ("overrides", "message"),
    [(["method.flow=oracle"], "oracle"), (["method.second_order=true"], "second_order")],
    ids=["oracle-flow", "second-order"],
)
def test_unmodelled_settings_are_refused_with_the_field_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        derive_structure(tiny_run_config(*overrides))


def test_flops_follow_the_config_on_the_tiny_architecture():
    base = flop_report(tiny_run_config("method.fl_noise_var=0"), "tiny", release=False)
    smoothed = flop_report(tiny_run_config(), "tiny", release=False)
    assert smoothed["phases"]["vae_decoder_backward"] == pytest.approx(3 * base["phases"]["vae_decoder_backward"])
    no_cfg = flop_report(tiny_run_config("sd.guidance_scale=1"), "tiny", release=False)
    assert no_cfg["sampling_phases"]["unet_policy_forward"] == pytest.approx(
        smoothed["sampling_phases"]["unet_policy_forward"] / 2)
