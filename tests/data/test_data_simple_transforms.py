"""Box arithmetic of flip, resize and pad; HSV jitter changes colours only."""

from __future__ import annotations

import colorsys
import random

import numpy as np
import pytest
import torch
from data_test_utils import make_sample

from vistrain.data.const import CommonKeys
from vistrain.data.transforms import Pad, RandomHorizontalFlip, RandomHSV, ResizeKeepRatio
from vistrain.data.transforms.photometric import shift_hsv

K = CommonKeys


def test_flip_mirrors_pixels_and_boxes() -> None:
    sample = make_sample((6, 10), [(1, 2, 4, 5)], [0])
    image = sample[K.images].clone()
    out = RandomHorizontalFlip(prob=1.0)(sample)
    assert out[K.images].dtype == torch.uint8  # transforms pass bytes on
    assert torch.equal(out[K.boxes2d], torch.tensor([[6.0, 2, 9, 5]]))
    assert torch.equal(out[K.images][:, :, 9 - 1].float(), image[:, :, 1])
    assert torch.equal(out[K.images][:, :, 0].float(), image[:, :, 9])
    kept = RandomHorizontalFlip(prob=0.0)(make_sample((6, 10), [(1, 2, 4, 5)], [0]))
    assert torch.equal(kept[K.boxes2d], torch.tensor([[1.0, 2, 4, 5]]))


def test_flip_probability_is_respected() -> None:
    random.seed(0)
    flip = RandomHorizontalFlip(prob=0.3)
    flips = sum(
        int(flip(make_sample((4, 8), [(0, 0, 2, 2)], [0]))[K.boxes2d][0, 0] == 6)
        for _ in range(400)
    )
    assert 80 < flips < 160


def test_resize_keeps_ratio_and_scales_boxes() -> None:
    sample = make_sample((100, 200), [(10, 20, 110, 60)], [1])
    out = ResizeKeepRatio(64)(sample)
    assert out[K.images].shape == (3, 32, 64)
    assert out[K.input_hw] == (32, 64)
    assert torch.allclose(out[K.boxes2d], torch.tensor([[3.2, 6.4, 35.2, 19.2]]))
    assert out[K.original_hw] == (100, 200)  # untouched: eval maps back with input/original


def test_resize_upscales_with_per_axis_exact_box_scale() -> None:
    sample = make_sample((30, 20), [(2, 3, 12, 27)], [1])
    out = ResizeKeepRatio((64, 64))(sample)
    assert out[K.input_hw] == (64, 43)  # 20 * 64/30 = 42.67 rounds to 43
    expected = torch.tensor([[2 * 43 / 20, 3 * 64 / 30, 12 * 43 / 20, 27 * 64 / 30]])
    assert torch.allclose(out[K.boxes2d], expected)
    # The object's pixels are where the box says.
    box = out[K.boxes2d][0]
    image = out[K.images].float()
    inner = image[:, int(box[1]) + 2 : int(box[3]) - 2, int(box[0]) + 2 : int(box[2]) - 2]
    colour = make_sample((1, 1), [(0, 0, 1, 1)], [1])[K.images][:, 0, 0]
    assert torch.allclose(inner, colour[:, None, None].expand_as(inner), atol=1.0)


def test_pad_to_size_and_to_divisor() -> None:
    sample = make_sample((32, 50), [(1, 2, 30, 31)], [0])
    image = sample[K.images].clone()
    out = Pad(64)(sample)
    assert out[K.images].shape == (3, 64, 64)
    assert torch.equal(out[K.images][:, :32, :50].float(), image)
    assert (out[K.images][:, 32:, :] == 114).all() and (out[K.images][:, :, 50:] == 114).all()
    assert out[K.input_hw] == (32, 50)
    assert torch.equal(out[K.boxes2d], torch.tensor([[1.0, 2, 30, 31]]))
    div = Pad(size_divisor=32)(make_sample((33, 64), [], []))
    assert div[K.images].shape == (3, 64, 64)


def test_pad_rejects_larger_images_and_bad_arguments() -> None:
    with pytest.raises(ValueError, match="ResizeKeepRatio"):
        Pad(16)(make_sample((32, 8), [], []))
    with pytest.raises(ValueError, match="exactly one"):
        Pad()
    with pytest.raises(ValueError, match="exactly one"):
        Pad(16, size_divisor=32)


def test_hsv_shift_moves_hue_saturation_and_value_by_the_amounts() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    before = [colorsys.rgb_to_hsv(*(p / 255.0)) for p in image.reshape(-1, 3)]

    def hsv_after(hue: float, sat: float, val: float) -> list[tuple[float, float, float]]:
        out = shift_hsv(image, hue, sat, val)
        assert out.shape == image.shape and out.dtype == np.uint8
        return [colorsys.rgb_to_hsv(*(p / 255.0)) for p in out.reshape(-1, 3)]

    # Hue +30 degrees wraps around the circle; 8-bit HSV resolves it to about 2 degrees.
    vivid = [i for i, (_, s, v) in enumerate(before) if s > 0.5 and v > 0.5]
    assert len(vivid) > 50
    turned = hsv_after(30 / 360, 0.0, 0.0)
    for i in vivid:
        moved = (turned[i][0] - before[i][0] - 30 / 360 + 0.5) % 1.0 - 0.5
        assert abs(moved) * 360 < 2.5
    # Brightness -40: the largest channel drops by 40, clipped at 0.
    darker = hsv_after(0.0, 0.0, -40.0)
    for i in vivid:
        assert darker[i][2] * 255 == pytest.approx(max(before[i][2] * 255 - 40, 0), abs=1.01)
    # Saturation +1 saturates every coloured pixel fully.
    full = hsv_after(0.0, 1.0, 0.0)
    assert all(full[i][1] > 0.97 for i in vivid)


def test_hsv_jitter_changes_pixels_within_gains_but_not_boxes() -> None:
    random.seed(0)
    changed = 0
    for _ in range(10):
        sample = make_sample((16, 16), [(2, 2, 10, 10)], [4], background=60.0)
        before = sample[K.images].clone()
        out = RandomHSV(hue_deg=0, sat_gain=0, val_gain=20)(sample)
        delta = out[K.images].float() - before
        # A value shift moves each channel by <= gain (plus 8-bit HSV rounding).
        assert delta.abs().max() <= 20 + 3
        assert (out[K.images] >= 0).all() and (out[K.images] <= 255).all()
        assert torch.equal(out[K.boxes2d], torch.tensor([[2.0, 2, 10, 10]]))
        changed += int(delta.abs().max() > 0.5)
    assert 0 < changed < 10  # each channel shifts with probability 1/2
