"""COCO box detection evaluation: the official COCO numbers, computed with faster-coco-eval.

``COCODetectEvaluator`` collects per-image detections during a test epoch and scores them
against a COCO annotation file. The twelve numbers it reports are those of pycocotools'
``COCOeval(iouType="bbox")`` on the same detections (the tests check equality to 1e-9);
the work is done by faster-coco-eval's C++ implementation of the same algorithm, which is
several times faster.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster
from torch import Tensor

from vistrain.data.datasets.coco_json import load_coco_json
from vistrain.engine.checkpoint_io import write_bytes_atomic
from vistrain.eval.base import Evaluator, GatherFunc, MetricResult

DET_METRIC = "Det"

COCO_DET_KEYS = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
"""Names of COCOeval's twelve summary statistics, in COCOeval's order."""

_REQUIRED_ANNOTATION_KEYS = frozenset(("id", "image_id", "category_id", "bbox", "area"))

# Columns of the per-image detection rows kept between process_batch and evaluate.
_X, _Y, _W, _H, _SCORE, _CLASS = range(6)


def _silent(*_: Any) -> None:
    """Swallow faster-coco-eval's progress messages; vistrain prints its own report."""


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while building many small containers.

    Turning 50k detections into COCO dicts allocates ~100k lists and dicts, which triggers
    full collections that walk every live object (the whole annotation index) and can
    triple the cost. The objects made here hold no reference cycles, so nothing is lost.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_coco_annotations(annotation_file: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a COCO annotation file.

    Args:
        annotation_file: Path to a COCO-format JSON file.

    Returns:
        The parsed JSON object.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not JSON, or lacks what box evaluation needs (``images``,
            ``annotations`` and a non-empty ``categories`` list; each annotation with
            ``id``, ``image_id``, ``category_id``, ``bbox`` and ``area``).
    """
    path = os.fspath(annotation_file)
    dataset = load_coco_json(path, require_annotations=True)
    if not dataset["categories"]:
        raise ValueError(f"COCO annotation file {path!r} has an empty 'categories' list.")
    for ann in dataset["annotations"]:
        if not isinstance(ann, dict) or not _REQUIRED_ANNOTATION_KEYS.issubset(ann):
            have = sorted(ann) if isinstance(ann, dict) else type(ann).__name__
            raise ValueError(
                f"COCO annotation file {path!r} has an annotation without the keys "
                f"{sorted(_REQUIRED_ANNOTATION_KEYS)} (it has {have})."
            )
    return dataset


def _image_ids_of(coco_image_id: Any) -> list[int]:
    """Normalise image ids given as an int, a sequence or a tensor to a list of ints."""
    if isinstance(coco_image_id, (Tensor, np.ndarray)):
        ids = coco_image_id.reshape(-1).tolist()
    elif isinstance(coco_image_id, Sequence) and not isinstance(coco_image_id, (str, bytes)):
        ids = list(coco_image_id)
    else:
        ids = [coco_image_id]
    out = []
    for image_id in ids:
        if isinstance(image_id, Tensor):
            image_id = image_id.item()
        if isinstance(image_id, bool) or not isinstance(image_id, (int, np.integer)):
            raise TypeError(
                f"coco_image_id entries must be integers (the 'id' of the COCO image), got "
                f"{image_id!r}."
            )
        out.append(int(image_id))
    return out


def _per_image(value: Any, name: str) -> list[Tensor]:
    """A list of per-image tensors from a list/tuple of them or a single image's tensor."""
    if isinstance(value, (list, tuple)):
        return [v if isinstance(v, Tensor) else torch.as_tensor(v) for v in value]
    if isinstance(value, (Tensor, np.ndarray)):
        return [value if isinstance(value, Tensor) else torch.as_tensor(value)]
    raise TypeError(
        f"{name} must be a list of per-image tensors (or one image's tensor), got "
        f"{type(value).__name__}."
    )


def _format_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], label_column: bool = True
) -> str:
    """Text table with right-aligned numbers (and a left-aligned first column if a label)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [cell.rjust(width) for cell, width in zip(row, widths)]
        if label_column:
            cells[0] = row[0].ljust(widths[0])
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _fmt(value: float) -> str:
    """Three decimals; COCO's -1 (no ground truth in that range) shows as ``-``."""
    return "-" if value < 0 or np.isnan(value) else f"{value:.3f}"


