"""Data problems are named: image modes, bad boxes, unknown categories, class-count mismatch."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vistrain.data.datasets import COCODataset
from vistrain.data.datasets.coco import load_image
from vistrain.data.image_io import pil_to_rgb, to_uint8_rgb
from vistrain.zoo import load_config
from vistrain.zoo.base import apply_overrides


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def vistrain_log() -> Iterator[_Records]:
    """Records of the ``vistrain`` logger (it does not propagate, so caplog misses them)."""
    handler = _Records()
    logger = logging.getLogger("vistrain")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


# --------------------------------------------------------------------------------------------
# Image modes
# --------------------------------------------------------------------------------------------


def test_16bit_png_loads_with_its_real_values(tmp_path: Path) -> None:
    ramp = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as image:
        assert image.mode.startswith("I")  # really a 16-bit file
    loaded = load_image(path)
    assert loaded.shape == (32, 32, 3) and loaded.dtype == np.uint8
    expected = np.rint(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    # OpenCV scales by 1/256 (truncating), PIL's fallback by 255/65535 (rounding): within 1.
    difference = np.abs(loaded[:, :, 0].astype(np.int16) - expected.astype(np.int16))
    assert difference.max() <= 1
    np.testing.assert_array_equal(loaded[:, :, 0], loaded[:, :, 2])
    assert (loaded == 255).mean() < 0.01  # Pillow's convert("RGB") made ~all of it white


def test_grey_rgba_and_palette_images_load_as_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    grey = colour[:, :, 0]
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    alpha = rng.integers(0, 256, (12, 10, 1), dtype=np.uint8)
    Image.fromarray(np.concatenate([colour, alpha], axis=2), mode="RGBA").save(tmp_path / "a.png")
    palette_image = Image.fromarray(colour).quantize(colors=16)
    palette_image.save(tmp_path / "palette.png")
    expected_palette = np.asarray(palette_image.convert("RGB"))

    np.testing.assert_array_equal(load_image(tmp_path / "grey.png"), np.stack([grey] * 3, 2))
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), colour)
    palette = load_image(tmp_path / "palette.png")
    assert palette.shape == (12, 10, 3)
    np.testing.assert_array_equal(palette, expected_palette)
    grey_alpha = Image.fromarray(np.stack([grey, alpha[:, :, 0]], 2), mode="LA")
    np.testing.assert_array_equal(pil_to_rgb(grey_alpha), np.stack([grey] * 3, 2))


def test_arrays_from_other_decoders() -> None:
    bgr16 = np.zeros((2, 2, 4), dtype=np.uint16)
    bgr16[..., 0] = 65535  # blue in OpenCV's order
    rgb = to_uint8_rgb(bgr16, bgr=True)
    assert rgb.shape == (2, 2, 3) and rgb[0, 0].tolist() == [0, 0, 255]
    floats = np.full((2, 2), 0.5, dtype=np.float32)
    assert to_uint8_rgb(floats)[0, 0].tolist() == [128, 128, 128]
    with pytest.raises(ValueError, match="shape"):
        to_uint8_rgb(np.zeros((2, 2, 5), dtype=np.uint8))


# --------------------------------------------------------------------------------------------
# COCO annotations
# --------------------------------------------------------------------------------------------


def _coco(tmp_path: Path, annotations: list[dict[str, Any]], num_images: int = 8) -> Path:
    images = [{"id": 100 + i, "file_name": f"{i}.png", "height": 20, "width": 30} for i in range(8)]
    coco = {
        "images": images[:num_images],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "cat"}, {"id": 4, "name": "dog"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    return path


def test_bad_boxes_are_dropped_with_one_warning(tmp_path: Path, vistrain_log: _Records) -> None:
    good = {"image_id": 100, "category_id": 1, "bbox": [1, 1, 5, 5]}
    bad_boxes = [[1, 1, 0, 5], [1, 1, 5, -2], [1, 1, float("nan"), 3], [float("inf"), 1, 2, 2]]
    annotations = [dict(good, id=1)]
    for index, bbox in enumerate(bad_boxes * 2):  # 8 bad boxes in images 100..107
        annotations.append({"id": 10 + index, "image_id": 100 + index, "category_id": 4})
        annotations[-1]["bbox"] = bbox
    # json writes NaN/Infinity, which Python's reader (and COCO tools) accept.
    ds = COCODataset(_coco(tmp_path, annotations), tmp_path, check_images=False)

    warnings = [r.getMessage() for r in vistrain_log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "dropped 8 box(es)" in warnings[0]
    assert "100, 101, 102, 103, 104 and others" in warnings[0]
    assert "ann.json" in warnings[0]
    assert ds._boxes[0].tolist() == [[1.0, 1.0, 6.0, 6.0]]
    assert all(len(ds._boxes[i]) == 0 for i in range(1, 8))
    assert all(np.isfinite(boxes).all() for boxes in ds._boxes)


def test_clean_data_gives_no_warning(tmp_path: Path, vistrain_log: _Records) -> None:
    ann = [{"id": 1, "image_id": 100, "category_id": 1, "bbox": [1, 1, 5, 5]}]
    COCODataset(_coco(tmp_path, ann), tmp_path, check_images=False)
    assert not [r for r in vistrain_log.records if r.levelno >= logging.WARNING]


def test_unknown_category_is_an_error_naming_it(tmp_path: Path) -> None:
    ann = [{"id": 7, "image_id": 100, "category_id": 9, "bbox": [1, 1, 5, 5]}]
    with pytest.raises(ValueError, match=r"annotation 7 has category_id 9.*ids \[1, 4\]"):
        COCODataset(_coco(tmp_path, ann), tmp_path, check_images=False)


def test_num_classes_is_checked_against_the_categories(tmp_path: Path) -> None:
    ann = [{"id": 1, "image_id": 100, "category_id": 1, "bbox": [1, 1, 5, 5]}]
    ds = COCODataset(_coco(tmp_path, ann), tmp_path, check_images=False)
    ds.check_num_classes(2)
    with pytest.raises(
        ValueError, match=r"num_classes=3 but .*ann\.json.* 2 categories \(cat, dog\)"
    ):
        ds.check_num_classes(3)


def test_shapes_experiment_checks_num_classes_when_built(tmp_path: Path) -> None:
    """Data whose categories differ from num_classes fails at build, not inside SimOTA."""
    module = load_config("yolox_shapes")
    settings = [
        "num_epochs=1",
        "num_train_images=4",
        "num_val_images=2",
        "batch_size=2",
        "image_size=64",
        "num_workers=0",
        f"cache_dir={tmp_path / 'cache'}",
    ]
    params = apply_overrides(module.Params(), settings)
    module.build(params, str(tmp_path / "run"))  # generates the cache; fits
    # Someone edits the cached annotations: a fourth category the 3-class model lacks.
    for ann_file in (tmp_path / "cache").glob("train-*/annotations.json"):
        coco = json.loads(ann_file.read_text())
        coco["categories"].append({"id": 4, "name": "star"})
        ann_file.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"num_classes=3 but .*train.* 4 categories"):
        module.build(params, str(tmp_path / "run2"))
