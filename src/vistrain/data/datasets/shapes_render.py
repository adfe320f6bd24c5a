"""Render one image of the generated shapes data set in memory (no file system access).

Everything random comes from the ``numpy.random.Generator`` passed in, so an image is a pure
function of its generator's seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPE_NAMES = ("circle", "square", "triangle", "star", "cross")
"""Shape classes in category-id order (category id = position + 1)."""

MAX_OCCLUSION = 0.4
"""Largest fraction of an object that later objects may cover."""


@dataclass
class RenderedObject:
    """One object drawn into an image.

    Attributes:
        class_index: Index into :data:`SHAPE_NAMES`.
        box: ``(x0, y0, x1, y1)`` of the whole object in pixels (x1, y1 exclusive).
        visible_pixels: Pixels of the object not covered by later objects.
    """

    class_index: int
    box: tuple[int, int, int, int]
    visible_pixels: int


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured ``(size, size, 3)`` float background: gradient, stripes or blotches."""
    kind = int(rng.integers(3))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    colour_a = rng.uniform(0, 255, 3).astype(np.float32)
    colour_b = rng.uniform(0, 255, 3).astype(np.float32)
    if kind == 0:  # linear gradient in a random direction
        angle = rng.uniform(0, 2 * math.pi)
        ramp = (xs * math.cos(angle) + ys * math.sin(angle) + 1.5) / 3.0
        weight = ramp[..., None]
    elif kind == 1:  # soft stripes at a random angle and period
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(0.04, 0.25)
        phase = (xs * math.cos(angle) + ys * math.sin(angle)) / period
        weight = (0.5 + 0.5 * np.sin(2 * math.pi * phase))[..., None]
    else:  # low-frequency blotches: a coarse random grid upsampled smoothly
        cells = int(rng.integers(3, 9))
        coarse = rng.uniform(0, 255, (cells, cells)).astype(np.uint8)
        smooth = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        weight = (np.asarray(smooth, dtype=np.float32) / 255.0)[..., None]
    return colour_a * (1.0 - weight) + colour_b * weight


def _polygon(class_index: int, cx: float, cy: float, radius: float, angle: float) -> list[float]:
    """Vertices (flat x, y list) of a shape of circumradius ``radius`` rotated by ``angle``."""
    name = SHAPE_NAMES[class_index]
    if name == "square":
        points = [(radius, k * math.pi / 2 + math.pi / 4) for k in range(4)]
    elif name == "triangle":
        points = [(radius, k * 2 * math.pi / 3) for k in range(3)]
    elif name == "star":
        points = [(radius if k % 2 == 0 else 0.45 * radius, k * math.pi / 5) for k in range(10)]
    else:  # cross: a plus sign with arms 0.3 of the radius wide
        arm = 0.3 * radius
        corners = [
            (arm, radius), (-arm, radius), (-arm, arm), (-radius, arm), (-radius, -arm),
            (-arm, -arm), (-arm, -radius), (arm, -radius), (arm, -arm), (radius, -arm),
            (radius, arm), (arm, arm),
        ]  # fmt: skip
        points = [(math.hypot(x, y), math.atan2(y, x)) for x, y in corners]
    flat: list[float] = []
    for dist, theta in points:
        flat += [cx + dist * math.cos(theta + angle), cy + dist * math.sin(theta + angle)]
    return flat


def _shape_mask(
    class_index: int, size: int, cx: float, cy: float, radius: float, angle: float
) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if SHAPE_NAMES[class_index] == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
    else:
        draw.polygon(_polygon(class_index, cx, cy, radius, angle), fill=255)
    return np.asarray(canvas) > 0


def _pick_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour that differs clearly from the mean background colour ``under``."""
    best = rng.uniform(0, 255, 3)
    for _ in range(8):
        if np.abs(best - under).sum() > 150:
            break
        best = rng.uniform(0, 255, 3)
    else:
        best = 255.0 - under
    return best.astype(np.float32)


def render_shapes_image(
    rng: np.random.Generator,
    size: int,
    num_classes: int = len(SHAPE_NAMES),
    max_objects: int = 6,
    min_scale: float = 0.06,
    max_scale: float = 0.45,
    noise_std: float = 4.0,
) -> tuple[np.ndarray, list[RenderedObject]]:
    """Draw one image: a textured background and 1 to ``max_objects`` filled shapes.

    Shapes have random classes (among the first ``num_classes`` of :data:`SHAPE_NAMES`),
    colours, rotations and sizes (diameter between ``min_scale`` and ``max_scale`` of the
    image, log-uniform), lie fully inside the image and may overlap, but no object is more
    than :data:`MAX_OCCLUSION` covered. Light pixel noise is added at the end.

    Returns:
        The ``(size, size, 3)`` uint8 image and the drawn objects.
    """
    image = _background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int32)
    objects: list[RenderedObject] = []
    full_pixels: list[int] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(10):
            class_index = int(rng.integers(num_classes))
            diameter = size * math.exp(rng.uniform(math.log(min_scale), math.log(max_scale)))
            radius = diameter / 2
            cx, cy = rng.uniform(radius + 1, size - radius - 1, 2)
            mask = _shape_mask(class_index, size, cx, cy, radius, rng.uniform(0, 2 * math.pi))
            pixels = int(mask.sum())
            if pixels < 9:
                continue
            covered = np.bincount(owner[mask & (owner >= 0)], minlength=len(objects))
            visible_after = [obj.visible_pixels - int(c) for obj, c in zip(objects, covered)]
            if any(v < (1 - MAX_OCCLUSION) * f for v, f in zip(visible_after, full_pixels)):
                continue
            for obj, visible in zip(objects, visible_after):
                obj.visible_pixels = visible
            colour = _pick_colour(rng, image[mask].mean(axis=0))
            image[mask] = colour
            owner[mask] = len(objects)
            rows = np.flatnonzero(mask.any(axis=1))
            cols = np.flatnonzero(mask.any(axis=0))
            box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
            objects.append(RenderedObject(class_index, box, pixels))
            full_pixels.append(pixels)
            break
    if noise_std > 0:
        image += rng.normal(0.0, noise_std, image.shape).astype(np.float32)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), objects
