"""LoRA adapters on the UNet (peft), the pretrained model as "adapters off", and export for diffusers.

With ``W`` a frozen weight of a targeted layer (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` by
default), the fine-tuned layer computes ``W x + (alpha / r) B A x`` with ``A`` ``[r, in]`` and ``B``
``[out, r]``; peft initialises ``B = 0``, so the policy starts *exactly* at the pretrained model.
The pretrained model ``eps#`` is the same UNet with the adapters switched off: no second copy of the
weights.

Adapters are added through diffusers' ``unet.add_adapter`` (the UNet stays a plain
``UNet2DConditionModel``, so attention processors, ``channels_last`` and ``torch.compile`` apply as
usual); the LoRA weights are fp32 whatever the frozen dtype (peft casts the layer input to the
adapter dtype and the sum back to the base dtype).

Export writes ``pytorch_lora_weights.safetensors`` (diffusers key format, with the adapter config as
metadata, so ``alpha != r`` loads correctly) that ``StableDiffusionPipeline.load_lora_weights`` (SDXL:
``StableDiffusionXLPipeline.load_lora_weights``; the UNet keys are the same ``unet.``-prefixed ones) reads. The
whole directory is written atomically (temporary sibling + rename).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastnabla.compat import prepare_third_party_imports
from fastnabla.tasks.sd.config import LoRAConfig
from fastnabla.utils.io import apply_umask, make_temp_dir

ADAPTER_NAME = "default"
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"


def add_lora(unet: nn.Module, cfg: LoRAConfig) -> list[nn.Parameter]:
    """Freeze ``unet``, add LoRA adapters per ``cfg`` (fp32, ``B = 0``) and return their parameters.

    Raises:
        ValueError: naming ``sd.lora.target_modules`` when no module of the UNet matches.
    """
    prepare_third_party_imports()
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        init_lora_weights=True,
    )
    try:
        unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    except ValueError as err:
        raise ValueError(f"sd.lora.target_modules={list(cfg.target_modules)}: {err}") from err
    params = lora_parameters(unet)
    if not params:
        raise ValueError(f"sd.lora.target_modules={list(cfg.target_modules)} matched no module of the UNet")
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def lora_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The LoRA parameters of ``unet`` in module order."""
    return [p for _, p in named_lora_parameters(unet)]


