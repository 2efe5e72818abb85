"""The model card beside the exported LoRA (``OUT/lora/README.md``): what it says is what the run did and measured,
it is written atomically, and ``--push-to-hub`` fails clearly, before anything is written, where no hub is reachable."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml

from fastnabla import train
from fastnabla.config.loader import build_config
from fastnabla.run.config import RunConfig
from fastnabla.run.presets import get_preset
from fastnabla.training.model_card import (
    CARD_FILE,
    HubError,
    ModelCard,
    check_hub,
    fastnabla_version,
    reward_description,
    write_model_card,
)

FAST = ["--preset", "tiny-sd", "sd.num_steps=4", "train.iterations=2", "train.batch_size=4",
        "train.sample_batch_size=2", "train.micro_batch_size=2", "train.fl_batch_size=4",
        "train.transition_fraction=0.5", "sd.prompts.eval_seeds=[0]", "sd.prompts.eval_prompts=['a photo of a cat']",
        "output.progress=false", "output.report_to=[]", "output.figure=false", "method.beta=25"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "run"
    argv = [*FAST, "--out", str(out)]
    assert train.main(argv) == 0
    return out, argv, json.loads((out / "metrics.json").read_text())


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_says_what_the_run_did_and_measured(run):
    out, argv, metrics = run
    card = (out / "lora" / CARD_FILE).read_text()
    assert metrics["model_card"] == str(out / "lora" / CARD_FILE)
    front = _front_matter(card)
    assert front["base_model"] == "tiny" and front["library_name"] == "diffusers" and "lora" in front["tags"]
    assert front["license"] == "other"  # not a known base model: the card points at the base model's license
    for row in ("| base model | `tiny` |", "| method | nabla-gfn |", "| reward | color-target |",
                "| beta (target p#(x) R(x)^beta) | 25 |", "| iterations | 2 |",
                "| sampler | DDIM eta 1, 4 steps, CFG 5 |", "| LoRA | rank 8, alpha 8, on to_q, to_k, to_v, to_out.0 |",
                f"| fastnabla version | {fastnabla_version()} |"):
        assert row in card, row
    measured = f"{metrics['eval_log_reward_pretrained']:.4f} (pretrained) -> {metrics['eval_log_reward']:.4f}"
    assert measured in card
    assert "python -m fastnabla.train " + " ".join(shlex.quote(a) for a in argv) in card
    assert "## License" in card and "use restrictions" in card


def test_the_lora_directory_holds_the_weights_and_the_card_only(run):
    out, _, _ = run
    assert sorted(p.name for p in (out / "lora").iterdir()) == [CARD_FILE, "pytorch_lora_weights.safetensors"]


def test_card_is_replaced_atomically(tmp_path):
    card = ModelCard(name="a", base_model="stabilityai/stable-diffusion-xl-base-1.0", method="ddpo", rewards="x",
                     beta=1.0, iterations=3, command="cmd")
    first = write_model_card(tmp_path, card).read_text()
    card.method = "refl"
    second = write_model_card(tmp_path, card).read_text()
    assert first != second and "| method | refl |" in second
    assert [p.name for p in tmp_path.iterdir()] == [CARD_FILE], "temporary files left behind"
    assert _front_matter(second)["license"] == "openrail++"


@pytest.mark.parametrize(("base", "shown"), [
    pytest.param("stable-diffusion-v1-5/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5",
                 id="hub-id"),
    pytest.param("/models/sd15", "sd15", id="local-directory"),
])
def test_base_model_metadata(base, shown):
    card = ModelCard(name="a", base_model=base, method="m", rewards="r", beta=1.0, iterations=1, command="c")
    assert _front_matter(card.text())["base_model"] == shown


def test_reward_description_of_a_sum():
    cfg = build_config(RunConfig, get_preset("tiny-sd"), None,
                       ["sd.reward=[{name: hpsv2, weight: 0.7}, {name: aesthetic, weight: 0.3}]"])
    assert reward_description(cfg.sd.reward) == "sum: 0.7 x hpsv2 + 0.3 x aesthetic"


@pytest.mark.parametrize(("repo", "env", "message"), [
    pytest.param("user/repo", "1", "HF_HUB_OFFLINE=1 is set, so no hub is reachable", id="offline"),
    pytest.param("no-slash", "0", "looks like 'user/name'", id="bad-repo-id"),
])
def test_hub_check_errors(monkeypatch, repo, env, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", env)
    with pytest.raises(HubError, match=message):
        check_hub(repo)


def test_push_to_hub_offline_fails_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    assert train.main([*FAST, "--push-to-hub", "user/my-lora", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE=1" in err and "huggingface-cli upload user/my-lora OUT/lora" in err
    assert not out.exists()
    assert train.main([*FAST, "--push-to-hub", "user/my-lora", "output.export_lora=false", "--out", str(out)]) == 2
    assert "needs output.export_lora=true" in capsys.readouterr().err


def test_an_averaged_run_exports_the_average_and_says_so(tmp_path):
    """With ``train.policy_ema_decay`` the exported LoRA holds the final checkpoint's averaged weights, not its live
    ones, and the card has a row saying so."""
    from safetensors.torch import load_file

    from fastnabla.tasks.sd.lora import LORA_WEIGHTS_FILE
    from fastnabla.training.checkpoint import CheckpointManager, load_state_file

    out = tmp_path / "run"
    assert train.main([*FAST, "train.iterations=3", "train.policy_ema_decay=0.5", "--out", str(out)]) == 0
    card = (out / "lora" / CARD_FILE).read_text()
    assert "| weights | the Polyak average of the trained weights (decay 0.5 per optimizer step) |" in card
    state = load_state_file(CheckpointManager(out / "checkpoints", keep=1).latest() / "rank0.pt")
    live = [v for k, v in state["task"].items() if k.startswith("lora.")]
    averaged = state["policy_average"]
    exported = list(load_file(out / "lora" / LORA_WEIGHTS_FILE).values())

    def fingerprints(tensors):  # the exported keys are renamed; each tensor is identified by shape and sum
        return sorted((tuple(t.shape), round(float(t.double().sum()), 5)) for t in tensors)

    assert len(exported) == len(averaged) == len(live)
    assert fingerprints(exported) == fingerprints(averaged)
    assert fingerprints(exported) != fingerprints(live)
