"""Training throughput of YOLOX-nano on this CPU, and the share of the step spent in SimOTA.

For each input size the script times, on one synthetic batch with a few boxes per image:

- the full training step: forward, ``YOLOXHeadLoss`` (SimOTA + terms), backward, SGD step;
- a baseline step of the same network with a trivial loss (mean of the head maps), so the
  ratio full / baseline shows what the detection loss costs on top of the network;
- the time inside the assigner (wrapped with a timer), as a share of the full step.

Usage::

    .venv/bin/python benchmarks/yolox_step.py [--sizes 256 416] [--batch 8] [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch

from vistrain.model.yolox import YOLOX
from vistrain.op.detect.simota import SimOTAAssigner
from vistrain.op.detect.yolox import YOLOXHeadLoss, YOLOXOut


class TimedAssigner:
    """Wraps an assigner and sums the wall time of its calls (CPU: no sync needed)."""

    def __init__(self, inner: SimOTAAssigner) -> None:
        self.inner = inner
        self.seconds = 0.0

    def __call__(self, *args: Any) -> Any:
        """Call the wrapped assigner and add its wall time."""
        start = time.perf_counter()
        out = self.inner(*args)
        self.seconds += time.perf_counter() - start
        return out


def synthetic_batch(
    batch: int, size: int, num_classes: int, gen: torch.Generator
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    images = torch.full((batch, 3, size, size), 114.0)
    boxes, classes = [], []
    for i in range(batch):
        n = int(torch.randint(2, 7, (1,), generator=gen))
        wh = torch.rand(n, 2, generator=gen) * size * 0.4 + size * 0.05
        xy = torch.rand(n, 2, generator=gen) * (size - wh)
        b = torch.cat((xy, xy + wh), dim=1)
        for x1, y1, x2, y2 in b.round().long().tolist():
            images[i, :, y1:y2, x1:x2] = torch.rand(3, 1, 1, generator=gen) * 255
        boxes.append(b)
        classes.append(torch.randint(0, num_classes, (n,), generator=gen))
    return images, boxes, classes


def time_steps(step: Any, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def bench_size(size: int, args: argparse.Namespace, gen: torch.Generator) -> str:
    """Time the full and baseline steps at one input size; return the table row."""
    model = YOLOX(args.num_classes, "nano").train()
    loss = YOLOXHeadLoss(args.num_classes)
    timer = TimedAssigner(loss.assigner)
    loss.assigner = timer  # type: ignore[assignment]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    images, boxes, classes = synthetic_batch(args.batch, size, args.num_classes, gen)
    hw = [(size, size)] * args.batch

    def full_step() -> None:
        out = model(images)
        assert isinstance(out, YOLOXOut)
        terms = loss(out.cls_score, out.bbox_pred, out.objectness, boxes, classes, hw)
        optimizer.zero_grad(set_to_none=True)
        sum(terms.values()).backward()  # type: ignore[union-attr]
        optimizer.step()

    def base_step() -> None:
        out = model(images)
        assert isinstance(out, YOLOXOut)
        total = sum(t.mean() for t in (*out.cls_score, *out.bbox_pred, *out.objectness))
        optimizer.zero_grad(set_to_none=True)
        total.backward()  # type: ignore[union-attr]
        optimizer.step()

    base = time_steps(base_step, args.warmup, args.steps)
    timer.seconds = 0.0
    full = time_steps(full_step, args.warmup, args.steps)
    assign = timer.seconds / (args.steps + args.warmup)
    return (
        f"{size:>5} {args.batch / full:>8.2f} {full * 1e3:>8.1f} {base * 1e3:>8.1f} "
        f"{full / base:>9.3f} {assign * 1e3:>9.2f} {100 * assign / full:>7.2f}%"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 416])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=80)
    args = parser.parse_args()

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {threads} threads, YOLOX-nano, batch {args.batch}")
    print(
        f"{'size':>5} {'img/s':>8} {'step ms':>8} {'base ms':>8} {'step/base':>9} "
        f"{'assign ms':>9} {'assign %':>8}"
    )
    for size in args.sizes:
        print(bench_size(size, args, gen))


if __name__ == "__main__":
    main()
