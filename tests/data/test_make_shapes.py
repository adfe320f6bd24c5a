"""``vistrain make-shapes``: the generated shapes as a COCO folder a user can train on."""

from __future__ import annotations

from pathlib import Path

import pytest

from vistrain.cli import main
from vistrain.data.datasets import COCODataset


def test_writes_train_and_val_splits(tmp_path: Path) -> None:
    out = tmp_path / "shapes"
    args = ["--num-train", "3", "--num-val", "2", "--image-size", "64", "--num-classes", "2"]
    assert main(["make-shapes", "--out", str(out), *args]) == 0
    train = COCODataset(out / "train" / "annotations.json", out / "train" / "images")
    val = COCODataset(out / "val" / "annotations.json", out / "val" / "images")
    assert (len(train), len(val)) == (3, 2)
    assert train.class_names == val.class_names == ["circle", "square"]
    # Distinct splits: no validation image repeats a training image.
    train_bytes = {p.read_bytes() for p in (out / "train" / "images").iterdir()}
    assert not any(p.read_bytes() in train_bytes for p in (out / "val" / "images").iterdir())


def test_refuses_a_folder_with_content(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    assert main(["make-shapes", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vistrain: error: --out") and err.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_bad_count_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["make-shapes", "--out", str(tmp_path / "x"), "--num-train", "0"]) == 2
    assert "num_images=0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
