"""A run whose training data yields no batch is refused before training, in both engines."""

from __future__ import annotations

import os

import pytest
from torch.utils.data import DataLoader

from trainer_fixtures import ToyDataset, ToyModel, toy_connectors, toy_loss_module
from vistrain.engine.callbacks.checkpoint import CheckpointCallback
from vistrain.engine.loop_state import NoTrainingStepsError
from vistrain.zoo.base import Experiment

EMPTY_CASES = {
    "empty": (0, False, "0 samples, batch_size=4"),
    "smaller_than_a_batch": (3, True, "3 samples, batch_size=4 per process, drop_last=True"),
}


def _experiment(folder: str, num: int, drop_last: bool) -> Experiment:
    import torch

    model = ToyModel()
    train_conn, test_conn = toy_connectors()
    train = DataLoader(ToyDataset(num), batch_size=4, drop_last=drop_last)
    return Experiment(
        model=model,
        loss_module=toy_loss_module(),
        optimizers=[torch.optim.SGD(model.parameters(), lr=0.1)],
        lr_schedulers=[],
        train_dataloader=train,
        test_dataloader=None,
        train_data_connector=train_conn,
        test_data_connector=test_conn,
        callbacks=[CheckpointCallback(save_prefix=folder)],
        trainer_kwargs={"num_epochs": 2, "tensorboard": False},
    )


@pytest.mark.parametrize("case", sorted(EMPTY_CASES))
@pytest.mark.parametrize("engine", ["native", "lightning"])
def test_zero_step_run_is_refused_before_training(tmp_path, engine, case):
    num, drop_last, expected = EMPTY_CASES[case]
    experiment = _experiment(str(tmp_path), num, drop_last)
    from vistrain.run import _fit_with

    with pytest.raises(NoTrainingStepsError) as err:
        _fit_with(engine, experiment, str(tmp_path), None)
    assert "yields no batch" in str(err.value) and expected in str(err.value)
    assert "\n" not in str(err.value)
    assert not os.path.exists(tmp_path / "checkpoints")  # nothing written: no callback setup
    assert not os.path.exists(tmp_path / "metrics.jsonl")
