"""Helpers for the data tests: synthetic samples of coloured rectangles and box checks."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import Tensor

from vistrain.data.const import CommonKeys

# Well separated colours (L-inf distance >= 105 between any two, and from black and grey 114).
PALETTE: list[tuple[int, int, int]] = [
    c for c in itertools.product((40, 145, 250), repeat=3) if len(set(c)) > 1 and max(c) == 250
]


def make_sample(
    hw: tuple[int, int],
    rects: list[tuple[int, int, int, int]],
    classes: list[int],
    background: float = 0.0,
    name: str = "s",
) -> dict[str, object]:
    """A sample whose image is ``background`` with filled rectangles of PALETTE[class]."""
    image = torch.full((3, *hw), background, dtype=torch.float32)
    for (x0, y0, x1, y1), cls in zip(rects, classes):
        image[:, y0:y1, x0:x1] = torch.tensor(PALETTE[cls], dtype=torch.float32)[:, None, None]
    original = image.permute(1, 2, 0).numpy().astype(np.uint8)
    return {
        CommonKeys.images: image,
        CommonKeys.input_hw: hw,
        CommonKeys.original_images: original,
        CommonKeys.original_hw: hw,
        CommonKeys.sample_names: name,
        CommonKeys.boxes2d: torch.tensor(rects, dtype=torch.float32).reshape(-1, 4),
        CommonKeys.boxes2d_classes: torch.tensor(classes, dtype=torch.long),
        CommonKeys.coco_image_id: 1,
    }


def colour_mask(image: Tensor, cls: int, tol: float) -> Tensor:
    """(H, W) bool: pixels within ``tol`` (L-inf) of PALETTE[cls] (uint8 or float image)."""
    colour = torch.tensor(PALETTE[cls], dtype=torch.float32)[:, None, None]
    return (image.float() - colour).abs().amax(0) <= tol


def box_purity(image: Tensor, box: Tensor, cls: int, tol: float = 40.0) -> float:
    """Fraction of the pixels whose centres lie in ``box`` that have the class's colour."""
    h, w = image.shape[-2:]
    ys = torch.arange(h, dtype=torch.float32) + 0.5
    xs = torch.arange(w, dtype=torch.float32) + 0.5
    inside = ((ys >= box[1]) & (ys < box[3]))[:, None] & ((xs >= box[0]) & (xs < box[2]))[None]
    if not inside.any():
        return 0.0
    return float(colour_mask(image, cls, tol)[inside].float().mean())


def outside_boxes(image: Tensor, boxes: Tensor, cls: int, tol: float, margin: float) -> int:
    """Number of pixels of the class's colour whose centres lie outside every given box."""
    h, w = image.shape[-2:]
    ys = (torch.arange(h, dtype=torch.float32) + 0.5)[:, None]
    xs = (torch.arange(w, dtype=torch.float32) + 0.5)[None]
    covered = torch.zeros((h, w), dtype=torch.bool)
    for box in boxes:
        covered |= (
            (xs >= box[0] - margin)
            & (xs < box[2] + margin)
            & (ys >= box[1] - margin)
            & (ys < box[3] + margin)
        )
    return int((colour_mask(image, cls, tol) & ~covered).sum())


class ListDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """A map-style data set over a list of samples that counts its reads."""

    def __init__(self, samples: list[dict[str, object]]) -> None:
        self.samples = samples
        self.reads = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, object]:
        self.reads += 1
        sample = self.samples[index]
        return {
            key: value.clone() if isinstance(value, Tensor) else value
            for key, value in sample.items()
        }
