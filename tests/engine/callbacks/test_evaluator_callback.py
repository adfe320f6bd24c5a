from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from dist_utils import run_distributed
from vistrain.engine.callbacks.evaluator import EvaluatorCallback
from vistrain.engine.callbacks.trainer_state import TrainerState
from vistrain.engine.connectors import CallbackConnector, DataConnector, data_key, pred_key
from vistrain.engine.trainer import Trainer
from vistrain.eval.base import Evaluator, MetricResult
from vistrain.eval.classification import ClassificationEvaluator
from vistrain.eval.coco import COCODetectEvaluator

CATEGORY_IDS = [2, 5, 9]
NUM_IMAGES = 11  # odd: a 2-rank DistributedSampler pads by repeating the first image
CONNECTOR = CallbackConnector(
    {
        "coco_image_id": data_key("coco_image_id"),
        "pred_boxes": pred_key("boxes"),
        "pred_scores": pred_key("scores"),
        "pred_classes": pred_key("class_ids"),
    }
)


def _write_gt(folder: str) -> str:
    rng = np.random.default_rng(3)
    images, annotations = [], []
    for index in range(NUM_IMAGES):
        image_id = 100 + index
        images.append({"id": image_id, "width": 320, "height": 240})
        for size in (10.0, 50.0, 120.0):
            w, h = size * rng.uniform(0.8, 1.2, 2)
            x, y = rng.uniform(0, 320 - w), rng.uniform(0, 240 - h)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(rng.choice(CATEGORY_IDS)),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    path = os.path.join(folder, "gt.json")
    categories = [{"id": c, "name": f"c{c}"} for c in CATEGORY_IDS]
    with open(path, "w") as handle:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, handle)
    return path


def _fake_model(image_ids: list[int], gt_file: str, junk_for: int | None = None) -> dict[str, Any]:
    """Jittered ground truth per image (seeded by image id); junk boxes for ``junk_for``."""
    with open(gt_file) as handle:
        anns = json.load(handle)["annotations"]
    boxes, scores, classes = [], [], []
    for image_id in image_ids:
        rng = np.random.default_rng(image_id)
        own = [a for a in anns if a["image_id"] == image_id]
        xyxy = np.asarray([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in own)])
        xyxy = xyxy + rng.normal(0, 2.0, xyxy.shape)
        if image_id == junk_for:
            xyxy = xyxy[:, [2, 3, 2, 3]] + [0, 0, 30, 30]  # boxes beside every object
        cls = [CATEGORY_IDS.index(a["category_id"]) for a in own]
        boxes.append(torch.tensor(xyxy, dtype=torch.float32))
        scores.append(torch.tensor(rng.uniform(0.2, 1.0, len(own)), dtype=torch.float32))
        classes.append(torch.tensor(cls))
    return {"boxes": boxes, "scores": scores, "class_ids": classes}


def _collate(items: list[int]) -> dict[str, Any]:
    return {"coco_image_id": list(items)}


def _state(epoch: int = 2, step: int = 40) -> TrainerState:
    return TrainerState(
        current_epoch=epoch,
        num_epochs=5,
        global_step=step,
        num_steps=-1,
        train_dataloader=None,
        num_train_batches=None,
        test_dataloader=None,
        num_test_batches=None,
    )


class _FakeDetector(nn.Module):
    """A model whose detections are ``_fake_model``'s for the batch's image ids."""

    def __init__(self, gt_file: str, junk_for: int | None = None) -> None:
        super().__init__()
        self.gt_file, self.junk_for = gt_file, junk_for

    def forward(self, coco_image_id: list[int]) -> dict[str, Any]:
        return _fake_model(coco_image_id, self.gt_file, self.junk_for)


def _run_epoch(
    callback: EvaluatorCallback, loader: Any, gt_file: str, junk_for: int | None = None
) -> Any:
    """One test epoch of the real Trainer (``Trainer.test``) with the fake detector."""
    connector = DataConnector({"coco_image_id": "coco_image_id"})
    out = os.path.join(os.path.dirname(gt_file), "run")
    trainer = Trainer("cpu", out, None, loader, None, connector, [callback], tensorboard=False)
    return trainer.test(_FakeDetector(gt_file, junk_for))


