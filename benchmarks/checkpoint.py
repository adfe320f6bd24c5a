"""How long does a checkpoint save block training, blocking against asynchronous?

A ResNet-18-sized model (11.7M parameters) trained with SGD momentum gives about 94 MB of
state. For 1 and 2 compute threads the script measures, per save:

* blocking: the time ``save_checkpoint`` + ``last.ckpt`` link holds the training thread;
* asynchronous: the time ``AsyncCheckpointWriter.save`` holds it (CPU snapshot), plus the
  extra time of the training steps that ran while the background write was in flight
  (their time minus the same number of undisturbed steps): the write's hidden cost;
* the time to load the checkpoint and restore model and optimizer.

Ratios are against the blocking save measured in the same run. Usage::

    .venv/bin/python benchmarks/checkpoint.py [--rounds 5] [--batch 8] [--size 64] [--dir DIR]
        [--device cuda]

On ``--device cuda`` the model trains on the GPU; a save then includes the copy to the host.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import torch
from torch import nn

from resnet18 import resnet18
from vistrain.engine.checkpoint_io import (
    AsyncCheckpointWriter,
    check_model_state,
    link_checkpoint,
    load_checkpoint,
    save_checkpoint,
    snapshot_to_cpu,
)


def state_of(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    return {
        "format": "vistrain-checkpoint",
        "version": 1,
        "epoch": 0,
        "epoch_finished": False,
        "batches_done": step,
        "global_step": step,
        "state_dict": model.state_dict(),
        "optimizers": [opt.state_dict()],
        "lr_schedulers": [],
        "callbacks": {},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="saves per configuration")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="input image side")
    parser.add_argument("--dir", default=None, help="folder to write to (default: a temp dir)")
    parser.add_argument("--device", default="cpu", help="device the model trains on")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = resnet18().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def train_step() -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(images), labels).backward()
        opt.step()
        sync()
        return time.perf_counter() - start

    n_params = sum(p.numel() for p in model.parameters())
    train_step()
    state_mb = (
        sum(
            t.numel() * t.element_size()
            for t in [*model.state_dict().values()]
            + [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        )
        / 1e6
    )
    print(
        f"model: {n_params / 1e6:.2f}M parameters, state {state_mb:.1f} MB, "
        f"batch {args.batch}x3x{args.size}x{args.size}, {os.cpu_count()} cores, device={device}"
    )

    folder = args.dir or tempfile.mkdtemp(prefix="vistrain-ckpt-bench-")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "bench.ckpt")
    last = os.path.join(folder, "last.ckpt")

    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for _ in range(3):
            train_step()
        base_step = statistics.median(train_step() for _ in range(10))

        blocking = []
        for step in range(args.rounds):
            start = time.perf_counter()
            save_checkpoint(state_of(model, opt, step), path)
            link_checkpoint(path, last)
            blocking.append(time.perf_counter() - start)
            train_step()
        block_s = statistics.median(blocking)

        snaps = []
        for step in range(args.rounds):
            start = time.perf_counter()
            snapshot_to_cpu(state_of(model, opt, step))
            snaps.append(time.perf_counter() - start)
        snap_s = statistics.median(snaps)

        writer = AsyncCheckpointWriter()
        blocked, extras, slowdowns = [], [], []
        for step in range(args.rounds):
            start = time.perf_counter()
            writer.save(state_of(model, opt, step), path, links=[last])
            blocked.append(time.perf_counter() - start)
            during = []
            while writer.in_flight:
                during.append(train_step())
            writer.wait()
            # The same number of undisturbed steps right after: a baseline under the same load.
            after = [train_step() for _ in range(max(2, len(during)))][: len(during)]
            extras.append(sum(during) - sum(after))
            slowdowns.append(sum(during) / sum(after) if during else 1.0)
        writer.close()
        async_blocked = statistics.median(blocked)
        async_extra = max(0.0, statistics.median(extras))
        rows.append((threads, base_step, block_s, snap_s, async_blocked, async_extra, slowdowns))

    loads = []
    for _ in range(3):
        start = time.perf_counter()
        ckpt = load_checkpoint(path)
        check_model_state(model, ckpt["state_dict"], path)
        model.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizers"][0])
        loads.append(time.perf_counter() - start)
    load_s = statistics.median(loads)
    size_mb = os.path.getsize(path) / 1e6

    print(f"file {size_mb:.1f} MB; times are medians of {args.rounds} saves, in ms\n")
    header = (
        f"{'threads':>7} {'step':>7} {'blocking':>9} {'fresh snap':>10} {'async blk':>10} "
        f"{'blk/blocking':>13} {'hidden':>8} {'async total/blocking':>21} {'step x in flight':>17}"
    )
    print(header)
    for threads, step_s, block_s, snap_s, blk_s, extra_s, slow in rows:
        print(
            f"{threads:>7} {step_s * 1e3:>7.1f} {block_s * 1e3:>9.1f} {snap_s * 1e3:>10.1f} "
            f"{blk_s * 1e3:>10.1f} {blk_s / block_s:>13.2f} {extra_s * 1e3:>8.1f} "
            f"{(blk_s + extra_s) / block_s:>21.2f} {statistics.median(slow):>17.2f}"
        )
    print(f"\nload + check + restore model and optimizer: {load_s * 1e3:.1f} ms")
    print(
        "blocking = training blocked by save+fsync+link; fresh snap = a CPU snapshot into new\n"
        "memory; async blk = training blocked by AsyncCheckpointWriter.save (snapshot into the\n"
        "reused buffers of the previous one); hidden = extra time of the steps run while the\n"
        "write was in flight, against as many undisturbed steps right after; step x in flight =\n"
        "their time ratio; async total = async blk + hidden."
    )


if __name__ == "__main__":
    main()
