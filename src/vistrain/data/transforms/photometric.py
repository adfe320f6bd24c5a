"""Random hue, saturation and value (HSV) jitter; pixels only, boxes untouched."""

from __future__ import annotations

import random

import torch
from torch import Tensor

from vistrain.common.typing import DictData
from vistrain.data.const import CommonKeys
from vistrain.data.transforms.base import Transform, check_prob


def rgb_to_hsv(image: Tensor) -> Tensor:
    """Convert a ``(3, H, W)`` RGB image in 0..255 to HSV.

    Returns:
        ``(3, H, W)``: hue as a fraction of the colour circle in [0, 1), saturation in
        [0, 1] and value in 0..255.
    """
    r, g, b = image.unbind(0)
    maxc, argmax = image.max(dim=0)
    minc = image.min(dim=0).values
    delta = maxc - minc
    safe_delta = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue_r = ((g - b) / safe_delta) % 6.0
    hue_g = (b - r) / safe_delta + 2.0
    hue_b = (r - g) / safe_delta + 4.0
    hue = torch.where(argmax == 0, hue_r, torch.where(argmax == 1, hue_g, hue_b))
    hue = torch.where(delta > 0, hue / 6.0, torch.zeros_like(hue))
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), 0.0)
    return torch.stack([hue, sat, maxc])


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hsv`: HSV (hue fraction, saturation, value 0..255) to RGB."""
    hue, sat, val = hsv.unbind(0)
    h6 = (hue % 1.0) * 6.0
    sector = h6.floor()
    frac = h6 - sector
    index = (sector.long() % 6).unsqueeze(0)
    p = val * (1.0 - sat)
    q = val * (1.0 - sat * frac)
    t = val * (1.0 - sat * (1.0 - frac))
    red = torch.stack([val, q, p, p, t, val]).gather(0, index)
    green = torch.stack([t, val, val, q, p, p]).gather(0, index)
    blue = torch.stack([p, p, t, val, val, q]).gather(0, index)
    return torch.cat([red, green, blue])


class RandomHSV(Transform):
    """Shift hue, saturation and value by random amounts, as YOLOX's colour augmentation.

    Each of the three channels is shifted with probability 1/2 by an amount drawn uniformly
    from ``[-gain, gain]``; hue wraps around, saturation and value are clipped. Boxes are
    not touched.

    Args:
        hue_deg: Largest hue shift in degrees of the colour circle.
        sat_gain: Largest saturation shift on a 0..255 scale.
        val_gain: Largest brightness shift on a 0..255 scale.
        prob: Chance of applying the jitter at all.
    """

    def __init__(
        self,
        hue_deg: float = 10.0,
        sat_gain: float = 30.0,
        val_gain: float = 30.0,
        prob: float = 1.0,
    ) -> None:
        for name, value in (("hue_deg", hue_deg), ("sat_gain", sat_gain), ("val_gain", val_gain)):
            if value < 0:
                raise ValueError(f"{name}={value!r} must be >= 0.")
        self.hue_deg = float(hue_deg)
        self.sat_gain = float(sat_gain)
        self.val_gain = float(val_gain)
        self.prob = check_prob(prob, "prob")

    def __call__(self, sample: DictData) -> DictData:
        """Maybe jitter the colours of the image."""
        if random.random() >= self.prob:
            return sample
        shifts = []
        for gain in (self.hue_deg / 360.0, self.sat_gain / 255.0, self.val_gain):
            amount = random.uniform(-gain, gain)
            shifts.append(amount if random.random() < 0.5 else 0.0)
        if not any(shifts):
            return sample
        hsv = rgb_to_hsv(sample[CommonKeys.images])
        hue = (hsv[0] + shifts[0]) % 1.0
        sat = (hsv[1] + shifts[1]).clamp(0.0, 1.0)
        val = (hsv[2] + shifts[2]).clamp(0.0, 255.0)
        sample[CommonKeys.images] = hsv_to_rgb(torch.stack([hue, sat, val]))
        return sample
