"""Accumulation under the Lightning engine, next to the native one: step validation and DDP.

Epochs here are 5 batches and windows 2, so every epoch ends with a partial window (which
steps): windows [0, 1], [2, 3], [4].
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from dist_utils import AllReduceCounter, run_distributed
from trainer_fixtures import ENGINES, ScriptedValidation, ToyDataset, read_metrics, run_toy

pytest.importorskip("lightning")


class ValidationPosition(ScriptedValidation):
    """Records (epoch, global_step, batches_done) of every validation; returns its step."""

    def __init__(self) -> None:
        super().__init__([])
        self.positions: list[tuple[int, int, int]] = []

    def on_test_epoch_end(self, trainer_state: Any, model: torch.nn.Module) -> dict[str, float]:
        state = trainer_state
        self.positions.append((state["current_epoch"], state["global_step"], state["batches_done"]))
        return {"score": float(state["global_step"])}


def _val_records(folder: str) -> list[tuple[str, int, int, float]]:
    return [
        (r["tag"], r["step"], r["epoch"], r["value"])
        for r in read_metrics(folder)
        if r["tag"].startswith("val/")
    ]


def test_step_validation_counts_optimizer_steps_on_both_engines(tmp_path) -> None:
    """val_check_interval=2 validates after steps 2, 4, 6, 8: step 6 is epoch 1's partial
    last window, step 4 starts epoch 1 -- Lightning's own batch count (every 4 batches)
    would validate in the middle of a window instead and zero its gradients."""
    runs = {}
    for engine in ENGINES:
        recorder = ValidationPosition()
        model = run_toy(
            engine,
            str(tmp_path / engine),
            [recorder],
            num_train=20,
            num_epochs=3,
            accumulate_grad_batches=2,
            check_val_every_n_epoch=None,
            val_check_interval=2,
        )
        runs[engine] = (recorder.positions, _val_records(str(tmp_path / engine)), model)
    native, lightning = runs["native"], runs["lightning"]
    # (epoch, global_step, batches_done): every validation right after a window's step.
    assert native[0] == [(0, 2, 4), (1, 4, 2), (1, 6, 5), (2, 8, 4)]
    assert lightning[0] == native[0]
    assert lightning[1] == native[1] and [r[1] for r in native[1]] == [2, 4, 6, 8]
    native_weights, pl_weights = native[2].state_dict(), lightning[2].state_dict()
    assert all(torch.equal(pl_weights[k], native_weights[k]) for k in native_weights)


def _ddp_accumulation(rank: int, world_size: int, out: str) -> dict[str, Any]:
    """Both engines, 2 epochs of 5 batches per rank (different data), windows of 2."""
    results = {}
    for engine in ENGINES:
        counter = AllReduceCounter()
        train = DataLoader(ToyDataset(20, seed=10 + rank), batch_size=4, shuffle=False)
        model = run_toy(
            engine,
            os.path.join(out, engine),
            [counter],
            train_loader=train,
            num_epochs=2,
            accumulate_grad_batches=2,
            check_val_every_n_epoch=None,
        )
        results[engine] = (counter.per_batch, model.state_dict())
    return results


def test_two_process_lightning_skips_all_reduce_inside_windows_like_native(tmp_path) -> None:
    ranks = run_distributed(_ddp_accumulation, 2, str(tmp_path))
    for results in ranks:
        for engine in ENGINES:
            per_batch = results[engine][0]
            assert [end for _, end in per_batch] == [False, True, False, True, True] * 2, engine
            # DDP all-reduces on the batches that step, and only on those (no_sync).
            assert all((count > 0) == end for count, end in per_batch), (engine, per_batch)
        assert results["lightning"][0] == results["native"][0]
        native, lightning = results["native"][1], results["lightning"][1]
        assert all(torch.equal(lightning[k], native[k]) for k in native)
    # The window's gradients were averaged: both ranks (different data) hold equal weights.
    first, second = ranks[0]["lightning"][1], ranks[1]["lightning"][1]
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_step_validation_on_a_lightning_without_the_epoch_loop_hook_is_a_clear_error(
    tmp_path, monkeypatch
) -> None:
    from vistrain.pl.engine import LightningEngine
    from vistrain.pl.fit import build_lightning_trainer

    trainer = build_lightning_trainer(
        str(tmp_path), check_val_every_n_epoch=None, val_check_interval=2
    )
    monkeypatch.delattr(type(trainer.fit_loop.epoch_loop), "_should_check_val_fx")
    # the check comes before the engine's own state is touched: no engine needed
    with pytest.raises(RuntimeError, match=r"val_check_interval=2\) needs the epoch loop"):
        LightningEngine._validate_by_step(None, trainer)  # type: ignore[arg-type]
