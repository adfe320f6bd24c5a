"""Samples per second of vistrain's YOLOX training pipe against a plain OpenCV reference.

Both sides run the same steps with the same parameter ranges, one thread each
(``cv2.setNumThreads(1)``, ``torch.set_num_threads(1)``), on the same files, and end with the
same output: a float32 ``(3, H, W)`` RGB tensor and the boxes and classes as tensors.

- vistrain: ``yolox_train_pipe(COCODataset(...), size)`` from :mod:`vistrain.data`.
- reference: the steps written directly with OpenCV and NumPy, in official YOLOX's structure
  (``cv2.imread`` straight to RGB, mosaic of four on a grey canvas, ``cv2.warpAffine`` with
  rotation, scale, shear and translation cropping the canvas back to the input size, mixup
  blending a rescaled, maybe flipped, randomly placed fifth image, HSV jitter by lookup
  table, flip, resize keeping the aspect ratio and pad with grey 114, one conversion to
  float at the end), each step in its fastest plain form (``cv2.flip``, ``addWeighted``,
  no-op resizes skipped, channel planes widened to float). It uses the same interpolation
  rules as vistrain (bilinear enlarging, area averaging when shrinking, nothing when the
  size already fits) and the same box filtering, so the two do the same work per sample.

The data are generated shapes rendered at 640 px, cropped to 640x480 (COCO's usual shape) and
saved as JPEG with a COCO annotation file (``--png`` keeps them as PNG; ``--cache`` decodes
every image once up front, ``COCODataset(cache_images=True)`` on vistrain's side, so only the
transforms are timed). Within a round the two sides take turns sample by sample, each sample
seeded alike on both (so both draw the same parameters and do the same work; the script
checks that their boxes agree). It prints each side's samples/s per round, by wall clock and
by the thread's CPU time (steadier on a shared machine), and the ratio vistrain / reference
with its median and range over the rounds.

Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/data_pipeline.py [--size 640] [--rounds 5]
        [--samples 40] [--images 24] [--mixup-prob 1.0] [--cache] [--png]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from vistrain.data.datasets import COCODataset
from vistrain.data.datasets.shapes_render import render_shapes_image
from vistrain.data.presets import yolox_train_pipe

GREY = 114


def write_dataset(root: Path, num_images: int, png: bool) -> Path:
    """Render shapes at 640 px, crop to 640x480, save as JPEG (or PNG); return the JSON."""
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for index in range(num_images):
        pixels, objects = render_shapes_image(np.random.default_rng([7, index]), 640, 5, 8)
        pixels = pixels[:480]
        name = f"{index:06d}.{'png' if png else 'jpg'}"
        cv2.imwrite(str(root / "images" / name), cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
        images.append({"id": index + 1, "file_name": name, "height": 480, "width": 640})
        for obj in objects:
            x0, y0, x1, y1 = obj.box
            y1 = min(y1, 480)
            if y1 - y0 >= 4:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": index + 1,
                        "category_id": obj.class_index + 1,
                        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                        "iscrowd": 0,
                    }
                )
    categories = [{"id": i + 1, "name": f"c{i}"} for i in range(5)]
    path = root / "annotations.json"
    coco = {"images": images, "annotations": annotations, "categories": categories}
    path.write_text(json.dumps(coco))
    return path


def resize(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if image.shape[:2] == hw:
        return image
    shrink = hw[0] < image.shape[0] or hw[1] < image.shape[1]
    return cv2.resize(
        image, (hw[1], hw[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    )


def areas(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def keep(boxes: np.ndarray, full_areas: np.ndarray, aspect: float) -> np.ndarray:
    """Boxes with sides >= 2 px, >= 10% of their unclipped area and aspect below ``aspect``."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    asp = np.maximum(w / np.maximum(h, 1e-6), h / np.maximum(w, 1e-6))
    return (w >= 2) & (h >= 2) & (w * h >= 0.1 * full_areas) & (asp < aspect)


