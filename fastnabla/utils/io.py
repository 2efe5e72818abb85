"""Output helpers: atomic writes, JSONL logs, and run directories that never look complete early.

A run directory is *finished* once ``metrics.json`` exists; it is written last and atomically, so
an interrupted run can always be told apart from a complete one.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

FINISHED_MARKER = "metrics.json"


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return _finite(obj.tolist())  # NaN / inf in tensors and arrays become null, as in plain floats
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through a temporary file in the same directory, then ``os.replace`` it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    text = json.dumps(_finite(data), indent=2, default=_json_default, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def write_npy(path: str | Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a JSONL file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class JsonlLogger:
    """Appends one JSON object per line and flushes, so the log is readable while a run is going.

    ``resume_after=N`` continues an existing log: lines with ``iteration > N`` (written after the
    checkpoint a run resumes from) are dropped first, so the log has one line per iteration.
    """

    def __init__(self, path: str | Path, resume_after: int | None = None):
        self.path = Path(path)
        if resume_after is None or not self.path.exists():
            self._file = self.path.open("w")
            return
        kept = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in kept if json.loads(line).get("iteration", 0) <= resume_after]
        text = "".join(line + "\n" for line in kept)
        atomic_write(self.path, lambda f: f.write(text.encode()))
        self._file = self.path.open("a")

    def records(self) -> list[dict[str, Any]]:
        """Every record written so far (after a resume: the kept ones too)."""
        self._file.flush()
        return read_jsonl(self.path)

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(_finite(record), default=_json_default, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prepare_run_dir(path: str | Path, overwrite: bool) -> Path:
    """Create ``path``; if it holds a finished run, use ``path-1``, ``path-2``, ... unless ``overwrite``.

    A directory holding an unfinished run (no ``metrics.json``) is reused: its files are stale.
    """
    base = Path(path)
    candidate = base
    i = 0
    while (candidate / FINISHED_MARKER).exists() and not overwrite:
        i += 1
        candidate = base.with_name(f"{base.name}-{i}")
    candidate.mkdir(parents=True, exist_ok=True)
    if overwrite:
        (candidate / FINISHED_MARKER).unlink(missing_ok=True)
    return candidate
