"""A map-style data set over any COCO-format detection annotation file."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from vistrain.common.typing import DictData
from vistrain.data.const import CommonKeys
from vistrain.data.datasets.coco_json import load_coco_json
from vistrain.data.image_io import pil_to_rgb

logger = logging.getLogger("vistrain")


def _decode_rgb(encoded: np.ndarray) -> np.ndarray | None:
    """Decode file bytes straight to ``(H, W, 3)`` uint8 RGB with OpenCV; ``None`` if it can't.

    OpenCV converts grey, palette and RGBA files to three channels (alpha dropped, as PIL's
    ``convert("RGB")`` does) and 16-bit ones to 8 bits; EXIF orientation is not applied.
    """
    if encoded.size == 0:
        return None
    flags = cv2.IMREAD_IGNORE_ORIENTATION
    rgb_flag = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV >= 4.10: no BGR pass
    pixels = cv2.imdecode(encoded, flags | (cv2.IMREAD_COLOR if rgb_flag is None else rgb_flag))
    if pixels is None or rgb_flag is not None:
        return pixels
    return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as an ``(H, W, 3)`` uint8 RGB array.

    OpenCV decodes it, straight to RGB (about twice as fast as PIL for JPEG, somewhat faster
    for PNG); grey, palette, RGBA and 16-bit files become 8-bit RGB. Files OpenCV cannot
    decode (PCX, TGA, ...) are read with PIL and converted by ``vistrain.data.image_io``.
    EXIF orientation is ignored either way, so the pixels are those the annotation's
    ``height`` and ``width`` describe.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file is not a readable image.
    """
    try:
        encoded = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"Image file {str(path)!r} does not exist.") from err
    except OSError as err:
        raise ValueError(f"Image file {str(path)!r} could not be read: {err}") from err
    rgb = _decode_rgb(encoded)
    if rgb is not None:
        return rgb
    try:
        with Image.open(path) as image:
            return pil_to_rgb(image)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"Image file {str(path)!r} does not exist.") from err
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"Image file {str(path)!r} could not be read: {err}") from err


class BadBoxes:
    """Counts boxes left out for a non-positive width or height or a non-finite value.

    Such boxes are dropped (they have no area to learn from, and a NaN would poison the loss),
    but a data set where this happens usually has a bug in its conversion to COCO, so
    ``warn`` says so once, with the count and the first image ids, instead of per box.
    """

    SHOWN_IDS = 5

    def __init__(self) -> None:
        self.count = 0
        self.image_ids: list[int] = []

    def add(self, image_id: int) -> None:
        """Record one dropped box of image ``image_id``."""
        self.count += 1
        if image_id not in self.image_ids and len(self.image_ids) < self.SHOWN_IDS:
            self.image_ids.append(image_id)

    def warn(self, where: str) -> None:
        """Log one warning if any box was dropped."""
        if self.count:
            logger.warning(
                "%s: dropped %d box(es) with a non-positive width or height or a non-finite "
                "value, in images %s%s.",
                where,
                self.count,
                ", ".join(str(image_id) for image_id in self.image_ids),
                " and others" if self.count > len(self.image_ids) else "",
            )


