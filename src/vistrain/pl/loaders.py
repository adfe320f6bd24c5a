"""Iterables handed to Lightning in place of the experiment's data loaders.

Lightning calls ``iter()`` on its training data *before* ``on_train_epoch_start`` (in epoch 0
and whenever it reloads loaders) and on its validation data before the validation hooks. The
native loop starts both iterators *after* those hooks, and that order matters:

- a loader handed over with ``set_train_dataloader`` from ``on_train_epoch_start`` must serve
  that same epoch (the YOLOX mode switch after a resume relies on it);
- the random generators are captured at the epoch start (for mid-epoch resume) and around
  validation (so validating never changes training randomness) *before* the DataLoader draws
  its worker seeds from them.

Both proxies below therefore return a generator from ``__iter__``: Python runs none of its
body until the first ``next()``, which Lightning only calls once the hooks have run. The
training proxy asks the engine for the epoch's batches; the test proxy wraps one loader.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from vistrain.pl.engine import LightningEngine


class EpochLoader:
    """The training data as Lightning sees it: the engine's current loader, started lazily.

    ``len()`` is the number of batches the coming (or running) epoch yields, so Lightning's
    ``num_training_batches`` matches the native loop, also for the shortened first epoch of a
    mid-epoch resume.
    """

    def __init__(self, engine: LightningEngine) -> None:
        self._engine = engine

    def __len__(self) -> int:
        return self._engine.epoch_length()

    def __iter__(self) -> Iterator[Any]:
        return self._engine.epoch_batches()


class LazyLoader:
    """A test loader whose iterator is created at the first ``next()``, not at ``iter()``."""

    def __init__(self, loader: DataLoader[Any]) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        yield from self.loader
