from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import vistrain.vis.base as vis_base
from vistrain.vis import BoundingBoxVisualizer, Visualizer
from vistrain.vis.image import class_color

BLACK = (0, 0, 0)


def pixel(picture: Image.Image, x: int, y: int) -> tuple[int, ...]:
    return tuple(picture.getpixel((x, y)))  # type: ignore[arg-type]


def draw_one(**kwargs: Any) -> tuple[Image.Image, np.ndarray]:
    image = np.zeros((100, 120, 3), dtype=np.uint8)
    kwargs.setdefault("min_size", 0)  # pixel positions below are those of the input image
    vis = BoundingBoxVisualizer(vis_freq=1, class_names=["cat", "dog", "bird"], **kwargs)
    vis.process(
        0,
        images=[image],
        image_names=["img0"],
        boxes=[np.array([[20.0, 40.0, 70.0, 90.0]])],
        scores=[np.array([0.9])],
        class_ids=[np.array([2])],
    )
    ((name, picture),) = vis.drawn
    assert name == "img0"
    return picture, image


def test_box_edges_have_the_class_colour_and_nothing_else_changes() -> None:
    picture, image = draw_one(line_width=2)
    color = class_color(2)
    assert picture.size == (120, 100)
    # Left, right, top and bottom edges, both pixels of the 2-pixel line.
    for x, y in [(20, 65), (21, 65), (70, 65), (69, 65), (45, 90), (45, 89), (60, 40), (60, 41)]:
        assert pixel(picture, x, y) == color, (x, y)
    # Inside the box and outside it, away from the label: untouched.
    for x, y in [(22, 65), (45, 65), (68, 88), (45, 42), (10, 65), (75, 65), (45, 95), (100, 20)]:
        assert pixel(picture, x, y) == BLACK, (x, y)
    # The label tag sits right above the top-left corner, in the class colour.
    tag = np.asarray(picture)[25:40, 20:60]
    assert (tag == np.array(color)).all(axis=-1).sum() > 50
    # Nothing right of the label above the box.
    assert (np.asarray(picture)[:40, 75:] == 0).all()
    assert (image == 0).all()  # the input is not drawn on


def test_line_width_and_colour_per_class() -> None:
    picture, _ = draw_one(line_width=1)
    assert pixel(picture, 20, 65) == class_color(2)
    assert pixel(picture, 21, 65) == BLACK
    colors = {class_color(c) for c in range(10)}
    assert len(colors) == 10  # distinct colours for neighbouring classes


def test_score_threshold_and_labels() -> None:
    vis = BoundingBoxVisualizer(vis_freq=1, score_threshold=0.5, min_size=0)
    image = torch.zeros(60, 80, 3, dtype=torch.uint8)  # tensors are accepted too
    boxes = torch.tensor([[10.0, 30.0, 30.0, 50.0], [50.0, 30.0, 70.0, 50.0]])
    vis.process(0, [image], ["a"], [boxes], [torch.tensor([0.7, 0.2])], [torch.tensor([0, 1])])
    picture = vis.drawn[0][1]
    assert pixel(picture, 10, 40) == class_color(0)
    assert pixel(picture, 50, 40) == BLACK  # below the threshold: not drawn
    assert vis.class_name(1) == "1"  # no names: the index


def test_ground_truth_without_scores_draws_every_box() -> None:
    vis = BoundingBoxVisualizer(
        vis_freq=1, class_names={4: "car"}, score_threshold=0.99, min_size=0
    )
    image = np.zeros((60, 80, 3), dtype=np.uint8)
    vis.process(0, [image], ["gt"], [np.array([[10, 30, 30, 50]])], None, [np.array([4])])
    assert pixel(vis.drawn[0][1], 10, 40) == class_color(4)
    assert vis.class_name(4) == "car" and vis.class_name(5) == "5"


def test_acts_only_every_vis_freq_iterations() -> None:
    vis = BoundingBoxVisualizer(vis_freq=5)
    image = np.zeros((20, 20, 3), dtype=np.uint8)
    args = ([image], ["x"], [np.zeros((0, 4))], [np.zeros(0)], [np.zeros(0)])
    for cur_iter in (1, 3, 4, 6, 9):
        vis.process(cur_iter, *args)
        assert vis.drawn == []
    vis.process(10, *args)
    assert len(vis.drawn) == 1
    vis.reset()
    assert vis.drawn == []
    assert isinstance(vis, Visualizer) and vis.should_process(0) and not vis.should_process(7)


