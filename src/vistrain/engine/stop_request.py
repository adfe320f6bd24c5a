"""A request to end training early, and the ranks' agreement on it.

Anything may ask a run to stop: a signal (``vistrain.engine.stop_signal``), an early-stopping
rule, a time budget. It calls ``LoopState.request_stop(reason, exit_code, checkpoint)``; the
loop acts on it at the next step boundary (``LoopState.stop_requested``), where every rank
must take the same decision at the same step: otherwise one rank would leave while the others
wait in the next collective for ever. ``agree_on_stop`` is that decision, one small
all-reduce when distributed and nothing otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from vistrain.common.distributed import all_gather_object, is_distributed


@dataclass(frozen=True)
class StopRequest:
    """Why training ends before its limits, and how.

    Attributes:
        reason: What happened, for the user (``"SIGTERM"``, ``"early stopping: ..."``).
        exit_code: The command line's exit status (128 + the signal number for a signal,
            0 for a planned stop such as early stopping).
        checkpoint: Write a checkpoint at the stop step (through every ``CheckpointCallback``)
            so ``--resume`` continues exactly there.
    """

    reason: str
    exit_code: int = 0
    checkpoint: bool = True


@dataclass(frozen=True)
class StopReport:
    """Where a run stopped: the request, the position and the checkpoint written there."""

    request: StopRequest
    epoch: int
    global_step: int
    checkpoint_path: str | None


def agree_on_stop(local: StopRequest | None) -> StopRequest | None:
    """Collective when distributed: the stop every rank takes, or None to go on.

    One all-reduce (max) of a 0/1 flag; only when some rank wants to stop are the requests
    gathered (once per run), and every rank adopts the lowest rank's request.
    """
    if not is_distributed():
        return local
    flag = torch.tensor([0 if local is None else 1], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if int(flag.item()) == 0:
        return None
    return next(request for request in all_gather_object(local) if request is not None)


__all__ = ["StopReport", "StopRequest", "agree_on_stop"]