class COCODataset(Dataset[DictData]):
    """Serve the images and boxes of a COCO-format detection file as vistrain samples.

    The JSON is read once, at construction. Each sample holds ``images`` (uint8
    ``(3, H, W)`` RGB sharing its memory with ``original_images``; a data pipe or
    ``collate_batch`` turns it into float32), ``input_hw`` and ``original_hw`` (``(H, W)``),
    ``original_images`` (the ``(H, W, 3)`` uint8 array),
    ``sample_names`` (the file stem),
    ``boxes2d`` (float32 ``(N, 4)`` xyxy pixels, from COCO's xywh, clipped to the image),
    ``boxes2d_classes`` (long ``(N,)``: the index of the category id in the sorted
    ``category_ids``) and ``coco_image_id``. Crowd annotations (``iscrowd=1``) and boxes with
    no area are left out (boxes with a non-positive width or height or a non-finite value with
    one warning that counts them); images without boxes are kept. Samples follow the file's
    order of ``images``.

    Attributes:
        annotation_file: The JSON path (the COCO evaluator is built from it).
        image_root: Folder the images' ``file_name`` are relative to.
        category_ids: Category ids, sorted; class index ``i`` means ``category_ids[i]``.
        class_names: Category names in the same order.

    Args:
        annotation_file: Path of the COCO instances JSON.
        image_root: Folder holding the images.
        check_images: Check at construction that every image file exists (a fast ``stat``
            per image) so a missing file fails now rather than mid-epoch.
        cache_images: Keep every decoded image in memory after its first read (each loader
            worker keeps its own cache). Worth it for small data sets such as the generated
            shapes, where PNG decoding is most of the loading time.

    Raises:
        FileNotFoundError: If the JSON file, the image folder or (with ``check_images``) an
            image is missing; the message names the path.
        ValueError: If the JSON is malformed or inconsistent (e.g. an annotation's category
            is not in ``categories``); the message names the file.
    """

    def __init__(
        self,
        annotation_file: str | os.PathLike[str],
        image_root: str | os.PathLike[str],
        check_images: bool = True,
        cache_images: bool = False,
    ) -> None:
        self.cache_images = cache_images
        self._cache: dict[int, np.ndarray] = {}
        self.annotation_file = str(annotation_file)
        self.image_root = str(image_root)
        path = Path(annotation_file)
        data = load_coco_json(path)
        if not Path(image_root).is_dir():
            raise FileNotFoundError(
                f"Image folder {self.image_root!r} (for {self.annotation_file!r}) does not exist."
            )
        self._parse(path, data)
        if check_images:
            missing = [name for name in self._file_names if not (Path(image_root) / name).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} image(s) listed in {self.annotation_file!r} are missing "
                    f"under {self.image_root!r}, e.g. {str(Path(image_root) / missing[0])!r}."
                )

    def _parse(self, path: Path, data: dict[str, Any]) -> None:
        where = f"COCO annotation file {str(path)!r}"
        try:
            categories = {int(cat["id"]): str(cat["name"]) for cat in data["categories"]}
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{where}: every category needs an 'id' and a 'name' ({err})."
            ) from err
        if len(categories) != len(data["categories"]):
            raise ValueError(f"{where}: category ids are not unique.")
        self.category_ids: list[int] = sorted(categories)
        self.class_names: list[str] = [categories[cid] for cid in self.category_ids]
        class_of = {cid: index for index, cid in enumerate(self.category_ids)}

        self._image_ids: list[int] = []
        self._file_names: list[str] = []
        self._sizes: list[tuple[int, int] | None] = []
        try:
            for image in data["images"]:
                self._image_ids.append(int(image["id"]))
                self._file_names.append(str(image["file_name"]))
                has_size = "height" in image and "width" in image
                self._sizes.append(
                    (int(image["height"]), int(image["width"])) if has_size else None
                )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{where}: every image needs an 'id' and a 'file_name' ({err})."
            ) from err
        position = {image_id: index for index, image_id in enumerate(self._image_ids)}
        if len(position) != len(self._image_ids):
            raise ValueError(f"{where}: image ids are not unique.")

        boxes: list[list[list[float]]] = [[] for _ in self._image_ids]
        classes: list[list[int]] = [[] for _ in self._image_ids]
        bad_boxes = BadBoxes()
        for ann in data.get("annotations", []):
            ann_id = ann.get("id", "?") if isinstance(ann, dict) else ann
            try:
                index = position[int(ann["image_id"])]
                category = int(ann["category_id"])
                x, y, w, h = (float(v) for v in ann["bbox"])
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(
                    f"{where}: annotation {ann_id!r} has a missing or unknown image_id, "
                    f"category_id or bbox ({err!r})."
                ) from err
            if category not in class_of:
                raise ValueError(
                    f"{where}: annotation {ann_id!r} has category_id {category}, which is not in "
                    f"'categories' (ids {self.category_ids}); add the category or fix the "
                    "annotation."
                )
            cls = class_of[category]
            if ann.get("iscrowd", 0):
                continue
            if not (math.isfinite(x + y + w + h) and w > 0 and h > 0):
                bad_boxes.add(self._image_ids[index])
                continue
            box = [x, y, x + w, y + h]
            size = self._sizes[index]
            if size is not None:
                box = [
                    min(max(box[0], 0.0), size[1]),
                    min(max(box[1], 0.0), size[0]),
                    min(max(box[2], 0.0), size[1]),
                    min(max(box[3], 0.0), size[0]),
                ]
            if box[2] > box[0] and box[3] > box[1]:
                boxes[index].append(box)
                classes[index].append(cls)
        bad_boxes.warn(where)
        self._boxes = [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes]
        self._classes = [np.asarray(c, dtype=np.int64).reshape(-1) for c in classes]

    def check_num_classes(self, num_classes: int, what: str = "num_classes") -> None:
        """Refuse a model whose class count differs from this data's categories.

        A model with fewer classes than the data crashes deep inside the loss's label
        assignment; one with more silently never learns the extra classes.

        Raises:
            ValueError: Naming both counts, the annotation file and the categories.
        """
        if num_classes != len(self.category_ids):
            names = ", ".join(self.class_names)
            raise ValueError(
                f"{what}={num_classes} but {self.annotation_file!r} has "
                f"{len(self.category_ids)} categories ({names}); the model's classes must match "
                "the data's categories"
            )

    def __len__(self) -> int:
        return len(self._image_ids)

    def __getitem__(self, index: int) -> DictData:
        file_name = self._file_names[index]
        # os.path, not pathlib: this runs five times per mosaic sample and pathlib's parsing
        # cost a few percent of the whole augmentation pipeline.
        path = os.path.join(self.image_root, file_name)
        cached = self._cache.get(index)
        if cached is not None:
            original = cached.copy()
        else:
            original = load_image(path)
        height, width = original.shape[:2]
        expected = self._sizes[index]
        if expected is not None and expected != (height, width):
            raise ValueError(
                f"Image {path!r} is {height}x{width} (HxW) but {self.annotation_file!r} "
                f"says {expected[0]}x{expected[1]}; fix the annotation or the image."
            )
        if self.cache_images and cached is None:
            self._cache[index] = original.copy()
        # A uint8 (3, H, W) view of the decoded pixels (no copy; transforms make new arrays),
        # the pipe (or collate_batch) makes the float network input.
        image = torch.from_numpy(original).permute(2, 0, 1)
        return {
            CommonKeys.images: image,
            CommonKeys.input_hw: (height, width),
            CommonKeys.original_images: original,
            CommonKeys.original_hw: (height, width),
            CommonKeys.sample_names: os.path.splitext(os.path.basename(file_name))[0],
            CommonKeys.boxes2d: torch.from_numpy(self._boxes[index].copy()),
            CommonKeys.boxes2d_classes: torch.from_numpy(self._classes[index].copy()),
            CommonKeys.coco_image_id: self._image_ids[index],
        }
