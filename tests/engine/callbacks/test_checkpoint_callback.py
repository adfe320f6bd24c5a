from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from dist_utils import run_distributed
from trainer_fixtures import ENGINES, ScriptedValidation, run_toy
from vistrain.common import distributed as vdist
from vistrain.engine import checkpoint_io as ckpt_io
from vistrain.engine.callbacks import checkpoint as ckpt_cb
from vistrain.engine.callbacks.checkpoint import CheckpointCallback
from vistrain.engine.checkpoint_io import is_temp_file, load_checkpoint


class _Loop:
    """Drives a callback's hooks with hand-built TrainerStates, without an engine.

    Pins that ``CheckpointCallback`` saves files of the engines' format (the same
    ``collect_checkpoint``) when a test drives it this way, as vis4d's own tests do; tests of
    what it does in a loop (best checkpoint, resume) run real engines.

    The model's weight is filled with the global step after every step, so a checkpoint's
    content tells which step it holds.
    """

    def __init__(self, callback: CheckpointCallback, batches: int = 2, train_module: Any = None):
        self.cb = callback
        self.batches = batches
        self.model = nn.Linear(3, 2)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.epoch = 0
        self.step = 0
        self.val_logs: dict[str, float] = {}
        self.train_module = train_module

    def state(self) -> dict[str, Any]:
        state = {
            "current_epoch": self.epoch,
            "num_epochs": 100,
            "global_step": self.step,
            "num_steps": -1,
            "train_dataloader": None,
            "num_train_batches": self.batches,
            "test_dataloader": None,
            "num_test_batches": None,
            "optimizers": [self.opt],
            "lr_schedulers": [],
            "val_logs": self.val_logs,
        }
        if self.train_module is not None:
            state["train_module"] = self.train_module
        return state

    def epoch_run(self) -> None:
        cb, model = self.cb, self.model
        cb.on_train_epoch_start(self.state(), model, None)
        for batch_idx in range(self.batches):
            cb.on_train_batch_start(self.state(), model, None, {}, batch_idx)
            self.step += 1
            with torch.no_grad():
                model.weight.fill_(float(self.step))
            cb.on_train_batch_end(self.state(), model, None, {}, {}, batch_idx)
        cb.on_train_epoch_end(self.state(), model, None)
        self.epoch += 1

    def fit_end(self) -> None:
        self.cb.on_fit_end(self.state(), self.model)


