"""fastnabla's rewards against the original packages, with the same random weights in both.

The packages do not install next to fastnabla's dependencies (``image-reward`` pins timm 0.6, ``hpsv2`` pins
pytest 7.2), so these tests skip unless they are importable: they run in a scratch environment set up as in
docs/rewards.md ("Cross-checking against the original packages"). They compare

* ImageReward: the package's ``score_gard`` (+ the torchvision tensor transform of its ReFL code) against the port,
  values and pixel gradients; its PIL ``score`` path against the port on the same pixels;
* HPSv2: the ``hpsv2`` package's own open_clip fork, ``light_augmentation`` transform (``ResizeMaxSize``) and score
  formula against ``build_reward("hpsv2")`` loading the fork's state dict saved like the released files;
* Aesthetic: OpenAI's ``clip`` package (``clip.model.build_model`` from an OpenAI-layout state dict, its ``_transform``)
  against ``build_reward("aesthetic", clip=<that file>)``.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from fastnabla.compat import enable_image_reward_package, prepare_third_party_imports
from fastnabla.rewards import build_reward
from fastnabla.rewards.imagereward import load_bert_tokenizer
from fastnabla.rewards.mlp_head import PreferenceMLP
from fastnabla.rewards.preprocess import CLIP_MEAN, CLIP_STD
from fastnabla.rewards.tiny import write_wordpiece_vocab

PROMPTS = ["a photo of a cat", "an oil painting of a dog"]


def importable(module: str) -> bool:
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return False
    prepare_third_party_imports()
    try:
        if module == "ImageReward":
            enable_image_reward_package()  # imports it after the transformers 5 shims
        else:
            __import__(module)
    except (ImportError, OSError):  # hpsv2 1.2.0's wheel lacks its BPE file: OSError at import
        return False
    return True


def smooth_pixels(shape, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(batch, 3, 8, 8, generator=gen), size=shape, mode="bilinear")
    return ((x * 255).round() / 255).clamp(0, 1)  # exactly representable as uint8, for the PIL paths


def to_pil(image):
    from PIL import Image

    return Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.mark.slow
@pytest.mark.skipif(not importable("ImageReward"), reason="the image-reward package is not installed")
def test_imagereward_port_matches_the_package(tmp_path, monkeypatch, two_threads):
    enable_image_reward_package()
    import ImageReward.models.BLIP.blip_pretrain as blip_pretrain
    from ImageReward.ImageReward import ImageReward
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize

    tok_dir = write_wordpiece_vocab(tmp_path / "bert")
    tokenizer = load_bert_tokenizer(tok_dir)
    monkeypatch.setattr(blip_pretrain, "init_tokenizer", lambda: load_bert_tokenizer(tok_dir))
    med = dict(vocab_size=len(tokenizer), hidden_size=768, num_hidden_layers=2, num_attention_heads=12,
               intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
               max_position_embeddings=512, layer_norm_eps=1e-12, pad_token_id=0, type_vocab_size=2,
               encoder_width=768, add_cross_attention=True, architectures=["BertModel"], model_type="bert")
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    torch.manual_seed(0)
    package = ImageReward(med_config=str(tmp_path / "med_config.json")).eval()
    with torch.no_grad():  # the package's head init gives near-constant scores; spread them out
        for param in package.mlp.parameters():
            param.normal_(0.0, 0.05)
    torch.save(package.state_dict(), tmp_path / "ImageReward.pt")
    port = build_reward("imagereward", checkpoint=str(tmp_path / "ImageReward.pt"), tokenizer=str(tok_dir))

    x = smooth_pixels((96, 80)).requires_grad_(True)
    transform = Compose([Resize(224, interpolation=InterpolationMode.BICUBIC), CenterCrop(224),
                         Normalize(CLIP_MEAN, CLIP_STD)])
    tokens = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    expected = package.score_gard(tokens.input_ids, tokens.attention_mask, transform(x)).squeeze(-1)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    values, grads = port.log_reward_and_grad(x.detach(), PROMPTS)
    assert torch.allclose(values, expected, rtol=1e-5, atol=1e-5)
    assert float((grads - expected_grad).abs().max()) <= 1e-4 * float(expected_grad.abs().max())
    with torch.no_grad():
        pil_score = package.score(PROMPTS[0], to_pil(x[0].detach()))
    assert abs(pil_score - float(values[0])) <= 5e-3  # PIL's uint8 bicubic vs the float resize


@pytest.mark.slow
@pytest.mark.skipif(not importable("hpsv2.src.open_clip"), reason="the hpsv2 package is not installed")
def test_hps_matches_the_package(tmp_path, two_threads):
    from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer
    from hpsv2.src.open_clip.transform import MaskAwareNormalize, ResizeMaxSize

    torch.manual_seed(0)
    arch = "ViT-B-32"  # the fork's ViT-H-14 is the same code at 6x the size
    model, _, preprocess_val = create_model_and_transforms(arch, None, precision="fp32", device="cpu",
                                                           light_augmentation=True, output_dict=True)
    model.eval()
    with torch.no_grad():  # the released checkpoints are fp16
        for param in model.parameters():
            param.copy_(param.half().float())
    torch.save({"state_dict": {k: v.half() for k, v in model.state_dict().items()}}, tmp_path / "HPS_v2_compressed.pt")
    reward = build_reward("hpsv2", checkpoint=str(tmp_path), architecture=arch)
    tokenizer = get_tokenizer(arch)

    def package_score(images, prompts):  # hpsv2.img_score.score's formula, on a batch
        out = model(images, tokenizer(prompts))
        return torch.diagonal(out["image_features"] @ out["text_features"].T)

    x = smooth_pixels((70, 100)).requires_grad_(True)  # non-square: longest side + zero padding
    transform = ResizeMaxSize(224, fill=0)
    normalize = MaskAwareNormalize(mean=CLIP_MEAN, std=CLIP_STD)
    expected = package_score(torch.stack([normalize(transform(image)) for image in x]), PROMPTS)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    values, grads = reward.log_reward_and_grad(x.detach(), PROMPTS)
    assert torch.allclose(values, expected, rtol=1e-5, atol=1e-6)
    assert float((grads - expected_grad).abs().max()) <= 1e-4 * float(expected_grad.abs().max())
    with torch.no_grad():
        pil = package_score(preprocess_val(to_pil(x[0].detach()))[None], PROMPTS[:1])
    assert abs(float(pil) - float(values[0])) <= 1e-3


@pytest.mark.slow
@pytest.mark.skipif(not importable("clip"), reason="OpenAI's clip package (clip-anytorch) is not installed")
def test_aesthetic_openai_layout_matches_the_clip_package(tmp_path, two_threads):
    import clip
    import open_clip

    config = {"embed_dim": 32, "quick_gelu": True,
              "vision_cfg": {"image_size": 224, "layers": 2, "width": 128, "head_width": 64, "patch_size": 32},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}
    (tmp_path / "fastnabla-openai-ref.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "fastnabla-openai-ref.json")
    torch.manual_seed(0)
    state = open_clip.create_model("fastnabla-openai-ref", pretrained=None).state_dict()
    torch.save(state, tmp_path / "ViT-L-14.pt")  # OpenAI's key layout (the architecture is read from the shapes)
    reference = clip.model.build_model({k: v.clone() for k, v in state.items()}).float().eval()
    head = PreferenceMLP(32).eval()
    torch.save(head.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    reward = build_reward("aesthetic", clip=str(tmp_path / "ViT-L-14.pt"), mlp=str(tmp_path),
                          open_clip_architecture="fastnabla-openai-ref")
    x = smooth_pixels((256, 256))
    preprocess = clip.clip._transform(224)  # OpenAI's own PIL preprocessing
    with torch.no_grad():
        features = reference.encode_image(torch.stack([preprocess(to_pil(image)) for image in x]))
        expected = head(torch.nn.functional.normalize(features, dim=-1))
        assert torch.allclose(reward.score(x, PROMPTS), expected, rtol=1e-3, atol=2e-3)
