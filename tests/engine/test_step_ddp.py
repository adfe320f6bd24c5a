"""Gradient accumulation under DDP: two real gloo processes, all-reduce only on stepping batches."""

from __future__ import annotations

import tempfile

import torch
from torch.utils.data import DataLoader

from dist_utils import AllReduceCounter, run_distributed
from trainer_fixtures import ToyDataset, ToyModel, toy_connectors, toy_loss_module
from vistrain.engine.trainer import Trainer


def _train(rank: int, world_size: int) -> tuple[list[tuple[int, bool]], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = ToyModel()
    counter = AllReduceCounter()
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
