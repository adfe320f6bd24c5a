"""Cost of the per-step stop agreement (``agree_on_stop``) in a 2-process gloo group.

Two processes train the toy classifier's ``SmallCNN`` under DDP (batch 16 per process,
32x32 images, one thread each) and, in alternating rounds, run the step boundary's
``agree_on_stop(None)`` after every step or not at all. The median time per step of each
kind and their ratio are printed (rank 0).

    python benchmarks/stop_check.py [--steps 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from vistrain.engine.stop_request import agree_on_stop
from vistrain.zoo.toy_classifier import SmallCNN


def _time_steps(
    model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, check: bool
) -> float:
    images = torch.rand(16, 3, 32, 32)
    labels = torch.randint(0, 4, (16,))
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images)["logits"], labels).backward()
        optimizer.step()
        if check:
            agree_on_stop(None)
    return (time.perf_counter() - start) / steps


def _worker(rank: int, steps: int, rounds: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(SmallCNN(norm="group"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    _time_steps(model, optimizer, 20, check=True)  # warm-up
    plain, checked = [], []
    for _ in range(rounds):
        plain.append(_time_steps(model, optimizer, steps, check=False))
        checked.append(_time_steps(model, optimizer, steps, check=True))
    if rank == 0:
        base, with_check = statistics.median(plain), statistics.median(checked)
        print(f"step without the check: {base * 1e3:.2f} ms")
        print(f"step with the check:    {with_check * 1e3:.2f} ms")
        print(f"ratio: {with_check / base:.3f}")
    dist.destroy_process_group()


def main() -> None:
    """Parse the arguments and run the two processes."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--port", type=int, default=29531)
    args = parser.parse_args()
    mp.spawn(_worker, args=(args.steps, args.rounds, args.port), nprocs=2)


if __name__ == "__main__":
    main()
