"""Benchmark: COCODetectEvaluator end to end against pycocotools and raw faster-coco-eval.

A seeded synthetic data set (500 images, 8 non-contiguous categories, crowd boxes, all
sizes) and 50,000 detections (100 per image: jittered ground truth plus clutter) are
evaluated three ways:

- ``vistrain``: ``COCODetectEvaluator.process_batch`` once per image (tensors, xyxy) and
  ``evaluate("Det")``: everything a test epoch costs beyond the model.
- ``faster-coco-eval``: ``COCO.loadRes`` on the detections in COCO results form, then
  ``COCOeval_faster`` evaluate/accumulate/summarize (the baseline of the goal).
- ``pycocotools``: the same with the official implementation.

Loading the annotation file is excluded from all three (it happens once per run, not per
evaluation). Runs are interleaved; each timing is the median of ``--repeats`` runs
(pycocotools: every other one). The script checks that the three produce identical
statistics and prints times and ratios. Goal: vistrain <= 1.2x raw faster-coco-eval.

Run: ``.venv/bin/python benchmarks/coco_eval.py [--images 500] [--dets-per-image 100]``
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import faster_coco_eval
import numpy as np
import torch

from vistrain.eval.coco import COCODetectEvaluator

CATEGORY_IDS = [1, 3, 7, 8, 15, 22, 40, 90]


def make_dataset(num_images: int, dets_per_image: int, seed: int) -> tuple[dict[str, Any], list]:
    """Ground truth and per-image detections (image id, xyxy, scores, class indices)."""
    rng = np.random.default_rng(seed)
    images, annotations, detections = [], [], []
    ann_id = 1
    for index in range(num_images):
        image_id = 2 * index + 5
        width, height = 640, 480
        images.append({"id": image_id, "width": width, "height": height})
        gt_xyxy, gt_cls = [], []
        for _ in range(int(rng.integers(0, 16))):
            size = float(np.exp(rng.uniform(np.log(6), np.log(300))))
            w, h = size * rng.uniform(0.6, 1.4), size * rng.uniform(0.6, 1.4)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            cls = int(rng.integers(len(CATEGORY_IDS)))
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": CATEGORY_IDS[cls],
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": int(rng.random() < 0.03),
                }
            )
            ann_id += 1
            gt_xyxy.append([x, y, x + w, y + h])
            gt_cls.append(cls)
        boxes = rng.uniform(0, 400, (dets_per_image, 2))
        boxes = np.concatenate([boxes, boxes + rng.uniform(4, 240, (dets_per_image, 2))], 1)
        classes = rng.integers(len(CATEGORY_IDS), size=dets_per_image)
        num_hits = min(len(gt_xyxy) * 2, dets_per_image)
        if num_hits:
            source = rng.integers(len(gt_xyxy), size=num_hits)
            base = np.asarray(gt_xyxy)[source]
            scale = (base[:, 2:] - base[:, :2]).repeat(2, 1)
            boxes[:num_hits] = base + rng.normal(0, 0.08, (num_hits, 4)) * scale
            classes[:num_hits] = np.where(
                rng.random(num_hits) < 0.9, np.asarray(gt_cls)[source], classes[:num_hits]
            )
        scores = 0.6 * rng.random(dets_per_image)
        scores[:num_hits] = 0.4 + 0.6 * rng.random(num_hits)
        detections.append(
            (
                image_id,
                torch.tensor(boxes, dtype=torch.float32),
                torch.tensor(scores, dtype=torch.float32),
                torch.tensor(classes, dtype=torch.int64),
            )
        )
    categories = [{"id": c, "name": f"cat{c}"} for c in CATEGORY_IDS]
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def to_results(detections: list) -> list[dict[str, Any]]:
    """COCO results form of the detections (xywh, category ids), as the baselines take it."""
    results = []
    for image_id, boxes, scores, classes in detections:
        xyxy = boxes.double().numpy()
        xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1)
        for box, score, cls in zip(xywh.tolist(), scores.double().tolist(), classes.tolist()):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": CATEGORY_IDS[cls],
                    "bbox": box,
                    "score": score,
                }
            )
    return results


def timed(func: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = func(*args)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--dets-per-image", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    gt, detections = make_dataset(args.images, args.dets_per_image, args.seed)
    results = to_results(detections)
    print(
        f"{len(gt['images'])} images, {len(gt['annotations'])} ground-truth boxes, "
        f"{len(results)} detections, {len(CATEGORY_IDS)} categories"
    )
    with tempfile.TemporaryDirectory() as tmp:
        ann_file = os.path.join(tmp, "gt.json")
        with open(ann_file, "w") as handle:
            json.dump(gt, handle)
        evaluator = COCODetectEvaluator(ann_file)
        fast_gt = faster_coco_eval.COCO(ann_file)
        with contextlib.redirect_stdout(io.StringIO()):
            import pycocotools.coco
            import pycocotools.cocoeval

            py_gt = pycocotools.coco.COCO(ann_file)

    def run_vistrain() -> np.ndarray:
        evaluator.reset()
        for image_id, boxes, scores, classes in detections:
            evaluator.process_batch(image_id, boxes, scores, classes)
        logs, _ = evaluator.evaluate("Det")
        return np.asarray(list(logs.values()))

    def run_fast(res: list) -> np.ndarray:
        coco_eval = faster_coco_eval.COCOeval_faster(
            fast_gt, fast_gt.loadRes(res), "bbox", print_function=lambda *_: None
        )
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
        return np.asarray(coco_eval.stats[:12])

    def run_py(res: list) -> np.ndarray:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval = pycocotools.cocoeval.COCOeval(py_gt, py_gt.loadRes(res), "bbox")
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        return np.asarray(coco_eval.stats[:12])

    # The three run interleaved, so a busy machine slows them alike; loadRes edits its
    # input in place, so each baseline run gets a fresh copy of the results (made untimed).
    run_vistrain()  # warm-up (imports, allocator)
    times: dict[str, list[float]] = {"vistrain": [], "fast": [], "py": []}
    for repeat in range(args.repeats):
        elapsed, s_vis = timed(run_vistrain)
        times["vistrain"].append(elapsed)
        elapsed, s_fast = timed(run_fast, copy.deepcopy(results))
        times["fast"].append(elapsed)
        if repeat % 2 == 0:
            elapsed, s_py = timed(run_py, copy.deepcopy(results))
            times["py"].append(elapsed)
    t_vis, t_fast, t_py = (statistics.median(times[k]) for k in ("vistrain", "fast", "py"))

    # faster-coco-eval's C++ accumulates in another order than numpy: pycocotools may differ
    # in the last bit or so of a mean; that is the 1e-12 tolerance below.
    identical = np.array_equal(s_vis, s_fast) and np.allclose(s_vis, s_py, rtol=0, atol=1e-12)
    print(f"stats (AP..ARl): {np.round(s_vis, 4).tolist()}")
    print(f"max |vistrain - pycocotools| = {np.abs(s_vis - s_py).max():.3g}")
    print(f"max |vistrain - faster-coco-eval| = {np.abs(s_vis - s_fast).max():.3g}")
    print(f"identical to faster-coco-eval and to pycocotools within 1e-12: {identical}")
    print(f"pycocotools          {t_py:7.3f} s")
    print(f"faster-coco-eval raw {t_fast:7.3f} s")
    print(f"vistrain evaluator   {t_vis:7.3f} s")
    print(f"vistrain / faster-coco-eval = {t_vis / t_fast:.2f}x (goal <= 1.2x)")
    print(f"pycocotools / vistrain      = {t_py / t_vis:.2f}x")
    if not identical:
        raise SystemExit("statistics differ")


if __name__ == "__main__":
    main()
