"""Callback modules."""

from vistrain.engine.callbacks.base import Callback
from vistrain.engine.callbacks.trainer_state import TrainerState

__all__ = ["Callback", "TrainerState"]
