from __future__ import annotations

import pytest
from torch import nn

from vistrain.model.summary import count_gflops, summarize
from vistrain.model.weights import freeze_backbone
from vistrain.model.yolox import YOLOX


@pytest.mark.parametrize(
    ("size", "side", "paper_gflops", "params"),
    [("nano", 416, 1.08, 912_159), ("tiny", 416, 6.45, 5_055_855)],
)
def test_yolox_matches_the_papers_gflops(
    size: str, side: int, paper_gflops: float, params: int
) -> None:
    model = YOLOX(80, size).train()
    summary = summarize(model, (side, side), forward=model.decoded)
    assert summary.parameters == summary.trainable == params
    assert round(summary.gflops, 2) == paper_gflops
    assert model.training  # the mode is restored
    assert str(summary).endswith(f"{paper_gflops:.2f} GFLOPs at {side}x{side}")


def test_counts_scale_with_the_input_and_follow_the_convention() -> None:
    # 3x3 conv 3->4 with bias on 8x8: 4*8*8 outputs x (27 + 1); BN: 2 per element; linear
    # 256->2 with bias: 2 x 257. FLOPs are twice the multiply-adds.
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 2)
    )
    expected = 2 * (256 * 28 + 256 * 2 + 2 * 257) / 1e9
    assert count_gflops(net, (8, 8)) == pytest.approx(expected)
    model = YOLOX(3, "nano")
    small = count_gflops(model, (320, 320), forward=model.decoded)
    large = count_gflops(model, (640, 640), forward=model.decoded)
    assert large == pytest.approx(4 * small, rel=1e-6)


def test_trainable_parameters_exclude_frozen_ones() -> None:
    model = YOLOX(3, "nano")
    frozen = freeze_backbone(model)
    summary = summarize(model, (64, 64), forward=model.decoded)
    assert summary.trainable == summary.parameters - frozen > 0