def clip(boxes: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    out = boxes.copy()
    out[:, 0::2] = out[:, 0::2].clip(0, hw[1])
    out[:, 1::2] = out[:, 1::2].clip(0, hw[0])
    return out


class OpenCVReference:
    """YOLOX's training augmentation written directly with OpenCV on uint8 arrays."""

    def __init__(self, dataset: COCODataset, size: int, mixup_prob: float, cache: bool) -> None:
        self.size = (size, size)
        self.mixup_prob = mixup_prob
        self.records = [
            (
                str(Path(dataset.image_root) / dataset._file_names[i]),
                dataset._boxes[i],
                dataset._classes[i],
            )
            for i in range(len(dataset))
        ]
        self.cache = [self.read(i) for i in range(len(self.records))] if cache else None

    def read(self, index: int) -> np.ndarray:
        # Straight to RGB, as vistrain's loader decodes (official YOLOX keeps BGR).
        return cv2.imread(self.records[index][0], cv2.IMREAD_COLOR_RGB)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        image = self.cache[index].copy() if self.cache is not None else self.read(index)
        return image, self.records[index][1].copy(), self.records[index][2].copy()

    def fitted(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        image, boxes, classes = self.load(index)
        r = min(self.size[0] / image.shape[0], self.size[1] / image.shape[1])
        hw = (max(1, round(image.shape[0] * r)), max(1, round(image.shape[1] * r)))
        sy, sx = hw[0] / image.shape[0], hw[1] / image.shape[1]
        return resize(image, hw), boxes * np.array([sx, sy, sx, sy], np.float32), classes

    def mosaic(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        h, w = self.size
        indices = [index] + [random.randrange(len(self.records)) for _ in range(3)]
        yc = int(random.uniform(0.5 * h, 1.5 * h))
        xc = int(random.uniform(0.5 * w, 1.5 * w))
        canvas = np.full((2 * h, 2 * w, 3), GREY, np.uint8)
        all_boxes, all_classes = [], []
        for k, i in enumerate(indices):
            tile, boxes, classes = self.fitted(i)
            th, tw = tile.shape[:2]
            top = yc - th if k in (0, 1) else yc
            left = xc - tw if k in (0, 2) else xc
            y0, x0 = max(top, 0), max(left, 0)
            y1, x1 = min(top + th, 2 * h), min(left + tw, 2 * w)
            canvas[y0:y1, x0:x1] = tile[y0 - top : y1 - top, x0 - left : x1 - left]
            moved = boxes + np.array([left, top, left, top], np.float32)
            clipped = clip(moved, (2 * h, 2 * w))
            ok = keep(clipped, areas(moved), math.inf)
            all_boxes.append(clipped[ok])
            all_classes.append(classes[ok])
        return canvas, np.concatenate(all_boxes), np.concatenate(all_classes)

    def affine(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, Any]:
        h, w = self.size
        angle = math.radians(random.uniform(-10, 10))
        zoom = random.uniform(0.1, 2.0)
        shx = math.tan(math.radians(random.uniform(-2, 2)))
        shy = math.tan(math.radians(random.uniform(-2, 2)))
        tx = random.uniform(-0.1, 0.1) * w
        ty = random.uniform(-0.1, 0.1) * h
        c, s = math.cos(angle) * zoom, math.sin(angle) * zoom
        lin = np.array([[1, shx], [shy, 1]]) @ np.array([[c, -s], [s, c]])
        centre = np.array([image.shape[1] / 2, image.shape[0] / 2])
        shift = np.array([w / 2 + tx, h / 2 + ty]) - lin @ centre
        matrix = np.concatenate([lin, shift[:, None]], axis=1)
        warped = cv2.warpAffine(image, matrix, (w, h), borderValue=(GREY, GREY, GREY))
        corners = boxes[:, [0, 1, 2, 1, 2, 3, 0, 3]].reshape(-1, 4, 2) @ lin.T + shift
        moved = np.concatenate([corners.min(1), corners.max(1)], 1).astype(np.float32)
        clipped = clip(moved, (h, w))
        ok = keep(clipped, areas(boxes) * abs(np.linalg.det(lin)), 20.0)
        return warped, clipped, ok

    def mixup(self, image: np.ndarray, boxes: np.ndarray, classes: np.ndarray) -> Any:
        other, o_boxes, o_classes = self.load(random.randrange(len(self.records)))
        h, w = image.shape[:2]
        zoom = min(h / other.shape[0], w / other.shape[1]) * random.uniform(0.5, 1.5)
        hw = (max(1, round(other.shape[0] * zoom)), max(1, round(other.shape[1] * zoom)))
        tile = resize(other, hw)
        o_boxes = o_boxes * np.array(
            [hw[1] / other.shape[1], hw[0] / other.shape[0]] * 2, np.float32
        )
        if random.random() < 0.5:
            tile = cv2.flip(tile, 1)
            o_boxes = np.stack(
                [hw[1] - o_boxes[:, 2], o_boxes[:, 1], hw[1] - o_boxes[:, 0], o_boxes[:, 3]], 1
            )
        top = random.randint(min(0, h - hw[0]), max(0, h - hw[0]))
        left = random.randint(min(0, w - hw[1]), max(0, w - hw[1]))
        canvas = np.full((h, w, 3), GREY, np.uint8)
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + hw[0], h), min(left + hw[1], w)
        canvas[y0:y1, x0:x1] = tile[y0 - top : y1 - top, x0 - left : x1 - left]
        moved = o_boxes + np.array([left, top, left, top], np.float32)
        clipped = clip(moved, (h, w))
        ok = keep(clipped, areas(moved), math.inf)
        blend = cv2.addWeighted(image, 0.5, canvas, 0.5, 0.0)
        return (
            blend,
            np.concatenate([boxes, clipped[ok]]),
            np.concatenate([classes, o_classes[ok]]),
        )

    def hsv(self, image: np.ndarray) -> np.ndarray:
        random.random()  # the draw of hsv_prob (1.0): keeps both sides' random streams equal
        shifts = []
        for gain in (10 / 360, 30 / 255, 30.0):
            amount = random.uniform(-gain, gain)
            shifts.append(amount if random.random() < 0.5 else 0.0)
        if not any(shifts):
            return image
        levels = np.arange(256, dtype=np.float64)
        table = np.stack(
            [
                np.round(levels + shifts[0] * 256) % 256,
                np.clip(np.round(levels + shifts[1] * 255), 0, 255),
                np.clip(np.round(levels + shifts[2]), 0, 255),
            ],
            -1,
        ).astype(np.uint8)
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)
        cv2.LUT(hsv, table.reshape(256, 1, 3), dst=hsv)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        random.random()  # the draw of mosaic_prob (1.0), as vistrain's pipe makes it
        image, boxes, classes = self.mosaic(index)
        image, boxes, ok = self.affine(image, boxes)
        boxes, classes = boxes[ok], classes[ok]
        if self.mixup_prob > 0 and random.random() < self.mixup_prob:
            image, boxes, classes = self.mixup(image, boxes, classes)
        image = self.hsv(image)
        if random.random() < 0.5:
            image = cv2.flip(image, 1)
            boxes = np.stack(
                [
                    image.shape[1] - boxes[:, 2],
                    boxes[:, 1],
                    image.shape[1] - boxes[:, 0],
                    boxes[:, 3],
                ],
                1,
            )
        r = min(self.size[0] / image.shape[0], self.size[1] / image.shape[1])
        hw = (max(1, round(image.shape[0] * r)), max(1, round(image.shape[1] * r)))
        if image.shape[:2] == self.size:
            padded = image
        else:
            padded = np.full((*self.size, 3), GREY, np.uint8)
            padded[: hw[0], : hw[1]] = resize(image, hw)
        boxes = boxes * np.array([hw[1] / image.shape[1], hw[0] / image.shape[0]] * 2, np.float32)
        planes = np.empty((3, *self.size), np.float32)  # fastest HWC bytes -> CHW floats
        for channel, plane in enumerate(cv2.split(padded)):
            planes[channel] = plane
        return {
            "images": torch.from_numpy(planes),
            "boxes2d": torch.from_numpy(np.ascontiguousarray(boxes, np.float32)),
            "boxes2d_classes": torch.from_numpy(classes),
        }


def check_same_work(vistrain: Any, reference: OpenCVReference, count: int) -> str:
    """Run both sides on the same seeds: the boxes must agree (same steps, same draws)."""
    pixel_diffs = []
    for index in range(count):
        random.seed(1000 + index)
        ours = vistrain[index]
        random.seed(1000 + index)
        theirs = reference[index]
        if not torch.allclose(ours["boxes2d"], theirs["boxes2d"], atol=1e-3):
            raise RuntimeError(f"sample {index}: the two pipelines' boxes differ")
        pixel_diffs.append(float((ours["images"] - theirs["images"]).abs().mean()))
    return (
        f"same boxes on {count} samples, mean |pixel difference| "
        f"{statistics.mean(pixel_diffs):.2f} (vistrain's half-pixel-exact warp)"
    )


def timed(pipe: Any, index: int, seed: int) -> np.ndarray:
    """Wall and CPU seconds for one sample of ``pipe``, its random draws seeded with ``seed``.

    Everything runs on the calling thread (one OpenCV and one PyTorch thread), so its CPU
    time is the work done; unlike wall time it does not count the time the thread waited
    for a core on a busy machine.
    """
    random.seed(seed)
    wall, cpu = time.perf_counter(), time.thread_time()
    out = pipe[index]
    elapsed = np.array([time.perf_counter() - wall, time.thread_time() - cpu])
    assert out["images"].shape[0] == 3 and out["images"].dtype == torch.float32
    return elapsed


def run_round(
    vistrain: Any, reference: OpenCVReference, start: int, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Samples/s (wall, CPU) of each side over ``count`` samples, interleaved one by one.

    Sample ``k`` runs on both sides with the same seed (so the same parameters and the same
    work), the side going first alternating: a change of the machine's load hits both alike.
    """
    n = len(reference.records)
    ours, theirs = np.zeros(2), np.zeros(2)
    for k in range(start, start + count):
        if k % 2 == 0:
            ours += timed(vistrain, k % n, k)
            theirs += timed(reference, k % n, k)
        else:
            theirs += timed(reference, k % n, k)
            ours += timed(vistrain, k % n, k)
    return count / ours, count / theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=640, help="training input size (px)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per side")
    parser.add_argument("--samples", type=int, default=40, help="samples per round")
    parser.add_argument("--images", type=int, default=24, help="images in the data set")
    parser.add_argument("--mixup-prob", type=float, default=1.0, help="0 for nano/tiny")
    parser.add_argument("--cache", action="store_true", help="decode every image up front")
    parser.add_argument("--png", action="store_true", help="PNG files instead of JPEG")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        ann = write_dataset(Path(tmp) / "data", args.images, args.png)
        coco = COCODataset(ann, Path(tmp) / "data" / "images", cache_images=args.cache)
        for index in range(len(coco) if args.cache else 0):
            coco[index]  # fills the cache
        vistrain = yolox_train_pipe(coco, args.size, mixup_prob=args.mixup_prob)
        reference = OpenCVReference(coco, args.size, args.mixup_prob, args.cache)
        same = check_same_work(vistrain, reference, 4)
        run_round(vistrain, reference, 0, 4)  # warm-up
        kind = "png" if args.png else "jpeg"
        print(f"size {args.size}, mixup_prob {args.mixup_prob}, cache {args.cache}, {kind}; {same}")
        print("samples/s per round (interleaved one by one, same seeds on both sides), by wall")
        print("clock and by the thread's CPU time (which ignores waiting for a busy machine):")
        ratios = []
        for index in range(args.rounds):
            ours, theirs = run_round(vistrain, reference, (index + 1) * args.samples, args.samples)
            ratios.append(ours / theirs)
            print(
                f"  round {index}: wall: vistrain {ours[0]:5.1f} reference {theirs[0]:5.1f} "
                f"ratio {ratios[-1][0]:.2f} | cpu: vistrain {ours[1]:5.1f} "
                f"reference {theirs[1]:5.1f} ratio {ratios[-1][1]:.2f}"
            )
        for column, clock in enumerate(("wall", "cpu")):
            values = [ratio[column] for ratio in ratios]
            print(
                f"ratio vistrain / reference ({clock}): median {statistics.median(values):.2f} "
                f"(min {min(values):.2f}, max {max(values):.2f}, {args.rounds} rounds)"
            )


if __name__ == "__main__":
    main()
