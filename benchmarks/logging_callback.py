"""Per-step cost of LoggingCallback against no logging and against reading metrics every step.

A small MLP (256-256-256-10, batch 64, SGD) trains with five loss metrics (0-d tensors) per
step. Three loops run alternately for ``--rounds`` rounds of ``--steps`` steps each:

* ``bare``: the step alone (baseline);
* ``vistrain``: the step plus ``LoggingCallback(refresh_rate=50)``'s batch hooks (one line
  every 50 steps; lines go to a null handler). On the CPU the callback reads each metric at
  once into a float sum (reading CPU memory waits for nothing); on a GPU it keeps the
  tensors and sums them with one stack and one host transfer per line;
* ``item``: the step plus the common naive pattern, ``float(v)`` of every metric every step
  (a device sync per metric on a GPU; on the CPU close to what the callback does).

Printed: median time per step of each loop and the ratios against ``bare`` measured in the
same run, and the time spent inside the logging code alone (timed around the hook calls,
which is steadier than the difference of two noisy loop times). Usage::

    .venv/bin/python benchmarks/logging_callback.py [--steps 1000] [--rounds 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vistrain.common.progress import ProgressDisplay
from vistrain.engine.callbacks.logging import LoggingCallback


def make_step(device: torch.device) -> Callable[[], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    ).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    inputs = torch.randn(64, 256, device=device)
    targets = torch.randint(0, 10, (64,), device=device)

    def step() -> dict[str, torch.Tensor]:
        logits = model(inputs)
        ce = nn.functional.cross_entropy(logits, targets)
        reg = logits.pow(2).mean() * 1e-4
        loss = ce + reg
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {
            "loss": loss.detach(),
            "loss_ce": ce.detach(),
            "loss_reg": reg.detach(),
            "logit_max": logits.detach().max(),
            "logit_mean": logits.detach().mean(),
        }

    return step


def run(
    kind: str, step: Callable[[], dict[str, torch.Tensor]], steps: int, device: torch.device
) -> tuple[float, float]:
    """Seconds per step of one loop and of its logging code alone (after 20 warm-up steps)."""
    callback = LoggingCallback(refresh_rate=50)
    callback._display = ProgressDisplay()
    state: dict[str, Any] = {
        "current_epoch": 0,
        "num_epochs": 1,
        "global_step": 0,
        "num_steps": -1,
        "train_dataloader": None,
        "num_train_batches": steps + 20,
        "test_dataloader": None,
        "num_test_batches": None,
    }
    batch = {"images": torch.empty(64, 1)}
    kept: dict[str, float] = {}
    if kind == "vistrain":
        callback.on_train_epoch_start(state, None, None)  # type: ignore[arg-type]
    start = 0.0
    in_logging = 0.0
    clock = time.perf_counter
    for index in range(steps + 20):
        if index == 20:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = clock()
            in_logging = 0.0
        if kind == "vistrain":
            t0 = clock()
            callback.on_train_batch_start(state, None, None, batch, index)  # type: ignore[arg-type]
            in_logging += clock() - t0
        metrics = step()
        state["global_step"] += 1
        t0 = clock()
        if kind == "vistrain":
            state["metrics"] = metrics
            callback.on_train_batch_end(state, None, None, {}, batch, index)  # type: ignore[arg-type]
        elif kind == "item":
            for key, value in metrics.items():
                kept[key] = kept.get(key, 0.0) + float(value)
        in_logging += clock() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (clock() - start) / steps, in_logging / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    vistrain_logger = logging.getLogger("vistrain")
    vistrain_logger.addHandler(logging.NullHandler())
    vistrain_logger.setLevel(logging.INFO)
    vistrain_logger.propagate = False
    step = make_step(device)
    times: dict[str, list[float]] = {"bare": [], "vistrain": [], "item": []}
    inside: dict[str, list[float]] = {"bare": [], "vistrain": [], "item": []}
    for _ in range(args.rounds):
        for kind in times:
            per_step, in_logging = run(kind, step, args.steps, device)
            times[kind].append(per_step)
            inside[kind].append(in_logging)
    bare = statistics.median(times["bare"])
    print(f"device={device} steps={args.steps} rounds={args.rounds} (medians per step)")
    for kind, values in times.items():
        per_step = statistics.median(values)
        print(
            f"{kind:9s} {per_step * 1e6:9.1f} us/step  ratio to bare {per_step / bare:6.3f}  "
            f"in logging code {statistics.median(inside[kind]) * 1e6:7.1f} us/step"
        )


if __name__ == "__main__":
    main()
