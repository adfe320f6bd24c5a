"""Type aliases shared across vistrain."""

from __future__ import annotations

from typing import Any

from torch import Tensor

DictData = dict[str, Any]
"""A batch or a model output: string keys to tensors, lists or nested data."""

MetricLogs = dict[str, float | int | Tensor]
"""Scalars returned by hooks and evaluators, keyed by their log name."""
