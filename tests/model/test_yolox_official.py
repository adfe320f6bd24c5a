"""Official YOLOX checkpoints give official outputs (fixture made with Megvii's yolox 0.3.0)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from vistrain.model.yolox import YOLOX
from vistrain.model.yolox_official import official_key
from vistrain.op.detect.yolox import YOLOXHeadLoss

_CANDIDATES = (
    Path(__file__).resolve().parents[1] / "fixtures" / "yolox_official",
    Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "yolox_official",
    Path("/work/shared/fixtures/yolox_official"),
)
FIXTURE = next((p for p in _CANDIDATES if (p / "cases.pt").is_file()), _CANDIDATES[-1])
pytestmark = pytest.mark.skipif(
    not (FIXTURE / "cases.pt").is_file(), reason=f"official YOLOX fixture not found ({FIXTURE})"
)
CHECKPOINT = FIXTURE / "yolox_nano_official.pth"


@pytest.fixture(scope="module")
def cases() -> dict[str, Any]:
    return torch.load(FIXTURE / "cases.pt", weights_only=False)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def model(cases: dict[str, Any]) -> YOLOX:
    return YOLOX.from_official(
        CHECKPOINT,
        "nano",
        score_threshold=cases["conf_thre"],
        nms_threshold=cases["nms_thre"],
        max_detections=None,
        pre_nms_top_k=None,
    ).eval()


def _rgb(cases: dict[str, Any]) -> torch.Tensor:
    """The fixture's BGR images as the RGB input vistrain models take."""
    return cases["images"].flip(1)


def test_every_official_name_maps_to_one_vistrain_tensor() -> None:
    official = torch.load(CHECKPOINT, weights_only=True)["model"]
    model = YOLOX(80, "nano")
    names = {official_key(model, k) for k in model.state_dict() if k != "bgr_input"}
    assert names == set(official)
    assert official_key(model, "neck.td4.blocks.0.conv2.0.0.weight") == (
        "backbone.C3_p4.m.0.conv2.dconv.conv.weight"
    )


def test_decoded_predictions_equal_officials(model: YOLOX, cases: dict[str, Any]) -> None:
    with torch.no_grad():
        decoded = model.decoded(_rgb(cases))
    reference = cases["decoded"]
    assert decoded.shape == reference.shape
    # Boxes within 1e-3 px or 1e-4 relative (float rounding of another conv backend; the
    # old cell-centre decoding was 4 to 16 px off), probabilities within 1e-4.
    torch.testing.assert_close(decoded[..., :4], reference[..., :4], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(decoded[..., 4:], reference[..., 4:], rtol=0, atol=1e-4)


def _match(ours: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """For each reference box the index of our nearest box (max coordinate difference)."""
    return torch.cdist(reference, ours, p=float("inf")).argmin(dim=1)


def test_detections_equal_officials_box_for_box(model: YOLOX, cases: dict[str, Any]) -> None:
    with torch.no_grad():
        det = model(_rgb(cases))
    for i, reference in enumerate(cases["detections"]):
        assert len(det.boxes[i]) == len(reference) > 100
        # Two detections whose scores tie within 2e-6 may come out in either order: pair
        # each reference row with our nearest box, and require a one-to-one pairing.
        nearest = _match(det.boxes[i], reference[:, :4])
        assert sorted(nearest.tolist()) == list(range(len(reference)))
        assert (det.boxes[i][nearest] - reference[:, :4]).abs().max() < 0.05
        assert (det.scores[i][nearest] - reference[:, 4] * reference[:, 5]).abs().max() < 1e-4
        assert torch.equal(det.class_ids[i][nearest], reference[:, 6].long())
        assert torch.all(det.scores[i][:-1] >= det.scores[i][1:])


@pytest.mark.parametrize("with_l1", [False, True])
def test_train_mode_loss_terms_equal_officials(cases: dict[str, Any], with_l1: bool) -> None:
    model = YOLOX.from_official(torch.load(CHECKPOINT, weights_only=True), "nano").train()
    loss = YOLOXHeadLoss(80)
    if with_l1:
        loss.enable_l1_loss()
    out = model(_rgb(cases))
    hw = [tuple(cases["images"].shape[-2:])] * 2
    targets = (cases["boxes_xyxy"], cases["classes"], hw)
    raw = loss(out.cls_score, out.bbox_pred, out.objectness, *targets)
    terms = {name: float(value.detach()) for name, value in raw.items()}
    reference = cases["losses_l1" if with_l1 else "losses"]
    names = {"loss_bbox": "iou_loss", "loss_obj": "conf_loss", "loss_cls": "cls_loss"}
    if with_l1:
        names["loss_l1"] = "l1_loss"
    assert set(terms) == set(names)
    for ours, theirs in names.items():
        assert terms[ours] == pytest.approx(reference[theirs], rel=1e-4), ours
    total = sum(terms.values())
    assert total == pytest.approx(reference["total_loss"], rel=1e-4)


def test_bare_state_dict_and_other_class_counts(cases: dict[str, Any]) -> None:
    official = torch.load(CHECKPOINT, weights_only=True)["model"]
    bare = YOLOX.from_official(official, "nano").eval()
    assert bare.num_classes == 80 and bool(bare.bgr_input)
    torch.manual_seed(0)
    fewer = YOLOX.from_official(official, "nano", num_classes=3).eval()
    assert fewer.num_classes == 3
    # Everything but the class predictors came from the checkpoint.
    for key, value in fewer.state_dict().items():
        if key.startswith("head.cls_preds."):
            assert value.shape[0] == 3
        else:
            assert torch.equal(value, bare.state_dict()[key]), key
    images = _rgb(cases)
    with torch.no_grad():
        torch.testing.assert_close(fewer.decoded(images)[..., :5], bare.decoded(images)[..., :5])


def test_legacy_checkpoints_take_normalised_rgb(cases: dict[str, Any]) -> None:
    legacy = YOLOX.from_official(CHECKPOINT, "nano", legacy=True)
    assert not bool(legacy.bgr_input)
    rgb = _rgb(cases)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.equal(legacy.normalize(rgb), (rgb / 255.0 - mean) / std)
    current = YOLOX.from_official(CHECKPOINT, "nano")
    assert torch.equal(current.normalize(rgb), cases["images"])


def test_wrong_size_or_foreign_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"YOLOX-tiny.*wrong shape.*backbone\.stem"):
        YOLOX.from_official(CHECKPOINT, "tiny")
    with pytest.raises(ValueError, match="Not an official YOLOX checkpoint"):
        YOLOX.from_official({"model": {"conv.weight": torch.zeros(1)}}, "nano")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        YOLOX.from_official(tmp_path / "missing.pth", "nano")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="Cannot read weights file"):
        YOLOX.from_official(garbage, "nano")
