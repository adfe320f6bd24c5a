"""Bounding boxes drawn on images with Pillow.

``BoundingBoxVisualizer`` draws each predicted box as a solid rectangle outline in a colour
that belongs to its class, with a ``name score`` label on a filled tag of the same colour;
ground-truth boxes, when given, are drawn beside them as dashed outlines of their class
colour without a label, so a miss or a wrong class shows at a glance. Labels are laid out
by ``vistrain.vis.layout``: next to their box, inside the picture, not on top of each other
(the most confident boxes choose first). Pictures whose shorter side is below ``min_size``
pixels are enlarged by a whole factor first (nearest neighbour, so pixels stay sharp and
boxes land exactly), because a 160-pixel image leaves no room for readable text.

Boxes are xyxy in the pixels of the image they are drawn on, which for ``original_images``
means original-image pixels; ground truth in another frame (a resized network input) is
mapped with ``gt_hw``. Pictures are written as ``<image_name>.png``, each through a
temporary file and ``os.replace`` so a reader never sees a half-written PNG.
"""

from __future__ import annotations

import colorsys
import functools
import math
import os
import uuid
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from vistrain.vis.base import Visualizer, display_available
from vistrain.vis.layout import Rect, place_labels

_GOLDEN_RATIO_CONJUGATE = 0.618033988749895


def class_color(class_id: int) -> tuple[int, int, int]:
    """The RGB colour of a class: hues spread by the golden ratio, so neighbours differ."""
    hue = (0.12 + class_id * _GOLDEN_RATIO_CONJUGATE) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return round(red * 255), round(green * 255), round(blue * 255)


def _text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    red, green, blue = background
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else (255, 255, 255)


LABEL_FONT_SIZE = 12
"""Pixel size of label text (Pillow's built-in FreeType font; its bitmap font without one)."""

DASH = (6, 4)
"""Ground-truth outlines: drawn and skipped pixels along each edge."""


@functools.lru_cache(maxsize=1)
def _label_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=LABEL_FONT_SIZE)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType: bitmap font
        return ImageFont.load_default()


def _dashed_rectangle(
    canvas: ImageDraw.ImageDraw, rect: Rect, color: tuple[int, int, int], width: int
) -> None:
    """A rectangle outline of dashes (``DASH``), ``width`` pixels thick, inside ``rect``."""
    left, top, right, bottom = rect
    on, off = DASH
    for start in range(left, right + 1, on + off):
        end = min(start + on - 1, right)
        canvas.rectangle((start, top, end, top + width - 1), fill=color)
        canvas.rectangle((start, bottom - width + 1, end, bottom), fill=color)
    for start in range(top, bottom + 1, on + off):
        end = min(start + on - 1, bottom)
        canvas.rectangle((left, start, left + width - 1, end), fill=color)
        canvas.rectangle((right - width + 1, start, right, end), fill=color)


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _image_to_pil(image: Any, index: int) -> Image.Image:
    array = _to_numpy(image)
    if array.dtype != np.uint8:
        raise TypeError(
            f"images[{index}] has dtype {array.dtype}; BoundingBoxVisualizer draws on original "
            "uint8 HxWx3 images (e.g. batch['original_images']), not normalised network inputs."
        )
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return Image.fromarray(array, mode="L").convert("RGB")
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(array[..., :3]), mode="RGB")
    raise ValueError(
        f"images[{index}] has shape {tuple(array.shape)}; expected HxWx3 (channels last). "
        "Pass original images, not CxHxW tensors."
    )


def _column(value: Any, index: int, what: str, num_boxes: int) -> np.ndarray:
    array = _to_numpy(value).reshape(-1)
    if array.shape[0] != num_boxes:
        raise ValueError(
            f"{what}[{index}] has {array.shape[0]} entries but boxes[{index}] has {num_boxes} "
            "boxes; they must match one to one."
        )
    return array


def _box_array(boxes: Any, index: int, what: str) -> np.ndarray:
    """``boxes`` as an (N, 4) float array; an empty input gives (0, 4)."""
    array = _to_numpy(boxes).astype(np.float64, copy=False)
    if array.size == 0:
        return np.zeros((0, 4))
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"{what}[{index}] has shape {tuple(array.shape)}; expected (N, 4) xyxy.")
    return array


