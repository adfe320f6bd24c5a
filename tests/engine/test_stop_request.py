"""``request_stop``: a callback ends training at the next step boundary, under both engines."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from trainer_fixtures import ENGINES, run_toy
from vistrain.engine.callbacks import Callback
from vistrain.engine.callbacks.checkpoint import CheckpointCallback
from vistrain.engine.checkpoint_io import load_checkpoint


class StopAtStep(Callback):
    """Requests a stop in ``on_train_batch_end`` of ``step``; records the steps it saw."""

    def __init__(self, step: int, checkpoint: bool) -> None:
        super().__init__()
        self.step = step
        self.checkpoint = checkpoint
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer_state: Any, *args: Any, **kwargs: Any) -> None:
        self.steps.append(trainer_state["global_step"])
        if trainer_state["global_step"] == self.step:
            trainer_state["train_module"].request_stop(
                "test", exit_code=3, checkpoint=self.checkpoint
            )


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("checkpoint", [True, False])
def test_request_stop_ends_at_that_step(tmp_path, engine: str, checkpoint: bool) -> None:
    stopper = StopAtStep(step=4, checkpoint=checkpoint)
    saver = CheckpointCallback(save_prefix=str(tmp_path))  # epoch-based: no file at step 4
    run_toy(engine, str(tmp_path), [stopper, saver], num_epochs=3)
    assert stopper.steps == [1, 2, 3, 4]  # 6 steps per epoch: stopped mid-epoch 0
    files = sorted(os.listdir(tmp_path / "checkpoints"))
    if checkpoint:
        assert files == ["epoch=0-step=4.ckpt", "last.ckpt"]
        state = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
        assert state["global_step"] == 4
    else:
        assert files == []
    with open(tmp_path / "metrics.jsonl") as handle:
        steps = {json.loads(line)["step"] for line in handle}
    assert max(steps) == 4
