"""Output helpers: atomic writes, JSONL logs, and run directories that never look complete early.

A run directory is *finished* once ``metrics.json`` exists; it is written last and atomically, so
an interrupted run can always be told apart from a complete one. Files and directories are created
with the user's umask (``tempfile`` alone would make them private: 0600 / 0700).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

FINISHED_MARKER = "metrics.json"
CONFIG_FILE = "config.yaml"
CONFIG_HEADER = "# fastnabla run config"  # first line of every run's config.yaml: marks a run directory


class RunDirError(ValueError):
    """An output directory cannot be used (a file, unwritable, or holding work that must not be lost)."""


def _umask() -> int:
    """The process's umask: read from /proc (Linux) without changing it, else set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> None:
    """Give ``path`` the mode a plain ``open()`` / ``mkdir()`` would have (``tempfile`` makes it private)."""
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


def make_temp_dir(final: str | Path) -> Path:
    """A new empty directory beside ``final`` (same file system, so it can be renamed into place), with the
    user's umask."""
    final = Path(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    apply_umask(tmp)
    return tmp


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
        apply_umask(tmp)
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


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a fastnabla run (its ``config.yaml`` starts with :data:`CONFIG_HEADER`; runs written
    before that header existed are recognised by ``config.yaml`` next to ``metrics.jsonl`` or ``checkpoints/``)."""
    path = Path(path)
    config = path / CONFIG_FILE
    if not config.is_file():
        return False
    with config.open("r", encoding="utf-8", errors="replace") as f:
        if f.readline().startswith(CONFIG_HEADER):
            return True
    return (path / "metrics.jsonl").is_file() or (path / "checkpoints").is_dir()


def _check_creatable(path: Path) -> None:
    """Raise :class:`RunDirError` unless ``path`` is, or can be made, a writable directory."""
    if path.exists() and not path.is_dir():
        raise RunDirError(f"output directory {path} is a file, not a directory")
    ancestor = path
    while not ancestor.exists():
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise RunDirError(f"output directory {path} cannot be created: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        what = "is not writable" if ancestor == path else f"cannot be created: {ancestor} is not writable"
        raise RunDirError(f"output directory {path} {what}")


def plan_run_dir(path: str | Path, overwrite: bool) -> tuple[Path, bool]:
    """Where a new run writes, and whether that directory's old run must be cleared first; raises
    :class:`RunDirError` (naming the directory) before anything is written. The rules:

    * a directory holding a *finished* run is kept: the new run goes to ``path-1``, ``path-2``, ...;
    * a directory holding an *unfinished* run is never discarded silently: continue it with ``--resume``;
    * ``overwrite`` replaces the run in ``path`` (finished or not): its files are deleted first;
    * a non-empty directory that holds no fastnabla run is never written into, ``overwrite`` or not;
    * a file, an unwritable directory, or a path that cannot be created is an error.
    """
    base = Path(path).expanduser()
    candidate, i = base, 0
    while not overwrite and (candidate / FINISHED_MARKER).exists():
        i += 1
        candidate = base.with_name(f"{base.name}-{i}")
    _check_creatable(candidate)
    if not candidate.exists() or not any(candidate.iterdir()):
        return candidate, False
    if not is_run_dir(candidate):
        raise RunDirError(f"output directory {candidate} is not empty and holds no fastnabla run: choose an empty "
                          "or new directory (--out)")
    if overwrite:
        return candidate, True
    latest = candidate / "checkpoints" / "latest"
    where = f" (checkpoint {latest.read_text().strip()})" if latest.is_file() else " (no checkpoint yet)"
    raise RunDirError(f"{candidate} holds an unfinished run{where}: continue it with --resume {candidate}, start it "
                      "over with output.overwrite=true (deletes it), or choose another --out")


def create_run_dir(path: Path, clear: bool) -> Path:
    """Create the directory :func:`plan_run_dir` chose (deleting the old run's files first when ``clear``)."""
    if clear:
        for entry in path.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"output directory {path} cannot be created: {err.strerror or err}") from err
    return path


def prepare_run_dir(path: str | Path, overwrite: bool) -> Path:
    """:func:`plan_run_dir` then :func:`create_run_dir`: the directory a new run writes into, created."""
    return create_run_dir(*plan_run_dir(path, overwrite))