class _FailingEvaluator(Evaluator):
    @property
    def metrics(self) -> list[str]:
        return ["Bad"]

    def reset(self) -> None:
        pass

    def process_batch(self, *args: Any, **kwargs: Any) -> None:
        pass

    def gather(self, gather_func: Any) -> None:
        gather_func(None)

    def evaluate(self, metric: str) -> MetricResult:
        raise ZeroDivisionError("no samples")


def _distributed_body(rank: int, world_size: int, gt_file: str, save_prefix: str) -> Any:
    torch.manual_seed(0)
    image_ids = list(range(100, 100 + NUM_IMAGES))
    sampler = DistributedSampler(image_ids, num_replicas=world_size, rank=rank, shuffle=False)
    loader = DataLoader(image_ids, batch_size=4, sampler=sampler, collate_fn=_collate)
    seen = [i for batch in loader for i in batch["coco_image_id"]]
    callback = EvaluatorCallback(
        evaluator=COCODetectEvaluator(gt_file),
        test_connector=CONNECTOR,
        save_predictions=True,
        save_prefix=save_prefix,
    )
    callback.setup()
    # The padded copy of the first image lands on rank 1 with different (junk) detections:
    # rank 0's detections of that image must be the ones that count.
    logs = _run_epoch(callback, loader, gt_file, junk_for=100 if rank == 1 else None)
    failing = EvaluatorCallback(evaluator=_FailingEvaluator())
    try:
        failing.on_test_epoch_end(_state(), nn.Identity())
        error = None
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
    return {"seen": seen, "logs": logs, "error": error}


def test_two_processes_match_one_process(tmp_path: Path) -> None:
    gt_file = _write_gt(str(tmp_path))
    reference = EvaluatorCallback(evaluator=COCODetectEvaluator(gt_file), test_connector=CONNECTOR)
    loader = DataLoader(list(range(100, 100 + NUM_IMAGES)), batch_size=3, collate_fn=_collate)
    expected = _run_epoch(reference, loader, gt_file)
    assert 0.3 < expected["Det/AP"] < 1.0

    save_prefix = str(tmp_path / "eval")
    results = run_distributed(_distributed_body, 2, gt_file, save_prefix)
    seen0, seen1 = results[0]["seen"], results[1]["seen"]
    assert len(seen0) == len(seen1) == 6 and set(seen0) & set(seen1) == {100}  # uneven + padded
    for result in results:
        assert result["logs"] == expected  # every rank returns rank 0's numbers
    assert results[0]["error"] == "ZeroDivisionError: no samples"
    assert results[1]["error"].startswith("RuntimeError: Evaluation failed on rank 0")
    assert os.listdir(os.path.join(save_prefix, "Det")) == ["detections_epoch=0-step=0.json"]


