"""The toy classifier, with checkpoints that take seconds to write (a signal can hit one).

An extra callback puts an object into every checkpoint whose pickling announces itself in
``<output_dir>/pickling`` and then sleeps, inside ``torch.save``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from vistrain.engine.callbacks.base import Callback
from vistrain.zoo import toy_classifier


@dataclass
class Params(toy_classifier.Params):
    """Same parameters as the toy classifier."""


class SlowToPickle:
    """Sleeps when pickled, after writing a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        with open(self.marker, "a") as handle:
            handle.write("pickling\n")
        time.sleep(2.0)
        return (str, ("slow",))


class SlowStateCallback(Callback):
    """Holds a ``SlowToPickle`` in its checkpoint state."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def state_dict(self) -> dict[str, Any]:
        """A state whose pickling is slow."""
        return {"slow": SlowToPickle(self.marker)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore."""


def build(params: Params, output_dir: str) -> Any:
    """The toy classifier plus ``SlowStateCallback``."""
    experiment = toy_classifier.build(params, output_dir)
    experiment.callbacks.append(SlowStateCallback(os.path.join(output_dir, "pickling")))
    return experiment
