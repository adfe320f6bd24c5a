"""The generated shapes detection data set, written to disk in COCO format.

The default experiment trains on it so that vistrain runs out of the box with nothing to
download: :func:`ensure_shapes_dataset` generates a split into a cache folder on first use
and reuses it afterwards. Layout of a split folder::

    <root>/images/000000.png ...   # RGB PNGs
    <root>/annotations.json        # COCO instances: images, annotations (bbox xywh), categories
    <root>/generated.json          # marker: the generation parameters (written last)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from vistrain.data.datasets.shapes_render import SHAPE_NAMES, render_shapes_image

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
"""Bumped whenever the generator's output changes, so caches are regenerated."""

MARKER_NAME = "generated.json"
ANNOTATION_NAME = "annotations.json"
IMAGE_FOLDER = "images"

CACHE_ENV = "VISTRAIN_CACHE"
"""Environment variable that overrides the folder of generated data sets."""


class ShapesPaths(NamedTuple):
    """Where a generated split lives; pass the last two to ``COCODataset``."""

    root: Path
    annotation_file: Path
    image_root: Path


def _paths(root: Path) -> ShapesPaths:
    return ShapesPaths(root, root / ANNOTATION_NAME, root / IMAGE_FOLDER)


def _check_params(num_images: int, image_size: int, num_classes: int, max_objects: int) -> None:
    if num_images < 1:
        raise ValueError(f"num_images={num_images!r} must be >= 1.")
    if image_size < 32:
        raise ValueError(f"image_size={image_size!r} must be >= 32 pixels.")
    if not 1 <= num_classes <= len(SHAPE_NAMES):
        raise ValueError(f"num_classes={num_classes!r} must be in 1..{len(SHAPE_NAMES)}.")
    if max_objects < 1:
        raise ValueError(f"max_objects={max_objects!r} must be >= 1.")


def _write_split(
    folder: Path, num_images: int, image_size: int, seed: int, num_classes: int, max_objects: int
) -> dict[str, Any]:
    """Render and write every image into ``folder``; return the COCO dict."""
    (folder / IMAGE_FOLDER).mkdir(parents=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in range(num_images):
        rng = np.random.default_rng([seed, index])
        pixels, objects = render_shapes_image(rng, image_size, num_classes, max_objects)
        file_name = f"{index:06d}.png"
        Image.fromarray(pixels).save(folder / IMAGE_FOLDER / file_name, compress_level=1)
        image_id = index + 1
        images.append(
            {"id": image_id, "file_name": file_name, "height": image_size, "width": image_size}
        )
        for obj in objects:
            x0, y0, x1, y1 = obj.box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": obj.class_index + 1,
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "area": float(obj.visible_pixels),
                    "iscrowd": 0,
                }
            )
    categories = [
        {"id": index + 1, "name": name, "supercategory": "shape"}
        for index, name in enumerate(SHAPE_NAMES[:num_classes])
    ]
    return {
        "info": {"description": "vistrain generated shapes", "version": GENERATOR_VERSION},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, separators=(",", ":"))
        handle.flush()
        os.fsync(handle.fileno())


