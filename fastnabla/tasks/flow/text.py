"""Prompt embeddings of SD3 / SD3.5 and FLUX.1, computed as their diffusers pipelines compute them.

* **SD3** (``StableDiffusion3Pipeline.encode_prompt``): both CLIP encoders (``CLIPTextModelWithProjection``) read the
  prompt padded to 77 tokens; their penultimate hidden states are concatenated (768 + 1280 = 2048 wide), padded with
  zeros to T5's width and followed by T5's ``max_sequence_length`` (default 256) token states -- the
  ``encoder_hidden_states`` ``[n, 77 + L, 4096]``; their projected pooled outputs are concatenated into the
  ``pooled_projections`` ``[n, 2048]``. Without T5 its part is zeros (the pipeline with ``text_encoder_3=None``).
* **FLUX** (``FluxPipeline.encode_prompt``): CLIP-L's ``pooler_output`` is the ``pooled_projections`` ``[n, 768]``;
  T5's token states (``max_sequence_length`` default 512) are the ``encoder_hidden_states``; ``txt_ids`` are zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor
DEFAULT_MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}


def _clip_tokens(tokenizer, prompts: list[str], device: torch.device) -> Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(device)


def _t5_states(encoder, tokenizer, prompts: list[str], length: int, device: torch.device) -> Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
                    return_tensors="pt").input_ids
    return encoder(ids.to(device), output_hidden_states=False)[0]


@torch.no_grad()
def encode_sd3(encoders: Sequence, tokenizers: Sequence, prompts: Sequence[str], max_sequence_length: int,
               joint_attention_dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(encoder_hidden_states [n, 77 + L, D], pooled_projections [n, P])`` of SD3 for ``prompts``."""
    prompts = list(prompts)
    hidden, pooled = [], []
    for encoder, tokenizer in zip(encoders[:2], tokenizers[:2], strict=True):
        # both CLIP towers are padded to the first tokenizer's length, as the pipeline's tokenizer_max_length
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizers[0].model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        pooled.append(out[0])
        hidden.append(out.hidden_states[-2].to(encoders[0].dtype))
    clip = torch.cat(hidden, dim=-1)
    if encoders[2] is None:
        t5 = torch.zeros((len(prompts), max_sequence_length, joint_attention_dim), device=device, dtype=clip.dtype)
    else:
        t5 = _t5_states(encoders[2], tokenizers[2], prompts, max_sequence_length, device).to(encoders[2].dtype)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


@torch.no_grad()
def encode_flux(encoders: Sequence, tokenizers: Sequence, prompts: Sequence[str], max_sequence_length: int,
                device: torch.device) -> tuple[Tensor, Tensor]:
    """``(encoder_hidden_states [n, L, D], pooled_projections [n, P])`` of FLUX for ``prompts``."""
    prompts = list(prompts)
    clip_encoder, t5_encoder = encoders
    pooled = clip_encoder(_clip_tokens(tokenizers[0], prompts, device), output_hidden_states=False).pooler_output
    t5 = _t5_states(t5_encoder, tokenizers[1], prompts, max_sequence_length, device)
    return t5.to(t5_encoder.dtype), pooled.to(clip_encoder.dtype)
