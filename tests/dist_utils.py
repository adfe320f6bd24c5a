"""Run a function in N real gloo processes from a test.

Usage::

    def _body(rank: int, world_size: int, x: int) -> int:  # module-level, picklable
        ...
        return value

    results = run_distributed(_body, 2, 5)  # [value_rank0, value_rank1]

The worker function must live at module level of a test module (spawned children import
it by name). Test file basenames must be unique across tests/ for that reason.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vistrain.common.distributed import destroy_process_group
from vistrain.engine.callbacks import Callback


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    out_dir: str,
    args: tuple[Any, ...],
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    finished = False
    try:
        result = fn(rank, world_size, *args)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as handle:
            pickle.dump(result, handle)
        finished = True
    finally:
        # waits for the peers only after success: a failed rank's peers may be gone
        destroy_process_group(wait_for_peers=finished)


def run_distributed(fn: Callable[..., Any], world_size: int = 2, *args: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; return each result.

    A failure in any rank raises in the caller with that rank's traceback.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _worker,
            args=(fn, world_size, free_port(), out_dir, args),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        results = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as handle:
                results.append(pickle.load(handle))
        return results


class AllReduceCounter(Callback):
    """Counts DDP's gradient all-reduces per training batch, under either engine.

    At the first batch start (before the first forward) it registers a comm hook on the
    DDP-wrapped model (the native engine hands callbacks the DDP model; under Lightning it
    is the trainer's ``model``) that all-reduces and averages as DDP's default does, and
    counts the buckets. ``per_batch`` holds, for every batch, how many buckets were
    all-reduced during it and whether the batch ended a window (``step_end``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.per_batch: list[tuple[int, bool]] = []
        self._hooked = False
        self._before = 0

    def on_train_batch_start(self, trainer_state, model, loss_module, batch, batch_idx) -> None:
        if not self._hooked:
            self._hooked = True
            ddp = model
            if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
                ddp = trainer_state["train_module"].trainer.model
            # No annotations: DDP compares them with its own as objects, and this module
            # has postponed (string) annotations.
            ddp.register_comm_hook(None, self._all_reduce)
        self._before = self.calls

    def _all_reduce(self, state, bucket):  # type: ignore[no-untyped-def]
        self.calls += 1
        tensor = bucket.buffer().div_(dist.get_world_size())
        future = dist.all_reduce(tensor, async_op=True).get_future()
        return future.then(lambda done: done.value()[0])

    def on_train_batch_end(self, trainer_state, model, loss_module, outputs, batch, batch_idx):
        self.per_batch.append((self.calls - self._before, trainer_state["step_end"]))
