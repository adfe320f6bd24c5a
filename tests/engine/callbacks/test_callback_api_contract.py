"""The public callback API matches the seed reference: names, modules, arguments, hooks."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

import vistrain.engine.callbacks as callbacks
from vistrain.engine.callbacks import Callback, TrainerState
from vistrain.engine.connectors import CallbackConnector, pred_key

SEED_CLASSES = {
    "Callback": "base",
    "CheckpointCallback": "checkpoint",
    "EMACallback": "ema",
    "EvaluatorCallback": "evaluator",
    "LoggingCallback": "logging",
    "TrainerState": "trainer_state",
    "VisualizerCallback": "visualizer",
    "YOLOXModeSwitchCallback": "yolox_callbacks",
    "YOLOXSyncNormCallback": "yolox_callbacks",
    "YOLOXSyncRandomResizeCallback": "yolox_callbacks",
}

# Beyond the seed: callbacks this project adds to the package's exports.
PROJECT_CLASSES = {
    "EarlyStoppingCallback": "early_stopping",
    "ProfilerCallback": "profiler",
}

# (name, kind, default) of the constructor arguments the seed documents
SEED_INIT = {
    "Callback": [
        ("epoch_based", "pos", True),
        ("train_connector", "pos", None),
        ("test_connector", "pos", None),
    ],
    "EMACallback": [
        ("epoch_based", "pos", True),
        ("train_connector", "pos", None),
        ("test_connector", "pos", None),
    ],
    "YOLOXSyncNormCallback": [
        ("epoch_based", "pos", True),
        ("train_connector", "pos", None),
        ("test_connector", "pos", None),
    ],
    "CheckpointCallback": [
        ("save_prefix", "kw", inspect.Parameter.empty),
        ("checkpoint_period", "kw", 1),
    ],
    "EvaluatorCallback": [
        ("evaluator", "kw", inspect.Parameter.empty),
        ("metrics_to_eval", "kw", None),
        ("save_predictions", "kw", False),
        ("save_prefix", "kw", None),
    ],
    "LoggingCallback": [("refresh_rate", "kw", 50)],
    "VisualizerCallback": [
        ("visualizer", "kw", inspect.Parameter.empty),
        ("visualize_train", "kw", False),
        ("show", "kw", False),
        ("save_to_disk", "kw", True),
        ("save_prefix", "kw", None),
    ],
    "YOLOXModeSwitchCallback": [("switch_epoch", "kw", inspect.Parameter.empty)],
    "YOLOXSyncRandomResizeCallback": [
        ("size_list", "kw", inspect.Parameter.empty),
        ("interval", "kw", inspect.Parameter.empty),
    ],
}

SEED_HOOKS = {
    "setup": [],
    "on_train_batch_start": ["trainer_state", "model", "loss_module", "batch", "batch_idx"],
    "on_train_batch_end": [
        "trainer_state",
        "model",
        "loss_module",
        "outputs",
        "batch",
        "batch_idx",
    ],
    "on_train_epoch_start": ["trainer_state", "model", "loss_module"],
    "on_train_epoch_end": ["trainer_state", "model", "loss_module"],
    "on_test_epoch_start": ["trainer_state", "model"],
    "on_test_batch_end": [
        "trainer_state",
        "model",
        "outputs",
        "batch",
        "batch_idx",
        "dataloader_idx",
    ],
    "on_test_epoch_end": ["trainer_state", "model"],
    "get_train_callback_inputs": ["outputs", "batch"],
    "get_test_callback_inputs": ["outputs", "batch"],
}

PROJECT_HOOKS = {  # beyond the seed (DESIGN section 3)
    "on_validation_end": ["trainer_state", "model"],
    "on_save_checkpoint": ["trainer_state", "model"],
    "on_fit_end": ["trainer_state", "model"],
}


def test_exports_exactly_the_seed_names_from_the_seed_submodules() -> None:
    assert sorted(callbacks.__all__) == sorted({**SEED_CLASSES, **PROJECT_CLASSES})
    for name, submodule in {**SEED_CLASSES, **PROJECT_CLASSES}.items():
        module = importlib.import_module(f"vistrain.engine.callbacks.{submodule}")
        assert getattr(module, name) is getattr(callbacks, name)


@pytest.mark.parametrize("name", sorted(SEED_INIT))
def test_constructor_arguments_and_defaults(name: str) -> None:
    params = inspect.signature(getattr(callbacks, name).__init__).parameters
    for arg, kind, default in SEED_INIT[name]:
        assert arg in params, f"{name} lacks {arg}"
        param = params[arg]
        if kind == "kw":
            assert param.kind is inspect.Parameter.KEYWORD_ONLY, (name, arg)
        assert param.default == default, (name, arg, param.default)
    if name not in ("Callback", "EMACallback", "YOLOXSyncNormCallback"):
        assert any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params.values())
        assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@pytest.mark.parametrize(
    "name", sorted(n for n in {**SEED_CLASSES, **PROJECT_CLASSES} if n != "TrainerState")
)
def test_hook_signatures(name: str) -> None:
    cls = getattr(callbacks, name)
    assert issubclass(cls, Callback)
    for hook, args in {**SEED_HOOKS, **PROJECT_HOOKS}.items():
        params = list(inspect.signature(getattr(cls, hook)).parameters)
        assert params[1:] == args, (name, hook, params)
    dataloader_idx = inspect.signature(cls.on_test_batch_end).parameters["dataloader_idx"]
    assert dataloader_idx.default == 0


def test_trainer_state_fields() -> None:
    required = {
        "current_epoch",
        "num_epochs",
        "global_step",
        "num_steps",
        "train_dataloader",
        "num_train_batches",
        "test_dataloader",
        "num_test_batches",
    }
    assert TrainerState.__required_keys__ == required
    assert {
        "optimizers",
        "metrics",
        "lr_schedulers",
        "train_module",
    } <= TrainerState.__optional_keys__


def test_base_callback_connectors_and_state() -> None:
    cb = Callback()
    with pytest.raises(ValueError, match="train_connector"):
        cb.get_train_callback_inputs({}, {})
    with pytest.raises(ValueError, match="test_connector"):
        cb.get_test_callback_inputs({}, {})
    with pytest.raises(TypeError, match="CallbackConnector"):
        Callback(train_connector={"x": pred_key("x")})  # type: ignore[arg-type]
    assert cb.state_dict() == {}
    cb.load_state_dict({})
    with_conn = Callback(test_connector=CallbackConnector({"boxes": pred_key("boxes")}))
    assert with_conn.get_test_callback_inputs({"boxes": torch.ones(1)}, {})["boxes"].shape == (1,)
