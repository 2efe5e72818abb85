"""Prompt conditioning of the UNet: SD 1.x / 2.x text embeddings, SDXL's two encoders, pooled embedding and
size / crop time ids, each computed as the diffusers pipelines compute it.

* **SD 1.x / 2.x** (``StableDiffusionPipeline.encode_prompt``): ``e = CLIP(ids).last_hidden_state`` ``[n, 77, D]``.
* **SDXL** (``StableDiffusionXLPipeline.encode_prompt``, no ``clip_skip``): each tokenizer pads to 77 tokens
  (``tokenizer`` with ``<|endoftext|>``, ``tokenizer_2`` with ``!``) and the UNet cross-attends to the
  *penultimate* hidden states of both encoders concatenated, ``e = [h_L^(-2), h_G^(-2)]`` ``[n, 77, 768 + 1280]``;
  the pooled embedding is ``text_encoder_2``'s projected end-of-text state, ``p = W h_G(eos)`` ``[n, 1280]``.
  The UNet also gets ``added_cond_kwargs = {"text_embeds": p, "time_ids": (h_orig, w_orig, top, left, h_tgt,
  w_tgt)}`` (Podell et al. 2023, section 2.2: size and crop conditioning); the pipeline's defaults are the sampled
  image size for both sizes and a (0, 0) crop, the same for both CFG halves.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor


@torch.no_grad()
def encode_sd(tokenizer, text_encoder, prompts: Sequence[str], device: torch.device) -> Tensor:
    """SD 1.x / 2.x: the text encoder's last hidden state ``[n, L, D]`` (``L`` = 77)."""
    max_len = min(int(tokenizer.model_max_length), int(text_encoder.config.max_position_embeddings))
    ids = tokenizer(list(prompts), padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
    return text_encoder(ids.input_ids.to(device))[0]


@torch.no_grad()
def encode_sdxl(tokenizers: Sequence, text_encoders: Sequence, prompts: Sequence[str],
                device: torch.device) -> tuple[Tensor, Tensor]:
    """SDXL: ``(e, p)`` -- the penultimate hidden states of both encoders concatenated ``[n, 77, D_1 + D_2]`` and
    the pooled, projected embedding of the last encoder ``[n, P]`` (module docstring)."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        ids = tokenizer(list(prompts), padding="max_length", max_length=int(tokenizer.model_max_length),
                        truncation=True, return_tensors="pt").input_ids
        out = encoder(ids.to(device), output_hidden_states=True)
        if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds (the pipeline's rule)
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    if pooled is None:
        raise ValueError("SDXL conditioning needs a text encoder with projection (text_encoder_2) for the pooled "
                         "embedding")
    return torch.cat(hidden, dim=-1), pooled


def sdxl_time_ids(original_size: Sequence[int], crop_top_left: Sequence[int], target_size: Sequence[int]) -> Tensor:
    """``add_time_ids`` ``[6]`` (float32): ``(*original_size, *crop_top_left, *target_size)``, each ``(height,
    width)`` / ``(top, left)`` as ``StableDiffusionXLPipeline._get_add_time_ids`` orders them."""
    values = [*original_size, *crop_top_left, *target_size]
    if len(values) != 6:
        raise ValueError(f"SDXL time ids need 2 + 2 + 2 values, got {values}")
    return torch.tensor(values, dtype=torch.float32)


def check_time_embedding(unet, pooled_width: int) -> None:
    """The UNet's addition embedding takes ``6 * addition_time_embed_dim + pooled_width`` inputs (the pipeline's
    check); raises ``ValueError`` naming both numbers."""
    cfg = unet.config
    if cfg.get("addition_embed_type") != "text_time":
        raise ValueError(f"an SDXL pipeline's UNet needs addition_embed_type='text_time', this one has "
                         f"{cfg.get('addition_embed_type')!r}")
    expected = int(unet.add_embedding.linear_1.in_features)
    passed = 6 * int(cfg.addition_time_embed_dim) + int(pooled_width)
    if expected != passed:
        raise ValueError(f"the UNet's added embedding takes {expected} inputs but 6 time ids x "
                         f"{cfg.addition_time_embed_dim} + the pooled text embedding ({pooled_width}) give {passed}: "
                         "text_encoder_2's projection_dim does not fit this UNet")
