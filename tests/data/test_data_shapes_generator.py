"""The generated shapes data set: deterministic, well-formed COCO, cached by parameters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vistrain.data.datasets import COCODataset, ensure_shapes_dataset, generate_shapes_dataset


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    a = generate_shapes_dataset(tmp_path / "a", 6, image_size=64, seed=3)
    b = generate_shapes_dataset(tmp_path / "b", 6, image_size=64, seed=3)
    c = generate_shapes_dataset(tmp_path / "c", 6, image_size=64, seed=4)
    files_a, files_b = _files(a.root), _files(b.root)
    assert len(files_a) == 6 + 2 and files_a == files_b
    assert _files(c.root)["images/000000.png"] != files_a["images/000000.png"]
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary folders left behind


def test_coco_json_is_well_formed_and_boxes_cover_shapes(tmp_path: Path) -> None:
    paths = generate_shapes_dataset(tmp_path / "s", 12, image_size=96, seed=0)
    coco = json.loads(paths.annotation_file.read_text())
    assert [c["name"] for c in coco["categories"]] == [
        "circle", "square", "triangle", "star", "cross",
    ]  # fmt: skip
    assert len(coco["images"]) == 12
    ids = {img["id"] for img in coco["images"]}
    sizes = []
    for ann in coco["annotations"]:
        assert ann["image_id"] in ids and ann["iscrowd"] == 0
        x, y, w, h = ann["bbox"]
        assert x >= 0 and y >= 0 and x + w <= 96 and y + h <= 96 and w > 0 and h > 0
        # Objects are at least 60% visible: their visible area is a good part of the box.
        assert ann["area"] >= 0.6 * 0.3 * w * h
        sizes.append(max(w, h))
    assert len(coco["annotations"]) >= 12
    assert min(sizes) < 20 and max(sizes) > 30  # small and large objects
    assert len({ann["category_id"] for ann in coco["annotations"]}) >= 3
    # Images are RGB PNGs of the requested size.
    first = Image.open(paths.image_root / coco["images"][0]["file_name"])
    assert first.size == (96, 96) and first.mode == "RGB"


def test_boxes_are_tight_on_the_drawn_shape(tmp_path: Path) -> None:
    paths = generate_shapes_dataset(tmp_path / "s", 1, image_size=128, seed=5, max_objects=1)
    coco = json.loads(paths.annotation_file.read_text())
    (ann,) = coco["annotations"]
    image = np.asarray(Image.open(paths.image_root / coco["images"][0]["file_name"]), float)
    x, y, w, h = (int(v) for v in ann["bbox"])
    inner = image[y : y + h, x : x + w].reshape(-1, 3)
    colour = np.median(inner[np.abs(inner - np.median(inner, 0)).sum(1) < 60], 0)
    is_shape = np.abs(image - colour).sum(-1) < 40
    rows, cols = np.nonzero(is_shape)
    # The shape's pixels span the box (within a pixel of noise either way).
    assert abs(cols.min() - x) <= 1 and abs(cols.max() + 1 - (x + w)) <= 1
    assert abs(rows.min() - y) <= 1 and abs(rows.max() + 1 - (y + h)) <= 1


def test_ensure_reuses_a_matching_split_and_regenerates_otherwise(tmp_path: Path) -> None:
    first = ensure_shapes_dataset(tmp_path, "train", 4, image_size=64, seed=0)
    stamp = first.annotation_file.stat().st_mtime_ns
    again = ensure_shapes_dataset(tmp_path, "train", 4, image_size=64, seed=0)
    assert again == first and again.annotation_file.stat().st_mtime_ns == stamp
    bigger = ensure_shapes_dataset(tmp_path, "train", 5, image_size=64, seed=0)
    assert len(json.loads(bigger.annotation_file.read_text())["images"]) == 5
    val = ensure_shapes_dataset(tmp_path, "val", 4, image_size=64, seed=0)
    assert val.root != first.root
    assert (val.image_root / "000000.png").read_bytes() != (
        bigger.image_root / "000000.png"
    ).read_bytes()
    assert len(COCODataset(val.annotation_file, val.image_root)) == 4


def test_ensure_regenerates_an_incomplete_split(tmp_path: Path) -> None:
    paths = ensure_shapes_dataset(tmp_path, "train", 3, image_size=64, seed=0)
    (paths.root / "generated.json").unlink()  # as if a run died before finishing
    (paths.image_root / "000001.png").unlink()
    again = ensure_shapes_dataset(tmp_path, "train", 3, image_size=64, seed=0)
    assert (again.image_root / "000001.png").is_file()


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_images"):
        generate_shapes_dataset(tmp_path / "x", 0)
    with pytest.raises(ValueError, match="num_classes"):
        generate_shapes_dataset(tmp_path / "x", 1, num_classes=9)
    with pytest.raises(ValueError, match="split"):
        ensure_shapes_dataset(tmp_path, "../evil", 1)
