"""Prompt sets: built in, named published sets read from the user's files, or any prompt file or dataset.

``sd.prompts.source`` is one of

* ``animals``: the 45 simple-animal prompts of DDPO (built in; the paper's Aesthetic Score experiments);
* a **named published set** whose files the user points to with ``sd.prompts.path`` (nothing is downloaded):
  ``hpdv2-photo+painting`` (the HPDv2 benchmark's photo and paintings prompts: the paper's and the release's
  HPSv2 set) and ``drawbench`` (the DrawBench prompts the release trains ImageReward on). A missing path or file
  is an error that says where to get them -- never a silent fallback to other prompts;
* a file: ``.txt`` (one prompt per line), ``.json`` (a list of prompts or of records, or a mapping holding such a
  list), ``.jsonl`` (one prompt or record per line), ``.csv`` / ``.tsv`` (a column of prompts);
* a directory: a local Hugging Face ``datasets`` directory (``save_to_disk``; needs the ``datasets`` package) or a
  directory of prompt files (all of them, in name order).

Records (JSON objects, CSV rows, dataset rows) take their prompt from ``sd.prompts.column``, or the first of
``prompt``, ``prompts``, ``caption``, ``text`` (any case) they have.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# The 45 common animals DDPO trains on (Black et al., 2023, "simple animals"); each prompt is the bare name.
ANIMALS: tuple[str, ...] = (
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat",
    "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly", "fish",
    "shark", "whale", "dolphin", "squirrel", "mouse", "rat", "snake", "turtle", "frog", "chicken", "duck",
    "goose", "bee", "pig", "turkey", "fly", "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo",
)  # fmt: skip

BUILTIN_PROMPT_SETS: dict[str, tuple[str, ...]] = {"animals": ANIMALS}
PROMPT_FILE_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".tsv")
PROMPT_COLUMNS = ("prompt", "prompts", "caption", "text")


@dataclass(frozen=True)
class PublishedPromptSet:
    """A published prompt set read from the user's files: which files, which prompts train, where to get them."""

    name: str
    files: tuple[tuple[str, ...], ...]  # per part, the accepted file names (the first is the canonical one)
    held_out_per_group: int  # the first N prompts of each file (DrawBench: of each category) are kept for evaluation
    where: str
    drop_categories: tuple[str, ...] = ()


PUBLISHED_PROMPT_SETS: dict[str, PublishedPromptSet] = {
    "hpdv2-photo+painting": PublishedPromptSet(
        "hpdv2-photo+painting",
        files=(("photo.json", "benchmark_photo.json"), ("paintings.json", "benchmark_paintings.json")),
        held_out_per_group=10,
        where="the HPDv2 benchmark prompts (800 per style, a JSON list each) from the Hugging Face dataset "
              "zhwang/HPDv2, folder benchmark/ (`python -c \"import hpsv2; hpsv2.benchmark_prompts('all')\"` puts "
              "them in ~/.cache/hpsv2/datasets/benchmark/); point sd.prompts.path at the folder holding photo.json "
              "and paintings.json",
    ),
    "drawbench": PublishedPromptSet(
        "drawbench",
        files=(("DrawBench Prompts.csv", "drawbench.csv"),),
        held_out_per_group=2,
        drop_categories=("Misspellings", "Rare Words"),
        where="the DrawBench prompts (Saharia et al. 2022; 200 prompts in 11 categories, a CSV with columns "
              "'Prompts' and 'Category', e.g. exported from the Imagen DrawBench sheet or the Hugging Face dataset "
              "sayakpaul/drawbench); point sd.prompts.path at the CSV file or the folder holding "
              "'DrawBench Prompts.csv'",
    ),
}


