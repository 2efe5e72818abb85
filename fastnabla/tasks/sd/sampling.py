"""Sampling images for evaluation: fixed prompts and seeds, the task's MDP, CFG in the fused step.

Each image ``i`` has its own CPU generator seeded with ``seeds[i]``, drawing first ``x_0`` and then
one step noise ``z_t`` per step (``[1, 4, h, w]`` each), so an image depends only on its
``(prompt, seed)`` pair and not on the batch it was sampled in -- the same streams a diffusers
``StableDiffusionPipeline`` draws with ``generator=[torch.Generator().manual_seed(s) for s in seeds]``
and DDIM ``eta > 0``. Each step is (docs/maths.md; paper eqs. 2-3 with CFG)::

    eps     = eps_u + w (eps_c - eps_u)
    x_{t+1} = a_t x_t + b_t eps + sigma_t z_t

computed by ``fastnabla.ops.denoise_step_fused`` from the pair of one batched UNet call.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from fastnabla.ops import denoise_step_fused
from fastnabla.tasks.sd.image_grid import save_image_grid

Tensor = torch.Tensor


def _per_sample_normal(generators: list[torch.Generator], shape: tuple[int, ...]) -> Tensor:
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators])


@torch.no_grad()
def sample_latents(task, prompts: Sequence[str], seeds: Sequence[int], use_pretrained: bool = False) -> Tensor:
    """Final latents ``x_T`` ``[n, 4, h, w]`` (fp32) for ``prompts[i]`` with seed ``seeds[i]``."""
    if len(prompts) != len(seeds):
        raise ValueError(f"sample_latents: {len(prompts)} prompts but {len(seeds)} seeds (one seed per prompt)")
    mdp, device, shape = task.mdp, task.device, tuple(task.latent_shape)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    cond = task.conditions_for(prompts)
    x = _per_sample_normal(generators, shape).to(device)
    n = x.shape[0]
    for t in range(mdp.num_steps):
        step = torch.full((n,), t, dtype=torch.int64, device=device)
        c = mdp.gather(step, x.dim(), torch.float32)
        noise = _per_sample_normal(generators, shape).to(device)
        eps_u, eps_c = task.eps_pair(x, step, cond, pretrained=use_pretrained)
        coeffs = (c["a"], c["b"], c["sigma"], c["alpha_bar"])
        if eps_u is None:
            x, _ = denoise_step_fused(x, eps_c, noise, *coeffs)
        else:
            x, _ = denoise_step_fused(x, eps_u, noise, *coeffs, eps_cond=eps_c, guidance_scale=task.guidance_scale)
    return x


@torch.no_grad()
def sample_images(
    task,
    prompts: Sequence[str],
    seeds: Sequence[int],
    use_pretrained: bool = False,
    batch_size: int | None = None,
) -> Tensor:
    """Images ``[n, 3, H, W]`` in ``[0, 1]`` (fp32, on the task's device) for ``(prompts[i], seeds[i])``.

    Args:
        task: an :class:`~fastnabla.tasks.sd.task.SDTask`.
        use_pretrained: sample the pretrained model (LoRA adapters off) instead of the policy.
        batch_size: images per sampling batch (None: all at once); results do not depend on it.
    """
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if len(prompts) != len(seeds):
        raise ValueError(f"sample_images: {len(prompts)} prompts but {len(seeds)} seeds (one seed per prompt)")
    size = batch_size or max(len(prompts), 1)
    if size < 1:
        raise ValueError(f"sample_images: batch_size must be >= 1, got {batch_size}")
    out = []
    for i in range(0, len(prompts), size):
        latents = sample_latents(task, prompts[i : i + size], seeds[i : i + size], use_pretrained)
        out.append(task.decode(latents))
    return torch.cat(out)


def evaluation_grid_inputs(prompts: Sequence[str], seeds: Sequence[int]) -> tuple[list[str], list[int]]:
    """Every ``(prompt, seed)`` pair, seed-major: row ``r`` of a grid with ``len(prompts)`` columns is seed ``r``."""
    pairs = [(p, s) for s in seeds for p in prompts]
    return [p for p, _ in pairs], [s for _, s in pairs]


def evaluation_prompts(task) -> list[str]:
    """``sd.prompts.eval_prompts``, or the first 4 prompts of the prompt set when that is empty."""
    return list(task.cfg.prompts.eval_prompts) or list(task.prompts[:4])


def save_evaluation_grid(task, path: str | Path, use_pretrained: bool = False, batch_size: int | None = None) -> Path:
    """Sample the fixed evaluation prompts x seeds (``sd.prompts``) and write them as one PNG grid:
    one column per prompt, one row per seed (atomic write)."""
    prompts, seeds = evaluation_grid_inputs(evaluation_prompts(task), task.cfg.prompts.eval_seeds)
    images = sample_images(task, prompts, seeds, use_pretrained=use_pretrained, batch_size=batch_size)
    return save_image_grid(images, path, nrow=len(evaluation_prompts(task)))
