"""Label placement: next to the box, inside the picture, no two labels on top of each other."""

from __future__ import annotations

import itertools

from vistrain.vis.layout import Rect, place_labels


def _overlap(a: Rect, b: Rect) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def test_a_lone_label_sits_above_the_top_left_corner() -> None:
    assert place_labels([(50, 40, 90, 80)], [(30, 10)], (200, 100)) == [(50, 30, 80, 40)]


def test_labels_at_the_edges_are_moved_inside() -> None:
    canvas = (100, 60)
    boxes = [(0, 0, 20, 20), (95, 50, 100, 60), (-10, 30, 5, 40)]
    tags = place_labels(boxes, [(40, 12)] * 3, canvas)
    for left, top, right, bottom in tags:
        assert left >= 0 and top >= 0 and right <= canvas[0] and bottom <= canvas[1]
    assert tags[0] == (0, 0, 40, 12)  # no room above: inside the box's top-left corner


def test_crowded_labels_do_not_overlap_while_there_is_room() -> None:
    boxes = [(40, 40, 60, 60)] * 6 + [(45, 45, 70, 70)] * 3
    tags = place_labels(boxes, [(30, 10)] * len(boxes), (200, 200))
    for a, b in itertools.combinations(tags, 2):
        assert not _overlap(a, b), (a, b)
    assert tags[0] == (40, 30, 70, 40)  # the first (most important) keeps the usual place


def test_without_room_the_least_covered_place_is_taken_and_stays_inside() -> None:
    boxes = [(0, 0, 10, 10)] * 5
    tags = place_labels(boxes, [(20, 10)] * 5, (20, 20))  # room for two tags only
    assert tags[0] != tags[1]
    assert all(t[0] >= 0 and t[1] >= 0 and t[2] <= 20 and t[3] <= 20 for t in tags)
