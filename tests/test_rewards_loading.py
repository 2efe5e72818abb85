"""Loading the learned rewards from local files (every supported layout, on tiny configs), the hub rules
(``HF_HUB_OFFLINE=1``: the local hub cache only, no network), and the errors that name the expected files."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from fastnabla.rewards import build_reward, describe_reward
from fastnabla.rewards.hps import hps_checkpoint_files
from fastnabla.rewards.imagereward import load_bert_tokenizer, port_to_checkpoint
from fastnabla.rewards.loading import resolve_file
from fastnabla.rewards.mlp_head import PreferenceMLP
from fastnabla.rewards.tiny import (
    TINY_BLIP_VISION,
    TINY_CLIP_VISION,
    register_tiny_open_clip,
    tiny_hps,
    tiny_imagereward,
    tiny_med_config,
    write_wordpiece_vocab,
)

PROMPTS = ["a photo of a cat", "an oil painting of a dog"]


@pytest.fixture
def offline_no_network(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1, an empty hub cache, and sockets that record (and refuse) any connection attempt."""
    import huggingface_hub.constants as hub_constants

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield attempts
    assert attempts == [], f"network access attempted: {attempts}"


def pixels(batch=2, shape=(40, 29)):
    return torch.rand(batch, 3, *shape, generator=torch.Generator().manual_seed(0))


def save_mlp(path, input_size, bare_keys=False):
    torch.manual_seed(3)
    mlp = PreferenceMLP(input_size)
    state = mlp.state_dict()
    if bare_keys:
        state = {k.removeprefix("layers."): v for k, v in state.items()}
    torch.save(state, path)
    return mlp


# --- aesthetic -------------------------------------------------------------------------------------------------


def test_aesthetic_from_a_transformers_clip_directory(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    vision = {k: v for k, v in TINY_CLIP_VISION.items() if k != "projection_dim"}
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=99)
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)).eval()
    clip.save_pretrained(tmp_path / "clip")  # a full CLIPModel directory, like openai/clip-vit-large-patch14
    mlp = save_mlp(tmp_path / "sac+logos+ava1-l14-linearMSE.pth", 16).eval()
    reward = build_reward("aesthetic", clip=str(tmp_path / "clip"), mlp=str(tmp_path))
    x = pixels()
    with torch.no_grad():
        inputs = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32, do_rescale=False)(
            images=list(x), return_tensors="pt")
        embeds = clip.get_image_features(**inputs)
        embeds = embeds if isinstance(embeds, torch.Tensor) else embeds.pooler_output
        expected = mlp(embeds / embeds.norm(dim=-1, keepdim=True))
        assert torch.allclose(reward.score(x, PROMPTS), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["pt", "safetensors", "torchscript"])
def test_aesthetic_from_an_open_clip_or_openai_file(layout, tmp_path):
    import open_clip
    from safetensors.torch import save_file

    arch = register_tiny_open_clip()
    torch.manual_seed(2)
    model = open_clip.create_model(arch, pretrained=None).eval()
    path = tmp_path / f"clip.{layout if layout != 'torchscript' else 'pt'}"
    if layout == "pt":
        torch.save(model.state_dict(), path)
    elif layout == "safetensors":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        class VisualOnly(torch.nn.Module):  # a TorchScript archive whose state dict has OpenAI's 'visual.*' keys
            def __init__(self):
                super().__init__()
                self.visual = model.visual

            def forward(self, x):
                return self.visual(x)

        torch.jit.save(torch.jit.trace(VisualOnly(), torch.rand(1, 3, 32, 32), check_trace=False), str(path))
    mlp = save_mlp(tmp_path / "mlp.pth", 16, bare_keys=True).eval()
    reward = build_reward("aesthetic", clip=str(path), mlp=str(tmp_path / "mlp.pth"), open_clip_architecture=arch)
    x = pixels()
    with torch.no_grad():
        embeds = model.encode_image(reward.model.preprocess(x))
        expected = mlp(embeds / embeds.norm(dim=-1, keepdim=True))
        assert torch.allclose(reward.score(x, PROMPTS), expected, rtol=1e-5, atol=1e-5)


