"""``vistrain predict``: detections of a trained or official checkpoint on image files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from coco_folder_utils import coco_sets, make_awkward_coco, train_tiny
from vistrain.cli import main
from vistrain.data.coco_categories import COCO_CATEGORIES
from vistrain.data.datasets import COCODataset
from vistrain.data.loader import collate_batch
from vistrain.data.presets import yolox_test_pipe
from vistrain.engine.checkpoint_io import load_checkpoint, save_checkpoint
from vistrain.predict import PredictParams, load_detector

OFFICIAL = Path("/work/shared/fixtures/yolox_official/yolox_nano_official.pth")
NAMES = {3: "square", 7: "triangle", 11: "circle"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(COCO folder, checkpoint of a short run on it)."""
    root = tmp_path_factory.mktemp("predict")
    folder = make_awkward_coco(root / "data")
    return folder, train_tiny(folder, root / "run")


@pytest.fixture(scope="module")
def inputs(trained: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The validation images plus a text file and a truncated PNG."""
    folder = tmp_path_factory.mktemp("inputs")
    for image in (trained[0] / "val" / "images").iterdir():
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes((folder / "000003.png").read_bytes()[:100])
    return folder


def _predict(ckpt: Path, input_path: Path, out: Path, *extra: str) -> int:
    return main(["predict", "--ckpt", str(ckpt), "--input", str(input_path),
                 "--output-dir", str(out), *extra])  # fmt: skip


def test_predictions_of_a_trained_checkpoint(
    trained: tuple[Path, Path], inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, ckpt = trained
    out = tmp_path / "pred"
    sets = [*coco_sets(folder), "--set", "size=nano", "--set", "image_size=64"]
    assert _predict(ckpt, inputs, out, "--config", "yolox_coco", *sets,
                    "--set", "score_threshold=0.001") == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "skipped" in printed and "notes.txt" in printed and "broken.png" in printed
    records = json.loads((out / "predictions.json").read_text())
    assert records, "the trained model found nothing at score 0.001"
    sizes = {p.name: Image.open(p).size for p in inputs.glob("0*.*") if p.name != "broken.png"}
    for record in records:
        assert set(record) == {"file_name", "bbox", "score", "category_id", "category_name"}
        assert NAMES[record["category_id"]] == record["category_name"]
        x, y, w, h = record["bbox"]
        width, height = sizes[record["file_name"]]
        assert x >= 0 and y >= 0 and w >= 0 and h >= 0
        assert x + w <= width + 0.01 and y + h <= height + 0.01
        assert record["score"] >= 0.001
    pictures = sorted(p.stem for p in (out / "pictures").iterdir())
    assert pictures == sorted(Path(name).stem for name in sizes)
    # The same detections as the validation path (original pixels), EMA weights.
    detector = load_detector(str(ckpt), PredictParams(score_threshold=0.001, image_size=64))
    data = COCODataset(folder / "val" / "annotations.json", folder / "val" / "images")
    pipe = yolox_test_pipe(data, 64)
    for index, name in enumerate(data._file_names):
        batch = collate_batch([pipe[index]])
        with torch.no_grad():
            det = detector.model(batch["images"], batch["input_hw"], batch["original_hw"])
        width, height = sizes[name]
        expected = det.boxes[0].clamp(min=0).minimum(torch.tensor([width, height] * 2))
        got = torch.tensor([r["bbox"] for r in records if r["file_name"] == name]).reshape(-1, 4)
        got[:, 2:] += got[:, :2]
        assert torch.allclose(got, expected, atol=0.02), name


def test_ema_weights_are_the_ones_used(trained: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt = load_checkpoint(trained[1])
    state = ckpt["state_dict"]
    state["ema_model.head.cls_preds.0.bias"] = torch.full_like(
        state["ema_model.head.cls_preds.0.bias"], 0.25
    )
    state["model.head.cls_preds.0.bias"] = torch.full_like(
        state["model.head.cls_preds.0.bias"], -0.5
    )
    path = tmp_path / "edited.ckpt"
    save_checkpoint(ckpt, path)
    detector = load_detector(str(path))
    assert torch.equal(detector.model.head.cls_preds[0].bias, torch.full((3,), 0.25))
    assert detector.info.class_names == ["class_0", "class_1", "class_2"]  # no --config


def test_classes_from_an_annotation_file(
    trained: tuple[Path, Path], inputs: Path, tmp_path: Path
) -> None:
    folder, ckpt = trained
    out = tmp_path / "pred"
    ann = folder / "train" / "annotations.json"
    code = _predict(ckpt, inputs / "000000.jpg", out, "--set", f"classes_from={ann}",
                    "--set", "score_threshold=0", "--set", "image_size=64")  # fmt: skip
    assert code == 0
    records = json.loads((out / "predictions.json").read_text())
    assert records and all(NAMES[r["category_id"]] == r["category_name"] for r in records)
    assert {r["file_name"] for r in records} == {"000000.jpg"}


def test_official_checkpoint(inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    assert _predict(OFFICIAL, inputs, out, "--set", "score_threshold=0.01") == 0
    records = json.loads((out / "predictions.json").read_text())
    coco = dict(COCO_CATEGORIES)
    assert records, "the fixture's random weights give low-score boxes everywhere"
    assert all(coco[r["category_id"]] == r["category_name"] for r in records)
    detector = load_detector(str(OFFICIAL))
    assert detector.info.image_size == 416 and detector.model.num_classes == 80


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ckpt", "missing.ckpt", "--input", "."], "does not exist"),
        (["--input", "no_such_folder"], "is neither an image file nor a folder"),
        (["--input", ".", "--set", "score_treshold=0.5"], "unknown key 'score_treshold'"),
        (["--input", ".", "--set", "score_threshold=2"], "score_threshold=2.0 must be in"),
        (["--input", ".", "--set", "classes_from=missing.json"], "does not exist"),
    ],
)
def test_usage_errors(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], args, message
) -> None:
    argv = ["predict", *args, "--output-dir", str(tmp_path / "out")]
    if "--ckpt" not in args:
        argv += ["--ckpt", str(trained[1])]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vistrain: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_no_yolox_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "other.pth"
    torch.save({"weights": torch.zeros(3)}, path)
    assert main(["predict", "--ckpt", str(path), "--input", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "neither a vistrain checkpoint nor an official YOLOX checkpoint" in err
