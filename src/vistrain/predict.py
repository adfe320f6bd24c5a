"""Detections on image files from a checkpoint: what ``vistrain predict`` runs.

::

    detector = load_detector("runs/yolox_coco/.../checkpoints/best.ckpt")
    summary = predict_images(detector, list_images("photos/"), "predictions/", PredictParams())

A checkpoint is either a vistrain checkpoint (its EMA weights when it has them, else the
trained weights) or an official YOLOX checkpoint (``{"model": state_dict}`` or a bare
state dict with official parameter names), told apart by content. The model size and the
class count are read off the weights' shapes. Class names and category ids come from, in
this order: a COCO annotation file (``classes_from``), the experiment the run used
(``--config``), COCO's 80 categories for an 80-class official checkpoint, else ``class_<i>``
with id ``i``.

Each image is resized keeping its aspect ratio and padded to the square input, as in
validation; the boxes are mapped back to the original pixels and clipped to the image.
Files that cannot be read as images are reported and skipped.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from vistrain.common.typing import DictData
from vistrain.data.coco_categories import COCO_CATEGORIES
from vistrain.data.const import CommonKeys
from vistrain.data.datasets.coco import load_image
from vistrain.data.loader import collate_batch
from vistrain.data.presets import yolox_test_pipe
from vistrain.engine.checkpoint_io import CHECKPOINT_FORMAT
from vistrain.eval.coco import load_coco_annotations
from vistrain.model.weights import read_weights_file
from vistrain.model.yolox import SIZES, YOLOX
from vistrain.model.yolox_official import is_official_state_dict
from vistrain.vis.image import BoundingBoxVisualizer

logger = logging.getLogger("vistrain")

PREDICTIONS_FILE = "predictions.json"
PICTURES_FOLDER = "pictures"
OFFICIAL_STEM_KEY = "backbone.backbone.stem.conv.conv.weight"
VISTRAIN_STEM_KEY = "backbone.stem.conv.0.weight"


@dataclass
class PredictParams:
    """Settings of ``vistrain predict`` and ``vistrain export`` (``--set KEY=VALUE``).

    Attributes:
        score_threshold: Smallest ``objectness x class`` score kept (and drawn).
        nms_threshold: IoU above which the class-aware NMS drops the lower-scoring box.
        max_detections: Most detections per image.
        image_size: Side of the square network input; None = the experiment's, else 416
            for nano and tiny, 640 for the others (the official test sizes).
        legacy: An official checkpoint from YOLOX 0.1.x (RGB input normalised by ImageNet
            mean and std) rather than >= 0.2 (BGR 0..255).
        classes_from: A COCO annotation file whose categories name the classes.
    """

    score_threshold: float = 0.3
    nms_threshold: float = 0.65
    max_detections: int = 100
    image_size: int | None = None
    legacy: bool = False
    classes_from: str = ""

    def validate(self) -> None:
        """Raise ValueError naming the first key whose value cannot be used."""
        for name in ("score_threshold", "nms_threshold"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name}={value} must be in [0, 1]")
        if self.max_detections < 1:
            raise ValueError(f"max_detections={self.max_detections} must be >= 1")
        if self.image_size is not None and (self.image_size < 32 or self.image_size % 32):
            raise ValueError(f"image_size={self.image_size} must be a positive multiple of 32")
        if self.classes_from and not os.path.isfile(self.classes_from):
            raise FileNotFoundError(f"classes_from={self.classes_from!r} does not exist")


@dataclass
class DetectorInfo:
    """What a detector's class indices mean and the input size it expects.

    Attributes:
        class_names: Name of class index ``i``.
        category_ids: Category id of class index ``i`` (as in the training annotations).
        image_size: Side of the square network input.
    """

    class_names: list[str]
    category_ids: list[int]
    image_size: int | None = None


@dataclass
class Detector:
    """A YOLOX ready to predict, with what its classes mean.

    Attributes:
        model: The network, in eval mode.
        info: Class names, category ids and input size.
        source: Which weights were loaded, for the log.
    """

    model: YOLOX
    info: DetectorInfo
    source: str = ""


@dataclass
class PredictSummary:
    """Outcome of :func:`predict_images`."""

    num_images: int = 0
    num_detections: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    predictions_file: str = ""


def _size_from_stem(stem: Tensor, path: str) -> str:
    """The YOLOX size whose stem has this many output channels (``64 x width``)."""
    for size, (_, width, _) in SIZES.items():
        if round(64 * width) == stem.shape[0]:
            return size
    raise ValueError(
        f"{path}: a stem of {stem.shape[0]} channels matches no YOLOX size "
        f"({', '.join(SIZES)}); is it a YOLOX checkpoint?"
    )


def _read_weights(path: str) -> tuple[str, Mapping[str, Tensor]]:
    """``("vistrain" | "official", state dict)`` of a checkpoint file, told apart by content.

    A vistrain checkpoint gives its EMA weights when it has them (prefix ``ema_model.``),
    else the trained ones; adapters' prefixes are removed.

    Raises:
        FileNotFoundError / ValueError: If the file is missing, unreadable or neither kind.
    """
    obj = read_weights_file(path)
    if obj.get("format") == CHECKPOINT_FORMAT and isinstance(obj.get("state_dict"), Mapping):
        return "vistrain", _model_weights(obj["state_dict"], path)
    state = obj.get("model", obj)
    if is_official_state_dict(state):
        return "official", state
    raise ValueError(
        f"{path} is neither a vistrain checkpoint nor an official YOLOX checkpoint "
        f"(found keys {sorted(map(str, obj))[:8]})"
    )


def _model_weights(state: Mapping[str, Tensor], path: str) -> dict[str, Tensor]:
    for prefix in ("ema_model.", "model.", ""):
        found = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if VISTRAIN_STEM_KEY in found:
            return found
    raise ValueError(
        f"{path} holds no YOLOX weights (no {VISTRAIN_STEM_KEY!r}, with or without an EMA "
        "adapter's prefix); predict and export run YOLOX checkpoints"
    )


def load_detector(
    ckpt_path: str, params: PredictParams | None = None, info: DetectorInfo | None = None
) -> Detector:
    """Build the YOLOX of a vistrain or official checkpoint, ready to predict.

    Args:
        ckpt_path: The checkpoint file.
        params: Thresholds, input size, ``legacy``, ``classes_from``.
        info: Class names and input size from the experiment; see the module docstring for
            what is used without it.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not a readable YOLOX checkpoint or the class names do not
            match its class count.
    """
    params = params or PredictParams()
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"--ckpt: checkpoint {ckpt_path!r} does not exist")
    kind, state = _read_weights(ckpt_path)
    if kind == "official":
        size = _size_from_stem(state[OFFICIAL_STEM_KEY], ckpt_path)
        model = YOLOX.from_official(state, size, legacy=params.legacy)
        source = f"official YOLOX-{size} weights"
    else:
        size = _size_from_stem(state[VISTRAIN_STEM_KEY], ckpt_path)
        num_classes = int(state["head.cls_preds.0.weight"].shape[0])
        model = YOLOX(num_classes, size)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            reason = str(err).splitlines()[0]
            raise ValueError(f"{ckpt_path} does not fit a YOLOX-{size}: {reason}") from None
        source = f"vistrain YOLOX-{size} weights"
    model.score_threshold = params.score_threshold
    model.nms_threshold = params.nms_threshold
    model.max_detections = params.max_detections
    model.eval()
    info = _class_info(model, kind, params, info, ckpt_path)
    if params.image_size is not None:
        info.image_size = params.image_size
    elif info.image_size is None:
        from vistrain.zoo.yolox_coco import official_recipe  # the zoo imports this module

        info.image_size = official_recipe(size).image_size
    return Detector(model, info, f"{source} of {ckpt_path}")


def info_from_annotations(annotation_file: str) -> DetectorInfo:
    """Class names and category ids of a COCO annotation file (sorted by id).

    Raises:
        FileNotFoundError / ValueError: If the file is missing or has no valid categories.
    """
    data = load_coco_annotations(annotation_file)
    try:
        categories = sorted((int(c["id"]), str(c["name"])) for c in data["categories"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{annotation_file!r}: every category needs an 'id' and a 'name' ({err})"
        ) from None
    return DetectorInfo([name for _, name in categories], [cid for cid, _ in categories])


def _class_info(
    model: YOLOX, kind: str, params: PredictParams, info: DetectorInfo | None, path: str
) -> DetectorInfo:
    if params.classes_from:
        named = info_from_annotations(params.classes_from)
        named.image_size = None if info is None else info.image_size
        info = named
    elif info is None and kind == "official" and model.num_classes == len(COCO_CATEGORIES):
        info = DetectorInfo(
            [name for _, name in COCO_CATEGORIES], [cid for cid, _ in COCO_CATEGORIES]
        )
    elif info is None:
        count = model.num_classes
        info = DetectorInfo([f"class_{i}" for i in range(count)], list(range(count)))
    if len(info.class_names) != model.num_classes:
        raise ValueError(
            f"{path} predicts {model.num_classes} classes but {len(info.class_names)} class "
            "names were given (classes_from or --config); use the annotation file or "
            "experiment the model was trained with"
        )
    return info


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(input_path: str) -> list[Path]:
    """The file ``input_path``, or the files directly inside the folder ``input_path``.

    In a folder every visible file is a candidate (a file that turns out not to be an
    image is reported when it is read), sorted by name.

    Raises:
        FileNotFoundError: If the path does not exist or the folder holds no files.
    """
    path = Path(input_path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"--input {input_path!r} is neither an image file nor a folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(
            f"--input {input_path!r} holds no files; pass an image or a folder of images"
        )
    return files


class ImageFiles(Dataset[DictData]):
    """Image files as test samples (``images``, sizes, ``original_images``, names, no boxes)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> DictData:
        original = load_image(self.paths[index])
        height, width = original.shape[:2]
        return {
            CommonKeys.images: torch.from_numpy(original).permute(2, 0, 1).float(),
            CommonKeys.input_hw: (height, width),
            CommonKeys.original_images: original,
            CommonKeys.original_hw: (height, width),
            CommonKeys.sample_names: self.paths[index].name,
            # No ground truth; the resize transforms scale boxes along with the pixels.
            CommonKeys.boxes2d: torch.zeros((0, 4)),
            CommonKeys.boxes2d_classes: torch.zeros((0,), dtype=torch.long),
        }


