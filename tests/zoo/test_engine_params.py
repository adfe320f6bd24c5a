"""The engine options every built-in experiment takes with ``--set``."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from cli_helpers import toy_args
from vistrain.cli import main
from vistrain.engine.checkpoint_io import load_checkpoint
from vistrain.zoo import toy_classifier, yolox_coco, yolox_shapes
from vistrain.zoo.base import apply_overrides
from vistrain.zoo.engine_params import EngineParams

ENGINE_KEYS = [field.name for field in dataclasses.fields(EngineParams)]
SETTINGS = [
    "precision=bf16-mixed",
    "accumulate_grad_batches=2",
    "gradient_clip_val=1.5",
    "gradient_clip_algorithm=value",
    "compile=eager",
    "channels_last=true",
]
EXPECTED = {
    "precision": "bf16-mixed",
    "accumulate_grad_batches": 2,
    "gradient_clip_val": 1.5,
    "gradient_clip_algorithm": "value",
    "compile": "eager",
    "channels_last": True,
}


def test_the_keys_are_the_six_engine_options() -> None:
    assert list(EXPECTED) == ENGINE_KEYS


RECIPE_VALUES = {
    toy_classifier: {},
    # the shapes recipe runs channels-last with its gradients' norm clipped at 10 (issue 17)
    yolox_shapes: {"channels_last": True, "gradient_clip_val": 10.0},
}


@pytest.mark.parametrize("module", [toy_classifier, yolox_shapes])
def test_every_key_reaches_the_trainer_kwargs_and_defaults_add_only_the_recipes(module) -> None:
    recipe = RECIPE_VALUES[module]
    assert module.Params().engine_trainer_kwargs() == recipe
    params = apply_overrides(module.Params(), SETTINGS)
    assert params.engine_trainer_kwargs() == EXPECTED
    assert apply_overrides(module.Params(), ["compile=true"]).engine_trainer_kwargs() == {
        **recipe,
        "compile": True,
    }
    plain = ["channels_last=false", "gradient_clip_val=none"]
    assert apply_overrides(module.Params(), plain).engine_trainer_kwargs() == {}


def test_yolox_coco_takes_the_same_keys() -> None:
    params = dataclasses.replace(yolox_coco.Params(), **EXPECTED)
    assert params.engine_trainer_kwargs() == EXPECTED
    assert set(ENGINE_KEYS) <= {field.name for field in dataclasses.fields(yolox_coco.Params)}


def test_toy_classifier_build_passes_the_options_to_the_trainer(tmp_path) -> None:
    params = apply_overrides(
        toy_classifier.Params(), ["num_train_images=8", "num_val_images=4", *SETTINGS]
    )
    experiment = toy_classifier.build(params, str(tmp_path))
    for key, value in EXPECTED.items():
        assert experiment.trainer_kwargs[key] == value
    assert experiment.trainer_kwargs["num_epochs"] == params.num_epochs


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("precision=16", "precision='16' is not one of 32, bf16-mixed, 16-mixed"),
        ("accumulate_grad_batches=0", "accumulate_grad_batches=0 must be an integer >= 1"),
        ("gradient_clip_val=-1", "gradient_clip_val=-1.0 must be a finite number > 0"),
        ("gradient_clip_algorithm=max", "gradient_clip_algorithm='max' is not one of norm"),
        ("compile=fast", "compile='fast' is not True, False or a torch.compile backend"),
        ("channels_last=maybe", "channels_last='maybe': expected bool"),
    ],
)
@pytest.mark.parametrize("config", ["toy_classifier", "yolox_shapes"])
def test_bad_values_are_one_line_cli_errors(tmp_path, capsys, config, setting, message) -> None:
    out = tmp_path / "out"
    assert main(["fit", "--config", config, "--set", setting, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith("vistrain: error:") and err.count("\n") == 1
    assert not out.exists()


def test_cli_trains_compiled_and_channels_last_with_plain_checkpoint_names(tmp_path) -> None:
    out = str(tmp_path / "run")
    sets = ["num_epochs=1", "num_train_images=32", "num_val_images=8", "batch_size=8"]
    sets += ["compile=eager", "channels_last=true", "ema=false"]
    assert main(["fit", *toy_args(*sets), "--output-dir", out]) == 0
    state = load_checkpoint(os.path.join(out, "checkpoints", "last.ckpt"))["state_dict"]
    plain = toy_classifier.SmallCNN().state_dict()
    assert list(state) == list(plain)
    assert state["features.0.weight"].shape == plain["features.0.weight"].shape
    assert torch.isfinite(state["head.weight"]).all()
    # vistrain test loads those plain names into the model and evaluates it compiled.
    ckpt = os.path.join(out, "checkpoints", "last.ckpt")
    test_args = ["test", *toy_args(*sets), "--output-dir", str(tmp_path / "test"), "--ckpt", ckpt]
    assert main(test_args) == 0
