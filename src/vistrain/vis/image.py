"""Bounding boxes drawn on images with Pillow.

``BoundingBoxVisualizer`` draws each box as a rectangle outline in a colour that belongs to
its class, with a ``name score`` label on a filled tag of the same colour just above the
box's top-left corner (inside the box when there is no room above). Boxes are xyxy in the
pixels of the image they are drawn on, which for ``original_images`` means original-image
pixels. Pictures are written as ``<image_name>.png``, each through a temporary file and
``os.replace`` so a reader never sees a half-written PNG.
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

_GOLDEN_RATIO_CONJUGATE = 0.618033988749895


def class_color(class_id: int) -> tuple[int, int, int]:
    """The RGB colour of a class: hues spread by the golden ratio, so neighbours differ."""
    hue = (0.12 + class_id * _GOLDEN_RATIO_CONJUGATE) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return round(red * 255), round(green * 255), round(blue * 255)


def _text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    red, green, blue = background
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else (255, 255, 255)


@functools.lru_cache(maxsize=1)
def _label_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


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


def _safe_name(name: Any) -> str:
    text = str(name).replace("/", "_").replace("\\", "_")
    if text in ("", ".", ".."):
        raise ValueError(f"Image name {name!r} cannot be a file name; give each image a name.")
    return text


class BoundingBoxVisualizer(Visualizer):
    """Draws predicted or ground-truth boxes with a colour per class and a label.

    Args:
        vis_freq: Draw on iterations that are a multiple of this.
        class_names: Names by class index (list, or dict from index to name); None labels
            boxes with the index.
        score_threshold: Boxes whose score is below this are not drawn (ignored when no
            scores are given).
        max_images: Draw at most this many images between two ``reset()`` calls; None
            draws every image it is given.
        line_width: Width of the box outlines in pixels.

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
        self.class_names = class_names
        self.score_threshold = float(score_threshold)
        self.max_images = max_images
        self.line_width = line_width
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

    def process(  # type: ignore[override]
        self,
        cur_iter: int,
        images: Sequence[Any] | np.ndarray | Tensor,
        image_names: Sequence[Any],
        boxes: Sequence[Any],
        scores: Sequence[Any] | None = None,
        class_ids: Sequence[Any] | None = None,
    ) -> None:
        """Draw the boxes of every image if ``cur_iter % vis_freq == 0``.

        Args:
            cur_iter: Global step (training) or batch index (testing).
            images: Original images, each HxWx3 uint8 (numpy arrays or tensors).
            image_names: One name per image; the file is ``<name>.png``.
            boxes: Per image, an (N, 4) array of xyxy boxes in that image's pixels.
            scores: Per image, (N,) confidences; None for ground truth (no threshold).
            class_ids: Per image, (N,) class indices; None draws every box in one colour.

        Raises:
            ValueError: If the lists have different lengths or shapes do not match.
            TypeError: If an image is not uint8.
        """
        if not self.should_process(cur_iter):
            return
        num = len(images)
        for what, values in (("image_names", image_names), ("boxes", boxes)):
            if len(values) != num:
                raise ValueError(f"{len(values)} {what} for {num} images; pass one per image.")
        for what, optional in (("scores", scores), ("class_ids", class_ids)):
            if optional is not None and len(optional) != num:
                raise ValueError(f"{len(optional)} {what} for {num} images; pass one per image.")
        for index in range(num):
            if self.max_images is not None and len(self._drawn) >= self.max_images:
                break
            picture = self.draw(
                images[index],
                boxes[index],
                None if scores is None else scores[index],
                None if class_ids is None else class_ids[index],
                index=index,
            )
            self._drawn.append((_safe_name(image_names[index]), picture))

    def draw(
        self,
        image: Any,
        boxes: Any,
        scores: Any | None = None,
        class_ids: Any | None = None,
        index: int = 0,
    ) -> Image.Image:
        """Draw one image's boxes and return the picture (the input is not modified).

        Args:
            image: HxWx3 uint8 array or tensor.
            boxes: (N, 4) xyxy boxes in the image's pixels.
            scores: (N,) confidences or None.
            class_ids: (N,) class indices or None.
            index: Position of the image in its batch (for error messages).
        """
        picture = _image_to_pil(image, index)
        box_array = _to_numpy(boxes).astype(np.float64, copy=False)
        if box_array.size == 0:
            return picture
        if box_array.ndim != 2 or box_array.shape[1] != 4:
            raise ValueError(
                f"boxes[{index}] has shape {tuple(box_array.shape)}; expected (N, 4) xyxy."
            )
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
        canvas = ImageDraw.Draw(picture)
        width, height = picture.size
        for box_index in order:
            x0, y0, x1, y1 = box_array[box_index]
            if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 < x0 or y1 < y0:
                continue
            if x1 < 0 or y1 < 0 or x0 > width - 1 or y0 > height - 1:
                continue
            left, top = max(0, round(x0)), max(0, round(y0))
            right, bottom = min(width - 1, round(x1)), min(height - 1, round(y1))
            class_id = 0 if class_array is None else int(class_array[box_index])
            color = class_color(class_id)
            canvas.rectangle((left, top, right, bottom), outline=color, width=self.line_width)
            parts = [] if class_array is None else [self.class_name(class_id)]
            if score_array is not None:
                parts.append(f"{float(score_array[box_index]):.2f}")
            if parts:
                self._draw_label(canvas, " ".join(parts), left, top, color, width)
        return picture

    def _draw_label(
        self,
        canvas: ImageDraw.ImageDraw,
        text: str,
        left: int,
        top: int,
        color: tuple[int, int, int],
        image_width: int,
    ) -> None:
        """A filled tag with the text, above the box corner (inside it when at the top edge)."""
        font = _label_font()
        text_left, text_top, text_right, text_bottom = canvas.textbbox((0, 0), text, font=font)
        pad = 1
        tag_width = text_right - text_left + 2 * pad
        tag_height = text_bottom - text_top + 2 * pad
        tag_top = top - tag_height if top - tag_height >= 0 else top + self.line_width
        tag_left = max(0, min(left, image_width - tag_width))
        canvas.rectangle(
            (tag_left, tag_top, tag_left + tag_width - 1, tag_top + tag_height - 1), fill=color
        )
        canvas.text(
            (tag_left + pad - text_left, tag_top + pad - text_top),
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
