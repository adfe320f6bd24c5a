"""Distributed helpers on torch.distributed.

Every function works unchanged in a single process (no process group): it then
returns its input, rank 0 and world size 1. Functions that are *collectives* say so in
their docstring: every rank must call them, in the same order, never from inside a
rank-0-only branch.
"""

from __future__ import annotations

import datetime
import functools
import gc
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


def is_distributed() -> bool:
    """True when a process group is initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_world_size() -> int:
    """Number of processes in the default group (1 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def get_rank() -> int:
    """Global rank of this process (0 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def get_local_rank() -> int:
    """Rank of this process on its machine, from the launcher's ``LOCAL_RANK``."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_rank_zero() -> bool:
    """True on the process that writes files and prints summaries."""
    return get_rank() == 0


def rank_zero_only(func: Callable[..., R]) -> Callable[..., R | None]:
    """Decorator: run ``func`` on rank 0 only; other ranks get ``None``.

    Never decorate a function that calls a collective: the other ranks would wait forever.
    """

    @functools.wraps(func)
    def wrapped(*args: Any, **kwargs: Any) -> R | None:
        if is_rank_zero():
            return func(*args, **kwargs)
        return None

    return wrapped


def _uses_nccl() -> bool:
    return dist.is_initialized() and dist.get_backend() == "nccl"


def _collective_device() -> torch.device:
    """The device tensors must live on for collectives of the current backend."""
    if _uses_nccl():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Collective: wait for every rank. Works on gloo and NCCL (binds NCCL to this GPU)."""
    if not is_distributed():
        return
    if _uses_nccl():
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def broadcast(obj: T, src: int = 0) -> T:
    """Collective: return rank ``src``'s ``obj`` on every rank.

    Tensors are broadcast in place through ``dist.broadcast`` (every rank must pass a
    tensor of the same shape and dtype); any other picklable object goes through
    ``broadcast_object_list``.
    """
    if not is_distributed():
        return obj
    if isinstance(obj, torch.Tensor):
        device = obj.device
        work = obj.to(_collective_device())
        dist.broadcast(work, src=src)
        if work is not obj:
            obj.copy_(work.to(device))
        return obj
    holder = [obj if get_rank() == src else None]
    dist.broadcast_object_list(holder, src=src)
    return cast(T, holder[0])


def all_gather_object(obj: T) -> list[T]:
    """Collective: the list of every rank's ``obj``, ordered by rank."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_dict(values: Mapping[str, Any], reduce_op: str = "mean") -> dict[str, Any]:
    """Collective: reduce a dict of scalars across ranks with one ``all_reduce``.

    Args:
        values: Name to scalar (Python number or tensor). Every rank must pass the same keys.
        reduce_op: ``"sum"`` or ``"mean"``.

    Returns:
        A dict with the same keys; tensors stay tensors (on their device), numbers become floats.

    Raises:
        ValueError: If ``reduce_op`` is neither ``"sum"`` nor ``"mean"``.
    """
    if reduce_op not in ("sum", "mean"):
        raise ValueError(f"reduce_op={reduce_op!r} is not supported; use 'sum' or 'mean'.")
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    device = _collective_device()
    stacked = torch.stack(
        [torch.as_tensor(values[k], dtype=torch.float64, device=device).reshape(()) for k in keys]
    )
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    if reduce_op == "mean":
        stacked /= get_world_size()
    out: dict[str, Any] = {}
    for key, reduced in zip(keys, stacked):
        original = values[key]
        if isinstance(original, torch.Tensor):
            out[key] = reduced.to(device=original.device, dtype=original.dtype)
        else:
            out[key] = float(reduced)
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP, DataParallel and ``torch.compile`` wrappers at any depth of nesting."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def init_process_group(
    backend: str | None = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT
) -> bool:
    """Initialise the default group from a launcher's environment (``torchrun``).

    Chooses NCCL when CUDA is available and gloo otherwise, binds this process to its
    GPU, and sets a timeout on collectives so a failed peer ends the run instead of
    hanging it.

    Returns:
        True if a group was created, False when the environment names no launcher
        (``WORLD_SIZE`` unset or 1) or a group already exists.
    """
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(get_local_rank())
    dist.init_process_group(backend=backend, timeout=timeout)
    return True


def destroy_process_group(wait_for_peers: bool = False) -> None:
    """Tear the default group down if there is one.

    Args:
        wait_for_peers: Collective when True: free unreachable DDP reducers and wait for
            every rank first. Destroying the group while a peer still talks to it, or while
            a DDP reducer still holds it, can abort the process with "terminate called
            without an active exception". Pass False on error paths, where a peer may be gone.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait_for_peers:
        gc.collect()
        barrier()
    dist.destroy_process_group()
