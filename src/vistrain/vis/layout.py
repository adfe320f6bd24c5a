"""Where box labels go: next to their box, inside the picture, never on top of each other.

A label tag is tried at a few places around its box (above the top-left corner first, as
detection pictures usually show it, then inside the box, below it, at the right-hand
corners, then stacked further above and below); every place is shifted into the picture,
and the first one that overlaps no tag placed before wins. Tags are placed in the order
given, so the caller lists the most important (most confident) boxes first. When every
place is taken, the one with the least overlap is used: in a crowded picture a label may
still cover part of another, but it never leaves the picture.
"""

from __future__ import annotations

from collections.abc import Sequence

Rect = tuple[int, int, int, int]
"""``(left, top, right, bottom)`` in pixels, right and bottom exclusive."""

STACK_STEPS = 4
"""How many tag heights further above and below the box a tag may be pushed."""


def _overlap(a: Rect, b: Rect) -> int:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return width * height if width > 0 and height > 0 else 0


def _inside(left: int, top: int, size: tuple[int, int], canvas: tuple[int, int]) -> Rect:
    """The tag at (left, top) shifted into the canvas (to its top-left when it is larger)."""
    width, height = size
    left = max(0, min(left, canvas[0] - width))
    top = max(0, min(top, canvas[1] - height))
    return left, top, left + width, top + height


def _candidates(box: Rect, size: tuple[int, int]) -> list[tuple[int, int]]:
    left, top, right, bottom = box
    width, height = size
    places = [
        (left, top - height),  # above, left-aligned
        (left, top),  # inside, top-left
        (left, bottom),  # below, left-aligned
        (left, bottom - height),  # inside, bottom-left
        (right - width, top - height),  # above, right-aligned
        (right - width, bottom),  # below, right-aligned
    ]
    for step in range(2, STACK_STEPS + 2):
        places.append((left, top - step * height))
        places.append((left, bottom + (step - 1) * height))
    return places


def place_labels(
    boxes: Sequence[Rect], sizes: Sequence[tuple[int, int]], canvas: tuple[int, int]
) -> list[Rect]:
    """One tag rectangle per box, inside ``canvas`` and, where there is room, overlap-free.

    Args:
        boxes: The boxes the tags belong to, most important first.
        sizes: ``(width, height)`` of each box's tag.
        canvas: ``(width, height)`` of the picture.

    Returns:
        The tag rectangles, in the order of ``boxes``.
    """
    placed: list[Rect] = []
    for box, size in zip(boxes, sizes):
        options = [_inside(left, top, size, canvas) for left, top in _candidates(box, size)]
        # min() keeps the first of equally good places, so the preference order decides ties.
        placed.append(min(options, key=lambda rect: sum(_overlap(rect, o) for o in placed)))
    return placed


__all__ = ["Rect", "place_labels"]
