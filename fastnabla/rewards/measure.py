"""Time and peak memory of one reward forward + backward (``d log R / d pixels``), per learned reward.

    python -m fastnabla.rewards.measure                       # aesthetic, hpsv2, imagereward; random weights
    python -m fastnabla.rewards.measure --batch 2 --size 512 --repeats 3 --threads 2 --json out.json
    python -m fastnabla.rewards.measure --rewards aesthetic --option clip=/m/clip --option mlp=/m/mlp.pth
    python -m fastnabla.rewards.measure --rewards hpsv2 hpsv2:fast_attention=false   # A/B in one run

Each reward runs in its own subprocess (a fresh interpreter, so one model's memory does not count against the next):
it builds the model (random weights of the real architecture unless ``--option`` paths are given), runs one warm-up
``Reward.log_reward_and_grad`` on ``[batch, 3, size, size]`` images in ``[0, 1]``, then ``--repeats`` timed ones, and
counts the FLOPs of one call (``torch.utils.flop_counter``: device-independent). On a shared machine absolute times
drift with the other load, so a 1024^3 fp32 matmul is timed before and after each call as a yardstick: compare the
achieved GFLOP/s of the reward with the matmul GFLOP/s measured in the same process at the same time.

Memory: on CPU, the peak resident set size of the process (Linux ``VmHWM``), reset after the model is built (by
writing ``5`` to ``/proc/self/clear_refs``) and read after the warm-up and timed calls; reported as the absolute peak
and as the increase over the resident size after the build (what one forward + backward needs on top of the model).
On CUDA, additionally ``torch.cuda.max_memory_allocated`` (reset at the same point).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch

DEFAULT_REWARDS = ("aesthetic", "hpsv2", "imagereward")
PROMPTS = ("a photo of a cat sitting on a sofa", "an oil painting of a lighthouse at dusk")


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def _parse_options(items: list[str]) -> dict:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--option needs key=value, got {item!r}")
        try:
            options[key] = json.loads(value)  # numbers, true/false, null, lists
        except json.JSONDecodeError:
            options[key] = value  # paths, names
    return options


def _split_spec(spec: str) -> tuple[str, list[str]]:
    """``"hpsv2:fast_attention=false,text_cache_size=0"`` -> ``("hpsv2", ["fast_attention=false", ...])``."""
    name, _, inline = spec.partition(":")
    return name, [item for item in inline.split(",") if item]


def matmul_gflops(device: str, n: int = 1024, repeats: int = 8) -> float:
    """fp32 matmul throughput of this process right now (GFLOP/s): the yardstick for a shared machine."""
    a = torch.rand(n, n, device=device)
    b = torch.rand(n, n, device=device)
    a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def measure_one(name: str, batch: int, size: int, repeats: int, device: str, options: dict) -> dict:
    """Build ``name`` and time ``repeats`` forward + backward calls (after one warm-up) on ``device``."""
    import inspect

    from fastnabla.rewards import REWARDS, build_reward

    accepts_random = name in REWARDS and "random_weights" in inspect.signature(REWARDS[name].builder).parameters
    if accepts_random and not any(k in options for k in ("random_weights", "clip", "mlp", "checkpoint")):
        options = {**options, "random_weights": True}  # no weight paths given: the real architecture, random weights
    start = time.perf_counter()
    reward = build_reward(name, **options).to(device)
    build_s = time.perf_counter() - start
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=gen).to(device)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]

    def step() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        values, grads = reward.log_reward_and_grad(images, prompts)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        assert torch.isfinite(values).all() and torch.isfinite(grads).all()
        return time.perf_counter() - t0

    rss_before = _status_kib("VmRSS")
    reset_ok = _reset_peak_rss()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    warmup_s = step()
    yardstick = [matmul_gflops(device)]
    times = []
    for _ in range(repeats):
        times.append(step())
        yardstick.append(matmul_gflops(device))
    peak = _status_kib("VmHWM") if reset_ok else None
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        reward.log_reward_and_grad(images, prompts)
    flops = counter.get_total_flops()
    result = {
        "reward": name,
        "params_m": round(sum(p.numel() for p in reward.parameters()) / 1e6, 1),
        "batch": batch,
        "size": size,
        "threads": torch.get_num_threads(),
        "device": device,
        "build_s": round(build_s, 2),
        "warmup_s": round(warmup_s, 2),
        "fwd_bwd_s": [round(t, 3) for t in times],
        "fwd_bwd_median_s": round(statistics.median(times), 3),
        "fwd_bwd_min_s": round(min(times), 3),
        "fwd_bwd_gflop": round(flops / 1e9, 1),
        "achieved_gflops": round(flops / 1e9 / statistics.median(times), 1),
        "matmul_gflops": [round(g, 1) for g in yardstick],
        "rss_after_build_mib": round(rss_before / 1024) if rss_before else None,
        "peak_rss_mib": round(peak / 1024) if peak else None,
        "peak_increase_mib": round((peak - rss_before) / 1024) if peak and rss_before else None,
    }
    if device.startswith("cuda"):
        result["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rewards", nargs="+", default=list(DEFAULT_REWARDS),
                        help="reward names, each optionally with its own options: name:key=value,key=value")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--option", action="append", default=[], help="builder option key=value (repeatable)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.worker:
        name, inline = _split_spec(args.rewards[0])
        options = _parse_options(args.option + inline)
        result = measure_one(name, args.batch, args.size, args.repeats, args.device, options)
        result["spec"] = args.rewards[0]
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    results = []
    load_start = os.getloadavg()
    for name in args.rewards:
        cmd = [sys.executable, "-m", "fastnabla.rewards.measure", "--worker", "--rewards", name,
               "--batch", str(args.batch), "--size", str(args.size), "--repeats", str(args.repeats),
               "--threads", str(args.threads), "--device", args.device]
        for option in args.option:
            cmd += ["--option", option]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{name}: failed (exit {proc.returncode})\n{proc.stderr[-4000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(lines[-1][len("RESULT "):]))
        print(json.dumps(results[-1]), flush=True)
    load_end = os.getloadavg()
    w = max(12, *(len(r["spec"]) for r in results))
    header = (f"{'reward':<{w}} {'params':>8} {'build s':>8} {'fwd+bwd s med':>14} {'min':>7} {'GFLOP':>7} "
              f"{'GFLOP/s':>8} {'matmul GFLOP/s':>15} {'peak RSS MiB':>13} {'+MiB':>6}")
    print(f"\nbatch {args.batch}, {args.size}x{args.size}, {results[0]['threads']} threads, {args.device}; "
          f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end")
    print(header)
    for r in results:
        yard = statistics.median(r["matmul_gflops"])
        print(f"{r['spec']:<{w}} {r['params_m']:>7}M {r['build_s']:>8} {r['fwd_bwd_median_s']:>14} "
              f"{r['fwd_bwd_min_s']:>7} {r['fwd_bwd_gflop']:>7} {r['achieved_gflops']:>8} {yard:>15.1f} "
              f"{r['peak_rss_mib']!s:>13} {r['peak_increase_mib']!s:>6}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"load_average": [load_start, load_end], "results": results}, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
