"""The learned rewards on tiny configs of their real architecture classes (``fastnabla.rewards.tiny``): score
shape/dtype, determinism, pixel gradients against central finite differences (float64), fp32 vs fp64, chunking,
HPS text cache, ImageReward text attention, and each scoring formula against an independent recomputation."""

from __future__ import annotations

import pytest
import torch

from fastnabla.rewards.base import Reward, RewardTransform
from fastnabla.rewards.imagereward import load_bert_tokenizer
from fastnabla.rewards.tiny import tiny_aesthetic, tiny_hps, tiny_imagereward, write_wordpiece_vocab

PROMPTS = ["a photo of a cat", "an oil painting of a dog", "a red bird in the sky", "cats", "a small house"]
MODELS = ["aesthetic", "hpsv2", "imagereward"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_bert_tokenizer(write_wordpiece_vocab(tmp_path_factory.mktemp("bert-vocab")))


def tiny(name: str, tokenizer):
    torch.manual_seed(1)
    model = {"aesthetic": tiny_aesthetic, "hpsv2": tiny_hps}[name]() if name != "imagereward" else (
        tiny_imagereward(tokenizer))
    return model.eval().requires_grad_(False)


def pixels(batch=3, shape=(40, 29), seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, *shape, generator=gen).to(dtype)


@pytest.mark.parametrize("name", MODELS)
def test_score_shape_dtype_and_determinism(name, tokenizer):
    reward = Reward(tiny(name, tokenizer))
    x = pixels(batch=3)
    first = reward.score(x, PROMPTS[:3])
    assert first.shape == (3,) and first.dtype == torch.float32 and torch.isfinite(first).all()
    assert torch.equal(first, reward.score(x, PROMPTS[:3]))
    assert first.std() > 0  # the images are told apart
    values, grads = reward.log_reward_and_grad(x, PROMPTS[:3])
    # with a graph, open_clip's attention leaves its no-grad fast path: equal up to float rounding
    assert torch.allclose(values, reward.log_reward(x, PROMPTS[:3]), rtol=1e-6, atol=1e-6)
    assert grads.shape == x.shape and grads.dtype == torch.float32 and torch.isfinite(grads).all()
    assert grads.abs().sum() > 0


@pytest.mark.parametrize("name", MODELS)
def test_pixel_gradient_matches_central_differences_fp64(name, tokenizer):
    model = tiny(name, tokenizer).double()
    x = pixels(batch=2, shape=(37, 45), dtype=torch.float64).requires_grad_(True)
    weights = torch.tensor([0.7, -1.3], dtype=torch.float64)  # random upstream gradient
    (grad,) = torch.autograd.grad((weights * model.score(x, PROMPTS[:2])).sum(), x)
    gen = torch.Generator().manual_seed(5)
    step = 1e-6
    with torch.no_grad():
        for _ in range(3):
            direction = torch.randn(x.shape, generator=gen, dtype=torch.float64)
            plus = (weights * model.score(x + step * direction, PROMPTS[:2])).sum()
            minus = (weights * model.score(x - step * direction, PROMPTS[:2])).sum()
            numeric = (plus - minus) / (2 * step)
            analytic = (grad * direction).sum()
            assert abs(float(numeric - analytic)) <= 1e-6 * max(abs(float(analytic)), 1e-8), (numeric, analytic)


@pytest.mark.parametrize("name", MODELS)
def test_fp32_reward_gradient_close_to_fp64(name, tokenizer):
    model = tiny(name, tokenizer)
    x = pixels(batch=2)
    values, grads = Reward(model).log_reward_and_grad(x, PROMPTS[:2])
    ref_model = tiny(name, tokenizer).double()
    x64 = x.double().requires_grad_(True)
    ref = ref_model.score(x64, PROMPTS[:2])
    (ref_grad,) = torch.autograd.grad(ref.sum(), x64)
    assert torch.allclose(values.double(), ref, rtol=1e-5, atol=1e-6)
    assert float((grads.double() - ref_grad).abs().max()) <= 1e-4 * float(ref_grad.abs().max())


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("chunk", [1, 2], ids=["chunk1", "chunk2"])
def test_chunking_matches_the_whole_batch(name, chunk, tokenizer):
    model = tiny(name, tokenizer)
    x = pixels(batch=5)
    whole_values, whole_grads = Reward(model).log_reward_and_grad(x, PROMPTS)
    values, grads = Reward(model, chunk_size=chunk).log_reward_and_grad(x, PROMPTS)
    scale = float(whole_grads.abs().max())
    # batch-size-dependent fp32 matmul blocking: agreement to ~1e-6 of the gradient's scale
    assert torch.allclose(values, whole_values, rtol=1e-5, atol=1e-6)
    assert float((grads - whole_grads).abs().max()) <= 1e-5 * scale
    graph = Reward(model, chunk_size=chunk).log_reward(x.requires_grad_(True), PROMPTS)
    (graph_grad,) = torch.autograd.grad(graph.sum(), x)
    assert float((graph_grad - whole_grads).abs().max()) <= 1e-5 * scale


@pytest.mark.parametrize("name", MODELS)
def test_low_precision_callers_are_scored_in_fp32(name, tokenizer):
    reward = Reward(tiny(name, tokenizer))
    x = pixels(batch=2, dtype=torch.bfloat16)
    assert torch.equal(reward.score(x, PROMPTS[:2]), reward.score(x.float(), PROMPTS[:2]))
    _, grads = reward.log_reward_and_grad(x, PROMPTS[:2])
    assert grads.dtype == torch.float32


@pytest.mark.parametrize("name", MODELS)
def test_exp_transform_is_log_r_equals_score_by_default(name, tokenizer):
    reward = Reward(tiny(name, tokenizer))
    assert reward.transform == RewardTransform(kind="exp", scale=1.0, shift=0.0)
    x = pixels(batch=2)
    assert torch.equal(reward.log_reward(x, PROMPTS[:2]), reward.score(x, PROMPTS[:2]))
    scaled = Reward(reward.model, RewardTransform(kind="exp", scale=3.0, shift=0.5))
    assert torch.allclose(scaled.log_reward(x, PROMPTS[:2]), 3.0 * (reward.score(x, PROMPTS[:2]) - 0.5))


def test_aesthetic_is_mlp_of_the_normalised_clip_embedding():
    model = tiny("aesthetic", None)
    x = pixels(batch=2)
    embeds = model.image_encoder.model(pixel_values=model.preprocess(x)).image_embeds
    expected = model.mlp.layers(embeds / embeds.norm(dim=-1, keepdim=True)).squeeze(-1)
    assert torch.allclose(model.score(x, ["", ""]), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(model.score(x, ["x", "y"]), model.score(x, ["", ""]))  # the prompt is unused


def test_hps_is_the_image_text_cosine():
    model = tiny("hpsv2", None)
    x = pixels(batch=2)
    image = model.clip.encode_image(model.preprocess(x))
    text = model.clip.encode_text(model.tokenizer(PROMPTS[:2]))
    expected = torch.nn.functional.cosine_similarity(image, text, dim=-1)
    assert torch.allclose(model.score(x, PROMPTS[:2]), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(model.score(x, PROMPTS[:2]), model.score(x, PROMPTS[2:4]))  # the prompt matters


def test_hps_text_cache_is_exact_bounded_and_reset():
    cached, uncached = tiny("hpsv2", None), tiny("hpsv2", None)
    uncached.text_cache_size = 0
    cached.text_cache_size = 2
    calls = []
    encode = cached.clip.encode_text
    cached.clip.encode_text = lambda tokens, normalize=False: calls.append(len(tokens)) or encode(tokens, normalize)
    x = pixels(batch=4)
    prompts = ["a cat", "a dog", "a cat", "a bird"]
    assert torch.equal(cached.score(x, prompts), uncached.score(x, prompts))
    assert calls == [3]  # unique prompts, encoded once
    assert list(cached._text_cache) == ["a dog", "a bird"]  # least recently used evicted first
    cached.score(x[:1], ["a bird"])
    assert calls == [3]  # served from the cache
    cached.double()
    assert len(cached._text_cache) == 0  # dtype/device changes drop the cache


def test_imagereward_formula_and_bidirectional_text(tokenizer):
    model = tiny("imagereward", tokenizer)
    x = pixels(batch=2)
    ids, mask = model.tokenize(["a cat", "a dog"], x.device)
    vision = model.vision(pixel_values=model.preprocess(x)).last_hidden_state
    hidden = model.text(input_ids=ids, attention_mask=mask, encoder_hidden_states=vision).last_hidden_state[:, 0]
    expected = (model.head(hidden) - 0.16717362830052426) / 1.0333394966054072
    assert torch.allclose(model.score(x, ["a cat", "a dog"]), expected, rtol=1e-6, atol=1e-6)
    # [CLS] sees later tokens (an encoder, not a causal decoder): changing the last word changes the score
    assert not torch.allclose(model.score(x[:1], ["a photo of a cat"]), model.score(x[:1], ["a photo of a dog"]))


def test_imagereward_padding_and_truncation(tokenizer):
    short, longer = tiny("imagereward", tokenizer), tiny("imagereward", tokenizer)
    longer.max_length = 48
    x = pixels(batch=1)
    assert torch.allclose(short.score(x, ["a cat"]), longer.score(x, ["a cat"]), rtol=1e-6, atol=1e-6)
    ids, mask = short.tokenize(["cat " * 60], x.device)
    assert ids.shape == (1, 35) and int(mask.sum()) == 35


def test_imagereward_rejects_a_tokenizer_larger_than_the_vocabulary(tokenizer):
    model = tiny("imagereward", tokenizer)
    model.text.config.vocab_size = 10
    with pytest.raises(ValueError, match="vocab_size"):
        model.score(pixels(batch=1), ["a photo of a cat"])


def test_hps_text_cache_filled_under_inference_mode_serves_gradient_calls():
    reward = Reward(tiny("hpsv2", None))
    x = pixels(batch=2)
    with torch.inference_mode():  # e.g. rewards of sampled trajectories
        scored = reward.score(x, PROMPTS[:2])
    values, grads = reward.log_reward_and_grad(x, PROMPTS[:2])  # later: gradients with the cached text features
    assert torch.allclose(values, scored, rtol=1e-6, atol=1e-6) and torch.isfinite(grads).all()


@pytest.mark.parametrize("name", MODELS)
def test_low_precision_weights_option_still_returns_fp32_scores(name, tokenizer):
    model = tiny(name, tokenizer)
    x = pixels(batch=2)
    reference = Reward(model).score(x, PROMPTS[:2])
    low = Reward(tiny(name, tokenizer).to(torch.bfloat16)).score(x, PROMPTS[:2])
    assert low.dtype == torch.float32
    assert float((low - reference).abs().max()) <= 0.05 * max(float(reference.abs().max()), 1e-3)