def _mean_valid(values: np.ndarray) -> float:
    """Mean over entries > -1, or -1 when there are none (COCOeval's convention)."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else -1.0


def _unused_path(folder: str, stem: str) -> str:
    """``<folder>/<stem>.json``, or ``<stem>-<n>.json`` with the smallest free ``n``."""
    path = os.path.join(folder, f"{stem}.json")
    counter = 1
    while os.path.exists(path):
        path = os.path.join(folder, f"{stem}-{counter}.json")
        counter += 1
    return path


class COCODetectEvaluator(Evaluator):
    """Official COCO box detection metrics (metric ``"Det"``).

    In a test epoch (see ``vistrain.eval.base`` for the whole loop)::

        evaluator.process_batch(coco_image_id, pred_boxes, pred_scores, pred_classes)  # per batch
        evaluator.gather(all_gather_object)        # every rank
        logs, report = evaluator.evaluate("Det")   # rank 0: {"AP": ..., "ARl": ...}
        evaluator.save("Det", out_dir, tag="epoch=3-step=1200")

    ``evaluate`` returns COCOeval's twelve statistics ``AP, AP50, AP75, APs, APm, APl, AR1,
    AR10, AR100, ARs, ARm, ARl`` over every image of the annotation file (as the official
    evaluation does: an image without detections counts as missed objects). Values are
    COCO's own: ``-1`` where a statistic is undefined because no ground truth falls in
    it (e.g. ``APs`` without small objects); with no detections at all every defined
    statistic is ``0``.

    Duplicates: each image id counts once. If an image is processed again (a
    ``DistributedSampler`` pads the last batches by repeating images, so one image can
    land on two ranks), the first set of detections seen for it wins: within a rank the
    earliest batch, across ranks the lowest rank.

    Args:
        annotation_file: COCO annotation JSON of the evaluated split; read once here.
        file_stem: Start of the names of saved result files.

    Raises:
        FileNotFoundError: If ``annotation_file`` does not exist.
        ValueError: If it is malformed (see ``load_coco_annotations``).
    """

    def __init__(self, annotation_file: str | os.PathLike[str], file_stem: str = "detections"):
        self.annotation_file = os.fspath(annotation_file)
        dataset = load_coco_annotations(self.annotation_file)
        try:
            self._coco_gt = COCO(dataset, print_function=_silent)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"COCO annotation file {self.annotation_file!r} is malformed: {err!r}"
            ) from err
        categories = sorted(self._coco_gt.cats.values(), key=lambda cat: int(cat["id"]))
        self.category_ids: list[int] = [int(cat["id"]) for cat in categories]
        self.category_names: list[str] = [str(cat.get("name", cat["id"])) for cat in categories]
        self._category_lut = np.asarray(self.category_ids, dtype=np.int64)
        self._image_ids = frozenset(int(i) for i in self._coco_gt.imgs)
        num_gt = dict.fromkeys(self.category_ids, 0)
        for ann in dataset["annotations"]:
            if not ann.get("iscrowd", 0) and ann["category_id"] in num_gt:
                num_gt[ann["category_id"]] += 1
        self._num_gt = num_gt
        self.file_stem = file_stem
        self._dets: dict[int, np.ndarray] = {}

    @property
    def metrics(self) -> list[str]:
        """The single metric ``"Det"``."""
        return [DET_METRIC]

    @property
    def num_images_processed(self) -> int:
        """Distinct image ids collected so far (after ``gather``: over every rank)."""
        return len(self._dets)

    def reset(self) -> None:
        """Drop every collected detection."""
        self._dets = {}

    def process_batch(  # type: ignore[override]
        self,
        coco_image_id: Any,
        pred_boxes: Sequence[Tensor] | Tensor,
        pred_scores: Sequence[Tensor] | Tensor,
        pred_classes: Sequence[Tensor] | Tensor,
    ) -> None:
        """Collect the detections of a batch of images.

        The whole batch moves to the CPU in one transfer (one device sync per call).

        Args:
            coco_image_id: COCO image id of each image (list, tensor, or an int for one image).
            pred_boxes: Per-image (N, 4) boxes, xyxy in original-image pixels.
            pred_scores: Per-image (N,) confidence scores.
            pred_classes: Per-image (N,) class indices into the sorted category ids
                (``self.category_ids``), not the category ids themselves.

        Raises:
            ValueError: If lengths or shapes disagree, an image id is not in the annotation
                file, or a class index is out of range.
            TypeError: If an argument has the wrong type.
        """
        image_ids = _image_ids_of(coco_image_id)
        boxes = _per_image(pred_boxes, "pred_boxes")
        scores = _per_image(pred_scores, "pred_scores")
        classes = _per_image(pred_classes, "pred_classes")
        if not len(image_ids) == len(boxes) == len(scores) == len(classes):
            raise ValueError(
                f"process_batch got {len(image_ids)} image ids, {len(boxes)} box tensors, "
                f"{len(scores)} score tensors and {len(classes)} class tensors; pass one of "
                "each per image."
            )
        if not image_ids:
            return
        unknown = [i for i in image_ids if i not in self._image_ids]
        if unknown:
            raise ValueError(
                f"Image ids {unknown} are not in the COCO annotation file "
                f"{self.annotation_file!r}; coco_image_id must hold the 'id' of an entry of "
                "its 'images' list."
            )
        counts = []
        for image_id, box, score, cls in zip(image_ids, boxes, scores, classes):
            num = box.shape[0] if box.ndim == 2 else -1
            if box.ndim != 2 or box.shape[1] != 4 or score.shape != (num,) or cls.shape != (num,):
                raise ValueError(
                    f"Image {image_id}: expected boxes (N, 4), scores (N,) and classes (N,), got "
                    f"{tuple(box.shape)}, {tuple(score.shape)} and {tuple(cls.shape)}."
                )
            counts.append(num)
        rows = self._to_host_rows(boxes, scores, classes)
        self._check_classes(rows[:, _CLASS])
        start = 0
        for image_id, num in zip(image_ids, counts):
            if image_id not in self._dets:
                image_rows = rows[start : start + num]
                image_rows[:, _W:_SCORE] -= image_rows[:, _X:_W]  # xyxy -> xywh
                self._dets[image_id] = image_rows
            start += num

    @staticmethod
    def _to_host_rows(
        boxes: list[Tensor], scores: list[Tensor], classes: list[Tensor]
    ) -> np.ndarray:
        """Stack a batch into (sum N, 6) float64 rows ``x1 y1 x2 y2 score class`` on the CPU.

        The rows are assembled on the tensors' device in a float type wide enough for the
        inputs (float32 at least: class indices are exact up to 2**24), then copied once.
        """
        dtype = torch.float32
        for tensor in (*boxes, *scores):
            if tensor.is_floating_point():
                dtype = torch.promote_types(dtype, tensor.dtype)
        parts = [
            torch.cat(
                (
                    box.to(dtype),
                    score.to(box.device, dtype)[:, None],
                    cls.to(box.device, dtype)[:, None],
                ),
                dim=1,
            )
            for box, score, cls in zip(boxes, scores, classes)
        ]
        stacked = parts[0] if len(parts) == 1 else torch.cat(parts)
        return stacked.detach().cpu().numpy().astype(np.float64)

    def _check_classes(self, class_column: np.ndarray) -> None:
        num_classes = len(self.category_ids)
        bad = (class_column < 0) | (class_column >= num_classes) | (class_column % 1 != 0)
        if bad.any():
            shown = [int(v) if v % 1 == 0 else v for v in class_column[bad][:5].tolist()]
            raise ValueError(
                f"pred_classes holds {shown}; class indices must be "
                f"integers in [0, {num_classes}) indexing the sorted category ids "
                f"{self.category_ids} of {self.annotation_file!r}."
            )

    def gather(self, gather_func: GatherFunc) -> None:
        """Collective: merge every rank's detections; an image id keeps the lowest rank's."""
        parts = gather_func(self._dets)
        if parts is None:
            return
        merged: dict[int, np.ndarray] = {}
        for part in parts:
            for image_id, rows in part.items():
                merged.setdefault(image_id, rows)
        self._dets = merged

    def _columns(self) -> tuple[list[int], list[int], list[list[float]], list[float], np.ndarray]:
        """Detections as Python columns (image id, category id, xywh, score), by image id."""
        image_ids = sorted(self._dets)
        if not image_ids:
            return [], [], [], [], np.zeros((0, 6))
        rows = np.concatenate([self._dets[i] for i in image_ids])
        counts = [self._dets[i].shape[0] for i in image_ids]
        image_col = np.repeat(np.asarray(image_ids, dtype=np.int64), counts).tolist()
        category_col = self._category_lut[rows[:, _CLASS].astype(np.int64)].tolist()
        return image_col, category_col, rows[:, _X:_SCORE].tolist(), rows[:, _SCORE].tolist(), rows

    def results(self) -> list[dict[str, Any]]:
        """The collected detections in COCO results format (what ``save`` writes)."""
        with _gc_paused():
            image_col, category_col, boxes, scores, _ = self._columns()
            return [
                {"image_id": image_id, "category_id": category_id, "bbox": box, "score": score}
                for image_id, category_id, box, score in zip(image_col, category_col, boxes, scores)
            ]

    def _detections_coco(self) -> COCO:
        """A COCO object of the detections, built directly (what ``loadRes`` would make).

        Building it here skips ``loadRes``'s per-detection polygon, which box evaluation
        never reads; ``area`` is ``w * h`` exactly as ``loadRes`` computes it.
        """
        image_col, category_col, boxes, scores, rows = self._columns()
        areas = (rows[:, _W] * rows[:, _H]).tolist()
        annotations = [
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": category_id,
                "bbox": box,
                "score": score,
                "area": area,
                "iscrowd": 0,
            }
            for ann_id, image_id, category_id, box, score, area in zip(
                range(1, len(boxes) + 1), image_col, category_col, boxes, scores, areas
            )
        ]
        detections = COCO(print_function=_silent)
        detections.dataset = {
            "images": self._coco_gt.dataset["images"],
            "categories": self._coco_gt.dataset["categories"],
            "annotations": annotations,
        }
        detections.createIndex()
        return detections

    def evaluate(self, metric: str) -> MetricResult:
        """COCO box metrics over every image of the annotation file.

        Returns:
            The twelve statistics keyed ``AP`` ... ``ARl`` and a report with a per-category
            table (AP, AP50, AP75, AR100) followed by the summary.

        Raises:
            ValueError: If ``metric`` is not ``"Det"``.
        """
        if metric != DET_METRIC:
            raise ValueError(f"Unknown metric {metric!r}; COCODetectEvaluator has {self.metrics}.")
        with _gc_paused():
            cocoeval = COCOeval_faster(
                self._coco_gt, self._detections_coco(), "bbox", print_function=_silent
            )
            cocoeval.evaluate()
            cocoeval.accumulate()
            cocoeval.summarize()
        stats = np.asarray(cocoeval.stats, dtype=np.float64)[: len(COCO_DET_KEYS)]
        logs = {key: float(value) for key, value in zip(COCO_DET_KEYS, stats)}
        return logs, self._report(cocoeval, logs)

    def _report(self, cocoeval: COCOeval_faster, logs: dict[str, float]) -> str:
        """Per-category table and summary, readable in a terminal or a log file."""
        precision = cocoeval.eval["precision"]  # [IoU thr, recall thr, category, area, max dets]
        recall = cocoeval.eval["recall"]  # [IoU thr, category, area, max dets]
        iou_thrs = cocoeval.params.iouThrs
        i50 = int(np.argmin(np.abs(iou_thrs - 0.5)))
        i75 = int(np.argmin(np.abs(iou_thrs - 0.75)))
        rows = []
        for k, (cat_id, name) in enumerate(zip(self.category_ids, self.category_names)):
            rows.append(
                [
                    name,
                    str(cat_id),
                    str(self._num_gt[cat_id]),
                    _fmt(_mean_valid(precision[:, :, k, 0, -1])),
                    _fmt(_mean_valid(precision[i50, :, k, 0, -1])),
                    _fmt(_mean_valid(precision[i75, :, k, 0, -1])),
                    _fmt(_mean_valid(recall[:, k, 0, -1])),
                ]
            )
        table = _format_table(["category", "id", "#gt", "AP", "AP50", "AP75", "AR100"], rows)
        ap_keys, ar_keys = COCO_DET_KEYS[:6], COCO_DET_KEYS[6:]
        summary = "\n".join(
            _format_table(list(keys), [[_fmt(logs[k]) for k in keys]], label_column=False)
            for keys in (ap_keys, ar_keys)
        )
        num_dets = sum(rows.shape[0] for rows in self._dets.values())
        title = (
            f"COCO box evaluation: {len(self._dets)} of {len(self._image_ids)} images "
            f"processed, {num_dets} detections ({os.path.basename(self.annotation_file)})"
        )
        note = "'-': no ground truth in that category or size range (COCO reports -1)."
        return f"{title}\n{table}\n{summary}\n{note}"

    def save(self, metric: str, output_dir: str, tag: str | None = None) -> str:
        """Write the detections as a COCO results JSON under ``output_dir``.

        The file is ``<file_stem>[_<tag>].json``; if that name is taken, ``-1``, ``-2``, ...
        is appended, so no earlier evaluation is overwritten. The write is atomic.

        Returns:
            The path written.

        Raises:
            ValueError: If ``metric`` is not ``"Det"`` or ``tag`` contains a path separator.
        """
        if metric != DET_METRIC:
            raise ValueError(f"Unknown metric {metric!r}; COCODetectEvaluator has {self.metrics}.")
        stem = self.file_stem
        if tag:
            if os.sep in tag or (os.altsep and os.altsep in tag):
                raise ValueError(f"tag={tag!r} must not contain a path separator.")
            stem = f"{stem}_{tag}"
        os.makedirs(output_dir, exist_ok=True)
        path = _unused_path(output_dir, stem)
        write_bytes_atomic(json.dumps(self.results()).encode("utf-8"), path)
        return path
