"""``vistrain export``: the detector without NMS as a TorchScript or ONNX file.

The exported file is run (TorchScript by torch, ONNX by onnxruntime) and must give the
eager model's decoded predictions; those must be the boxes the eager model's own
post-processing starts from.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vistrain.cli import main
from vistrain.engine.checkpoint_io import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, save_checkpoint
from vistrain.export import DecodedYOLOX
from vistrain.model.adapter import ModelExpEMAAdapter
from vistrain.model.yolox import YOLOX
from vistrain.predict import PredictParams, load_detector

SIZE = 96


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A vistrain checkpoint of a 3-class nano whose EMA weights differ from its raw ones."""
    torch.manual_seed(0)
    adapter = ModelExpEMAAdapter(YOLOX(3, "nano"), decay=0.9, warmup_steps=1)
    with torch.no_grad():
        for param in adapter.ema_model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    path = tmp_path_factory.mktemp("export") / "model.ckpt"
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION}
    save_checkpoint({**state, "state_dict": adapter.state_dict(), "epoch": 1}, path)
    return path


def _images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, SIZE, SIZE, generator=generator) * 255


def _eager(checkpoint: Path) -> torch.Tensor:
    detector = load_detector(str(checkpoint), PredictParams(image_size=SIZE))
    with torch.no_grad():
        return DecodedYOLOX(detector.model)(_images())


def _export(checkpoint: Path, fmt: str, output: Path) -> None:
    code = main(["export", "--ckpt", str(checkpoint), "--format", fmt, "--output", str(output),
                 "--set", f"image_size={SIZE}"])  # fmt: skip
    assert code == 0 and output.is_file()
    assert not list(output.parent.glob("*.partial"))


def test_decoded_predictions_are_what_postprocessing_keeps(checkpoint: Path) -> None:
    """The best-scoring decoded row is the model's best detection (same box and score)."""
    detector = load_detector(str(checkpoint), PredictParams(image_size=SIZE, score_threshold=0))
    decoded = _eager(checkpoint)
    with torch.no_grad():
        det = detector.model(_images())
    assert decoded.shape == (2, (SIZE // 8) ** 2 + (SIZE // 16) ** 2 + (SIZE // 32) ** 2, 8)
    for i in range(2):
        scores = decoded[i, :, 4:5] * decoded[i, :, 5:]
        best = int(scores.max(-1).values.argmax())
        centre, size = decoded[i, best, :2], decoded[i, best, 2:4]
        box = torch.cat((centre - size / 2, centre + size / 2))
        top = int(det.scores[i].argmax())
        assert torch.allclose(det.scores[i][top], scores[best].max(), atol=1e-6)
        assert torch.allclose(det.boxes[i][top], box, atol=1e-3)


def test_torchscript_equals_eager(checkpoint: Path, tmp_path: Path) -> None:
    """Without --output the file lands beside the checkpoint, named after it."""
    copy = tmp_path / "run.ckpt"
    copy.write_bytes(checkpoint.read_bytes())
    code = main(["export", "--ckpt", str(copy), "--format", "torchscript",
                 "--set", f"image_size={SIZE}"])  # fmt: skip
    assert code == 0 and not list(tmp_path.glob("*.partial"))
    loaded = torch.jit.load(str(tmp_path / "run.pt"))
    with torch.no_grad():
        exported = loaded(_images())
    torch.testing.assert_close(exported, _eager(checkpoint), rtol=1e-5, atol=1e-4)


def test_onnx_equals_eager(checkpoint: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    output = tmp_path / "model.onnx"
    _export(checkpoint, "onnx", output)
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    (exported,) = session.run(None, {"images": _images().numpy()})
    torch.testing.assert_close(torch.from_numpy(exported), _eager(checkpoint), rtol=1e-4, atol=1e-3)


def test_output_that_is_a_folder_is_refused(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["export", "--ckpt", str(checkpoint), "--format", "onnx",
                 "--output", str(tmp_path)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("vistrain: error: --output") and err.count("\n") == 1
