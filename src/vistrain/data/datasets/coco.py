"""A map-style data set over any COCO-format detection annotation file."""

from __future__ import annotations

import json
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


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(
            f"COCO annotation file {str(path)!r} does not exist; check the annotation_file path."
        )
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"COCO annotation file {str(path)!r} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(
            f"COCO annotation file {str(path)!r} must hold a JSON object with 'images', "
            f"'annotations' and 'categories'; it holds a {type(data).__name__}."
        )
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(
                f"COCO annotation file {str(path)!r} has no {key!r} list; it is not a COCO "
                "detection file."
            )
    if not isinstance(data.get("annotations", []), list):
        raise ValueError(f"COCO annotation file {str(path)!r}: 'annotations' must be a list.")
    return data


def _to_rgb8(pixels: np.ndarray) -> np.ndarray | None:
    """An ``(H, W, 3)`` uint8 RGB array of what ``cv2.imdecode(..., IMREAD_UNCHANGED)`` gave.

    Grey becomes three equal channels, BGR(A) becomes RGB (alpha dropped, as PIL's
    ``convert("RGB")`` does), 16-bit values are scaled to 8 bits (65535 -> 255). ``None``
    for a layout this does not know (then PIL reads the file).
    """
    if pixels.dtype == np.uint16:
        pixels = cv2.convertScaleAbs(pixels, alpha=255.0 / 65535.0)
    if pixels.dtype != np.uint8:
        return None
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    codes = {1: cv2.COLOR_GRAY2RGB, 3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGB}
    if channels not in codes:
        return None
    return cv2.cvtColor(pixels, codes[channels])


def load_image(path: Path) -> np.ndarray:
    """Read an image file as an ``(H, W, 3)`` uint8 RGB array.

    OpenCV decodes it (several times faster than PIL for PNG, the format of the generated
    shapes); grey, palette, RGBA and 16-bit files are converted to 8-bit RGB. Files OpenCV
    cannot decode are read with PIL. EXIF orientation is ignored either way, so the pixels
    are those the annotation's ``height`` and ``width`` describe.

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
    pixels = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED) if encoded.size else None
    rgb = None if pixels is None else _to_rgb8(pixels)
    if rgb is not None:
        return rgb
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"Image file {str(path)!r} does not exist.") from err
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"Image file {str(path)!r} could not be read: {err}") from err


class COCODataset(Dataset[DictData]):
    """Serve the images and boxes of a COCO-format detection file as vistrain samples.

    The JSON is read once, at construction. Each sample holds ``images`` (uint8
    ``(3, H, W)`` RGB; a data pipe or ``collate_batch`` turns it into float32), ``input_hw``
    and ``original_hw`` (``(H, W)``), ``original_images`` (the ``(H, W, 3)`` uint8 array),
    ``sample_names`` (the file stem),
    ``boxes2d`` (float32 ``(N, 4)`` xyxy pixels, from COCO's xywh, clipped to the image),
    ``boxes2d_classes`` (long ``(N,)``: the index of the category id in the sorted
    ``category_ids``) and ``coco_image_id``. Crowd annotations (``iscrowd=1``) and boxes with
    no area are left out; images without boxes are kept. Samples follow the file's order of
    ``images``.

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
        ValueError: If the JSON is malformed or inconsistent; the message names the file.
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
        data = _load_json(path)
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
        for ann in data.get("annotations", []):
            try:
                index = position[int(ann["image_id"])]
                cls = class_of[int(ann["category_id"])]
                x, y, w, h = (float(v) for v in ann["bbox"])
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(
                    f"{where}: annotation {ann.get('id', '?') if isinstance(ann, dict) else ann!r} "
                    f"has a missing or unknown image_id, category_id or bbox ({err!r})."
                ) from err
            if ann.get("iscrowd", 0):
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
        self._boxes = [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes]
        self._classes = [np.asarray(c, dtype=np.int64).reshape(-1) for c in classes]

    def __len__(self) -> int:
        return len(self._image_ids)

    def __getitem__(self, index: int) -> DictData:
        file_name = self._file_names[index]
        path = Path(self.image_root) / file_name
        cached = self._cache.get(index)
        if cached is not None:
            original = cached.copy()
        else:
            original = load_image(path)
        height, width = original.shape[:2]
        expected = self._sizes[index]
        if expected is not None and expected != (height, width):
            raise ValueError(
                f"Image {str(path)!r} is {height}x{width} (HxW) but {self.annotation_file!r} "
                f"says {expected[0]}x{expected[1]}; fix the annotation or the image."
            )
        if self.cache_images and cached is None:
            self._cache[index] = original.copy()
        # uint8 (3, H, W) view of a private copy: transforms work on the bytes, the pipe
        # (or collate_batch) makes the float network input.
        image = torch.from_numpy(original.copy()).permute(2, 0, 1)
        return {
            CommonKeys.images: image,
            CommonKeys.input_hw: (height, width),
            CommonKeys.original_images: original,
            CommonKeys.original_hw: (height, width),
            CommonKeys.sample_names: Path(file_name).stem,
            CommonKeys.boxes2d: torch.from_numpy(self._boxes[index].copy()),
            CommonKeys.boxes2d_classes: torch.from_numpy(self._classes[index].copy()),
            CommonKeys.coco_image_id: self._image_ids[index],
        }
