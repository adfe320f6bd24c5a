"""Gradient accumulation under DDP: two real gloo processes, all-reduce only on stepping batches."""

# No ``from __future__ import annotations``: DDP checks the comm hook's annotations as objects.
import tempfile
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from dist_utils import run_distributed
from trainer_fixtures import ToyDataset, ToyModel, toy_connectors, toy_loss_module
from vistrain.engine.callbacks import Callback
from vistrain.engine.trainer import Trainer


class CountAllReduce(Callback):
    """Registers a counting all-reduce comm hook on the DDP model before the first forward.

    ``per_batch`` holds, for every batch, how many gradient buckets were all-reduced during
    it and whether the batch ended a window.
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

            def hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
                self.calls += 1
                tensor = bucket.buffer().div_(dist.get_world_size())
                fut = dist.all_reduce(tensor, async_op=True).get_future()
                return fut.then(lambda f: f.value()[0])

            model.register_comm_hook(None, hook)
        self._before = self.calls

    def on_train_batch_end(self, trainer_state, model, loss_module, outputs, batch, batch_idx):
        self.per_batch.append((self.calls - self._before, trainer_state["step_end"]))


def _train(rank: int, world_size: int) -> tuple[list[tuple[int, bool]], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = ToyModel()
    counter = CountAllReduce()
    train = DataLoader(ToyDataset(20, seed=10 + rank), batch_size=4, shuffle=False)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            "cpu", out, train, None, *toy_connectors(), [counter],
            num_epochs=1, accumulate_grad_batches=2, tensorboard=False,
        )  # fmt: skip
        trainer.fit(model, torch.optim.SGD(model.parameters(), lr=0.1), None, toy_loss_module())
    return counter.per_batch, [p.detach().clone() for p in model.parameters()]


def test_ddp_all_reduces_only_on_batches_that_step() -> None:
    (batches0, weights0), (batches1, weights1) = run_distributed(_train, 2)
    # 5 batches: windows [0, 1], [2, 3], [4]; all-reduce on batches 1, 3 and 4 only.
    assert [end for _, end in batches0] == [False, True, False, True, True]
    assert all((count > 0) == end for count, end in batches0), batches0
    assert batches0 == batches1
    # The accumulated gradients were reduced: both ranks (different data) hold equal weights.
    assert all(torch.equal(a, b) for a, b in zip(weights0, weights1))
