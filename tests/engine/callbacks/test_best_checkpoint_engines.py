"""``best.ckpt`` under real engines: the file credited is the one its validation evaluated.

Step-based validation (``val_check_interval``) with ``CheckpointCallback(monitor=...)``,
under the native Trainer and under Lightning. The scores come from a scripted evaluator, so
the best validation is known; ``best.json`` must name the checkpoint saved at that
validation's step and record that validation's value, and ``best.ckpt`` must hold those
weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainer_fixtures import ENGINES, ScriptedValidation, read_metrics, run_toy
from vistrain.engine.callbacks import CheckpointCallback
from vistrain.engine.checkpoint_io import load_checkpoint

SCORES = (0.2, 0.9, 0.1, 0.5)
"""Scores of the successive validations; the second (step 8) is the best with mode="max"."""


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", ["max", "min"])
def test_best_checkpoint_is_the_one_its_validation_scored(
    tmp_path: Path, engine: str, mode: str
) -> None:
    if engine == "lightning":
        pytest.importorskip("lightning")
    scorer = ScriptedValidation(SCORES)
    saver = CheckpointCallback(
        save_prefix=str(tmp_path),
        epoch_based=False,
        checkpoint_period=4,
        monitor="score",
        mode=mode,
        async_save=False,
    )
    model = run_toy(
        engine,
        str(tmp_path),
        [scorer, saver],
        num_epochs=3,  # 6 batches per epoch: validations at steps 4, 8, 12, 16
        check_val_every_n_epoch=None,
        val_check_interval=4,
    )
    assert scorer.steps == [4, 8, 12, 16]
    logged = {r["step"]: r["value"] for r in read_metrics(str(tmp_path)) if r["tag"] == "val/score"}
    assert logged == dict(zip(scorer.steps, SCORES))
    best_step = (max if mode == "max" else min)(logged, key=logged.__getitem__)
    assert best_step == (8 if mode == "max" else 12)

    folder = tmp_path / "checkpoints"
    record = json.loads((folder / "best.json").read_text())
    assert record["global_step"] == best_step
    assert record["value"] == logged[best_step]
    assert record["file"] == f"epoch=1-step={best_step}.ckpt"
    best = load_checkpoint(folder / "best.ckpt")
    periodic = load_checkpoint(folder / record["file"])
    assert best["global_step"] == best_step
    assert all(torch.equal(best["state_dict"][k], v) for k, v in periodic["state_dict"].items())
    assert saver.state_dict()["best"]["value"] == logged[best_step]
    assert not torch.equal(best["state_dict"]["net.0.weight"], model.net[0].weight.detach())
