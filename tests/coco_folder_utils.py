"""A tiny COCO folder shaped like a user's own data, made from the shapes generator.

``vistrain make-shapes`` writes it; :func:`make_awkward_coco` then edits it the ways real
data sets differ from the generated one: category ids 3, 7, 11 (not contiguous, listed out
of order), one image without boxes, one JPEG, one non-square image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from cli_helpers import set_args
from vistrain.cli import main

CATEGORY_IDS = {1: 11, 2: 3, 3: 7}
"""Generated id -> id in the edited files (the names stay: circle, square, triangle)."""


def _edit_split(root: Path, jpeg_index: int, empty_index: int, crop_index: int) -> None:
    path = root / "annotations.json"
    coco: dict[str, Any] = json.loads(path.read_text())
    coco["categories"] = [
        dict(cat, id=CATEGORY_IDS[cat["id"]]) for cat in reversed(coco["categories"])
    ]
    images = coco["images"]
    empty_id = images[empty_index]["id"]
    crop = images[crop_index]
    kept = []
    for ann in coco["annotations"]:
        if ann["image_id"] == empty_id:
            continue
        ann["category_id"] = CATEGORY_IDS[ann["category_id"]]
        if ann["image_id"] == crop["id"]:  # keep boxes wholly inside the cropped width
            x, _, w, _ = ann["bbox"]
            if x + w > crop["width"] * 0.75:
                continue
        kept.append(ann)
    coco["annotations"] = kept
    # A non-square image: the left three quarters of one picture.
    crop_path = root / "images" / crop["file_name"]
    with Image.open(crop_path) as image:
        width = int(image.width * 0.75)
        image.crop((0, 0, width, image.height)).save(crop_path)
    crop["width"] = width
    # A JPEG.
    jpeg = images[jpeg_index]
    png_path = root / "images" / jpeg["file_name"]
    jpeg["file_name"] = Path(jpeg["file_name"]).with_suffix(".jpg").name
    with Image.open(png_path) as image:
        image.convert("RGB").save(root / "images" / jpeg["file_name"], quality=95)
    png_path.unlink()
    path.write_text(json.dumps(coco))


def make_awkward_coco(out_dir: Path, num_train: int = 8, num_val: int = 4, size: int = 64) -> Path:
    """Write the tiny folder through the command line and edit it; returns ``out_dir``."""
    code = main(
        [
            "make-shapes",
            "--out",
            str(out_dir),
            "--num-train",
            str(num_train),
            "--num-val",
            str(num_val),
            "--image-size",
            str(size),
        ]
    )
    assert code == 0
    for split in ("train", "val"):
        _edit_split(out_dir / split, jpeg_index=0, empty_index=1, crop_index=2)
    return out_dir


def coco_sets(folder: Path) -> list[str]:
    """``--set`` arguments pointing ``yolox_coco`` at ``folder``."""
    pairs = {
        "train_ann": folder / "train" / "annotations.json",
        "train_images": folder / "train" / "images",
        "val_ann": folder / "val" / "annotations.json",
        "val_images": folder / "val" / "images",
    }
    return set_args(*(f"{key}={value}" for key, value in pairs.items()))


TINY_FIT = [
    "size=nano",
    "image_size=64",
    "multiscale_min=64",
    "multiscale_max=64",
    "batch_size=4",
    "num_epochs=2",
    "no_aug_epochs=1",
    "warmup_epochs=0",
    "lr_per_64=0.5",
    "val_every=1",
    "vis_every=100",
    "num_workers=0",
    "num_threads=1",
    "ema_warmup_steps=2",
]
"""``--set`` items of a few-second ``yolox_coco`` run on the tiny folder."""


def train_tiny(folder: Path, out: Path) -> Path:
    """Train ``yolox_coco`` briefly on ``folder``; return ``last.ckpt``."""
    sets = set_args(*TINY_FIT)
    code = main(
        ["fit", "--config", "yolox_coco", *coco_sets(folder), *sets, "--output-dir", str(out)]
    )
    assert code == 0
    return out / "checkpoints" / "last.ckpt"
