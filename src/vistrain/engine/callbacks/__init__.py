"""Callback modules: the hooks every part of a run plugs into (see ``base.Callback``)."""

from vistrain.engine.callbacks.base import Callback
from vistrain.engine.callbacks.checkpoint import CheckpointCallback
from vistrain.engine.callbacks.early_stopping import EarlyStoppingCallback
from vistrain.engine.callbacks.ema import EMACallback
from vistrain.engine.callbacks.evaluator import EvaluatorCallback
from vistrain.engine.callbacks.logging import LoggingCallback
from vistrain.engine.callbacks.profiler import ProfilerCallback
from vistrain.engine.callbacks.trainer_state import TrainerState
from vistrain.engine.callbacks.visualizer import VisualizerCallback
from vistrain.engine.callbacks.yolox_callbacks import (
    YOLOXModeSwitchCallback,
    YOLOXSyncNormCallback,
    YOLOXSyncRandomResizeCallback,
)

__all__ = [
    "Callback",
    "CheckpointCallback",
    "EMACallback",
    "EarlyStoppingCallback",
    "EvaluatorCallback",
    "LoggingCallback",
    "ProfilerCallback",
    "TrainerState",
    "VisualizerCallback",
    "YOLOXModeSwitchCallback",
    "YOLOXSyncNormCallback",
    "YOLOXSyncRandomResizeCallback",
]