def detection_records(
    file_name: str,
    boxes: Tensor,
    scores: Tensor,
    class_ids: Tensor,
    image_hw: tuple[int, int],
    info: DetectorInfo,
) -> list[dict[str, Any]]:
    """One JSON record per detection: COCO ``[x, y, w, h]`` clipped to the image."""
    height, width = image_hw
    limits = torch.tensor([width, height, width, height], dtype=boxes.dtype)
    clipped = torch.minimum(boxes.detach().cpu().clamp(min=0), limits)
    records = []
    for box, score, cls in zip(clipped.tolist(), scores.tolist(), class_ids.tolist()):
        x0, y0, x1, y1 = box
        records.append(
            {
                "file_name": file_name,
                "bbox": [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                "score": round(float(score), 5),
                "category_id": info.category_ids[int(cls)],
                "category_name": info.class_names[int(cls)],
            }
        )
    return records


def _picture_name(file_name: str, used: set[str]) -> str:
    name = Path(file_name).stem + ".png"
    if name in used:
        name = Path(file_name).name.replace(".", "_") + ".png"
    used.add(name)
    return name


@torch.no_grad()
def predict_images(
    detector: Detector,
    paths: Sequence[Path],
    output_dir: str,
    params: PredictParams | None = None,
    device: torch.device | None = None,
) -> PredictSummary:
    """Detect objects in ``paths``; write ``predictions.json`` and one picture per image.

    Writes ``<output_dir>/predictions.json`` (a list of records with ``file_name``,
    ``bbox`` as COCO ``[x, y, w, h]`` in the original image's pixels, ``score``,
    ``category_id``, ``category_name``) and ``<output_dir>/pictures/<name>.png``. A file
    that cannot be read as an image is logged and listed in the summary, not fatal.
    """
    params = params or PredictParams()
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model: nn.Module = detector.model.to(device).eval()
    info = detector.info
    size = int(info.image_size or 640)
    pipe = yolox_test_pipe(ImageFiles(paths), size)
    drawer = BoundingBoxVisualizer(
        class_names=info.class_names, score_threshold=params.score_threshold
    )
    pictures = Path(output_dir) / PICTURES_FOLDER
    pictures.mkdir(parents=True, exist_ok=True)
    summary = PredictSummary()
    records: list[dict[str, Any]] = []
    used: set[str] = set()
    for index, path in enumerate(paths):
        try:
            batch = collate_batch([pipe[index]])
        except (ValueError, FileNotFoundError, OSError) as err:
            reason = str(err).splitlines()[0]
            logger.warning("Skipped %s: %s", path, reason)
            summary.skipped.append((str(path), reason))
            continue
        det = model(
            batch[CommonKeys.images].to(device),
            batch[CommonKeys.input_hw],
            batch[CommonKeys.original_hw],
        )
        image_hw = tuple(batch[CommonKeys.original_hw][0])
        found = detection_records(
            path.name, det.boxes[0], det.scores[0], det.class_ids[0], image_hw, info
        )
        records.extend(found)
        picture = drawer.draw(
            batch[CommonKeys.original_images][0],
            det.boxes[0].cpu(),
            det.scores[0].cpu(),
            det.class_ids[0].cpu(),
        )
        picture.save(pictures / _picture_name(path.name, used))
        summary.num_images += 1
        summary.num_detections += len(found)
    summary.predictions_file = str(Path(output_dir) / PREDICTIONS_FILE)
    with open(summary.predictions_file, "w", encoding="utf-8") as handle:
        json.dump(records, handle, indent=1)
    return summary


__all__ = [
    "Detector",
    "DetectorInfo",
    "PredictParams",
    "PredictSummary",
    "detection_records",
    "info_from_annotations",
    "list_images",
    "load_detector",
    "predict_images",
]
