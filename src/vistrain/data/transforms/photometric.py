"""Random hue, saturation and value (HSV) jitter; pixels only, boxes untouched."""

from __future__ import annotations

import random

import cv2
import numpy as np

from vistrain.common.typing import DictData
from vistrain.data.const import CommonKeys
from vistrain.data.transforms.base import Transform, check_prob
from vistrain.data.transforms.image import as_array, as_tensor


def hsv_shift_table(hue: float, sat: float, val: float) -> np.ndarray:
    """The ``(256, 1, 3)`` lookup table that shifts the channels of an 8-bit HSV image.

    Hue is in OpenCV's full-circle byte scale (256 steps per turn, ``COLOR_RGB2HSV_FULL``)
    and wraps around; saturation and value (0..255) are clipped.

    Args:
        hue: Hue shift as a fraction of the colour circle.
        sat: Saturation shift as a fraction of full saturation.
        val: Brightness shift on the 0..255 scale.
    """
    levels = np.arange(256, dtype=np.float64)
    table = np.stack(
        [
            np.round(levels + hue * 256.0) % 256.0,
            np.clip(np.round(levels + sat * 255.0), 0.0, 255.0),
            np.clip(np.round(levels + val), 0.0, 255.0),
        ],
        axis=-1,
    )
    return table.astype(np.uint8).reshape(256, 1, 3)


def shift_hsv(array: np.ndarray, hue: float, sat: float, val: float) -> np.ndarray:
    """Shift hue, saturation and value of an ``(H, W, 3)`` uint8 RGB array (new array).

    One conversion to 8-bit HSV, one table lookup per pixel and channel, one conversion
    back: the arithmetic of official YOLOX's colour augmentation done with a lookup table,
    as Ultralytics does. See :func:`hsv_shift_table` for the units.
    """
    hsv = cv2.cvtColor(array, cv2.COLOR_RGB2HSV_FULL)
    cv2.LUT(hsv, hsv_shift_table(hue, sat, val), dst=hsv)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


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
        image = as_array(sample[CommonKeys.images])
        sample[CommonKeys.images] = as_tensor(shift_hsv(image, *shifts))
        return sample