def _read_marker(root: Path) -> Any:
    try:
        with open(root / MARKER_NAME, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None


def shapes_cache_dir(cache_dir: str = "") -> Path:
    """Folder the generated shapes splits live in.

    ``cache_dir`` when given, else ``$VISTRAIN_CACHE`` when set, else
    ``~/.cache/vistrain/shapes``.
    """
    if cache_dir:
        return Path(cache_dir).expanduser()
    from_env = os.environ.get(CACHE_ENV, "")
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "vistrain" / "shapes"


def generate_shapes_dataset(
    root: str | os.PathLike[str],
    num_images: int,
    image_size: int = 256,
    seed: int = 0,
    num_classes: int = len(SHAPE_NAMES),
    max_objects: int = 6,
) -> ShapesPaths:
    """Generate a shapes detection data set into ``root`` (replacing what is there).

    Each image shows a textured background (gradient, stripes or blotches) and 1 to
    ``max_objects`` filled shapes (circle, square, triangle, star, cross; the first
    ``num_classes`` of them) of random colour, rotation and size, possibly overlapping but
    each at least 60% visible. Image ``i`` depends only on ``(seed, i)``, so the same
    arguments give byte-identical PNGs and JSON. Category ids are 1..``num_classes``; boxes
    are tight around the whole shape and ``area`` counts its visible pixels.

    The split is written to a temporary sibling folder and moved into place with one
    rename, so ``root`` is either absent, the old content or complete.

    Args:
        root: Output folder.
        num_images: Number of images.
        image_size: Side of the square images in pixels.
        seed: Seed of the generator.
        num_classes: Number of shape classes (1..5).
        max_objects: Most objects per image.

    Returns:
        The split's paths (root, annotation file, image folder).

    Raises:
        ValueError: If an argument is out of range.
    """
    _check_params(num_images, image_size, num_classes, max_objects)
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    params = {
        "version": GENERATOR_VERSION,
        "num_images": num_images,
        "image_size": image_size,
        "seed": seed,
        "num_classes": num_classes,
        "max_objects": max_objects,
    }
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        coco = _write_split(tmp, num_images, image_size, seed, num_classes, max_objects)
        _write_json(tmp / ANNOTATION_NAME, coco)
        _write_json(tmp / MARKER_NAME, params)
        if root.exists():
            # Another process may have finished the same split meanwhile: keep its copy.
            if _read_marker(root) == params:
                return _paths(root)
            shutil.rmtree(root)
        try:
            os.rename(tmp, root)
        except OSError:
            if _read_marker(root) != params:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _paths(root)


def split_seed(seed: int, split: str) -> int:
    """The generator seed of ``split``: distinct splits never share images for one ``seed``."""
    return int(np.random.SeedSequence([seed, zlib.crc32(split.encode())]).generate_state(1)[0])


def ensure_shapes_dataset(
    cache_dir: str | os.PathLike[str],
    split: str,
    num_images: int,
    image_size: int = 256,
    seed: int = 0,
    num_classes: int = len(SHAPE_NAMES),
    max_objects: int = 6,
) -> ShapesPaths:
    """Return the split ``<cache_dir>/<split>``, generating it unless a matching one exists.

    A split is reused when its marker file records exactly these parameters (and the
    generator version); otherwise it is regenerated with
    :func:`generate_shapes_dataset`, seeded by :func:`split_seed` so that ``"train"`` and
    ``"val"`` differ. Safe to call from several processes at once (each generates into its
    own temporary folder; the first to finish wins), though calling it on rank 0 before a
    barrier avoids the duplicate work.

    Raises:
        ValueError: If ``split`` is not a plain folder name or an argument is out of range.
    """
    if not split or split in (".", "..") or "/" in split or os.sep in split:
        raise ValueError(f"split={split!r} must be a plain folder name such as 'train' or 'val'.")
    root = Path(cache_dir) / split
    params = {
        "version": GENERATOR_VERSION,
        "num_images": num_images,
        "image_size": image_size,
        "seed": split_seed(seed, split),
        "num_classes": num_classes,
        "max_objects": max_objects,
    }
    if _read_marker(root) == params:
        return _paths(root)
    logger.info(
        "Generating the shapes data set's %r split: %d images of %dx%d pixels into %s "
        "(once; later runs reuse it).",
        split,
        num_images,
        image_size,
        image_size,
        root,
    )
    return generate_shapes_dataset(
        root, num_images, image_size, split_seed(seed, split), num_classes, max_objects
    )


def write_shapes_coco(
    out_dir: str | os.PathLike[str],
    num_train: int = 200,
    num_val: int = 50,
    image_size: int = 256,
    seed: int = 0,
    num_classes: int = 3,
    max_objects: int = 6,
) -> dict[str, ShapesPaths]:
    """Write generated shapes as a COCO folder with a ``train`` and a ``val`` split.

    A small data set in the layout of a user's own data, to try ``yolox_coco`` and
    ``vistrain predict`` on (``vistrain make-shapes`` calls this)::

        <out_dir>/train/annotations.json  <out_dir>/train/images/000000.png ...
        <out_dir>/val/annotations.json    <out_dir>/val/images/000000.png ...

    Returns:
        The paths of each split by name.

    Raises:
        ValueError: If a count or size is out of range.
    """
    counts = {"train": num_train, "val": num_val}
    for count in counts.values():
        _check_params(count, image_size, num_classes, max_objects)
    return {
        split: generate_shapes_dataset(
            Path(out_dir) / split,
            count,
            image_size=image_size,
            seed=split_seed(seed, split),
            num_classes=num_classes,
            max_objects=max_objects,
        )
        for split, count in counts.items()
    }
