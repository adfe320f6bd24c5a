from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from vistrain.eval.coco import COCO_DET_KEYS, COCODetectEvaluator

pycoco = pytest.importorskip("pycocotools.coco")
pycocoeval = pytest.importorskip("pycocotools.cocoeval")

CATEGORY_IDS = [1, 3, 7]  # non-contiguous on purpose
NUM_IMAGES = 14


def _make_gt(seed: int = 0) -> dict[str, Any]:
    """Images of 640x480 with small, medium and large boxes, some crowd, two without GT."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    ann_id = 1
    for index in range(NUM_IMAGES):
        image_id = 10 + 3 * index  # non-contiguous image ids
        images.append({"id": image_id, "width": 640, "height": 480, "file_name": f"{index}.jpg"})
        if index in (4, 9):
            continue  # images without any ground truth
        for size in (12.0, 60.0, 150.0, float(rng.uniform(8, 200))):  # small, medium, large, any
            w, h = size * rng.uniform(0.7, 1.3), size * rng.uniform(0.7, 1.3)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": int(rng.choice(CATEGORY_IDS)),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": int(ann_id % 11 == 0),
                }
            )
            ann_id += 1
    categories = [{"id": c, "name": f"class_{c}"} for c in CATEGORY_IDS]
    return {"images": images, "annotations": annotations, "categories": categories}


def _predictions(gt: dict[str, Any], seed: int = 1) -> list[tuple[int, torch.Tensor, ...]]:
    """Per image: jittered GT boxes (mostly right class) plus clutter; some images empty."""
    rng = np.random.default_rng(seed)
    per_image: dict[int, list[Any]] = {img["id"]: [] for img in gt["images"]}
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        for _ in range(2):
            jitter = rng.normal(0, 0.1, 4) * [w, h, w, h]
            box = [x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]]
            cls = CATEGORY_IDS.index(ann["category_id"])
            if rng.random() < 0.15:
                cls = int(rng.integers(len(CATEGORY_IDS)))
            per_image[ann["image_id"]].append((box, float(rng.uniform(0.3, 1.0)), cls))
    out = []
    for index, (image_id, dets) in enumerate(per_image.items()):
        if index in (2, 7):  # images without detections (one has GT, so it is missed)
            dets = []
        for _ in range(int(rng.integers(0, 6))):
            x, y = rng.uniform(0, 500, 2)
            w, h = rng.uniform(5, 140, 2)
            dets.append(([x, y, x + w, y + h], float(rng.uniform(0, 0.6)), int(rng.integers(3))))
        boxes = torch.tensor([d[0] for d in dets], dtype=torch.float32).reshape(-1, 4)
        scores = torch.tensor([d[1] for d in dets], dtype=torch.float32)
        classes = torch.tensor([d[2] for d in dets], dtype=torch.int64)
        out.append((image_id, boxes, scores, classes))
    return out


@pytest.fixture()
def gt_file(tmp_path: Path) -> str:
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(_make_gt()))
    return str(path)


def _pycocotools_stats(gt_file: str, results: list[dict[str, Any]]) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = pycoco.COCO(gt_file)
        if results:
            dt = gt.loadRes(copy.deepcopy(results))
        else:  # pycocotools' loadRes cannot take an empty list; build the empty result set
            dt = pycoco.COCO()
            dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"]}
            dt.dataset["annotations"] = []
            dt.createIndex()
        coco_eval = pycocoeval.COCOeval(gt, dt, "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return np.asarray(coco_eval.stats, dtype=np.float64)


def _run(evaluator: COCODetectEvaluator, preds: list[Any], batch_size: int = 3) -> None:
    for start in range(0, len(preds), batch_size):
        chunk = preds[start : start + batch_size]
        evaluator.process_batch(
            [p[0] for p in chunk],
            [p[1] for p in chunk],
            [p[2] for p in chunk],
            [p[3] for p in chunk],
        )


def test_matches_pycocotools(gt_file: str) -> None:
    evaluator = COCODetectEvaluator(gt_file)
    assert evaluator.metrics == ["Det"]
    assert evaluator.category_ids == CATEGORY_IDS
    _run(evaluator, _predictions(_make_gt()))
    logs, report = evaluator.evaluate("Det")
    assert list(logs) == list(COCO_DET_KEYS)
    expected = _pycocotools_stats(gt_file, evaluator.results())
    np.testing.assert_allclose(np.asarray(list(logs.values())), expected, rtol=0, atol=1e-9)
    # The scenario is not degenerate: the numbers are neither 0 nor perfect.
    assert 0.2 < logs["AP"] < 0.95 and logs["APs"] > 0 and logs["APl"] > 0
    for name in ("class_1", "class_3", "class_7", "AP50", "ARl"):
        assert name in report


def test_results_are_xywh_with_category_ids(gt_file: str) -> None:
    evaluator = COCODetectEvaluator(gt_file)
    evaluator.process_batch(
        13, torch.tensor([[10.0, 20.0, 50.0, 100.0]]), torch.tensor([0.5]), torch.tensor([2])
    )
    assert evaluator.results() == [
        {"image_id": 13, "category_id": 7, "bbox": [10.0, 20.0, 40.0, 80.0], "score": 0.5}
    ]


def test_perfect_detections_score_one(gt_file: str) -> None:
    gt = _make_gt()
    evaluator = COCODetectEvaluator(gt_file)
    for img in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == img["id"]]
        xyxy = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        classes = [CATEGORY_IDS.index(a["category_id"]) for a in anns]
        evaluator.process_batch(
            [img["id"]],
            [torch.tensor(xyxy, dtype=torch.float64).reshape(-1, 4)],
            [torch.ones(len(anns))],
            [torch.tensor(classes, dtype=torch.int64)],
        )
    logs, _ = evaluator.evaluate("Det")
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
        assert logs[key] == pytest.approx(1.0), key


def test_no_detections_gives_coco_values(gt_file: str) -> None:
    evaluator = COCODetectEvaluator(gt_file)
    logs, _ = evaluator.evaluate("Det")  # nothing processed at all
    expected = _pycocotools_stats(gt_file, [])
    np.testing.assert_allclose(np.asarray(list(logs.values())), expected, rtol=0, atol=1e-9)
    assert logs["AP"] == 0.0 and logs["AR100"] == 0.0
    # Images processed with empty predictions give the same numbers.
    empty = torch.zeros((0, 4))
    evaluator.process_batch([10, 13], [empty, empty], [torch.zeros(0)] * 2, [torch.zeros(0)] * 2)
    assert evaluator.evaluate("Det")[0] == logs
    assert "0 detections" in evaluator.evaluate("Det")[1]


def test_single_image_form_and_duplicates(gt_file: str) -> None:
    preds = _predictions(_make_gt())
    batched = COCODetectEvaluator(gt_file)
    _run(batched, preds)
    single = COCODetectEvaluator(gt_file)
    for image_id, boxes, scores, classes in preds:
        single.process_batch(torch.tensor(image_id), boxes, scores, classes)
    # A repeated image (sampler padding) counts once: its first detections win.
    image_id, boxes, _, classes = preds[0]
    single.process_batch(image_id, boxes + 100.0, torch.rand(len(boxes)), classes)
    assert single.num_images_processed == NUM_IMAGES
    assert single.results() == batched.results()
    assert single.evaluate("Det")[0] == batched.evaluate("Det")[0]


def test_gather_merges_ranks_and_keeps_first_rank(gt_file: str) -> None:
    preds = _predictions(_make_gt())
    reference = COCODetectEvaluator(gt_file)
    _run(reference, preds)
    rank0, rank1 = COCODetectEvaluator(gt_file), COCODetectEvaluator(gt_file)
    _run(rank0, preds[0::2])
    _run(rank1, preds[1::2])
    image_id, boxes, scores, classes = preds[0]  # padded duplicate on rank 1, different boxes
    rank1.process_batch(image_id, boxes + 50.0, scores, classes)
    states = [rank0._dets, rank1._dets]
    for evaluator in (rank0, rank1):
        evaluator.gather(lambda _: states)
    assert rank0.results() == reference.results()
    assert rank0.evaluate("Det")[0] == reference.evaluate("Det")[0]
    rank1.reset()
    assert rank1.num_images_processed == 0


def test_save_writes_coco_results_without_overwriting(gt_file: str, tmp_path: Path) -> None:
    evaluator = COCODetectEvaluator(gt_file)
    _run(evaluator, _predictions(_make_gt()))
    out = tmp_path / "eval" / "Det"
    first = evaluator.save("Det", str(out), tag="epoch=0-step=10")
    second = evaluator.save("Det", str(out), tag="epoch=0-step=10")
    untagged = evaluator.save("Det", str(out))
    assert os.path.basename(first) == "detections_epoch=0-step=10.json"
    assert len({first, second, untagged}) == 3
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in (first, second, untagged))
    with open(first) as handle:
        saved = json.load(handle)
    assert saved == evaluator.results()
    # The file is a valid COCO results file: pycocotools scores it like the evaluator.
    np.testing.assert_allclose(
        _pycocotools_stats(gt_file, saved),
        np.asarray(list(evaluator.evaluate("Det")[0].values())),
        rtol=0,
        atol=1e-9,
    )
    with pytest.raises(ValueError, match="separator"):
        evaluator.save("Det", str(out), tag="a/b")


def test_bad_annotation_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        COCODetectEvaluator(str(missing))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json"):
        COCODetectEvaluator(str(bad_json))
    for key in ("images", "annotations", "categories"):
        gt = _make_gt()
        del gt[key]
        path = tmp_path / f"no_{key}.json"
        path.write_text(json.dumps(gt))
        with pytest.raises(ValueError, match=f"no_{key}.json.*'{key}'"):
            COCODetectEvaluator(str(path))
    gt = _make_gt()
    del gt["annotations"][0]["area"]
    path = tmp_path / "no_area.json"
    path.write_text(json.dumps(gt))
    with pytest.raises(ValueError, match=r"no_area\.json"):
        COCODetectEvaluator(str(path))


def test_bad_predictions_are_clear_errors(gt_file: str) -> None:
    evaluator = COCODetectEvaluator(gt_file)
    box, score = torch.tensor([[0.0, 0.0, 5.0, 5.0]]), torch.tensor([0.9])
    with pytest.raises(ValueError, match=r"Image ids \[11\] are not in"):
        evaluator.process_batch(11, box, score, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\[3\].*\[1, 3, 7\]"):
        evaluator.process_batch(10, box, score, torch.tensor([3]))
    with pytest.raises(ValueError, match="expected boxes"):
        evaluator.process_batch(10, box[0], score, torch.tensor([0]))
    with pytest.raises(ValueError, match="2 image ids"):
        evaluator.process_batch([10, 13], [box], [score], [torch.tensor([0])])
    with pytest.raises(TypeError, match="integers"):
        evaluator.process_batch(["10"], [box], [score], [torch.tensor([0])])
    with pytest.raises(ValueError, match="Unknown metric"):
        evaluator.evaluate("Seg")
    assert evaluator.num_images_processed == 0
