"""COCODataset: samples, class mapping, and errors that name the bad file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vistrain.data.const import CommonKeys
from vistrain.data.datasets import COCODataset

K = CommonKeys


def _write(tmp_path: Path, images: list[tuple[int, str, int, int]]) -> Path:
    """A COCO file with non-contiguous, unsorted category ids; writes the listed images."""
    (tmp_path / "img").mkdir(exist_ok=True)
    for _, name, h, w in images:
        Image.fromarray(np.full((h, w, 3), 7, np.uint8)).save(tmp_path / "img" / name)
    coco = {
        "images": [{"id": i, "file_name": n, "height": h, "width": w} for i, n, h, w in images],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [1, 2, 3, 4], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [5, 5, 10, 10], "iscrowd": 0},
            {"id": 3, "image_id": 10, "category_id": 11, "bbox": [0, 0, 5, 5], "iscrowd": 1},
            {"id": 4, "image_id": 10, "category_id": 11, "bbox": [18, 1, 10, 4]},
            {"id": 5, "image_id": 10, "category_id": 3, "bbox": [2, 2, 0, 4]},
        ],
        "categories": [
            {"id": 7, "name": "seven"},
            {"id": 3, "name": "three"},
            {"id": 11, "name": "eleven"},
        ],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    return path


def test_samples_boxes_and_sorted_class_mapping(tmp_path: Path) -> None:
    ann = _write(tmp_path, [(10, "a.png", 16, 20), (11, "b.png", 8, 8)])
    ds = COCODataset(ann, tmp_path / "img")
    assert len(ds) == 2 and ds.annotation_file == str(ann)
    assert ds.category_ids == [3, 7, 11]
    assert ds.class_names == ["three", "seven", "eleven"]
    s = ds[0]
    # Bytes until a pipe (or collate_batch) makes the float input; not aliasing the original.
    assert s[K.images].shape == (3, 16, 20) and s[K.images].dtype == torch.uint8
    assert int(s[K.images].max()) == 7
    s[K.images].zero_()
    assert int(s[K.original_images].max()) == 7
    assert s[K.original_images].shape == (16, 20, 3) and s[K.original_images].dtype == np.uint8
    assert s[K.input_hw] == s[K.original_hw] == (16, 20)
    assert s[K.sample_names] == "a" and s[K.coco_image_id] == 10
    # xywh -> xyxy; the crowd box and the zero-width box are left out; boxes clipped to image.
    assert torch.equal(s[K.boxes2d], torch.tensor([[1.0, 2, 4, 6], [5, 5, 15, 15], [18, 1, 20, 5]]))
    assert s[K.boxes2d_classes].tolist() == [1, 0, 2]
    assert s[K.boxes2d_classes].dtype == torch.long
    empty = ds[1]
    assert empty[K.boxes2d].shape == (0, 4) and empty[K.boxes2d_classes].shape == (0,)


def test_missing_image_error_names_the_file(tmp_path: Path) -> None:
    ann = _write(tmp_path, [(10, "a.png", 16, 20)])
    coco = json.loads(ann.read_text())
    coco["images"].append({"id": 12, "file_name": "gone.png", "height": 4, "width": 4})
    ann.write_text(json.dumps(coco))
    with pytest.raises(FileNotFoundError, match=r"gone\.png"):
        COCODataset(ann, tmp_path / "img")
    lazy = COCODataset(ann, tmp_path / "img", check_images=False)
    with pytest.raises(FileNotFoundError, match=r"gone\.png"):
        lazy[1]


def test_malformed_json_error_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"broken\.json"):
        COCODataset(bad, tmp_path)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match=r"wrong\.json.*'images'"):
        COCODataset(wrong, tmp_path)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "x.png"}],
                "annotations": [{"id": 9, "image_id": 1, "category_id": 5, "bbox": [0, 0, 1, 1]}],
                "categories": [{"id": 1, "name": "a"}],
            }
        )
    )
    with pytest.raises(ValueError, match=r"unknown\.json.*annotation 9"):
        COCODataset(unknown, tmp_path, check_images=False)


def test_missing_annotation_file_or_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        COCODataset(tmp_path / "nope.json", tmp_path)
    ann = _write(tmp_path, [(10, "a.png", 16, 20)])
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        COCODataset(ann, tmp_path / "no_such_dir")


def test_image_size_disagreeing_with_json_is_an_error(tmp_path: Path) -> None:
    ann = _write(tmp_path, [(10, "a.png", 16, 20)])
    coco = json.loads(ann.read_text())
    coco["images"][0]["height"] = 17
    ann.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"a\.png.*16x20"):
        COCODataset(ann, tmp_path / "img")[0]


def test_cache_images_serves_later_reads_from_memory(tmp_path: Path) -> None:
    ann = _write(tmp_path, [(10, "a.png", 16, 20)])
    ds = COCODataset(ann, tmp_path / "img", cache_images=True)
    first = ds[0]
    first[K.original_images][:] = 0  # a caller scribbling on its sample...
    (tmp_path / "img" / "a.png").unlink()
    again = ds[0]  # ...neither reaches the cache nor needs the file any more
    assert int(again[K.original_images].max()) == 7
    assert torch.equal(again[K.boxes2d], first[K.boxes2d])
    uncached = COCODataset(ann, tmp_path / "img", check_images=False)
    with pytest.raises(FileNotFoundError, match=r"a\.png"):
        uncached[0]


def _write_one(tmp_path: Path, name: str, pixels: Image.Image) -> Path:
    (tmp_path / "img").mkdir(exist_ok=True)
    pixels.save(tmp_path / "img" / name)
    h, w = pixels.height, pixels.width
    coco = {
        "images": [{"id": 1, "file_name": name, "height": h, "width": w}],
        "annotations": [],
        "categories": [{"id": 1, "name": "a"}],
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(coco))
    return path


@pytest.mark.parametrize(
    ("name", "mode", "pixel", "rgb"),
    [
        ("grey.png", "L", 90, (90, 90, 90)),
        ("colour.png", "RGB", (200, 30, 5), (200, 30, 5)),
        ("alpha.png", "RGBA", (10, 20, 250, 60), (10, 20, 250)),
        ("deep.png", "I;16", 65535 // 3, (85, 85, 85)),  # 16-bit scaled to 8 bits
        ("lossless.bmp", "RGB", (1, 128, 254), (1, 128, 254)),
    ],
)
def test_images_of_any_layout_load_as_rgb_bytes(
    tmp_path: Path, name: str, mode: str, pixel: object, rgb: tuple[int, int, int]
) -> None:
    ann = _write_one(tmp_path, name, Image.new(mode, (5, 3), pixel))  # type: ignore[arg-type]
    sample = COCODataset(ann, tmp_path / "img")[0]
    original = sample[K.original_images]
    assert original.shape == (3, 5, 3) and original.dtype == np.uint8
    assert original.reshape(-1, 3).tolist() == [list(rgb)] * 15
    assert sample[K.images][:, 0, 0].tolist() == list(rgb)


def test_palette_png_and_formats_opencv_lacks_load_as_rgb(tmp_path: Path) -> None:
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 250, 100, 7] + [0] * 762)
    ann = _write_one(tmp_path, "pal.png", palette)
    assert COCODataset(ann, tmp_path / "img")[0][K.original_images][2, 3].tolist() == [250, 100, 7]
    # OpenCV has no GIF decoder in every build; PIL reads what it cannot.
    gif = _write_one(tmp_path, "anim.gif", palette)
    assert COCODataset(gif, tmp_path / "img")[0][K.original_images][0, 0].tolist() == [250, 100, 7]


def test_unreadable_image_is_a_value_error_naming_it(tmp_path: Path) -> None:
    ann = _write(tmp_path, [(10, "a.png", 16, 20)])
    (tmp_path / "img" / "a.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"a\.png.*could not be read"):
        COCODataset(ann, tmp_path / "img")[0]
