"""Diagnostic behind docs/digits.md, "Can the LoRA policy represent the target?": fit the digits preset's LoRA
(rank 8; measured there with the attention-only adapter the preset had then, ``sd.lora.target_modules=[to_q,to_k,
to_v,to_out.0]``) to the importance-weighted target *by supervision* -- the denoising loss on the target's own
samples -- and score the result with the preset's end-of-run evaluation. No reward
gradient and no GFlowNet: what this reaches is what the policy family and the sampler can do when the answer is
given, a floor for every fine-tuning method on this yardstick.

The target's samples are the cached 10,000 pretrained images resampled with their importance weights
(``DigitsTarget.resampled``), encoded by the pipeline's VAE (posterior mean x scaling factor). Each step draws a
batch, a training timestep ``t ~ U{0..999}`` and noise per row, and regresses the LoRA'd UNet's epsilon on the noise,
half the rows with the prompt and half with the empty prompt, so that both halves of the CFG pair learn the target
and their guided combination samples it. ``--uniform`` fits the *pretrained* samples instead (a control: it should
stay near the pretrained sampler's numbers).

    python docs/digits/target_distillation.py OUT_DIR [--steps 1500] [--lr 1e-3] [--batch 128] [--uniform] \
        [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fastnabla.config.loader import build_config
from fastnabla.run.config import RunConfig
from fastnabla.run.driver import build_task_run
from fastnabla.run.presets import get_preset
from fastnabla.training.distributed import DistContext


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--uniform", action="store_true", help="fit the pretrained samples (the control)")
    p.add_argument("overrides", nargs="*", help="overrides of the digits preset (KEY=VALUE)")
    args = p.parse_intermixed_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    if args.out.exists():  # never overwrite an earlier result
        raise FileExistsError(f"{args.out} exists; give a new output directory")
    cfg = build_config(RunConfig, get_preset("digits"), None, [f"output.dir={args.out}", *args.overrides])
    run = build_task_run(cfg, DistContext())
    args.out.mkdir(parents=True)
    task = run.task
    run.prepare_evaluation()
    if run.why_not is not None:
        raise SystemExit(f"the digits evaluation cannot score this configuration: {run.why_not}")
    t = run.target_info
    images = t["samples"].images
    if not args.uniform:
        images = images[t["target"].resampled]
    with torch.no_grad():
        z = torch.cat([task.vae.encode(images[i : i + 500].to(task.device) * 2 - 1).latent_dist.mean
                       for i in range(0, len(images), 500)]) * task.vae.config.scaling_factor
    from diffusers import DDIMScheduler

    alpha_bar = DDIMScheduler.from_pretrained(str(run.pipeline_dir), subfolder="scheduler").alphas_cumprod.float()
    prompt = t["prompt"]
    cond = task.encode_prompts([prompt])[0].float()
    uncond = task.negative_embeds.reshape(cond.shape).float()
    params = task.policy_parameters()
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    t0, losses = time.perf_counter(), []
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(z), (args.batch,), generator=gen)
        x0 = z[idx]
        ts = torch.randint(len(alpha_bar), (args.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        ab = alpha_bar[ts].reshape(-1, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        embeds = torch.stack([cond if i % 2 == 0 else uncond for i in range(args.batch)])
        pred = task.unet(xt, ts, encoder_hidden_states=embeds, return_dict=False)[0].float()
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0:
            print(f"step {step}: loss {statistics.fmean(losses[-100:]):.4f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    result = run.evaluate_digits(args.out)
    result["distillation"] = {"steps": args.steps, "lr": args.lr, "batch": args.batch, "uniform": args.uniform,
                              "seconds": time.perf_counter() - t0,
                              "final_loss": statistics.fmean(losses[-100:]) if losses else None}
    (args.out / "distillation.json").write_text(json.dumps(result, indent=2))
    pol, pre, target = result["policy"], result["pretrained"], result["target"]
    print(f"target distillation ({'pretrained samples' if args.uniform else 'target samples'}): mean log R "
          f"{pre['mean_log_reward']:.2f} -> {pol['mean_log_reward']:.2f} (target {target['mean_log_reward']:.2f}), "
          f"class TV {pre['class_tv']:.3f} -> {pol['class_tv']:.3f} (floor {target['class_tv_floor']['mean']:.3f}), "
          f"diversity {pol['diversity_ratio']:.3f}, Frechet {pre['frechet']:.0f} -> {pol['frechet']:.0f}")
    print("histogram", [round(v, 3) for v in pol["histogram"]], "target", [round(v, 3) for v in target["histogram"]])
    run.close()
    return result


if __name__ == "__main__":
    main()
