"""Prompt sets: every file format and a datasets directory against prompts written by hand, the published sets split
as the authors' release splits them, and errors that name the field and say where to get missing files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from fastnabla.tasks.sd.config import PromptConfig
from fastnabla.tasks.sd.prompts import ANIMALS, load_prompts, load_task_prompts

PROMPTS = ["a red fox", "a blue whale, at night", "an owl \"on\" a branch"]


def _write_csv(path: Path, header: list[str], rows: list[list[str]], delimiter: str = ",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


FILES = [
    pytest.param(lambda d: (d / "p.txt").write_text("\n".join(["", *PROMPTS, "  "]) + "\n") and d / "p.txt", "",
                 id="txt"),
    pytest.param(lambda d: (d / "p.json").write_text(json.dumps(PROMPTS)) and d / "p.json", "", id="json-list"),
    pytest.param(lambda d: (d / "p.json").write_text(json.dumps([{"Caption": p, "id": i} for i, p in
                                                                  enumerate(PROMPTS)])) and d / "p.json", "",
                 id="json-records"),
    pytest.param(lambda d: (d / "p.json").write_text(json.dumps({"prompts": PROMPTS, "n": 3})) and d / "p.json", "",
                 id="json-mapping"),
    pytest.param(lambda d: (d / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS)) and
                 d / "p.jsonl", "", id="jsonl-strings"),
    pytest.param(lambda d: (d / "p.jsonl").write_text("".join(json.dumps({"text": p, "x": 1}) + "\n\n" for p in
                                                              PROMPTS)) and d / "p.jsonl", "", id="jsonl-records"),
    pytest.param(lambda d: _write_csv(d / "p.csv", ["id", "Prompt"], [[str(i), p] for i, p in enumerate(PROMPTS)]),
                 "", id="csv-prompt-column"),
    pytest.param(lambda d: _write_csv(d / "p.csv", ["id", "wording"], [[str(i), p] for i, p in enumerate(PROMPTS)]),
                 "wording", id="csv-named-column"),
    pytest.param(lambda d: _write_csv(d / "p.tsv", ["wording"], [[p] for p in PROMPTS], "\t"), "", id="tsv-first"),
]


@pytest.mark.parametrize("make, column", FILES)
def test_prompt_files(make, column, tmp_path):
    assert load_prompts(str(make(tmp_path)), column=column) == PROMPTS


def test_a_directory_of_prompt_files_in_name_order(tmp_path):
    (tmp_path / "b.txt").write_text(PROMPTS[2] + "\n")
    (tmp_path / "a.json").write_text(json.dumps(PROMPTS[:2]))
    (tmp_path / "notes.md").write_text("not prompts\n")
    assert load_prompts(str(tmp_path)) == PROMPTS


def test_a_hugging_face_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({
        "test": datasets.Dataset.from_dict({"caption": ["held out"]}),
        "train": datasets.Dataset.from_dict({"caption": PROMPTS, "score": [1, 2, 3]}),
    }).save_to_disk(str(tmp_path / "ds"))
    assert load_prompts(str(tmp_path / "ds")) == PROMPTS  # the train split
    datasets.Dataset.from_dict({"words": PROMPTS}).save_to_disk(str(tmp_path / "single"))
    assert load_prompts(str(tmp_path / "single"), column="words") == PROMPTS
    with pytest.raises(ValueError, match="no prompt column"):
        load_prompts(str(tmp_path / "single"))


def _hpdv2(folder: Path, n: int = 15) -> Path:
    folder.mkdir()
    for style in ("photo", "paintings", "anime"):
        (folder / f"{style}.json").write_text(json.dumps([f"{style} {i}" for i in range(n)]))
    return folder


def test_hpdv2_photo_painting_is_the_release_split(tmp_path):
    folder = _hpdv2(tmp_path / "benchmark")
    cfg = PromptConfig(source="hpdv2-photo+painting", path=str(folder))
    train, evaluation = load_task_prompts(cfg)
    assert train == [f"photo {i}" for i in range(10, 15)] + [f"paintings {i}" for i in range(10, 15)]
    assert evaluation == ["photo 0", "photo 1", "photo 2", "photo 3"]  # from the 10 + 10 held out, never trained on


def test_drawbench_drops_two_categories_and_holds_out_two_per_category(tmp_path):
    rows = [[f"{c} {i}", c] for c in ("Colors", "Misspellings", "Counting", "Rare Words") for i in range(4)]
    csv_file = _write_csv(tmp_path / "DrawBench Prompts.csv", ["Prompts", "Category"], rows)
    for path in (csv_file, tmp_path):  # the file itself, or its folder
        train, evaluation = load_task_prompts(PromptConfig(source="drawbench", path=str(path)))
        assert train == ["Colors 2", "Colors 3", "Counting 2", "Counting 3"]
        assert evaluation == ["Colors 0", "Colors 1", "Counting 0", "Counting 1"]


ERRORS = [
    pytest.param(lambda d: PromptConfig(source="hpdv2-photo+painting"), r"sd\.prompts\.path .*zhwang/HPDv2",
                 id="published-without-path"),
    pytest.param(lambda d: PromptConfig(source="hpdv2-photo+painting", path=str(d / "nope")),
                 r"sd\.prompts\.path=.*does not exist.*zhwang/HPDv2", id="published-path-missing"),
    pytest.param(lambda d: PromptConfig(source="drawbench", path=str(d)), r"holds no 'DrawBench Prompts\.csv'",
                 id="published-file-missing"),
    pytest.param(lambda d: PromptConfig(source=str(d / "nope.txt")), r"sd\.prompts\.source=.*nope\.txt",
                 id="missing-file"),
    pytest.param(lambda d: (d / "e.txt").write_text("\n \n") and PromptConfig(source=str(d / "e.txt")),
                 "holds no prompt", id="empty"),
    pytest.param(lambda d: (d / "b.json").write_text("[1, 2") and PromptConfig(source=str(d / "b.json")),
                 "not a valid .json prompt file", id="bad-json"),
    pytest.param(lambda d: (d / "r.json").write_text(json.dumps([{"id": 1}])) and PromptConfig(
        source=str(d / "r.json")), r"no prompt field .*sd\.prompts\.column", id="record-without-prompt"),
    pytest.param(lambda d: _write_csv(d / "c.csv", ["a"], [["x"]]) and PromptConfig(source=str(d / "c.csv"),
                                                                                   column="b"),
                 r"no column 'b'", id="csv-unknown-column"),
    pytest.param(lambda d: (d / "notes.md").write_text("x") and PromptConfig(source=str(d)), "holds no prompt file",
                 id="directory-without-prompts"),
]


@pytest.mark.parametrize("make_cfg, message", ERRORS)
def test_errors_name_the_field_and_where_to_get_files(make_cfg, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        load_task_prompts(make_cfg(tmp_path))


def test_builtin_animals_and_eval_defaults():
    train, evaluation = load_task_prompts(PromptConfig())
    assert train == list(ANIMALS) and evaluation == list(ANIMALS[:4])
    train, evaluation = load_task_prompts(PromptConfig(eval_prompts=["a cat"]))
    assert evaluation == ["a cat"]


def test_sd15_hpsv2_preset_never_trains_on_other_prompts(tmp_path, capsys):
    """Without sd.prompts.path the run stops before loading anything, saying where to get the prompts."""
    from fastnabla import train

    model = tmp_path / "sd15"  # a model that exists is checked first: make the prompts the first missing thing
    from fastnabla.tasks.sd.tiny import save_tiny_pipeline

    save_tiny_pipeline(model)
    assert train.main(["--preset", "sd15-hpsv2", "--model", str(model), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "sd.prompts.source='hpdv2-photo+painting'" in err and "zhwang/HPDv2" in err
    assert not (tmp_path / "o").exists()


def test_held_out_eval_source_is_used_for_evaluation(tmp_path):
    (tmp_path / "eval.txt").write_text("held 1\nheld 2\n")
    train, evaluation = load_task_prompts(PromptConfig(eval_source=str(tmp_path / "eval.txt")))
    assert train == list(ANIMALS) and evaluation == ["held 1", "held 2"]
    with pytest.raises(ValueError, match=r"sd\.prompts\.eval_source"):
        load_task_prompts(PromptConfig(eval_source=str(tmp_path / "missing.txt")))


@pytest.mark.parametrize("chunk, world", [(None, 1), (1, 1), (3, 1), (None, 2)], ids=["whole", "chunk1", "chunk3",
                                                                                      "two-ranks"])
def test_k_samples_per_prompt_whatever_the_chunking(chunk, world):
    from test_sd_common import build_tiny_task

    from fastnabla.training.trajectories import sample_keyed

    task = build_tiny_task()
    parts = [sample_keyed(task, seed=3, iteration=2, global_batch=6, chunk_size=chunk, rank=r, world_size=world,
                          condition_repeats=3) for r in range(world)]
    prompts = [p for part in parts for p in part.cond["prompts"]]
    assert prompts[:3] == [prompts[0]] * 3 and prompts[3:] == [prompts[3]] * 3
    whole = sample_keyed(task, seed=3, iteration=2, global_batch=6, condition_repeats=3)
    assert prompts == whole.cond["prompts"]
    # batch-size-dependent CPU kernels: equal up to float summation order
    torch.testing.assert_close(torch.cat([p.states for p in parts]), whole.states, rtol=1e-5, atol=1e-4)
    assert not torch.equal(whole.states[0, 0], whole.states[1, 0])  # the same prompt, its own noise


def test_repeats_must_divide_the_batch():
    from fastnabla.config.loader import ConfigError, build_config
    from fastnabla.run.config import RunConfig
    from fastnabla.run.presets import get_preset

    with pytest.raises(ConfigError, match=r"train\.batch_size=8 must be a multiple of sd\.prompts\.repeats=3"):
        build_config(RunConfig, get_preset("tiny-sd"), None, ["sd.prompts.repeats=3"])
