"""The import graph has no back-edges: a module imports only from its own layer or the layers below it.

The layers (docs/architecture.md), lowest first. A module's layer is that of the longest prefix listed here; imports
made only for type checking (``if TYPE_CHECKING:``) are not edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS: list[tuple[str, ...]] = [
    ("fastnabla.kernels",),  # the top-level kernels/ folder: Triton kernels
    ("fastnabla.compat", "fastnabla.utils", "fastnabla.config"),  # no knowledge of diffusion at all
    ("fastnabla.mdp",),  # the sampler as coefficients
    ("fastnabla.ops",),  # fused ops with their references
    ("fastnabla.losses", "fastnabla.rewards"),  # scalar baseline losses, reward models
    ("fastnabla.training",),  # the trainer and its contracts
    ("fastnabla.methods",),  # every training method
    ("fastnabla.tasks",),  # models + rewards behind the trainer's interface
    ("fastnabla.run",),  # run config composition, presets, the run driver
    ("fastnabla.train", "fastnabla.eval", "fastnabla.compare", "fastnabla.flops"),  # command-line tools
]
RANK = {prefix: rank for rank, prefixes in enumerate(LAYERS) for prefix in prefixes}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["fastnabla", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    if module == "fastnabla":  # the package's own __init__: mounts kernels/, imports nothing else
        return RANK["fastnabla.utils"]
    matches = [p for p in RANK if module == p or module.startswith(p + ".")]
    return RANK[max(matches, key=len)] if matches else None


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(path: Path) -> list[tuple[int, str]]:
    """``(line, imported module)`` of every runtime import of ``path`` (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out += [(node.lineno, f"{target}.{a.name}") if node.module is None else (node.lineno, target)
                    for a in node.names]
    return out


SOURCES = sorted([*(ROOT / "fastnabla").rglob("*.py"), *(ROOT / "kernels").glob("*.py")])


def test_every_module_has_a_layer():
    assert [str(p.relative_to(ROOT)) for p in SOURCES if layer_of(module_name(p)) is None] == []


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_no_module_imports_a_higher_layer(path):
    own = layer_of(module_name(path))
    back_edges = [f"line {line}: {target} (layer {layer_of(target)} > {own})"
                  for line, target in imports(path)
                  if target.startswith("fastnabla") and (layer_of(target) or 0) > own]
    assert back_edges == []


def test_kernels_import_nothing_from_fastnabla():
    for path in (ROOT / "kernels").glob("*.py"):
        bad = [t for _, t in imports(path) if t.startswith("fastnabla") and not t.startswith("fastnabla.kernels")]
        assert bad == [], f"{path.name} imports {bad}"


def test_the_scanner_sees_back_edges_and_skips_type_checking_imports():
    """The check itself can fail: a lower-layer module importing the run driver is reported."""
    probe = ROOT / "fastnabla" / "mdp" / "_probe_architecture_test.py"
    try:
        probe.write_text("from typing import TYPE_CHECKING\nfrom fastnabla.run.driver import run_training\n"
                         "from . import schedule\nif TYPE_CHECKING:\n    import fastnabla.eval\n")
        edges = [t for _, t in imports(probe) if t.startswith("fastnabla")]
    finally:
        probe.unlink(missing_ok=True)
    assert edges == ["fastnabla.run.driver", "fastnabla.mdp.schedule"]
    assert layer_of("fastnabla.run.driver") > layer_of("fastnabla.mdp.schedule")
