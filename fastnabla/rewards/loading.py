"""Finding and reading reward-model weights: local paths first, the Hugging Face hub only where allowed.

Resolution of a path option (``checkpoint=...``, ``clip=...``):

1. an existing local file (or a directory holding one of the expected file names) is used as is;
2. otherwise the value (or, when the option is not given, the reward's default hub repository) is looked up on the
   Hugging Face hub through ``huggingface_hub``: with ``HF_HUB_OFFLINE=1`` only the user's local hub cache is read
   (``local_files_only=True``; no download is attempted), otherwise the file is downloaded into that cache;
3. if nothing is found, :class:`FileNotFoundError` names the option, what was tried, the expected files and where
   users get them.

No cache directory is hard-coded: ``huggingface_hub`` uses its own (``HF_HOME`` / ``HF_HUB_CACHE``).
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

Tensor = torch.Tensor
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class WeightFiles:
    """What one path option of a reward needs, for resolution and for error messages.

    ``filenames``: accepted file names (first = the one fetched from the hub); for a directory option, the files
    that must all be present (``alternatives`` lists groups of which one must be present, e.g. the weights).
    """

    reward: str
    option: str
    description: str
    filenames: tuple[str, ...]
    source: str
    hub_repo: str | None = None
    alternatives: tuple[tuple[str, ...], ...] = ()


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set to a true value (then nothing is downloaded)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _missing(spec: WeightFiles, tried: Iterable[str]) -> FileNotFoundError:
    expected = " or ".join(spec.filenames)
    if spec.alternatives:
        expected += " + " + " + ".join("(" + " or ".join(group) + ")" for group in spec.alternatives)
    return FileNotFoundError(
        f"reward {spec.reward!r}: {spec.description} not found (option {spec.option}=...; tried: {'; '.join(tried)}). "
        f"Expected: {expected}. Get it from {spec.source}, then pass {spec.option}=/local/path."
    )


def _hub_note() -> str:
    return "not in the local hub cache (HF_HUB_OFFLINE=1: no download attempted)" if hub_offline() else "not found"


def _looks_like_hub_id(value: str) -> bool:
    return bool(_HUB_ID.match(value)) and not value.startswith((".", "/", "~"))


def resolve_file(value: str | os.PathLike | None, spec: WeightFiles) -> Path:
    """The local path of the file ``spec`` describes (see the module docstring for the order)."""
    tried: list[str] = []
    if value is not None:
        path = Path(value).expanduser()
        if path.is_file():
            return path
        if path.is_dir():
            for name in spec.filenames:
                if (path / name).is_file():
                    return path / name
            raise _missing(spec, [f"directory {path} (holds none of the expected names)"])
        tried.append(f"local path {path} (does not exist)")
        repo = str(value) if _looks_like_hub_id(str(value)) else None
    else:
        repo = spec.hub_repo
    if repo is not None:
        found = _hub_file(repo, spec.filenames[0])
        if found is not None:
            return found
        tried.append(f"hub {repo}/{spec.filenames[0]} ({_hub_note()})")
    raise _missing(spec, tried or ["no path given and no default hub repository"])


def resolve_dir(value: str | os.PathLike | None, spec: WeightFiles) -> Path:
    """The local directory holding all of ``spec.filenames`` and one file of each ``spec.alternatives`` group."""
    tried: list[str] = []
    if value is not None:
        path = Path(value).expanduser()
        if path.is_dir():
            missing = _missing_in_dir(path, spec)
            if not missing:
                return path
            raise _missing(spec, [f"directory {path} (lacks {', '.join(missing)})"])
        tried.append(f"local directory {path} (does not exist)")
        repo = str(value) if _looks_like_hub_id(str(value)) else None
    else:
        repo = spec.hub_repo
    if repo is not None:
        found = _hub_snapshot(repo, spec)
        if found is not None:
            return found
        tried.append(f"hub {repo} ({_hub_note()})")
    raise _missing(spec, tried or ["no path given and no default hub repository"])


def _missing_in_dir(path: Path, spec: WeightFiles) -> list[str]:
    missing = [name for name in spec.filenames if not (path / name).is_file()]
    missing += [" or ".join(g) for g in spec.alternatives if not any((path / n).is_file() for n in g)]
    return missing


def _hub_file(repo: str, filename: str) -> Path | None:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None
    try:
        return Path(hf_hub_download(repo, filename, local_files_only=hub_offline()))
    except Exception:  # noqa: BLE001 - any hub failure (offline, missing, network) means "not found here"
        return None


def _hub_snapshot(repo: str, spec: WeightFiles) -> Path | None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    # online: fetch one file per alternative group (the first, e.g. model.safetensors); offline nothing is fetched
    patterns = list(spec.filenames) + [n for g in spec.alternatives for n in (g if hub_offline() else g[:1])]
    try:
        path = Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=hub_offline()))
    except Exception:  # noqa: BLE001 - see _hub_file
        return None
    return path if not _missing_in_dir(path, spec) else None


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


def load_state_dict_file(path: Path, what: str) -> dict[str, Tensor]:
    """Tensors of a checkpoint file: safetensors, a torch pickle (read with ``weights_only=True``) or a
    TorchScript archive (OpenAI's CLIP ``.pt`` files). A ``{"state_dict": ...}`` wrapper and ``module.`` prefixes
    (DDP) are removed."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif _is_torchscript_archive(path):
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{what}: could not read {path} as a checkpoint ({type(err).__name__}: {err})") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{what}: {path} holds a {type(state).__name__}, not a state dict")
    tensors = {k[7:] if k.startswith("module.") else k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(f"{what}: {path} holds no tensors")
    return tensors


def load_exact(module: torch.nn.Module, state: dict[str, Tensor], what: str, ignore: Iterable[str] = ()) -> None:
    """``module.load_state_dict(state)`` that names missing/unexpected/mis-shaped keys in its error (values are
    cast to the module's dtypes); keys starting with a prefix in ``ignore`` are dropped first."""
    ignore = tuple(ignore)
    state = {k: v for k, v in state.items() if not (ignore and k.startswith(ignore))}
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state
                    and state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        def head(items: list[str]) -> str:
            return ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")

        raise ValueError(
            f"{what}: the checkpoint does not match the expected layout: "
            + "; ".join(
                part
                for part in (
                    f"missing keys: {head(missing)}" if missing else "",
                    f"unexpected keys: {head(unexpected)}" if unexpected else "",
                    f"shape mismatches: {head(shapes)}" if shapes else "",
                )
                if part
            )
        )
    module.load_state_dict(state, strict=True)
