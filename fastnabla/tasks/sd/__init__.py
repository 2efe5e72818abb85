"""Stable Diffusion task: diffusers pipelines, LoRA policy, flow U-Net, sampling with CFG."""
