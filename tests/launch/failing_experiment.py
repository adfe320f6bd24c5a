"""An experiment whose rank 1 fails while building: the launcher must end every process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from vistrain.zoo import toy_classifier


@dataclass
class Params(toy_classifier.Params):
    """Same parameters as the toy classifier."""


def build(params: Params, output_dir: str) -> Any:
    """Raise on rank 1 after rank 0 entered a collective-heavy training."""
    if os.environ.get("RANK") == "1":
        raise RuntimeError("rank 1 failed on purpose")
    return toy_classifier.build(params, output_dir)