def _files(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def _step_of(path: Path) -> int:
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt["state_dict"]["weight"], torch.full((2, 3), float(ckpt["global_step"])))
    return int(ckpt["global_step"])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"checkpoint_period": 0}, ValueError, "checkpoint_period=0"),
        ({"checkpoint_period": 1.5}, TypeError, "checkpoint_period"),
        ({"mode": "avg"}, ValueError, "mode='avg'"),
        ({"max_to_keep": 0}, ValueError, "max_to_keep=0"),
        ({"save_prefix": ""}, ValueError, "save_prefix"),
    ],
)
def test_bad_arguments_are_rejected(
    tmp_path: Path, kwargs: dict[str, Any], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        CheckpointCallback(**{"save_prefix": str(tmp_path), **kwargs})


@pytest.mark.parametrize("async_save", [False, True])
def test_epoch_based_saves_every_period_with_last_link(tmp_path: Path, async_save: bool) -> None:
    cb = CheckpointCallback(save_prefix=str(tmp_path), checkpoint_period=2, async_save=async_save)
    cb.setup()
    folder = tmp_path / "checkpoints"
    assert folder.is_dir()
    loop = _Loop(cb)
    for _ in range(5):
        loop.epoch_run()
    loop.fit_end()
    assert _files(folder) == ["epoch=1-step=4.ckpt", "epoch=3-step=8.ckpt", "last.ckpt"]
    assert os.path.samefile(folder / "last.ckpt", folder / "epoch=3-step=8.ckpt")
    ckpt = load_checkpoint(folder / "last.ckpt")
    assert ckpt["epoch"] == 3 and ckpt["epoch_finished"] and ckpt["batches_done"] == 2
    assert _step_of(folder / "last.ckpt") == 8
    assert ckpt["optimizers"][0]["param_groups"][0]["momentum"] == 0.9
    assert ckpt["callbacks"]["CheckpointCallback"]["saved"] == [
        "epoch=1-step=4.ckpt",
        "epoch=3-step=8.ckpt",
    ]


def test_step_based_saves_at_multiples_of_the_period(tmp_path: Path) -> None:
    cb = CheckpointCallback(save_prefix=str(tmp_path), checkpoint_period=3, epoch_based=False)
    cb.setup()
    loop = _Loop(cb, batches=4)
    for _ in range(2):
        loop.epoch_run()
    loop.fit_end()
    folder = tmp_path / "checkpoints"
    assert _files(folder) == ["epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt", "last.ckpt"]
    ckpt = load_checkpoint(folder / "epoch=1-step=6.ckpt")
    assert not ckpt["epoch_finished"] and ckpt["batches_done"] == 2
    assert _step_of(folder / "last.ckpt") == 6
    # Without an engine the file is still built by the engines' writer: same format.
    engine_run = tmp_path / "engine"
    run_toy("native", str(engine_run), [CheckpointCallback(save_prefix=str(engine_run))])
    assert set(ckpt) == set(load_checkpoint(engine_run / "checkpoints" / "last.ckpt"))


@pytest.mark.parametrize("async_save", [False, True])
def test_retention_keeps_the_newest_and_survives_resume(tmp_path: Path, async_save: bool) -> None:
    cb = CheckpointCallback(save_prefix=str(tmp_path), max_to_keep=2, async_save=async_save)
    cb.setup()
    loop = _Loop(cb, batches=1)
    for _ in range(4):
        loop.epoch_run()
    loop.fit_end()
    folder = tmp_path / "checkpoints"
    assert _files(folder) == ["epoch=2-step=3.ckpt", "epoch=3-step=4.ckpt", "last.ckpt"]

    # Resume from epoch 2's file: the restored list decides what goes next, and the
    # abandoned epoch=3 file is overwritten when the resumed run reaches it again.
    state = load_checkpoint(folder / "epoch=2-step=3.ckpt")["callbacks"]["CheckpointCallback"]
    assert state["saved"] == ["epoch=1-step=2.ckpt", "epoch=2-step=3.ckpt"]
    resumed = CheckpointCallback(save_prefix=str(tmp_path), max_to_keep=2, async_save=async_save)
    resumed.setup()
    resumed.load_state_dict(state)
    loop2 = _Loop(resumed, batches=1)
    loop2.epoch, loop2.step = 3, 3
    for _ in range(3):
        loop2.epoch_run()
    loop2.fit_end()
    assert _files(folder) == ["epoch=4-step=5.ckpt", "epoch=5-step=6.ckpt", "last.ckpt"]
    assert [name for name in os.listdir(folder) if is_temp_file(name)] == []


def _best(folder: Path) -> tuple[int, dict[str, Any]]:
    """The step ``best.ckpt`` holds and the ``best.json`` record (which must agree)."""
    record = json.loads((folder / "best.json").read_text())
    step = int(load_checkpoint(folder / "best.ckpt")["global_step"])
    assert record["global_step"] == step
    return step, record


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("mode", "best_step"), [("max", 12), ("min", 18)])
def test_best_checkpoint_follows_the_validation_of_its_weights(
    tmp_path: Path, engine: str, mode: str, best_step: int
) -> None:
    if engine == "lightning":
        pytest.importorskip("lightning")
    cb = CheckpointCallback(save_prefix=str(tmp_path), monitor="AP", mode=mode, max_to_keep=1)
    scores = ScriptedValidation((0.2, 0.9, 0.1, 0.5), key="AP")  # files at steps 6, 12, 18, 24
    run_toy(engine, str(tmp_path), [scores, cb], num_epochs=4)
    assert scores.steps == [6, 12, 18, 24]
    folder = tmp_path / "checkpoints"
    assert _files(folder) == ["best.ckpt", "best.json", "epoch=3-step=24.ckpt", "last.ckpt"]
    step, record = _best(folder)  # its periodic file is long deleted
    expected = 0.9 if mode == "max" else 0.1
    assert step == best_step and record["value"] == expected
    assert record["file"] == f"epoch={best_step // 6 - 1}-step={best_step}.ckpt"
    assert cb.state_dict()["best"]["value"] == expected


