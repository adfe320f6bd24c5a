"""Mosaic, random affine and mixup keep every box on its object's pixels."""

from __future__ import annotations

import random

import pytest
import torch
from data_test_utils import box_purity, make_sample, outside_boxes

from vistrain.data.const import CommonKeys
from vistrain.data.transforms import MixUp, Mosaic, RandomAffine
from vistrain.data.transforms.base import PAD_VALUE

K = CommonKeys


def _four_samples(hw: tuple[int, int]) -> list[dict[str, object]]:
    """Four images with three separated rectangles each; class = unique colour index."""
    h, w = hw
    samples = []
    for index in range(4):
        rects = [
            (4, 5, 4 + w // 4, 5 + h // 5),
            (w // 2, h // 3, w // 2 + w // 5, h // 3 + h // 4),
            (w // 6, 2 * h // 3, w // 6 + w // 3, 2 * h // 3 + h // 4),
        ]
        classes = [3 * index + k for k in range(3)]
        samples.append(make_sample(hw, rects, classes, name=f"s{index}"))
    return samples


@pytest.mark.parametrize("seed", range(12))
def test_mosaic_boxes_stay_on_their_objects(seed: int) -> None:
    random.seed(seed)
    size = (48, 64)
    samples = _four_samples(size)  # tiles already at image_size: no resampling blur
    extra = iter(samples[1:])
    out = Mosaic(size)(samples[0], lambda: next(extra))
    image, boxes, classes = out[K.images], out[K.boxes2d], out[K.boxes2d_classes]
    assert image.shape == (3, 96, 128)
    assert out[K.input_hw] == (96, 128)
    assert out[K.sample_names] == "s0"
    assert len(boxes) == len(classes) > 0
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= 128).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= 96).all()
    for box, cls in zip(boxes, classes.tolist()):
        assert box_purity(image, box, cls, tol=1.0) == 1.0
    for cls in range(12):
        mine = boxes[classes == cls]
        if len(mine):
            # Every visible pixel of the object is inside its box.
            assert outside_boxes(image, mine, cls, tol=1.0, margin=0.0) == 0
        else:
            # A dropped object keeps at most 10% of its pixels (or a sliver under 2 px).
            full = samples[cls // 3][K.boxes2d][cls % 3]
            area = float((full[2] - full[0]) * (full[3] - full[1]))
            visible = outside_boxes(image, mine, cls, tol=1.0, margin=0.0)
            assert visible <= max(0.1 * area, 2 * float(full[2] - full[0]))
    # The tiles fill one rectangle around the centre, sample i in quadrant i.
    assert image.dtype == torch.uint8
    filled = ~(image == PAD_VALUE).all(0)
    rows = filled.any(1).nonzero().flatten().tolist()
    cols = filled.any(0).nonzero().flatten().tolist()
    assert int(filled.sum()) == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    yc = rows[0] + 48 if rows[0] > 0 else rows[-1] + 1 - 48
    xc = cols[0] + 64 if cols[0] > 0 else cols[-1] + 1 - 64
    for box, cls in zip(boxes.tolist(), classes.tolist()):
        quadrant = cls // 3
        assert (box[2] <= xc) if quadrant in (0, 2) else (box[0] >= xc)
        assert (box[3] <= yc) if quadrant in (0, 1) else (box[1] >= yc)


def test_mosaic_resizes_tiles_of_other_sizes() -> None:
    random.seed(0)
    samples = [_four_samples((90, 60))[0], *_four_samples((40, 120))[1:]]
    extra = iter(samples[1:])
    out = Mosaic((64, 64))(samples[0], lambda: next(extra))
    assert out[K.images].shape == (3, 128, 128)
    for box, cls in zip(out[K.boxes2d], out[K.boxes2d_classes].tolist()):
        if (box[2:] - box[:2]).min() >= 8:  # thin boxes are mostly blurred edge
            assert box_purity(out[K.images], box, cls, tol=40.0) > 0.75


@pytest.mark.parametrize("seed", range(12))
def test_affine_boxes_stay_on_their_objects(seed: int) -> None:
    random.seed(seed)
    hw = (96, 112)
    rects = [(10, 12, 34, 36), (60, 20, 90, 44), (30, 58, 56, 86), (80, 60, 100, 80)]
    sample = make_sample(hw, rects, [0, 5, 10, 15])
    affine = RandomAffine(degrees=10, translate=0.1, scale=(0.5, 1.5), shear=2, output_size=hw)
    out = affine(sample)
    image, boxes, classes = out[K.images], out[K.boxes2d], out[K.boxes2d_classes]
    assert image.shape == (3, 96, 112) and out[K.input_hw] == hw
    assert len(boxes) > 0
    for box, cls in zip(boxes, classes.tolist()):
        # A rotated (<= 10 deg) square fills ~75% of its axis-aligned box.
        assert box_purity(image, box, cls) > 0.55
        assert outside_boxes(image, box[None], cls, tol=40.0, margin=1.0) == 0
    for cls in {0, 5, 10, 15} - set(classes.tolist()):
        # Objects whose box was dropped are (nearly) out of the frame.
        assert outside_boxes(image, boxes[:0], cls, tol=40.0, margin=0.0) < 0.1 * 26 * 26 * 2.25


def test_affine_crops_a_mosaic_canvas_to_the_output_size() -> None:
    random.seed(1)
    hw = (40, 40)
    samples = _four_samples(hw)
    extra = iter(samples[1:])
    mosaic = Mosaic(hw)(samples[0], lambda: next(extra))
    canvas = mosaic[K.images].clone()
    out = RandomAffine(degrees=0, translate=0, scale=(1, 1), shear=0, output_size=hw)(mosaic)
    assert out[K.images].shape == (3, 40, 40)
    # With no rotation/zoom the output is the canvas's central 40x40 window.
    assert torch.equal(out[K.images], canvas[:, 20:60, 20:60])
    for box, cls in zip(out[K.boxes2d], out[K.boxes2d_classes].tolist()):
        assert box_purity(out[K.images], box, cls, tol=1.0) > 0.99


def test_identity_affine_keeps_boxes_and_pixels() -> None:
    sample = make_sample((32, 48), [(3, 4, 20, 25)], [2])
    image = sample[K.images].clone()
    out = RandomAffine(degrees=0, translate=0, scale=(1, 1), shear=0)(sample)
    assert torch.equal(out[K.images].float(), image)
    assert torch.allclose(out[K.boxes2d], torch.tensor([[3.0, 4, 20, 25]]), atol=1e-4)


@pytest.mark.parametrize("seed", range(6))
def test_mixup_blends_and_keeps_both_box_sets(seed: int) -> None:
    random.seed(seed)
    current = make_sample((64, 80), [(5, 6, 25, 30)], [0])
    base = current[K.images].clone()
    other = make_sample((50, 50), [(10, 12, 35, 40)], [7])
    out = MixUp(scale=(0.8, 1.2))(current, lambda: other)
    image, boxes, classes = out[K.images], out[K.boxes2d], out[K.boxes2d_classes]
    assert image.shape == (3, 64, 80)
    assert classes.tolist()[0] == 0 and torch.equal(boxes[0], torch.tensor([5.0, 6, 25, 30]))
    # What the other image contributed: 2 * out - current == the pasted canvas.
    contributed = 2 * image.float() - base
    if len(boxes) == 2:
        assert classes.tolist()[1] == 7
        assert box_purity(contributed, boxes[1], 7, tol=45.0) > 0.8
    else:
        # Dropped: the other object barely shows.
        assert outside_boxes(contributed, boxes[:0], 7, tol=40.0, margin=0.0) < 0.1 * 25 * 28 * 2


def test_mixup_with_zero_probability_draws_nothing() -> None:
    sample = make_sample((16, 16), [(1, 1, 8, 8)], [0])

    def draw() -> dict[str, object]:
        raise AssertionError("MixUp with prob=0 must not draw a sample")

    out = MixUp(prob=0.0)(sample, draw)
    assert len(out[K.boxes2d]) == 1
