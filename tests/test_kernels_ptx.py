"""Every Triton kernel compiles to PTX for sm_90 with the vector loads it is designed for, in any test order.

The checks live in ``tests/kernels_ptx.py`` and run in a fresh process without ``TRITON_INTERPRET``: this session
imported triton in interpreter mode (``tests/conftest.py``), and triton then cannot compile for a GPU target.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from kernels_ptx import OPS, SKIP_STATUS

SCRIPT = Path(__file__).with_name("kernels_ptx.py")


@pytest.mark.parametrize("op", OPS)
def test_kernels_compile_for_sm90(op):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT), op], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode == SKIP_STATUS:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_check_refuses_interpreter_mode():
    """Run under ``TRITON_INTERPRET=1`` the checks would fail for the wrong reason: the script says so instead."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), OPS[0]], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "TRITON_INTERPRET" in done.stderr
