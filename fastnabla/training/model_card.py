"""A model card (``README.md``) beside an exported LoRA, and the optional upload to a Hugging Face hub repository.

The card is what a user of the LoRA needs to know: the base model it applies to, how it was trained (method,
reward(s) and their weights, beta, iterations, LoRA shape, sampler), the reward measured on the fixed evaluation grid
before and after training, the command that made it, the fastnabla version, and the license note. It starts with the
hub's YAML metadata block (``base_model``, ``library_name: diffusers``, ``license``, ``tags``), so a pushed repository
is indexed as a LoRA of its base model. Written atomically (temporary file + rename).

:func:`check_hub` runs at start-up when ``output.push_to_hub`` is set, before anything is written: it fails with a
clear error where no hub can be reached (``HF_HUB_OFFLINE=1``) or ``huggingface_hub`` is missing. :func:`push_to_hub`
creates the repository (private unless ``output.hub_private=false``) and uploads the directory in one commit.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastnabla.utils.io import atomic_write

CARD_FILE = "README.md"
# licenses of base models users fine-tune most (hub license ids); anything else is "other" with a pointer to it
KNOWN_LICENSES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-2-1": "openrail++",
    "stabilityai/stable-diffusion-2-1-base": "openrail++",
    "stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
}


class HubError(RuntimeError):
    """The hub cannot be reached or the upload failed; the message says what to do instead."""


def fastnabla_version() -> str:
    try:
        return importlib.metadata.version("fastnabla")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


@dataclass
class ModelCard:
    """What the card says; ``rows`` are extra ``(setting, value)`` lines of the training table."""

    name: str
    base_model: str
    method: str
    rewards: str
    beta: float
    iterations: int
    command: str
    reward_before: float | None = None
    reward_after: float | None = None
    reward_note: str = ""
    rows: list[tuple[str, str]] = field(default_factory=list)
    license: str = ""

    def license_id(self) -> str:
        return self.license or KNOWN_LICENSES.get(self.base_model, "other")

    def text(self) -> str:
        lic = self.license_id()
        base = self.base_model if not Path(self.base_model).expanduser().is_absolute() else Path(self.base_model).name
        front = ["---", f"base_model: {base}", "library_name: diffusers", f"license: {lic}", "tags:",
                 *(f"- {t}" for t in ("text-to-image", "diffusers", "lora", "stable-diffusion", "fastnabla",
                                      "reward-fine-tuning")), "---", ""]
        measured = "not measured"
        if self.reward_before is not None and self.reward_after is not None:
            measured = f"{self.reward_before:.4f} (pretrained) -> {self.reward_after:.4f} (fine-tuned)"
        rows = [("base model", f"`{self.base_model}`"), ("method", self.method), ("reward", self.rewards),
                ("beta (target p#(x) R(x)^beta)", f"{self.beta:g}"), ("iterations", str(self.iterations)),
                *self.rows, ("mean log R on the evaluation grid", measured + (f" ({self.reward_note})"
                                                                              if self.reward_note else "")),
                ("fastnabla version", fastnabla_version())]
        table = ["| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
        use = ["```python", "import torch", "from diffusers import DiffusionPipeline", "",
               f'pipe = DiffusionPipeline.from_pretrained("{self.base_model}", torch_dtype=torch.float16)',
               'pipe.load_lora_weights("<this directory or hub repository>")', "```"]
        lic_note = (f"This LoRA is a derivative of `{self.base_model}` and is distributed under that model's license "
                    f"(`{lic}`" + ("; see the base model's card" if lic == "other" else "") + "), including its use "
                    "restrictions. fastnabla, which trained it, is Apache-2.0. The reward models used for training "
                    "have their own licenses; none of their weights are included here.")
        return "\n".join([
            *front, f"# {self.name}", "",
            f"A LoRA for `{self.base_model}` fine-tuned with fastnabla ({self.method}) on the reward {self.rewards}.",
            "", "## Training", "", *table, "", "## Use", "", *use, "", "## The command that trained it", "",
            "```bash", self.command, "```", "", "## License", "", lic_note, "",
        ])


def write_model_card(directory: str | Path, card: ModelCard) -> Path:
    """Write ``card`` as ``directory/README.md``, atomically."""
    path = Path(directory) / CARD_FILE
    text = card.text()
    atomic_write(path, lambda f: f.write(text.encode()))
    return path


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_hub(repo: str) -> None:
    """Fail early when ``--push-to-hub REPO`` cannot work here (no network access to a hub, no client).

    Raises:
        HubError: naming the reason and how to upload later.
    """
    later = f"train without --push-to-hub and upload OUT/lora later with `huggingface-cli upload {repo} OUT/lora`"
    if "/" not in repo.strip("/") or repo.count("/") != 1:
        raise HubError(f"output.push_to_hub={repo!r}: a hub repository id looks like 'user/name'")
    if _hub_offline():
        raise HubError(f"output.push_to_hub={repo!r}: HF_HUB_OFFLINE=1 is set, so no hub is reachable from here; "
                       f"unset it where a hub is reachable, or {later}")
    if importlib.util.find_spec("huggingface_hub") is None:
        raise HubError(f"output.push_to_hub={repo!r}: huggingface_hub is not installed (pip install huggingface_hub)")


def push_to_hub(directory: str | Path, repo: str, private: bool = True, message: str = "") -> str:
    """Create ``repo`` (if needed) and upload ``directory`` in one commit; returns the repository URL.

    Raises:
        HubError: the hub refused or could not be reached (the message keeps the client's reason).
    """
    check_hub(repo)
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(directory), repo_id=repo, repo_type="model",
                          commit_message=message or "Upload LoRA trained with fastnabla")
    except Exception as err:  # noqa: BLE001 - network, auth, permissions: all reported the same way
        raise HubError(f"uploading {directory} to {repo} failed ({type(err).__name__}: {err}); the LoRA and its card "
                       f"stay in {directory}: upload them later with `huggingface-cli upload {repo} {directory}`"
                       ) from err
    return str(url)


def reward_description(reward_cfg: Any) -> str:
    """``aesthetic`` or ``sum: 0.7 x hpsv2 + 0.3 x aesthetic`` from an ``sd.reward`` section."""
    if getattr(reward_cfg, "name", "") == "sum":
        return "sum: " + " + ".join(f"{t.weight:g} x {t.name}" for t in reward_cfg.terms)
    return str(getattr(reward_cfg, "name", reward_cfg))