def _safe_name(name: Any) -> str:
    text = str(name).replace("/", "_").replace("\\", "_")
    if text in ("", ".", ".."):
        raise ValueError(f"Image name {name!r} cannot be a file name; give each image a name.")
    return text


class BoundingBoxVisualizer(Visualizer):
    """Draws predicted boxes (solid, labelled) and ground truth (dashed) per class colour.

    Args:
        vis_freq: Draw on iterations that are a multiple of this.
        class_names: Names by class index (list, or dict from index to name); None labels
            boxes with the index.
        score_threshold: Boxes whose score is below this are not drawn (ignored when no
            scores are given).
        max_images: Draw at most this many images between two ``reset()`` calls; None
            draws every image it is given.
        line_width: Width of the box outlines in pixels (of the enlarged picture).
        min_size: Enlarge pictures whose shorter side is below this by the smallest whole
            factor that reaches it, so labels stay readable; 0 keeps the image's size.

    Raises:
        TypeError / ValueError: For arguments of the wrong type or out of range.
    """

    def __init__(
        self,
        vis_freq: int = 50,
        class_names: Sequence[str] | Mapping[int, str] | None = None,
        score_threshold: float = 0.3,
        max_images: int | None = None,
        line_width: int = 2,
        min_size: int = 320,
    ) -> None:
        super().__init__(vis_freq)
        if class_names is not None and (
            isinstance(class_names, str) or not isinstance(class_names, (Sequence, Mapping))
        ):
            raise TypeError(
                f"class_names must be a list of names or a dict of index to name, got "
                f"{type(class_names).__name__}."
            )
        if not isinstance(score_threshold, (int, float)) or not math.isfinite(score_threshold):
            raise ValueError(f"score_threshold={score_threshold!r} must be a finite number.")
        if max_images is not None and (isinstance(max_images, bool) or max_images < 1):
            raise ValueError(f"max_images={max_images!r} must be None or at least 1.")
        if isinstance(line_width, bool) or not isinstance(line_width, int) or line_width < 1:
            raise ValueError(f"line_width={line_width!r} must be an int of at least 1.")
        if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
            raise ValueError(f"min_size={min_size!r} must be an int >= 0 (0 = never enlarge).")
        self.class_names = class_names
        self.score_threshold = float(score_threshold)
        self.max_images = max_images
        self.line_width = line_width
        self.min_size = min_size
        self._drawn: list[tuple[str, Image.Image]] = []
        self._made_folders: set[str] = set()
        self._warned_no_display = False

    @property
    def drawn(self) -> list[tuple[str, Image.Image]]:
        """The pictures drawn since the last ``reset()``, as (name, image) pairs."""
        return list(self._drawn)

    def class_name(self, class_id: int) -> str:
        """The name of a class index (the index itself when no name is known)."""
        names = self.class_names
        if isinstance(names, Mapping):
            return str(names.get(class_id, class_id))
        if names is not None and 0 <= class_id < len(names):
            return str(names[class_id])
        return str(class_id)

    def scale_factor(self, width: int, height: int) -> int:
        """The whole factor a ``width`` x ``height`` image is enlarged by (1 = not at all)."""
        shorter = max(1, min(width, height))
        return max(1, math.ceil(self.min_size / shorter)) if self.min_size else 1

    def process(  # type: ignore[override]
        self,
        cur_iter: int,
        images: Sequence[Any] | np.ndarray | Tensor,
        image_names: Sequence[Any],
        boxes: Sequence[Any],
        scores: Sequence[Any] | None = None,
        class_ids: Sequence[Any] | None = None,
        gt_boxes: Sequence[Any] | None = None,
        gt_class_ids: Sequence[Any] | None = None,
        gt_hw: Sequence[Any] | None = None,
    ) -> None:
        """Draw the boxes of every image if ``cur_iter % vis_freq == 0``.

        Args:
            cur_iter: Global step (training) or batch index (testing).
            images: Original images, each HxWx3 uint8 (numpy arrays or tensors).
            image_names: One name per image; the file is ``<name>.png``.
            boxes: Per image, an (N, 4) array of xyxy boxes in that image's pixels.
            scores: Per image, (N,) confidences; None for ground truth (no threshold).
            class_ids: Per image, (N,) class indices; None draws every box in one colour.
            gt_boxes: Per image, (M, 4) ground-truth xyxy boxes, drawn dashed; None: none.
            gt_class_ids: Per image, (M,) ground-truth class indices (colours).
            gt_hw: Per image, the (h, w) the ground-truth pixels refer to when it is not
                the image's own size (e.g. a batch's ``input_hw`` after a resize); the
                boxes are scaled to the image per axis.

        Raises:
            ValueError: If the lists have different lengths or shapes do not match.
            TypeError: If an image is not uint8.
        """
        if not self.should_process(cur_iter):
            return
        num = len(images)
        optional: dict[str, Sequence[Any] | None] = {
            "image_names": image_names,
            "boxes": boxes,
            "scores": scores,
            "class_ids": class_ids,
            "gt_boxes": gt_boxes,
            "gt_class_ids": gt_class_ids,
            "gt_hw": gt_hw,
        }
        for what, values in optional.items():  # the first two are required
            if values is not None and len(values) != num:
                raise ValueError(f"{len(values)} {what} for {num} images; pass one per image.")

        def item(values: Sequence[Any] | None, index: int) -> Any:
            return None if values is None else values[index]

        for index in range(num):
            if self.max_images is not None and len(self._drawn) >= self.max_images:
                break
            picture = self.draw(
                images[index],
                boxes[index],
                item(scores, index),
                item(class_ids, index),
                index=index,
                gt_boxes=item(gt_boxes, index),
                gt_class_ids=item(gt_class_ids, index),
                gt_hw=item(gt_hw, index),
            )
            self._drawn.append((_safe_name(image_names[index]), picture))

    def draw(
        self,
        image: Any,
        boxes: Any,
        scores: Any | None = None,
        class_ids: Any | None = None,
        index: int = 0,
        gt_boxes: Any | None = None,
        gt_class_ids: Any | None = None,
        gt_hw: Any | None = None,
    ) -> Image.Image:
        """Draw one image's boxes and return the picture (the input is not modified).

        Args:
            image: HxWx3 uint8 array or tensor.
            boxes: (N, 4) xyxy boxes in the image's pixels.
            scores: (N,) confidences or None.
            class_ids: (N,) class indices or None.
            index: Position of the image in its batch (for error messages).
            gt_boxes: (M, 4) ground-truth xyxy boxes or None (drawn dashed, no label).
            gt_class_ids: (M,) ground-truth class indices or None.
            gt_hw: (h, w) the ground-truth pixels refer to; None = the image's size.
        """
        picture = _image_to_pil(image, index)
        width, height = picture.size
        factor = self.scale_factor(width, height)
        if factor > 1:
            picture = picture.resize((width * factor, height * factor), Image.Resampling.NEAREST)
        canvas = ImageDraw.Draw(picture)
        if gt_boxes is not None:
            gt_array = _box_array(gt_boxes, index, "gt_boxes")
            if gt_hw is not None:
                gt_h, gt_w = (float(v) for v in _to_numpy(gt_hw).reshape(-1)[:2])
                gt_array = gt_array * np.array([width / gt_w, height / gt_h] * 2)
            gt_classes = (
                None
                if gt_class_ids is None
                else _column(gt_class_ids, index, "gt_class_ids", gt_array.shape[0])
            )
            for box_index in range(gt_array.shape[0]):
                rect = self._pixel_rect(gt_array[box_index] * factor, picture.size)
                if rect is not None:
                    class_id = 0 if gt_classes is None else int(gt_classes[box_index])
                    _dashed_rectangle(canvas, rect, class_color(class_id), self.line_width)
        box_array = _box_array(boxes, index, "boxes")
        num_boxes = box_array.shape[0]
        score_array = None if scores is None else _column(scores, index, "scores", num_boxes)
        class_array = (
            None if class_ids is None else _column(class_ids, index, "class_ids", num_boxes)
        )
        order = np.arange(num_boxes)
        if score_array is not None:
            keep = score_array.astype(np.float64) >= self.score_threshold
            order = order[keep]
            # Low scores first, so confident boxes end up on top.
            order = order[np.argsort(score_array[order], kind="stable")]
        labels: list[tuple[Rect, str, tuple[int, int, int]]] = []
        for box_index in order.tolist():
            rect = self._pixel_rect(box_array[box_index] * factor, picture.size)
            if rect is None:
                continue
            class_id = 0 if class_array is None else int(class_array[box_index])
            color = class_color(class_id)
            canvas.rectangle(rect, outline=color, width=self.line_width)
            parts = [] if class_array is None else [self.class_name(class_id)]
            if score_array is not None:
                parts.append(f"{float(score_array[box_index]):.2f}")
            if parts:
                labels.append((rect, " ".join(parts), color))
        # Labels after every outline, so no box line crosses a label; the most confident
        # box (drawn last) chooses its label's place first.
        self._draw_labels(canvas, labels[::-1], picture.size)
        return picture

    @staticmethod
    def _pixel_rect(box: np.ndarray, size: tuple[int, int]) -> Rect | None:
        """The box as whole pixels clipped to the picture; None when invalid or outside."""
        width, height = size
        x0, y0, x1, y1 = (float(v) for v in box)
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 < x0 or y1 < y0:
            return None
        if x1 < 0 or y1 < 0 or x0 > width - 1 or y0 > height - 1:
            return None
        return (
            max(0, round(x0)),
            max(0, round(y0)),
            min(width - 1, round(x1)),
            min(height - 1, round(y1)),
        )

    def _draw_labels(
        self,
        canvas: ImageDraw.ImageDraw,
        labels: list[tuple[Rect, str, tuple[int, int, int]]],
        size: tuple[int, int],
    ) -> None:
        """Filled tags with the texts, placed by ``place_labels`` (in the order given)."""
        font = _label_font()
        pad = 1
        extents = [
            tuple(round(v) for v in canvas.textbbox((0, 0), text, font=font))
            for _, text, _ in labels
        ]
        tag_sizes = [
            (right - left + 2 * pad, bottom - top + 2 * pad) for left, top, right, bottom in extents
        ]
        # Boxes as exclusive rectangles: the tag above a box ends where its outline starts.
        anchors = [
            (left, top, right + 1, bottom + 1) for (left, top, right, bottom), _, _ in labels
        ]
        tags = place_labels(anchors, tag_sizes, size)
        for (_, text, color), extent, tag in zip(labels, extents, tags):
            canvas.rectangle((tag[0], tag[1], tag[2] - 1, tag[3] - 1), fill=color)
            canvas.text(
                (tag[0] + pad - extent[0], tag[1] + pad - extent[1]),
                text,
                fill=_text_color(color),
                font=font,
            )

    def show(self, cur_iter: int, blocking: bool = True) -> None:
        """Open the drawn pictures in the system's image viewer, if there is a display.

        Without a display (no DISPLAY / WAYLAND_DISPLAY on Linux) this warns once per
        visualizer and does nothing. Pillow hands pictures to an external viewer, so the
        call returns at once whatever ``blocking`` says.
        """
        if not self._drawn:
            return
        if not display_available():
            if not self._warned_no_display:
                self._warned_no_display = True
                warnings.warn(
                    "BoundingBoxVisualizer.show: no display found (DISPLAY and WAYLAND_DISPLAY "
                    "are unset), so pictures are not shown; save them with save_to_disk "
                    "instead. This warning is given once.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return
        for name, picture in self._drawn:
            picture.show(title=name)

    def save_to_disk(self, cur_iter: int, output_folder: str | os.PathLike[str]) -> None:
        """Write each drawn picture to ``<output_folder>/<image_name>.png`` (atomically).

        The folder is created on first use. Each file is written to a temporary name in the
        same folder and moved into place with ``os.replace``, so readers see either the old
        or the new picture, never a torn one.
        """
        if not self._drawn:
            return
        folder = os.fspath(output_folder)
        if folder not in self._made_folders:
            os.makedirs(folder, exist_ok=True)
            self._made_folders.add(folder)
        for name, picture in self._drawn:
            target = os.path.join(folder, f"{name}.png")
            temporary = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
            try:
                with open(temporary, "xb") as handle:
                    picture.save(handle, format="PNG")
                os.replace(temporary, target)
            except BaseException:
                if os.path.exists(temporary):
                    os.remove(temporary)
                raise

    def reset(self) -> None:
        """Forget the drawn pictures."""
        self._drawn = []