def _prompt_of(record: Any, column: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        keys = {k.lower(): k for k in record}
        wanted = [column] if column else list(PROMPT_COLUMNS)
        for name in wanted:
            key = name if name in record else keys.get(name.lower())
            if key is not None and isinstance(record[key], str):
                return record[key]
        raise ValueError(f"{where}: a record has no prompt field {wanted} (its fields: {sorted(record)}); set "
                         "sd.prompts.column")
    raise ValueError(f"{where}: expected prompts as strings or records, got {type(record).__name__}")


def _json_prompts(data: Any, column: str, where: str) -> list[str]:
    if isinstance(data, dict):
        lists = [v for k, v in data.items() if isinstance(v, list) and k.lower() in (*PROMPT_COLUMNS, "data")]
        if len(lists) != 1:
            raise ValueError(f"{where}: a JSON mapping must hold one list of prompts under one of "
                             f"{(*PROMPT_COLUMNS, 'data')}")
        data = lists[0]
    if not isinstance(data, list):
        raise ValueError(f"{where}: expected a JSON list of prompts")
    return [_prompt_of(r, column, where) for r in data]


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))


def _csv_prompts(path: Path, column: str, where: str) -> list[str]:
    rows = _csv_rows(path)
    if not rows:
        return []
    fields = {k.lower(): k for k in rows[0] if k is not None}
    key = (fields.get(column.lower()) if column else next((fields[c] for c in PROMPT_COLUMNS if c in fields), None))
    if key is None:
        if column:
            raise ValueError(f"{where}: no column {column!r} (columns: {list(rows[0])})")
        key = next(iter(rows[0]))  # no named prompt column: the first one
    return [row[key] for row in rows]


def read_prompt_file(path: Path, column: str = "", field_name: str = "sd.prompts.source") -> list[str]:
    """The prompts of one ``.txt`` / ``.json`` / ``.jsonl`` / ``.csv`` / ``.tsv`` file (stripped, blanks dropped)."""
    where = f"{field_name}: {path}"
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            prompts = _json_prompts(json.loads(path.read_text(encoding="utf-8")), column, where)
        elif suffix == ".jsonl":
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            prompts = [_prompt_of(json.loads(line), column, where) for line in lines]
        elif suffix in (".csv", ".tsv"):
            prompts = _csv_prompts(path, column, where)
        else:
            prompts = path.read_text(encoding="utf-8").splitlines()
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{where}: not a valid {suffix or 'text'} prompt file ({err})") from err
    return [p.strip() for p in prompts if p and p.strip()]


def _dataset_prompts(path: Path, column: str, where: str) -> list[str]:
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError as err:
        raise ValueError(f"{where} is a Hugging Face datasets directory: pip install datasets "
                         "(or 'fastnabla[data]')") from err
    data = load_from_disk(str(path))
    if isinstance(data, DatasetDict):
        data = data["train"] if "train" in data else next(iter(data.values()))
    names = {c.lower(): c for c in data.column_names}
    key = names.get(column.lower()) if column else next((names[c] for c in PROMPT_COLUMNS if c in names), None)
    if key is None:
        raise ValueError(f"{where}: no prompt column {column or PROMPT_COLUMNS} (columns: {data.column_names}); set "
                         "sd.prompts.column")
    return [p.strip() for p in data[key] if isinstance(p, str) and p.strip()]


def _directory_prompts(path: Path, column: str, field_name: str) -> list[str]:
    where = f"{field_name}: {path}"
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        return _dataset_prompts(path, column, where)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in PROMPT_FILE_SUFFIXES)
    if not files:
        raise ValueError(f"{where}: the directory holds no prompt file ({', '.join(PROMPT_FILE_SUFFIXES)}) and is "
                         "not a Hugging Face datasets directory")
    return [p for file in files for p in read_prompt_file(file, column, field_name)]


def _find(root: Path, names: tuple[str, ...], parts: int) -> Path | None:
    """``root`` itself when it is a file and the set has one file, else the first of ``names`` in folder ``root``."""
    if root.is_file():
        return root if parts == 1 or root.name in names else None
    return next((root / n for n in names if (root / n).is_file()), None)


