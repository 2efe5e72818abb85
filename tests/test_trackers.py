"""Trackers (``output.report_to: [tensorboard, wandb]``): W&B in offline mode (no network) and TensorBoard both get
every iteration's numbers of ``metrics.jsonl`` and the evaluation images with prompt + ``log R`` captions (read back
from W&B's own run file and TensorBoard's event file); older ``output.tensorboard`` configs load; a missing wandb is
a clear error before anything is written."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from fastnabla import train
from fastnabla.config.loader import build_config
from fastnabla.run.config import RunConfig
from fastnabla.run.presets import get_preset
from fastnabla.training import trackers
from fastnabla.training.trackers import LoggedImages, Trackers, flatten_scalars

pytest.importorskip("wandb")
FAST = ["--preset", "tiny-sd", "sd.num_steps=4", "train.iterations=2", "train.batch_size=4",
        "train.sample_batch_size=2", "train.micro_batch_size=2", "train.fl_batch_size=4",
        "train.transition_fraction=0.5", "sd.prompts.eval_seeds=[0]", "sd.prompts.eval_prompts=['a photo of a cat']",
        "output.progress=false", "output.figure=false", "output.export_lora=false", "optim.lr_policy=0.05"]


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing written outside tmp_path
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))


def wandb_records(run_dir: Path) -> list:
    """The protobuf records of W&B's run file ``run-<id>.wandb``: W&B's LevelDB-log layout (a 7-byte file header,
    32 KiB blocks of records with a 7-byte header: crc32c, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def wandb_history(run_dir: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for record in wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            rows.setdefault(int(items["_step"]), {}).update(items)
    return rows


def test_wandb_offline_and_tensorboard_get_the_numbers_and_captioned_images(tmp_path, wandb_offline):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert train.main([*FAST, "--report-to", "tensorboard,wandb", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    caption = "a photo of a cat (seed 0): log R = {:.4f}"
    # W&B: its own run file, read back
    history = wandb_history(out)
    assert sorted(history) == [1, 2]
    for r in records:
        for key, value in flatten_scalars(r).items():
            assert history[r["iteration"]][key] == pytest.approx(value), key
    assert history[1]["samples_pretrained/captions"] == [caption.format(metrics["eval_log_reward_pretrained"])]
    assert history[2]["samples/captions"] == [caption.format(metrics["eval_log_reward"])]
    (image,) = history[2]["samples/filenames"]
    assert (next(out.glob("wandb/offline-run-*")) / "files" / image).is_file()
    run_id = (out / "wandb_run_id").read_text().strip()
    assert [r.run.run_id for r in wandb_records(out) if r.WhichOneof("record_type") == "run"] == [run_id]
    # TensorBoard: the event file
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0, "images": 0}).Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward_mean")] == [
        (r["iteration"], pytest.approx(r["reward_mean"])) for r in records]
    assert {"samples", "samples_pretrained"} <= set(events.Tags()["images"])
    (text,) = events.Tensors("samples/captions/text_summary")
    assert caption.format(metrics["eval_log_reward"]) in text.tensor_proto.string_val[0].decode()


def test_resume_continues_the_same_wandb_run(tmp_path, wandb_offline):
    first = Trackers(["wandb"], tmp_path, "n", config={"a": 1})
    run_id = first.trackers[0].run.id
    first.close()
    again = Trackers(["wandb"], tmp_path, "n", config={"a": 1}, resume=True)
    assert again.trackers[0].run.id == run_id == (tmp_path / trackers.WANDB_ID_FILE).read_text().strip()
    again.close()


@pytest.mark.parametrize(("overrides", "expected"), [
    pytest.param([], ["tensorboard"], id="default"),
    pytest.param(["output.tensorboard=false"], [], id="older-spelling-off"),
    pytest.param(["output.report_to=[wandb]", "output.tensorboard=false"], ["wandb"], id="older-spelling-with-wandb"),
    pytest.param(["output.report_to=[wandb, tensorboard, wandb]"], ["wandb", "tensorboard"], id="deduplicated"),
])
def test_report_to_and_the_older_tensorboard_switch(overrides, expected):
    assert build_config(RunConfig, get_preset("tiny-sd"), None, overrides).output.report_to == expected


def test_unknown_tracker_is_refused():
    with pytest.raises(ValueError, match=r"output.report_to: \['mlflow'\] not among"):
        build_config(RunConfig, get_preset("tiny-sd"), None, ["output.report_to=[mlflow]"])


def test_missing_wandb_is_a_clear_error_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trackers, "wandb_available", lambda: False)
    out = tmp_path / "run"
    assert train.main([*FAST, "--report-to", "wandb", "--out", str(out)]) == 2
    assert 'pip install "fastnabla[wandb]"' in capsys.readouterr().err
    assert not out.exists()


def test_logged_images_need_one_caption_each():
    with pytest.raises(ValueError, match="1 captions for 2 images"):
        LoggedImages("x", torch.zeros(2, 3, 4, 4), ["only one"])
    assert LoggedImages("x", torch.ones(3, 4, 4)).uint8_hwc().shape == (1, 4, 4, 3)