def named_lora_parameters(unet: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every LoRA weight (names like ``...to_q.lora_A.default.weight``)."""
    return [(n, p) for n, p in unet.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def lora_layers(unet: nn.Module) -> list[nn.Module]:
    """The peft tuner layers (modules that hold adapters) of ``unet``."""
    prepare_third_party_imports()
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(layers: list[nn.Module]) -> Iterator[None]:
    """Run the base model: every adapter of ``layers`` off inside the block, restored after.

    peft's switch also changes ``requires_grad`` of the adapter weights; their flags are restored
    exactly, so the block is safe in the middle of a training step (a graph built before it still
    backpropagates into the adapters).
    """
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


def lora_state_dict_for_diffusers(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights in diffusers' key format (``...to_q.lora.down.weight``), fp32 copies on CPU."""
    prepare_third_party_imports()
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    return {k: v.detach().float().cpu().contiguous() for k, v in convert_state_dict_to_diffusers(state).items()}


def export_lora(unet: nn.Module, directory: str | Path, family: str = "sd") -> Path:
    """Write the LoRA of ``unet`` as a diffusers LoRA directory (``load_lora_weights`` of the ``family``'s pipeline,
    ``sd`` or ``sdxl``, reads it), atomically.

    An existing ``directory`` is replaced only once the new one is complete.
    """
    prepare_third_party_imports()
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline_cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline

    directory = Path(directory).expanduser()
    directory.parent.mkdir(parents=True, exist_ok=True)
    config = unet.peft_config[ADAPTER_NAME]
    tmp = make_temp_dir(directory)
    try:
        pipeline_cls.save_lora_weights(
            tmp,
            unet_lora_layers=lora_state_dict_for_diffusers(unet),
            unet_lora_adapter_metadata=config.to_dict(),
            safe_serialization=True,
        )
        if not (tmp / LORA_WEIGHTS_FILE).is_file():
            raise OSError(f"diffusers did not write {LORA_WEIGHTS_FILE} into {tmp}")
        for file in tmp.iterdir():
            apply_umask(file)  # safetensors writes 0600
        if directory.exists():
            stale = directory.with_name(f".{directory.name}.stale-{os.getpid()}")
            os.rename(directory, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


# --- reading diffusers-format LoRA files (--init-lora, fastnabla-eval --lora) ------------------------------------


@dataclass
class LoRAFile:
    """A diffusers-format UNet LoRA read from disk: weights by peft key (``<module>.lora_A.weight`` /
    ``<module>.lora_B.weight``), its rank, alpha (and where the alpha came from) and the module suffixes it targets."""

    path: Path
    state: dict[str, torch.Tensor]
    rank: int
    alpha: float
    alpha_source: str
    target_modules: list[str]

    @property
    def modules(self) -> list[str]:
        return sorted({k.rsplit(".lora_", 1)[0] for k in self.state})


def _lora_weights_file(path: str | Path, field: str) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / LORA_WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{field}={str(path)!r}: no such file (a diffusers LoRA: {LORA_WEIGHTS_FILE} or the "
                                "directory holding it, as fastnabla's export and diffusers' save_lora_weights write)")
    if path.suffix != ".safetensors":
        raise ValueError(f"{field}={str(path)!r}: only .safetensors LoRA files are read (pickled .bin files can run "
                         "code when loaded)")
    return path


def _suffix(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def read_lora_file(path: str | Path, field: str = "sd.lora.init") -> LoRAFile:
    """Read a diffusers-format LoRA (``pytorch_lora_weights.safetensors`` or its directory) through diffusers' own
    ``StableDiffusionPipeline.lora_state_dict`` (which also converts the older ``lora.down/up`` and kohya layouts),
    keeping the UNet's weights in peft's key format.

    The alpha is the adapter metadata's ``lora_alpha`` (fastnabla's export and diffusers >= 0.33 store it), else the
    stored network alphas, else the rank (scale 1) -- what ``load_lora_weights`` assumes in the same cases.

    Raises:
        FileNotFoundError / ValueError: naming ``field`` and what is wrong (text-encoder weights, mixed ranks or
            alphas, DoRA / rsLoRA, no UNet weights).
    """
    prepare_third_party_imports()
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    file = _lora_weights_file(path, field)
    try:
        raw, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
            str(file.parent), weight_name=file.name, use_safetensors=True, local_files_only=True,
            return_lora_metadata=True)
    except Exception as err:
        raise ValueError(f"{field}={str(file)!r}: diffusers could not read it as a LoRA ({type(err).__name__}: "
                         f"{err})") from err
    text = sorted(k for k in raw if not k.startswith("unet."))
    if text:
        raise ValueError(f"{field}={str(file)!r} holds {len(text)} weights outside the UNet (e.g. {text[0]!r}: a "
                         "text-encoder LoRA); fastnabla trains and evaluates UNet LoRAs only")
    state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in raw.items()})
    state = {k: v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}
    if not state:
        raise ValueError(f"{field}={str(file)!r} holds no UNet LoRA weights")
    meta = {k.removeprefix("unet."): v for k, v in (metadata or {}).items()}
    if meta.get("use_dora") or meta.get("use_rslora"):
        raise ValueError(f"{field}={str(file)!r} is a DoRA / rsLoRA adapter; only plain LoRA is supported")
    ranks = {int(v.shape[0]) for k, v in state.items() if ".lora_A." in k}
    if len(ranks) != 1 or meta.get("rank_pattern"):
        raise ValueError(f"{field}={str(file)!r} has different ranks per module ({sorted(ranks)}); fastnabla's LoRA "
                         "has one rank")
    rank = ranks.pop()
    if meta.get("lora_alpha") is not None:
        if meta.get("alpha_pattern"):
            raise ValueError(f"{field}={str(file)!r} has different alphas per module; fastnabla's LoRA has one alpha")
        alpha, source = float(meta["lora_alpha"]), "adapter metadata"
    elif alphas:
        values = {float(v) for k, v in alphas.items() if k.startswith("unet.") or "." not in k}
        if len(values) != 1:
            raise ValueError(f"{field}={str(file)!r} has different network alphas per module ({sorted(values)[:4]})")
        alpha, source = values.pop(), "network alphas"
    else:
        alpha, source = float(rank), "none stored: alpha = rank (diffusers' default)"
    targets = sorted({_suffix(k.rsplit(".lora_", 1)[0]) for k in state})
    return LoRAFile(file, state, rank, alpha, source, targets)


@torch.no_grad()
def load_lora_file(unet: nn.Module, lora: LoRAFile, cfg: LoRAConfig, field: str = "sd.lora.init") -> None:
    """Copy ``lora`` into the adapters :func:`add_lora` made on ``unet`` (``cfg``), so the LoRA UNet computes
    ``W x + (alpha_file / r) B A x`` exactly: ``B`` is rescaled by ``(alpha_file / r) / (cfg.alpha / r)``.

    Raises:
        ValueError: naming ``field`` and the settings that would fit (rank, target modules) when they differ.
    """
    own = dict(named_lora_parameters(unet))
    own_modules = sorted({n.rsplit(".lora_", 1)[0] for n in own})
    fix = f"sd.lora.rank={lora.rank} sd.lora.target_modules=[{','.join(lora.target_modules)}]"
    if lora.rank != cfg.rank:
        raise ValueError(f"{field}: {lora.path} has rank {lora.rank}, sd.lora.rank is {cfg.rank}; set {fix}")
    if lora.modules != own_modules:
        extra = sorted(set(lora.modules) - set(own_modules))
        missing = sorted(set(own_modules) - set(lora.modules))
        raise ValueError(f"{field}: {lora.path} adapts other modules than sd.lora.target_modules="
                         f"{list(cfg.target_modules)} ({len(extra)} not adapted here, e.g. {extra[:2]}; {len(missing)} "
                         f"missing from the file, e.g. {missing[:2]}); set {fix}")
    ratio = (lora.alpha / lora.rank) / (cfg.alpha / cfg.rank)
    for name, param in own.items():
        module, _, rest = name.rpartition(".lora_")
        kind = rest.split(".", 1)[0]  # "A" or "B"
        value = lora.state[f"{module}.lora_{kind}.weight"]
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{field}: {lora.path}: {module}.lora_{kind} has shape {tuple(value.shape)}, the UNet "
                             f"expects {tuple(param.shape)} (a LoRA for another architecture?)")
        value = value.to(device=param.device, dtype=torch.float32)
        param.copy_(value * ratio if kind == "B" else value)

