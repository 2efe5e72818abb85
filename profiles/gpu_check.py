"""The checks only a GPU can run, as one prepared script that writes its report into the repository.

    python profiles/gpu_check.py                       # on a CUDA machine, from the repository root (<= 8 minutes)
    python profiles/gpu_check.py --budget-s 300 --out profiles/gpu

Stages, each with its share of the time budget and its own timeout (a stage that runs out is reported, the next
still runs):

1. ``tests/test_gpu.py``: every Triton kernel against its reference on CUDA tensors (outputs and gradients, fp32 and
   bf16), ``torch.compile(fullgraph=True)`` through the custom ops, CUDA-graph capture of the sampling UNet and a
   tiny-sd training step on the GPU against the same step on the CPU; ``tests/test_kernels_ptx.py``.
2. ``pytest bench/ --benchmark-only`` with the Triton providers (the op suites: times, bytes, ratio to a copy of
   the same bytes) and the FLOP counts.
3. ``profiles/profile_train.py --preset tiny-sd`` for two iterations (Nsight Systems when ``nsys`` is on PATH,
   else ``torch.profiler``): where a step's time goes, by NVTX range.

Outputs in ``--out`` (default ``profiles/gpu``): ``report.md`` (machine, each stage's verdict and time, the bench
table, the profile's top ranges), ``tests.log``, ``bench.json``, ``bench.md``, ``profile/``. Commit ``report.md`` and
``bench.md`` with what they show. Without CUDA it exits 2 at once.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARES = {"tests": 0.45, "bench": 0.35, "profile": 0.20}


def _run(cmd: list[str], timeout: float, log: Path) -> tuple[int | None, float]:
    """Run ``cmd`` from the repository root, output to ``log``; ``(return code or None on timeout, seconds)``."""
    start = time.perf_counter()
    with log.open("w") as f:
        try:
            code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = None
    return code, time.perf_counter() - start


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else "(no output)"


def _verdict(code: int | None) -> str:
    return "timed out" if code is None else ("passed" if code == 0 else f"failed (exit {code})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python profiles/gpu_check.py", description=__doc__.split("\n")[0])
    p.add_argument("--budget-s", type=float, default=460.0, help="seconds for all stages together (default 460)")
    p.add_argument("--out", type=Path, default=ROOT / "profiles" / "gpu")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA device: this script checks what only a GPU can (tests/test_gpu.py skips on CPU)",
              file=sys.stderr)
        return 2
    from fastnabla.utils.profiling import machine_info

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    stages = {
        "tests": [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py", "tests/test_kernels_ptx.py",
                  "-rs"],
        "bench": [py, "-m", "pytest", "bench/", "--benchmark-only", "-q", "-p", "no:cacheprovider",
                  f"--benchmark-json={out / 'bench.json'}"],
        "profile": [py, "profiles/profile_train.py", "--preset", "tiny-sd", "--iterations", "2", "--warmup", "2",
                    "--out", str(out / "profile")],
    }
    results = {}
    for name, cmd in stages.items():
        code, seconds = _run(cmd, SHARES[name] * args.budget_s, out / f"{name}.log")
        results[name] = (code, seconds)
        print(f"{name}: {_verdict(code)} in {seconds:.0f} s", flush=True)
    if (out / "bench.json").is_file():
        subprocess.run([py, "bench/summarize.py", str(out / "bench.json"), "--out", str(out / "bench.md")], cwd=ROOT,
                       check=False)
    lines = [f"# GPU check, {datetime.date.today().isoformat()}", "", "```json",
             json.dumps(machine_info(), indent=2, default=str), "```", "",
             "| stage | verdict | seconds |", "|---|---|---:|"]
    lines += [f"| {name} | {_verdict(code)} | {seconds:.0f} |" for name, (code, seconds) in results.items()]
    for name in stages:
        lines += ["", f"## {name}", "", "```", _tail(out / f"{name}.log"), "```"]
    if (out / "bench.md").is_file():
        lines += ["", "## Benchmarks", "", (out / "bench.md").read_text()]
    summary = out / "profile" / "summary.md"
    if summary.is_file():
        lines += ["", "## Profile (tiny-sd, 2 iterations)", "", summary.read_text()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"report: {out / 'report.md'}")
    return 0 if all(code == 0 for code, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
