"""The README's promises: CI runs its test command, and its YAML example is the default config."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from fastnabla.config.loader import build_config, to_dict
from fastnabla.run.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_cmds = [line for block in _bash_blocks() for line in block.splitlines() if "pytest" in line and "pip" in line]
    assert len(test_cmds) == 1, test_cmds
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmds[0].strip() in ci


def test_readme_main_command_runs_the_default_job():
    main_cmds = [line for block in _bash_blocks() for line in block.splitlines() if "pip install" in line]
    assert any(line.strip().endswith("python -m fastnabla.train") for line in main_cmds)


def test_readme_yaml_example_is_the_complete_default(tmp_path):
    block = re.findall(r"```yaml\n(.*?)```", README, flags=re.S)
    assert len(block) == 1
    path = tmp_path / "readme.yaml"
    path.write_text(block[0])
    assert build_config(RunConfig, None, path) == RunConfig()
    assert _key_paths(yaml.safe_load(block[0])) == _key_paths(to_dict(RunConfig())), "README's config is not complete"


def _key_paths(tree: dict, prefix: str = "") -> set[str]:
    """Every key of a nested config, dotted (``sd.memory.unet_gradient_checkpointing``)."""
    paths = set()
    for key, value in tree.items():
        paths.add(prefix + key)
        if isinstance(value, dict) and key not in ("scheduler", "options"):
            paths |= _key_paths(value, f"{prefix}{key}.")
    return paths