def test_best_is_kept_right_when_resuming_from_the_best_file(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    cb = CheckpointCallback(save_prefix=str(tmp_path), monitor="AP")
    # epoch 1 (step 12) becomes best after its file was written
    run_toy("native", str(tmp_path), [ScriptedValidation((0.5, 0.9), "AP"), cb], num_epochs=2)
    saved_state = load_checkpoint(folder / "last.ckpt")["callbacks"]["CheckpointCallback"]
    assert saved_state["best"]["value"] == 0.5  # the file predates its own validation

    resumed = CheckpointCallback(save_prefix=str(tmp_path), monitor="AP")
    resumed.load_state_dict(saved_state)  # best.json supplies the later result
    assert resumed.state_dict()["best"]["value"] == 0.9
    resumed = CheckpointCallback(save_prefix=str(tmp_path), monitor="AP")
    worse = ScriptedValidation((0.7,), "AP")  # worse than 0.9: best.ckpt must stay at step 12
    run_toy(
        "native", str(tmp_path), [worse, resumed], num_epochs=3, ckpt_path=str(folder / "last.ckpt")
    )
    assert worse.steps == [18]
    assert _best(folder)[0] == 12


def test_validation_without_a_matching_checkpoint_credits_nothing(tmp_path: Path) -> None:
    cb = CheckpointCallback(save_prefix=str(tmp_path), monitor="AP", checkpoint_period=2)
    scores = ScriptedValidation((0.1, 0.3, 0.99, 0.5), "AP")  # steps 6, 18: weights never saved
    run_toy("native", str(tmp_path), [scores, cb], num_epochs=4)
    step, record = _best(tmp_path / "checkpoints")
    assert (step, record["value"]) == (24, 0.5)


def test_missing_monitor_key_warns_once_listing_keys(tmp_path: Path) -> None:
    cb = CheckpointCallback(save_prefix=str(tmp_path), monitor="Det/AP")
    scores = ScriptedValidation([{"AP50": 0.1, "loss": 1.0}] * 3)
    with pytest.warns(UserWarning, match=r"monitor='Det/AP'.*\['AP50', 'loss'\]") as record:
        run_toy("native", str(tmp_path), [scores, cb], num_epochs=3)
    assert len([w for w in record if "monitor=" in str(w.message)]) == 1
    assert not (tmp_path / "checkpoints" / "best.ckpt").exists()


def test_setup_removes_stale_temp_files(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    stale = folder / f".epoch=0-step=1.ckpt.tmp-{os.getpid()}-0a1b"
    stale.write_bytes(b"torn")
    CheckpointCallback(save_prefix=str(tmp_path)).setup()
    assert not stale.exists()


def test_async_write_error_is_raised_at_fit_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_save(obj: Any, handle: Any) -> None:
        raise OSError(28, "No space left on device")

    cb = CheckpointCallback(save_prefix=str(tmp_path), async_save=True)
    cb.setup()
    monkeypatch.setattr(ckpt_io.torch, "save", broken_save)
    loop = _Loop(cb)
    loop.epoch_run()
    with pytest.raises(OSError, match="No space left"):
        loop.fit_end()


def test_auto_mode_decides_from_spare_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Linear(2, 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert ckpt_cb.writer_has_spare_cpu(model)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two trainers on two cores: none to spare
    assert not ckpt_cb.writer_has_spare_cpu(model)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert not ckpt_cb.writer_has_spare_cpu(model)


class _GatheringModule:
    """A train_module whose checkpoint_state is a real collective."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calls = 0

    def checkpoint_state(self) -> dict[str, Any]:
        self.calls += 1
        ranks = vdist.all_gather_object(vdist.get_rank())
        return {
            "format": "vistrain-checkpoint",
            "version": 1,
            "global_step": int(self.model.weight[0, 0]),
            "state_dict": self.model.state_dict(),
            "gathered": ranks,
        }


def _two_rank_saves(rank: int, world_size: int, prefix: str) -> dict[str, Any]:
    writes: list[str] = []
    real_save = ckpt_cb.save_checkpoint

    def counting_save(obj: Any, path: Any) -> None:
        writes.append(os.path.basename(path))
        real_save(obj, path)

    ckpt_cb.save_checkpoint = counting_save  # type: ignore[assignment]
    cb = CheckpointCallback(save_prefix=prefix, epoch_based=False, async_save=False)
    cb.setup()
    vdist.barrier()  # rank 0 made the folder
    loop = _Loop(cb, batches=3)
    module = _GatheringModule(loop.model)
    loop.train_module = module
    loop.epoch_run()
    loop.fit_end()
    vdist.barrier()
    return {"calls": module.calls, "writes": writes}


def test_only_rank_zero_writes_and_every_rank_collects(tmp_path: Path) -> None:
    results = run_distributed(_two_rank_saves, 2, str(tmp_path))
    assert results[0]["calls"] == results[1]["calls"] == 3
    assert results[0]["writes"] == [f"epoch=0-step={s}.ckpt" for s in (1, 2, 3)]
    assert results[1]["writes"] == []
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["gathered"] == [0, 1] and ckpt["global_step"] == 3