def test_aesthetic_layout_errors_name_the_keys(tmp_path):
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing keys: layers\.0\.bias"):
        build_reward("aesthetic", mlp=str(tmp_path / "bad.pth"), clip=str(tmp_path))
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="could not read"):
        build_reward("aesthetic", mlp=str(tmp_path / "notes.pth"), clip=str(tmp_path))


# --- HPS -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["hpsv2", "hpsv2.1"])
def test_hps_from_a_compressed_checkpoint(version, tmp_path):
    reference = tiny_hps().eval()
    with torch.no_grad():  # the released files are fp16: the loaded model holds the fp16-rounded weights
        for p in reference.parameters():
            p.copy_(p.half().float())
    state = {f"module.{k}": v.half() for k, v in reference.clip.state_dict().items()}
    name = hps_checkpoint_files(version).filenames[0]
    torch.save({"state_dict": state, "epoch": 1}, tmp_path / name)
    reward = build_reward(version, checkpoint=str(tmp_path), architecture=register_tiny_open_clip())
    assert reward.name == version
    x = pixels()
    assert torch.allclose(reward.score(x, PROMPTS), reference.score(x, PROMPTS).detach(), rtol=1e-6, atol=1e-6)


def test_hps_checkpoint_of_another_architecture_is_named(tmp_path):
    torch.save({"state_dict": {"visual.proj": torch.zeros(3, 3)}}, tmp_path / "HPS_v2_compressed.pt")
    with pytest.raises(ValueError, match="does not match the expected layout.*missing keys"):
        build_reward("hpsv2", checkpoint=str(tmp_path), architecture=register_tiny_open_clip())


# --- ImageReward -----------------------------------------------------------------------------------------------


def test_imagereward_from_checkpoint_med_config_and_tokenizer(tmp_path):
    tok_dir = write_wordpiece_vocab(tmp_path / "bert")
    tokenizer = load_bert_tokenizer(tok_dir)
    torch.manual_seed(4)
    reference = tiny_imagereward(tokenizer).eval()
    state = port_to_checkpoint(reference.state_dict())
    assert any(k.startswith("blip.visual_encoder.blocks.1.attn.qkv") for k in state)  # the package's layout
    state["blip.text_proj.weight"] = torch.zeros(4, 32)  # present in ImageReward.pt, unused by the score
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(64)[None]
    (tmp_path / "ir").mkdir()
    torch.save(state, tmp_path / "ir" / "ImageReward.pt")
    (tmp_path / "ir" / "med_config.json").write_text(json.dumps(tiny_med_config(len(tokenizer))))
    reward = build_reward("imagereward", checkpoint=str(tmp_path / "ir" / "ImageReward.pt"), tokenizer=str(tok_dir),
                          vision_config=TINY_BLIP_VISION)
    x = pixels()
    assert torch.allclose(reward.score(x, PROMPTS), reference.score(x, PROMPTS).detach(), rtol=1e-6, atol=1e-6)
    state["blip.itm_head.weight"] = torch.zeros(2, 32)
    torch.save(state, tmp_path / "ir" / "ImageReward.pt")
    with pytest.raises(ValueError, match=r"unexpected keys: blip\.itm_head\.weight"):
        build_reward("imagereward", checkpoint=str(tmp_path / "ir"), tokenizer=str(tok_dir),
                     vision_config=TINY_BLIP_VISION)


def test_bert_tokenizer_directory_must_be_complete(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"vocab\.txt"):
        build_reward("imagereward", random_weights=True, tokenizer=str(tmp_path / "empty"))
    tokenizer = load_bert_tokenizer(write_wordpiece_vocab(tmp_path / "bert"))
    assert tokenizer.tokenize("a photo of cats") == ["a", "photo", "of", "cat", "##s"]
    assert tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(tokenizer) - 2, len(tokenizer) - 1]


# --- missing files, hub rules ----------------------------------------------------------------------------------

MISSING = [
    pytest.param("aesthetic", {}, ["sac+logos+ava1-l14-linearMSE.pth", "improved-aesthetic-predictor", "mlp="],
                 id="aesthetic-mlp"),
    pytest.param("hpsv2", {}, ["HPS_v2_compressed.pt", "xswu/HPSv2", "checkpoint=", "no download attempted"],
                 id="hpsv2"),
    pytest.param("hpsv2.1", {}, ["HPS_v2.1_compressed.pt", "xswu/HPSv2"], id="hpsv2.1"),
    pytest.param("imagereward", {}, ["ImageReward.pt", "THUDM/ImageReward", "checkpoint="], id="imagereward"),
]


