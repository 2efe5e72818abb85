"""Turn a pytest-benchmark JSON into a markdown results table.

    pytest bench/ --benchmark-only --benchmark-json=bench.json
    python bench/summarize.py bench.json [--out bench/RESULTS.md] [--op OP ...] [--out -]

One row per benchmark (op x shape x dtype x CFG x mode x provider): median, median over the eager
provider's median in the same case, median over a ``copy_`` of the op's minimal bytes (the memory
bandwidth limit; 1.0 is ideal), the bandwidth that implies, and memory (bytes saved for backward, and
of those the bytes that are not the op's inputs where a suite records them; CUDA peak). ``--op`` keeps
only the named ops; ``--out -`` prints without writing a file. The machine description comes from the
JSON (``machine_info``, filled by ``bench/conftest.py``); the script needs only the standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

PROVIDER_ORDER = {
    "eager": 0, "loop": 1, "compiled": 2, "fused": 3, "fused-chunk-B": 4, "fused-chunk-half": 5, "fused-chunk-1": 6,
    "fused-ckpt-chunk-B": 7, "fused-ckpt-chunk-half": 8, "triton": 9, "triton-philox": 10,
}
MODE_ORDER = {"fwd": 0, "bwd": 1, "fwd+bwd": 2}


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt_time(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:,.1f}" if us < 100 else f"{us:,.0f}"


def machine_lines(data: dict) -> list[str]:
    info = dict(data.get("machine_info", {}))
    ours = info.get("fastnabla") or {}
    cpu = ours.get("cpu") or (info.get("cpu") or {}).get("brand_raw") or info.get("processor") or platform.processor()
    rows = [
        ("CPU", f"{cpu}, {ours.get('cpu_cores', os.cpu_count())} cores, "
                f"{ours.get('torch_threads', '?')} torch threads"),
        ("GPU", ours.get("gpu", "unknown")),
        ("torch / CUDA / triton", f"{ours.get('torch', '?')} / {ours.get('cuda', '?')} / {ours.get('triton', '?')}"),
        ("python / platform", f"{ours.get('python', info.get('python_version', '?'))} / "
                              f"{ours.get('platform', info.get('system', '?'))}"),
        ("pytest-benchmark / run at", f"{data.get('version', '?')} / {data.get('datetime', '?')}"),
    ]
    return ["| machine | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def rows_of(data: dict, ops: list[str] | None = None) -> list[dict]:
    rows = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "op" not in info or (ops and info["op"] not in ops):
            continue
        rows.append({**info, "median": bench["stats"]["median"], "rounds": bench["stats"].get("rounds")})

    def case(r: dict) -> tuple:
        return (r["op"], r.get("shape_name", str(r["shape"])), r["dtype"], bool(r.get("cfg")), r["mode"])

    eager = {case(r): r["median"] for r in rows if r["provider"] == "eager"}
    for r in rows:
        base = eager.get(case(r))
        r["ratio_to_eager"] = r["median"] / base if base else None
    rows.sort(key=lambda r: (r["op"], _numel(r["shape"]), r["dtype"], bool(r.get("cfg")), MODE_ORDER.get(r["mode"], 9),
                             PROVIDER_ORDER.get(r["provider"], 9)))
    return rows


def _peak(r: dict) -> str:
    """Peak memory of one call: CUDA ``max_memory_allocated``, or the CPU allocator replay (``cpu_peak_bytes``)."""
    if r.get("peak_bytes") is not None:
        return _fmt_bytes(r["peak_bytes"])
    if r.get("cpu_peak_bytes") is not None:
        return _fmt_bytes(r["cpu_peak_bytes"]) + " (CPU)"
    return "-"


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| op | shape | dtype | CFG | mode | provider | median (µs) | × eager | × copy | GB/s "
        "| saved for bwd | saved, not inputs | peak | peak × loop |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio_e = f"{r['ratio_to_eager']:.2f}" if r.get("ratio_to_eager") else "-"
        ratio_c = f"{r['ratio_to_copy']:.2f}" if r.get("ratio_to_copy") else "-"
        gbs = f"{r['bytes_min'] / r['median'] / 1e9:.1f}" if r.get("bytes_min") else "-"
        shape = "×".join(str(s) for s in r["shape"])
        loop = f"{r['peak_ratio_to_loop']:.3f}" if r.get("peak_ratio_to_loop") else "-"
        lines.append(
            f"| {r['op']} | {shape} | {r['dtype']} | {'on' if r.get('cfg') else 'off'} | {r['mode']} | "
            f"{r['provider']} | {_fmt_time(r['median'])} | {ratio_e} | {ratio_c} | {gbs} | "
            f"{_fmt_bytes(r.get('saved_bytes'))} | {_fmt_bytes(r.get('saved_extra_bytes'))} | "
            f"{_peak(r)} | {loop} |"
        )
    return lines


def render(data: dict, source: str, notes: list[str] | None = None, ops: list[str] | None = None) -> str:
    rows = rows_of(data, ops)
    on_gpu = any(r.get("device", "").startswith("cuda") for r in rows)
    kind = "GPU" if on_gpu else "CPU"
    providers = sorted({r["provider"] for r in rows}, key=lambda p: PROVIDER_ORDER.get(p, 9))
    out = [
        f"# Benchmark results ({kind} numbers)",
        "",
        f"Generated by `python bench/summarize.py {source}` from `pytest bench/ --benchmark-only "
        f"--benchmark-json={source}`.",
    ]
    if not on_gpu:
        out += [
            "",
            "**These are CPU numbers.** They show the relative cost of the providers on this CPU "
            "and validate the harness; absolute GPU times come only from a GPU run. Providers "
            f"measured: {', '.join(providers)} (the triton provider is skipped without CUDA).",
        ]
    for note in notes or []:
        out += ["", note]
    out += [
        "",
        *machine_lines(data),
        "",
        "Columns: *median* of the timed calls; *× eager* = median / eager median of the same case "
        "(lower is faster); *× copy* = median / median of a `Tensor.copy_` moving `bytes_min` bytes in "
        "the same run (1.0 = memory-bandwidth limit); *GB/s* = `bytes_min` / median; *saved for bwd* = "
        "storages autograd keeps for backward; *saved, not inputs* = those of them that are not the op's "
        "inputs (memory that saving allocates; `-` where a suite does not record it); *peak* = extra CUDA "
        "`max_memory_allocated` over one call, or on CPU the peak of PyTorch's CPU allocator replayed from "
        "profiler events (bench/memory_utils.py); *peak × loop* = peak over that of a per-draw loop computing "
        "the same result (forward-looking memory suite).",
        "",
        *table(rows),
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")),
                        help="markdown file to write (default: bench/RESULTS.md; '-': print only)")
    parser.add_argument("--note", action="append", default=[], help="a paragraph to add under the title (repeatable)")
    parser.add_argument("--op", action="append", default=[], help="keep only this op (repeatable)")
    args = parser.parse_args(argv)
    data = json.loads(args.json.read_text())
    text = render(data, args.json.name, args.note, args.op or None)
    if args.out != "-":
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
