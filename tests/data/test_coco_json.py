"""The shared COCO-JSON reader: both the data set and the evaluator fail the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vistrain.data.datasets import COCODataset
from vistrain.data.datasets.coco_json import load_coco_json
from vistrain.eval.coco import COCODetectEvaluator


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_annotations_are_optional_unless_required(tmp_path: Path) -> None:
    unlabelled = _write(tmp_path / "unlabelled.json", {"images": [], "categories": []})
    assert load_coco_json(unlabelled) == {"images": [], "categories": []}
    with pytest.raises(ValueError, match=r"unlabelled\.json.*'annotations'"):
        load_coco_json(unlabelled, require_annotations=True)


@pytest.mark.parametrize(
    ("content", "error", "match"),
    [
        (None, FileNotFoundError, "does not exist"),
        ("{not json", ValueError, "not valid JSON"),
        ("[1, 2]", ValueError, "holds a list"),
        ('{"images": [], "annotations": [], "categories": {}}', ValueError, "no 'categories' list"),
        ('{"images": [], "categories": [], "annotations": 3}', ValueError, "'annotations'"),
    ],
)
def test_data_set_and_evaluator_reject_a_bad_file_alike(
    tmp_path: Path, content: str | None, error: type[Exception], match: str
) -> None:
    path = tmp_path / "ann.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    for read in (
        load_coco_json,
        lambda p: COCODataset(p, tmp_path, check_images=False),
        COCODetectEvaluator,
    ):
        with pytest.raises(error, match=match) as caught:
            read(path)
        assert "ann.json" in str(caught.value)