def test_max_images_caps_pictures_until_reset() -> None:
    vis = BoundingBoxVisualizer(vis_freq=1, max_images=2)
    images = [np.zeros((8, 8, 3), dtype=np.uint8)] * 3
    vis.process(0, images, ["a", "b", "c"], [np.zeros((0, 4))] * 3)
    vis.process(0, images, ["d", "e", "f"], [np.zeros((0, 4))] * 3)
    assert [name for name, _ in vis.drawn] == ["a", "b"]


def test_save_to_disk_writes_named_pngs_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vis = BoundingBoxVisualizer(vis_freq=1, min_size=0)
    images = [np.full((30, 40, 3), 7, dtype=np.uint8), np.full((10, 10, 3), 9, dtype=np.uint8)]
    boxes = [np.array([[2, 2, 20, 20]]), np.zeros((0, 4))]
    made: list[str] = []
    real_makedirs = os.makedirs
    monkeypatch.setattr(
        os, "makedirs", lambda path, **kw: (made.append(path), real_makedirs(path, **kw))[1]
    )
    folder = tmp_path / "out" / "test"
    calls_after = []
    for cur_iter in (0, 1):  # the folder is created once, not per call
        vis.process(cur_iter, images, ["img_a", "sub/img_b"], boxes)
        vis.save_to_disk(cur_iter, str(folder))
        vis.reset()
        calls_after.append(len(made))
    assert made[0] == str(folder) and made.count(str(folder)) == 1
    assert calls_after[0] == calls_after[1]
    assert sorted(os.listdir(folder)) == ["img_a.png", "sub_img_b.png"]  # no temp files left
    saved = np.asarray(Image.open(folder / "img_a.png"))
    assert saved.shape == (30, 40, 3) and saved[25, 35].tolist() == [7, 7, 7]
    assert saved[10, 2].tolist() == list(class_color(0))