@pytest.mark.parametrize("name, options, needles", MISSING)
def test_missing_weights_name_the_files_and_where_to_get_them(name, options, needles, offline_no_network):
    with pytest.raises(FileNotFoundError) as info:
        build_reward(name, **options)
    for needle in needles:
        assert needle in str(info.value)


def test_missing_companion_files_are_named(offline_no_network, tmp_path):
    save_mlp(tmp_path / "sac+logos+ava1-l14-linearMSE.pth", 768)
    with pytest.raises(FileNotFoundError, match=r"config\.json.*model\.safetensors or pytorch_model\.bin"):
        build_reward("aesthetic", mlp=str(tmp_path))
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"lacks model\.safetensors or pytorch_model\.bin"):
        build_reward("aesthetic", mlp=str(tmp_path), clip=str(tmp_path / "clip"))
    torch.save({}, tmp_path / "ImageReward.pt")
    with pytest.raises(FileNotFoundError, match=r"med_config\.json"):
        build_reward("imagereward", checkpoint=str(tmp_path / "ImageReward.pt"))
    (tmp_path / "med_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"bert-base-uncased.*vocab\.txt"):
        build_reward("imagereward", checkpoint=str(tmp_path / "ImageReward.pt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_reward("hpsv2", checkpoint=str(tmp_path / "nowhere" / "HPS_v2_compressed.pt"))


def test_offline_reads_the_local_hub_cache_without_network(offline_no_network, tmp_path):
    revision = "0" * 40
    repo = tmp_path / "hub-cache" / "models--xswu--HPSv2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "snapshots" / revision / "HPS_v2_compressed.pt").write_bytes(b"cached")
    found = resolve_file(None, hps_checkpoint_files("hpsv2"))
    assert found.read_bytes() == b"cached"
    with pytest.raises(FileNotFoundError, match="no download attempted"):
        resolve_file(None, hps_checkpoint_files("hpsv2.1"))


@pytest.mark.parametrize("offline", ["1", ""], ids=["offline", "online"])
def test_hub_downloads_only_when_online(offline, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo, filename, local_files_only=False, **kwargs):
        calls.append((repo, filename, local_files_only))
        raise FileNotFoundError("fake hub")

    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(FileNotFoundError):
        resolve_file(None, hps_checkpoint_files("hpsv2"))
    assert calls == [("xswu/HPSv2", "HPS_v2_compressed.pt", offline == "1")]


@pytest.mark.parametrize("offline", ["1", ""], ids=["offline", "online"])
def test_hub_directory_fetches_one_weights_file_and_only_when_online(offline, monkeypatch):
    import huggingface_hub

    from fastnabla.rewards.aesthetic import CLIP_DIR_FILES
    from fastnabla.rewards.loading import resolve_dir

    calls = []

    def fake_snapshot(repo, allow_patterns=None, local_files_only=False, **kwargs):
        calls.append((repo, sorted(allow_patterns), local_files_only))
        raise FileNotFoundError("fake hub")

    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    with pytest.raises(FileNotFoundError, match="openai/clip-vit-large-patch14"):
        resolve_dir(None, CLIP_DIR_FILES)
    weights = ["model.safetensors", "pytorch_model.bin"] if offline else ["model.safetensors"]
    assert calls == [("openai/clip-vit-large-patch14", sorted(["config.json", *weights]), offline == "1")]


# --- registry --------------------------------------------------------------------------------------------------


def test_registry_names_options_and_descriptions():
    from fastnabla.rewards import available_rewards

    assert {"aesthetic", "hpsv2", "hpsv2.1", "imagereward", "brightness", "color-target"} <= set(available_rewards())
    with pytest.raises(ValueError, match=r"valid options: \['checkpoint', 'random_weights'"):
        build_reward("hpsv2", chekpoint="x")
    for name, option in [("aesthetic", "mlp"), ("hpsv2.1", "text_cache_size"), ("imagereward", "med_config")]:
        assert option in describe_reward(name)
    with pytest.raises(ValueError, match="dtype"):
        build_reward("hpsv2", random_weights=True, dtype="int8", architecture=register_tiny_open_clip())
