"""Scalar writers behind the scalar logger: perf scalars, CSV, W&B (offline) and MLflow."""

from __future__ import annotations

import csv
import glob
import json
import os
import resource
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from trainer_fixtures import ToyDataset, read_metrics, run_toy, toy_connectors, toy_loss_module
from vistrain.engine.callbacks import CheckpointCallback, LoggingCallback
from vistrain.engine.scalar_log import ScalarLogger
from vistrain.engine.trainer import Trainer


class WithImages(Dataset[dict[str, Any]]):
    """The toy samples plus an ``images`` entry, so the logger counts images."""

    def __init__(self) -> None:
        self.base = ToyDataset(24)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return {**self.base[idx], "images": torch.zeros(3, 2, 2)}


def test_perf_scalars_on_log_steps(tmp_path) -> None:
    train_conn, test_conn = toy_connectors()
    model = torch.nn.Linear(8, 2)
    model.forward = lambda x: {"pred": torch.nn.Linear.forward(model, x)}  # type: ignore[method-assign]
    trainer = Trainer(
        "cpu", str(tmp_path), DataLoader(WithImages(), batch_size=4), None, train_conn,
        test_conn, [LoggingCallback(refresh_rate=3)], num_epochs=1, tensorboard=False,
    )  # fmt: skip
    trainer.fit(model, torch.optim.SGD(model.parameters(), lr=0.1), None, toy_loss_module())
    records = read_metrics(str(tmp_path))
    perf = {(r["tag"], r["step"]): r["value"] for r in records if r["tag"].startswith("perf/")}
    # Written where the console prints its line (every 3 batches), not on other steps.
    assert {step for _, step in perf} == {3, 6}
    for step in (3, 6):
        step_time = perf[("perf/step_time", step)]
        assert step_time > 0 and perf[("perf/data_time", step)] >= 0
        # Same window: images per second times seconds per step is the batch size.
        assert perf[("perf/img_per_s", step)] * step_time == pytest.approx(4.0)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        assert 0 < perf[("perf/max_memory_mb", step)] <= peak_mb
    assert not any(r["tag"].startswith("train/perf") for r in records)


def test_csv_holds_what_jsonl_holds_and_is_purged_on_resume(tmp_path) -> None:
    first = ScalarLogger(str(tmp_path), loggers=["jsonl", "csv"])
    for step in (1, 2, 3):
        first.log({"train/loss": 1.0 / step, "lr": 0.1}, step, 0)
    first.close()
    resumed = ScalarLogger(str(tmp_path), loggers="jsonl,csv", purge_after_step=2)
    resumed.log({"train/loss": 9.0}, 3, 0)
    resumed.close()
    with open(tmp_path / "metrics.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    from_csv = [(r["tag"], int(r["step"]), float(r["value"])) for r in rows]
    from_jsonl = [(r["tag"], r["step"], r["value"]) for r in read_metrics(str(tmp_path))]
    assert from_csv == from_jsonl
    assert ("train/loss", 3, 9.0) in from_csv and ("train/loss", 3, 1.0 / 3) not in from_csv


def test_unknown_logger_names_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"'neptune'.*jsonl, tb, csv, wandb, mlflow"):
        Trainer("cpu", str(tmp_path), None, None, None, None, [], loggers="tb,neptune")


def _pairs_match(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    """Same steps, same values (to float32 precision) as ``metrics.jsonl``."""
    expected = sorted(expected)
    return [step for step, _ in got] == [step for step, _ in expected] and [
        value for _, value in got
    ] == pytest.approx([value for _, value in expected], rel=1e-6)


def _fit(out: str, loggers: str, num_epochs: int, ckpt_path: str | None = None) -> None:
    callbacks = [LoggingCallback(refresh_rate=2), CheckpointCallback(save_prefix=out)]
    run_toy("native", out, callbacks, num_epochs=num_epochs, loggers=loggers,
            log_every_n_steps=2, ckpt_path=ckpt_path)  # fmt: skip


def test_mlflow_run_gets_the_scalars_and_a_resume_continues_it(tmp_path, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default: <run>/mlruns
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = str(tmp_path)
    _fit(out, "jsonl,mlflow", num_epochs=1)
    _fit(out, "jsonl,mlflow", num_epochs=2, ckpt_path=os.path.join(out, "checkpoints", "last.ckpt"))
    client = MlflowClient(tracking_uri="file:" + os.path.join(out, "mlruns"))
    experiment = client.get_experiment_by_name("vistrain")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the resumed segment logged into the same run
    history = client.get_metric_history(runs[0].info.run_id, "train/mse")
    expected = [(r["step"], r["value"]) for r in read_metrics(out) if r["tag"] == "train/mse"]
    assert _pairs_match(sorted((m.step, m.value) for m in history), expected)
    assert {step for step, _ in expected} == {2, 4, 6, 8, 10, 12}


def _wandb_records(path: str) -> list[Any]:
    """The protobuf records of an offline ``.wandb`` file (a LevelDB-style record log)."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as handle:
        data = handle.read()
    block, pos, pending, records = 32768, 7, b"", []  # 7: the file's own header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_offline_run_gets_the_scalars_and_a_resume_continues_it(
    tmp_path, monkeypatch
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = str(tmp_path)
    _fit(out, "jsonl,wandb", num_epochs=1)
    _fit(out, "jsonl,wandb", num_epochs=2, ckpt_path=os.path.join(out, "checkpoints", "last.ckpt"))
    with open(os.path.join(out, "trackers.json"), encoding="utf-8") as handle:
        run_id = json.load(handle)["wandb"]
    files = sorted(glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb")))
    assert len(files) == 2 and all(path.endswith(f"run-{run_id}.wandb") for path in files)
    logged = []
    for path in files:
        for record in _wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                items = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
                if "train/mse" in items:
                    logged.append((items["_step"], items["train/mse"]))
    expected = [(r["step"], r["value"]) for r in read_metrics(out) if r["tag"] == "train/mse"]
    assert _pairs_match(sorted(logged), expected)
    assert len(expected) == 6