def test_failed_write_leaves_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vis = BoundingBoxVisualizer(vis_freq=1)
    (tmp_path / "a.png").write_bytes(b"old")

    def broken_save(self: Image.Image, fp: Any, *args: Any, **kwargs: Any) -> None:
        fp.write(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    vis.process(0, [np.zeros((4, 4, 3), dtype=np.uint8)], ["a"], [np.zeros((0, 4))])
    with pytest.raises(OSError, match="disk full"):
        vis.save_to_disk(0, str(tmp_path))
    assert os.listdir(tmp_path) == ["a.png"]
    assert (tmp_path / "a.png").read_bytes() == b"old"


def test_show_without_display_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(vis_base.sys, "platform", "linux")
    opened: list[str] = []
    monkeypatch.setattr(Image.Image, "show", lambda self, title=None: opened.append(title))
    vis = BoundingBoxVisualizer(vis_freq=1)
    vis.process(0, [np.zeros((4, 4, 3), dtype=np.uint8)], ["a"], [np.zeros((0, 4))])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vis.show(0)
        vis.show(0)
    assert len(caught) == 1 and "no display" in str(caught[0].message)
    assert opened == []
    monkeypatch.setenv("DISPLAY", ":0")
    vis.show(0)
    assert opened == ["a"]


def test_bad_inputs_name_the_problem() -> None:
    vis = BoundingBoxVisualizer(vis_freq=1)
    good = np.zeros((4, 4, 3), dtype=np.uint8)
    with pytest.raises(TypeError, match="uint8"):
        vis.process(0, [good.astype(np.float32)], ["a"], [np.zeros((0, 4))])
    with pytest.raises(ValueError, match="HxWx3"):
        vis.process(0, [np.zeros((3, 4, 5), dtype=np.uint8)], ["a"], [np.zeros((0, 4))])
    with pytest.raises(ValueError, match="2 boxes for 1 images"):
        vis.process(0, [good], ["a"], [np.zeros((0, 4))] * 2)
    with pytest.raises(ValueError, match="expected \\(N, 4\\)"):
        vis.process(0, [good], ["a"], [np.zeros((2, 5))])
    with pytest.raises(ValueError, match="scores\\[0\\] has 1 entries"):
        vis.process(0, [good], ["a"], [np.zeros((2, 4))], [np.zeros(1)])
    with pytest.raises(ValueError, match="vis_freq=0"):
        BoundingBoxVisualizer(vis_freq=0)
    with pytest.raises(ValueError, match="max_images"):
        BoundingBoxVisualizer(max_images=0)
    with pytest.raises(TypeError, match="class_names"):
        BoundingBoxVisualizer(class_names="cat")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_size"):
        BoundingBoxVisualizer(min_size=-1)
    with pytest.raises(ValueError, match="1 gt_boxes for 2 images"):
        vis.process(0, [good, good], ["a", "b"], [np.zeros((0, 4))] * 2, gt_boxes=[np.zeros(4)])


def _colour_mask(picture: Image.Image, color: tuple[int, int, int]) -> np.ndarray:
    return (np.asarray(picture) == np.array(color)).all(axis=-1)


def test_small_images_are_enlarged_by_a_whole_factor_with_the_boxes() -> None:
    vis = BoundingBoxVisualizer(vis_freq=1, line_width=1)  # default min_size=320
    image = np.zeros((120, 160, 3), dtype=np.uint8)
    image[10, 10] = 200  # one bright pixel becomes a 3x3 block (nearest neighbour)
    vis.process(0, [image], ["a"], [np.array([[20.0, 40.0, 60.0, 80.0]])])
    picture = vis.drawn[0][1]
    assert vis.scale_factor(160, 120) == 3 and picture.size == (480, 360)
    assert (np.asarray(picture)[30:33, 30:33] == 200).all()
    for x, y in [(60, 150), (180, 150), (120, 120), (120, 240)]:  # edges at 3x the input
        assert pixel(picture, x, y) == class_color(0), (x, y)
    big = BoundingBoxVisualizer(vis_freq=1)
    big.process(0, [np.zeros((400, 500, 3), dtype=np.uint8)], ["b"], [np.zeros((0, 4))])
    assert big.drawn[0][1].size == (500, 400)  # large enough: kept


def test_ground_truth_is_dashed_beside_solid_predictions() -> None:
    vis = BoundingBoxVisualizer(vis_freq=1, min_size=0, line_width=1, class_names=["a", "b"])
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    vis.process(
        0,
        [image],
        ["x"],
        boxes=[np.array([[110.0, 40.0, 190.0, 90.0]])],
        scores=[np.array([0.9])],
        class_ids=[np.array([1])],
        # ground truth in a frame twice the image's size (a resized input): mapped back
        gt_boxes=[np.array([[20.0, 80.0, 180.0, 180.0]])],
        gt_class_ids=[np.array([0])],
        gt_hw=[(200, 400)],
    )
    picture = vis.drawn[0][1]
    gt_edge = _colour_mask(picture, class_color(0))[40, 10:91]  # top edge of gt (10,40,90,90)
    pred_edge = _colour_mask(picture, class_color(1))[90, 110:191]  # bottom edge of prediction
    assert pred_edge.all()  # solid
    assert 0.4 < gt_edge.mean() < 0.8  # dashes and gaps
    assert _colour_mask(picture, class_color(0))[40:91, 10].any()  # left edge at x = 10
    assert not _colour_mask(picture, class_color(0))[:, 100:].any()  # no label for gt


def test_labels_of_stacked_boxes_do_not_cover_each_other_nor_leave_the_picture() -> None:
    # Four boxes at the same spot in the top-right corner: every label must be found whole.
    vis = BoundingBoxVisualizer(vis_freq=1, min_size=0, class_names=["c0", "c1", "c2", "c3"])
    image = np.zeros((120, 160, 3), dtype=np.uint8)
    box = [130.0, 0.0, 159.0, 20.0]
    vis.process(
        0,
        [image],
        ["x"],
        [np.array([box] * 4)],
        [np.array([0.9, 0.8, 0.7, 0.6])],
        [np.array([0, 1, 2, 3])],
    )
    picture = vis.drawn[0][1]
    assert picture.size == (160, 120)
    for class_id in range(4):
        mask = _colour_mask(picture, class_color(class_id))
        ring = np.zeros_like(mask)
        ring[0:21, 130:160] = True
        ring[2:19, 132:158] = False
        mask &= ~ring  # the box outline (the same for all four boxes) is not a label
        rows, cols = np.nonzero(mask)
        # a whole tag: as wide as its text ("cX 0.90") and as tall as a line of it
        assert cols.max() - cols.min() >= 25 and rows.max() - rows.min() >= 8, class_id
        assert mask.sum() > 0.4 * (cols.max() - cols.min()) * (rows.max() - rows.min())
