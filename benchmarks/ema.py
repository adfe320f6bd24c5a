"""Benchmark: cost of one EMA update against copying the same tensors.

A ResNet-18 (11.7M parameters, BatchNorm buffers) built here in plain torch. Timed, on
one thread by default, as the median over interleaved rounds:

* ``foreach copy``: ``torch._foreach_copy_`` of every EMA tensor from the model (baseline:
  the least work any EMA can do is to touch every tensor once).
* ``per-tensor copy``: ``ema.copy_(model)`` tensor by tensor in Python.
* ``per-tensor lerp loop``: the naive EMA, ``ema.lerp_(model, 1 - d)`` tensor by tensor.
* ``ModelEMAAdapter.update``: the adapter's fused update (pairs collected once, reused).
* ``collect + update``: the adapter's update with the pairs collected again every time
  (``refresh()`` before each update), to show what re-collecting per update would cost.

Run: ``.venv/bin/python benchmarks/ema.py [--threads 1] [--rounds 40] [--device cpu]``
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch

from resnet18 import resnet18
from vistrain.model.adapter import ModelEMAAdapter


def _time_ms(
    fns: dict[str, Callable[[], None]], rounds: int, sync: Callable[[], None]
) -> dict[str, tuple[float, float]]:
    """Median and minimum wall time of each function, in milliseconds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm up (allocations, caches, lazy pair building)
        for _ in range(3):
            fn()
    sync()
    order = list(fns)
    shuffler = random.Random(0)
    for _ in range(rounds):
        shuffler.shuffle(order)  # interleaved in random order: drift and position hit all alike
        for name in order:
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: (1e3 * statistics.median(v), 1e3 * min(v)) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    torch.manual_seed(0)
    adapter = ModelEMAAdapter(resnet18(), decay=0.9998).to(device)
    model, ema = adapter.model, adapter.ema_model
    n_params = sum(p.numel() for p in model.parameters())
    model_named = dict(model.named_parameters()) | dict(model.named_buffers())
    ema_named = dict(ema.named_parameters()) | dict(ema.named_buffers())
    names = list(ema_named)
    ema_all = [ema_named[n] for n in names]
    src_all = [model_named[n] for n in names]
    floating = [i for i, t in enumerate(ema_all) if t.is_floating_point()]
    integer = [i for i, t in enumerate(ema_all) if not t.is_floating_point()]
    weight = 1.0 - adapter.decay

    @torch.no_grad()
    def foreach_copy() -> None:
        torch._foreach_copy_(ema_all, src_all)

    @torch.no_grad()
    def loop_copy() -> None:
        for e, s in zip(ema_all, src_all):
            e.copy_(s)

    @torch.no_grad()
    def loop_lerp() -> None:
        for i in floating:
            ema_all[i].lerp_(src_all[i], weight)
        for i in integer:
            ema_all[i].copy_(src_all[i])

    step = [0]

    def adapter_update() -> None:
        step[0] += 1
        adapter.update(step[0])

    def collect_and_update() -> None:
        adapter.refresh()
        adapter_update()

    results = _time_ms(
        {
            "foreach copy (baseline)": foreach_copy,
            "per-tensor copy": loop_copy,
            "per-tensor lerp loop": loop_lerp,
            "ModelEMAAdapter.update": adapter_update,
            "collect + update": collect_and_update,
        },
        args.rounds,
        sync,
    )

    base, base_min = results["foreach copy (baseline)"]
    print(
        f"ResNet-18: {n_params / 1e6:.2f}M parameters, {len(ema_all)} tensors "
        f"({len(integer)} integer buffers); device={device}, threads={args.threads}, "
        f"rounds={args.rounds}, torch {torch.__version__}"
    )
    print(f"  {'':26s} {'median':>9s}      ratio   {'min':>9s}      ratio")
    for name, (med, low) in results.items():
        print(
            f"  {name:26s} {med:9.3f} ms {med / base:5.2f}x   {low:9.3f} ms {low / base_min:5.2f}x"
        )
    ratio = results["ModelEMAAdapter.update"][0] / base
    print(f"goal <= 1.10x copy (medians): {'met' if ratio <= 1.10 else 'NOT met'} ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
