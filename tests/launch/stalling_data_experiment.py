"""The toy classifier whose training data stalls: a loader worker blocks inside a read.

After ``STALL_AFTER`` samples every ``__getitem__`` sleeps for a minute (a hung network or
disk read), so a worker can only end early if something ends it from outside.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from vistrain.data.loader import rebuild_dataloader
from vistrain.zoo import toy_classifier

STALL_AFTER = 64


@dataclass
class Params(toy_classifier.Params):
    """Same parameters as the toy classifier."""


class StallingDataset(Dataset[dict[str, Any]]):
    """Serves ``STALL_AFTER`` samples of ``inner`` normally, then blocks on each for 60 s."""

    def __init__(self, inner: Dataset[dict[str, Any]]) -> None:
        self.inner = inner
        self.served = 0

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, idx: int) -> dict[str, Any]:
        self.served += 1
        if self.served > STALL_AFTER:
            time.sleep(60.0)
        return self.inner[idx]


def build(params: Params, output_dir: str) -> Any:
    """The toy classifier training on ``StallingDataset``."""
    experiment = toy_classifier.build(params, output_dir)
    loader = experiment.train_dataloader
    assert loader is not None  # the toy classifier always has training data
    experiment.train_dataloader = rebuild_dataloader(loader, StallingDataset(loader.dataset))
    return experiment