def published_prompts(name: str, path: str, held_out: bool = False) -> list[str]:
    """The training prompts (or, ``held_out``, the evaluation prompts) of a :data:`PUBLISHED_PROMPT_SETS` entry
    read from ``path``, split as the authors' release splits them: the first ``held_out_per_group`` prompts of each
    file (DrawBench: of each category, after dropping the misspelling and rare-word categories) are held out."""
    spec = PUBLISHED_PROMPT_SETS[name]
    if not path:
        raise ValueError(f"sd.prompts.source={name!r} is read from your files: set sd.prompts.path to {spec.where}")
    root = Path(path).expanduser()
    if not root.exists():
        raise ValueError(f"sd.prompts.path={path!r} does not exist; sd.prompts.source={name!r} needs {spec.where}")
    groups: list[list[str]] = []
    for names in spec.files:
        file = _find(root, names, len(spec.files))
        if file is None:
            raise ValueError(f"sd.prompts.path={path!r} holds no {' or '.join(repr(n) for n in names)}; "
                             f"sd.prompts.source={name!r} needs {spec.where}")
        if file.suffix.lower() == ".csv":  # DrawBench: split per category
            by_category: dict[str, list[str]] = {}
            for row in _csv_rows(file):
                if row.get("Category") not in spec.drop_categories:
                    by_category.setdefault(row.get("Category", ""), []).append(row.get("Prompts", "").strip())
            groups += [[p for p in ps if p] for ps in by_category.values()]
        else:
            groups.append(read_prompt_file(file, "", "sd.prompts.path"))
    n = spec.held_out_per_group
    return [p for g in groups for p in (g[:n] if held_out else g[n:])]


def load_prompts(source: str, field_name: str = "sd.prompts.source", path: str = "", column: str = "") -> list[str]:
    """The prompts of ``source`` (module docstring); errors name ``field_name`` and the file.

    Raises:
        ValueError: a missing or empty file or directory, or a named set without its files.
    """
    if source in BUILTIN_PROMPT_SETS:
        return list(BUILTIN_PROMPT_SETS[source])
    if source in PUBLISHED_PROMPT_SETS:
        prompts = published_prompts(source, path)
    else:
        location = Path(source).expanduser()
        if location.is_dir():
            prompts = _directory_prompts(location, column, field_name)
        elif location.is_file():
            prompts = read_prompt_file(location, column, field_name)
        else:
            raise ValueError(
                f"{field_name}={source!r} is neither a built-in prompt set {tuple(BUILTIN_PROMPT_SETS)}, a published "
                f"set {tuple(PUBLISHED_PROMPT_SETS)} (with sd.prompts.path), nor an existing prompt file or directory"
            )
    if not prompts:
        raise ValueError(f"{field_name}: {source!r} holds no prompt")
    return prompts


def held_out_prompts(cfg) -> list[str] | None:
    """All held-out evaluation prompts of ``sd.prompts``: ``eval_source``'s, else a published set's held-out ones;
    ``None`` when the config names none (evaluation then uses training prompts)."""
    if cfg.eval_source:
        return load_prompts(cfg.eval_source, "sd.prompts.eval_source", path=cfg.path, column=cfg.column)
    if cfg.source in PUBLISHED_PROMPT_SETS:
        return published_prompts(cfg.source, cfg.path, held_out=True)
    return None


def load_task_prompts(cfg) -> tuple[list[str], list[str]]:
    """The training prompts of ``sd.prompts`` (a :class:`~fastnabla.tasks.sd.config.PromptConfig`) and the image
    grids' evaluation prompts: ``eval_prompts`` if given, else the first 4 held-out prompts (:func:`held_out_prompts`),
    else the first 4 training prompts."""
    prompts = load_prompts(cfg.source, path=cfg.path, column=cfg.column)
    if cfg.eval_prompts:
        return prompts, list(cfg.eval_prompts)
    held_out = held_out_prompts(cfg)
    return prompts, (held_out if held_out is not None else prompts)[:4]


def draw_prompts(prompts: list[str], n: int, generator: torch.Generator | None = None) -> list[str]:
    """``n`` prompts drawn uniformly with replacement, reproducibly from ``generator`` (a CPU generator)."""
    if not prompts:
        raise ValueError("cannot draw from an empty prompt set")
    idx = torch.randint(len(prompts), (n,), generator=generator)
    return [prompts[i] for i in idx.tolist()]
