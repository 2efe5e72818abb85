"""The top-level ``kernels/`` folder never shadows the PyPI package ``kernels``, and ``fastnabla.kernels`` imports
from a checkout, an editable install and a wheel alike.

transformers >= 5.25 runs ``from kernels import CUDAProperties`` (Hugging Face's kernel hub). A regular package
named ``kernels`` on ``sys.path`` (the repository root under ``python -m pytest`` / ``python -m fastnabla.train``)
used to shadow it and broke every diffusers/transformers import.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_MODULES = sorted(p.stem for p in (ROOT / "kernels").glob("*.py"))


def python(code: str, cwd: Path, **env: str) -> str:
    """Run ``code`` in a fresh interpreter started in ``cwd`` (so ``python -c`` puts ``cwd`` first on sys.path)."""
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def pypi_kernels_location() -> str | None:
    """Where ``import kernels`` resolves from a neutral directory: the PyPI package, when it is installed."""
    spec = importlib.util.find_spec("kernels")
    return spec.origin if spec is not None and spec.origin else None


def test_kernels_folder_is_not_a_regular_package():
    assert KERNEL_MODULES, "the top-level kernels/ folder holds the Triton kernels"
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py would make the folder a package that shadows the PyPI package `kernels`")


def test_import_kernels_from_the_repository_root_is_the_pypi_package():
    pypi = pypi_kernels_location()
    if pypi is None or Path(pypi).resolve().is_relative_to(ROOT):
        pytest.skip("the PyPI package `kernels` is not installed in this environment")
    origin = python("import kernels; print(kernels.__file__)", cwd=ROOT)
    assert Path(origin).resolve() == Path(pypi).resolve()
    assert not Path(origin).resolve().is_relative_to(ROOT)


@pytest.mark.parametrize("where", ["repo-root", "elsewhere"])
def test_fastnabla_kernels_import_from_the_checkout(where, tmp_path):
    cwd = ROOT if where == "repo-root" else tmp_path
    code = "import importlib\n" + "".join(
        f"print(importlib.import_module('fastnabla.kernels.{m}').__file__)\n" for m in KERNEL_MODULES)
    files = python(code, cwd=cwd).splitlines()
    assert [Path(f).resolve() for f in files] == [ROOT / "kernels" / f"{m}.py" for m in KERNEL_MODULES]


def test_transformers_and_diffusers_import_from_the_repository_root():
    pytest.importorskip("diffusers")
    code = ("from fastnabla.compat import prepare_third_party_imports; prepare_third_party_imports()\n"
            "import diffusers, peft, transformers\nfrom transformers import CLIPTextModel\nprint('ok')")
    out = python(code, cwd=ROOT, HF_HUB_OFFLINE="1")
    assert out.endswith("ok")


def _packages_in_tree() -> set[str]:
    found = {"fastnabla.kernels"}
    for init in (ROOT / "fastnabla").rglob("__init__.py"):
        found.add(".".join(init.parent.relative_to(ROOT).parts))
    return found


def test_wheel_ships_every_package_and_the_kernels_inside_fastnabla(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "source"  # a copy: setuptools builds in the source tree (build/, *.egg-info)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for part in ("fastnabla", "kernels"):
        shutil.copytree(ROOT / part, source / part, ignore=ignore)
    for part in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / part, source / part)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    if built.returncode != 0 and "setuptools" in built.stderr and "requirement" in built.stderr.lower():
        pytest.skip(f"this environment's setuptools cannot build the wheel: {built.stderr[-300:]}")
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("fastnabla-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not any(n.startswith("kernels/") for n in names), "a top-level kernels/ in the wheel would shadow PyPI's"
    for module in KERNEL_MODULES:
        assert f"fastnabla/kernels/{module}.py" in names
    data = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "fastnabla").rglob("*.json"))
    assert data and all(d in names for d in data), "package data (the FLOP tool's configs) missing from the wheel"
    shipped = {".".join(Path(n).parent.parts) for n in names if n.endswith(".py")}
    missing = _packages_in_tree() - shipped
    assert not missing, f"packages missing from the wheel (pyproject.toml [tool.setuptools] packages): {missing}"

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = "import importlib\n" + "".join(
        f"print(importlib.import_module('fastnabla.kernels.{m}').__file__)\n" for m in KERNEL_MODULES)
    files = python(code, cwd=tmp_path, PYTHONPATH=str(target)).splitlines()
    assert [Path(f).resolve() for f in files] == [target / "fastnabla" / "kernels" / f"{m}.py" for m in KERNEL_MODULES]