def test_single_process_epoch_logs_saves_and_resets(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gt_file = _write_gt(str(tmp_path))
    evaluator = COCODetectEvaluator(gt_file)
    callback = EvaluatorCallback(
        evaluator=evaluator,
        metrics_to_eval=["Det"],
        test_connector=CONNECTOR,
        save_predictions=True,
        save_prefix=str(tmp_path / "eval"),
    )
    loader = DataLoader(list(range(100, 100 + NUM_IMAGES)), batch_size=4, collate_fn=_collate)
    callback.setup()
    with caplog.at_level(logging.INFO, logger="vistrain"):
        logs = _run_epoch(callback, loader, gt_file)
    direct = COCODetectEvaluator(gt_file)
    for batch in loader:
        out = _fake_model(batch["coco_image_id"], gt_file)
        direct.process_batch(batch["coco_image_id"], out["boxes"], out["scores"], out["class_ids"])
    assert logs == {f"Det/{k}": v for k, v in direct.evaluate("Det")[0].items()}
    assert any("c5" in r.getMessage() and "AP50" in r.getMessage() for r in caplog.records)
    # The evaluator was reset: a second, empty epoch scores nothing and saves a new file.
    assert evaluator.num_images_processed == 0
    again = callback.on_test_epoch_end(_state(), nn.Identity())
    assert again["Det/AP"] == 0.0
    saved = sorted(os.listdir(tmp_path / "eval" / "Det"))
    assert saved == ["detections_epoch=0-step=0.json", "detections_epoch=2-step=40.json"]
    # the saved predictions are the detections in COCO's result format
    with open(tmp_path / "eval" / "Det" / saved[0], encoding="utf-8") as handle:
        predictions = json.load(handle)
    assert len(predictions) == sum(
        len(b) for b in _fake_model(list(range(100, 111)), gt_file)["boxes"]
    )
    assert all(set(p) == {"image_id", "category_id", "bbox", "score"} for p in predictions)
    assert {p["image_id"] for p in predictions} == set(range(100, 100 + NUM_IMAGES))
    assert {p["category_id"] for p in predictions} <= set(CATEGORY_IDS)
    assert callback.evaluate() == {f"Det/{k}": v for k, v in evaluator.evaluate("Det")[0].items()}


def test_classification_through_the_trainer(tmp_path: Path) -> None:
    """Seven classes, so top-5 is not trivially 1: the true class ranks 1st, 3rd, 6th and
    7th in the four samples, giving top-1 1/4 and top-5 2/4, as test/<k> logs."""
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5, 6],  # class 0 first
            [1.0, 2, 9, 3, 8, 5, 7],  # class 6 third
            [9.0, 8, 7, 6, 5, 1, 2],  # class 6 sixth
            [9.0, 8, 7, 6, 5, 4, 3],  # class 6 seventh
        ]
    )
    samples = [{"x": row, "labels": label} for row, label in zip(logits, [0, 6, 6, 6])]
    callback = EvaluatorCallback(
        evaluator=ClassificationEvaluator(7),
        test_connector=CallbackConnector(
            {"logits": pred_key("logits"), "labels": data_key("labels")}
        ),
    )
    trainer = Trainer(
        "cpu",
        str(tmp_path),
        None,
        DataLoader(samples, batch_size=3),  # type: ignore[arg-type]
        None,
        DataConnector({"x": "x"}),
        [callback],
        tensorboard=False,
    )
    logs = trainer.test(_Logits())
    assert logs == {"Cls/top1": 0.25, "Cls/top5": 0.5}
    with open(tmp_path / "metrics.jsonl", encoding="utf-8") as handle:
        written = {r["tag"]: r["value"] for r in map(json.loads, handle)}
    assert written == {"test/Cls/top1": 0.25, "test/Cls/top5": 0.5}


class _Logits(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": x}


def test_constructor_validation(tmp_path: Path) -> None:
    evaluator = COCODetectEvaluator(_write_gt(str(tmp_path)))
    with pytest.raises(ValueError, match=r"\['Seg'\].*\['Det'\]"):
        EvaluatorCallback(evaluator=evaluator, metrics_to_eval=["Det", "Seg"])
    with pytest.raises(TypeError, match="list of metric names"):
        EvaluatorCallback(evaluator=evaluator, metrics_to_eval="Det")
    with pytest.raises(ValueError, match="save_prefix"):
        EvaluatorCallback(evaluator=evaluator, save_predictions=True)
    with pytest.raises(ValueError, match="cannot save"):
        EvaluatorCallback(
            evaluator=ClassificationEvaluator(2), save_predictions=True, save_prefix="x"
        )
    with pytest.raises(TypeError, match="Evaluator"):
        EvaluatorCallback(evaluator=object())  # type: ignore[arg-type]
    callback = EvaluatorCallback(evaluator=evaluator)
    assert callback.metrics_to_eval == ["Det"]
    with pytest.raises(ValueError, match="test_connector"):
        callback.on_test_batch_end(_state(), nn.Identity(), {}, {}, 0)
