"""The Lightning bridge runs vistrain callbacks like the native Trainer does.

Each scenario trains the same seeded toy model under both engines and compares what the
callbacks saw (hook, epoch, step, batch index, batches done, learning rate), the written
metrics and the final weights.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dist_utils import run_distributed

pytest.importorskip("lightning")

from vistrain.cli import main
from vistrain.engine.callbacks import (
    Callback,
    CheckpointCallback,
    YOLOXModeSwitchCallback,
)
from vistrain.engine.checkpoint_io import load_checkpoint
from vistrain.engine.connectors import (
    DataConnector,
    LossConnector,
    data_key,
    pred_key,
)
from vistrain.engine.loss_module import LossModule
from vistrain.engine.optim import warmup_cosine
from vistrain.engine.trainer import Trainer
from vistrain.pl import CallbackWrapper, TrainingModule
from vistrain.pl.fit import build_lightning_trainer

NUM_TRAIN = 24  # 6 batches of 4 per epoch


class _Regression(Dataset[dict[str, Any]]):
    """Seeded samples x (8,), y (2,); ``tag`` tells which pipeline produced them."""

    def __init__(self, num: int, tag: float = 0.0, multi: bool = False) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(num, 8, generator=gen)
        self.y = self.x[:, :2] * 2.0 - self.x[:, 2:4]
        self.tag = tag
        self.multi = multi

    @property
    def has_multi_sample(self) -> bool:
        return self.multi

    def without_multi_sample(self) -> _Regression:
        return _Regression(len(self.x), tag=1.0, multi=False)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return {"x": self.x[idx], "y": self.y[idx], "tag": torch.tensor(self.tag)}


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pred": self.net(x)}


class _L1Switchable(nn.Module):
    """MSE whose extra term the YOLOX mode switch turns on (like YOLOXHeadLoss)."""

    def __init__(self) -> None:
        super().__init__()
        self.loss_l1: nn.Module | None = None

    def enable_l1_loss(self) -> None:
        self.loss_l1 = nn.L1Loss()

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = ((pred - target) ** 2).mean()
        return loss if self.loss_l1 is None else loss + self.loss_l1(pred, target)


class _Recorder(Callback):
    """Records what every hook sees; returns logs so both scalar paths are exercised."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, ...]] = []

    def _lr(self, state: Any) -> float:
        return round(float(state["optimizers"][0].param_groups[0]["lr"]), 10)

    def setup(self) -> None:
        self.calls.append(("setup",))

    def on_train_epoch_start(self, trainer_state, model, loss_module) -> None:
        self.calls.append(
            ("train_epoch_start", trainer_state["current_epoch"], trainer_state["global_step"])
        )

    def on_train_batch_start(self, trainer_state, model, loss_module, batch, batch_idx) -> None:
        assert model.training
        self.calls.append(
            (
                "train_batch_start",
                trainer_state["current_epoch"],
                trainer_state["global_step"],
                batch_idx,
                trainer_state["batches_done"],
                float(batch["tag"][0]),
            )
        )

    def on_train_batch_end(self, trainer_state, model, loss_module, outputs, batch, batch_idx):
        assert set(outputs) == {"pred"} and "metrics" in trainer_state
        self.calls.append(
            (
                "train_batch_end",
                trainer_state["global_step"],
                batch_idx,
                trainer_state["batches_done"],
                self._lr(trainer_state),
            )
        )
        return {"seen": float(batch_idx)}

    def on_train_epoch_end(self, trainer_state, model, loss_module) -> None:
        self.calls.append(
            (
                "train_epoch_end",
                trainer_state["current_epoch"],
                trainer_state["global_step"],
                self._lr(trainer_state),
            )
        )

    def on_test_epoch_start(self, trainer_state, model) -> None:
        assert not model.training
        self.calls.append(("test_epoch_start", trainer_state["current_epoch"]))

    def on_test_batch_end(self, trainer_state, model, outputs, batch, batch_idx, dataloader_idx=0):
        self.calls.append(("test_batch_end", batch_idx, dataloader_idx))

    def on_test_epoch_end(self, trainer_state, model):
        self.calls.append(("test_epoch_end", trainer_state["global_step"]))
        return {"score": float(trainer_state["global_step"])}

    def on_validation_end(self, trainer_state, model) -> None:
        self.calls.append(
            ("validation_end", trainer_state["global_step"], dict(trainer_state["val_logs"]))
        )

    def on_fit_end(self, trainer_state, model) -> None:
        self.calls.append(("fit_end", trainer_state["global_step"]))


def _parts(multi: bool = False, sharded: bool = False) -> dict[str, Any]:
    torch.manual_seed(0)
    model = _Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = LossModule(
        {
            "loss": _L1Switchable(),
            "connector": LossConnector({"pred": pred_key("pred"), "target": data_key("y")}),
            "name": "mse",
        }
    )
    data = _Regression(NUM_TRAIN, multi=multi)
    if sharded:  # one shard per rank, the way experiments build distributed loaders
        sampler = torch.utils.data.DistributedSampler(data, shuffle=True, seed=0)
        train = DataLoader(data, batch_size=2, sampler=sampler)
    else:
        train = DataLoader(data, batch_size=4, shuffle=True)
    test = DataLoader(_Regression(8), batch_size=4)
    return {
        "model": model,
        "optimizer": optimizer,
        "scheduler": warmup_cosine(optimizer, warmup_steps=3, num_epochs=3),
        "loss": loss,
        "train": train,
        "test": test,
    }


def _metrics(folder: str) -> list[tuple[Any, ...]]:
    with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    # perf/* are clocks and memory: never the same in two runs or engines.
    return [
        (r["tag"], r["step"], r["epoch"], round(r["value"], 8))
        for r in records
        if not r["tag"].startswith("perf/")
    ]


def _run(
    engine: str,
    out: str,
    callbacks: list[Callback],
    multi: bool = False,
    ckpt_path: str | None = None,
    sharded: bool = False,
    **loop: Any,
) -> nn.Module:
    parts = _parts(multi, sharded)
    connector = DataConnector({"x": "x"})
    num_epochs = loop.pop("num_epochs", 3)
    if engine == "native":
        Trainer(
            "cpu",
            out,
            parts["train"],
            parts["test"],
            connector,
            connector,
            callbacks,
            num_epochs=num_epochs,
            log_every_n_steps=4,
            tensorboard=False,
            **loop,
        ).fit(parts["model"], parts["optimizer"], parts["scheduler"], parts["loss"], ckpt_path)
        return parts["model"]
    module = TrainingModule(
        parts["model"],
        parts["loss"],
        [parts["optimizer"]],
        [parts["scheduler"]],
        connector,
        connector,
        train_dataloader=parts["train"],
        test_dataloader=parts["test"],
        output_dir=out,
        log_every_n_steps=4,
        tensorboard=False,
        resume_from=ckpt_path,
    )
    trainer = build_lightning_trainer(
        out, num_epochs=num_epochs, callbacks=[CallbackWrapper(cb) for cb in callbacks], **loop
    )
    trainer.fit(module)
    return parts["model"]


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "loop",
    [
        {"check_val_every_n_epoch": 2},
        {"check_val_every_n_epoch": None, "val_check_interval": 4},
        {"check_val_every_n_epoch": 1, "num_steps": 9},
    ],
    ids=["epoch-validation", "step-validation", "step-limit-mid-epoch"],
)
def test_hooks_metrics_and_weights_match_native(tmp_path, loop) -> None:
    runs = {}
    for engine in ("native", "lightning"):
        recorder = _Recorder()
        model = _run(engine, str(tmp_path / engine), [recorder], **dict(loop))
        runs[engine] = (recorder.calls, _metrics(str(tmp_path / engine)), model)
    native, pl_run = runs["native"], runs["lightning"]
    assert pl_run[0] == native[0]
    assert pl_run[1] == native[1]
    assert _same_weights(pl_run[2], native[2])
    hooks = [call[0] for call in native[0]]
    assert hooks.count("test_epoch_start") >= 1 and hooks[-1] == "fit_end"
    # on_validation_end follows every validation and sees that validation's logs
    ends = [call for call in native[0] if call[0] == "validation_end"]
    assert len(ends) == hooks.count("test_epoch_start")
    assert all(call[2] == {"score": float(call[1])} for call in ends)


def test_checkpoints_cross_engines_and_mid_epoch_resume(tmp_path) -> None:
    """Lightning resumes a native mid-epoch checkpoint and ends bit-identical; its own
    checkpoints have the native format and the native engine resumes them."""
    straight = _run("native", str(tmp_path / "straight"), [_Recorder()])
    part = tmp_path / "part"
    _run(
        "native",
        str(part),
        [CheckpointCallback(save_prefix=str(part), epoch_based=False, checkpoint_period=8)],
        num_steps=8,
    )
    mid = str(part / "checkpoints" / "epoch=1-step=8.ckpt")
    assert load_checkpoint(mid)["epoch_finished"] is False
    resumed = tmp_path / "resumed"
    saver = CheckpointCallback(save_prefix=str(resumed), checkpoint_period=1)
    model = _run("lightning", str(resumed), [saver], ckpt_path=mid)
    assert _same_weights(model, straight)

    pl_ckpt = load_checkpoint(str(resumed / "checkpoints" / "epoch=1-step=12.ckpt"))
    native_ckpt = load_checkpoint(str(tmp_path / "part" / "checkpoints" / "last.ckpt"))
    assert set(pl_ckpt) == set(native_ckpt)
    assert (pl_ckpt["epoch"], pl_ckpt["global_step"], pl_ckpt["epoch_finished"]) == (1, 12, True)
    assert pl_ckpt["batches_done"] == 6 and pl_ckpt["callbacks"]["CheckpointCallback"]["saved"]
    again = _run(
        "native",
        str(tmp_path / "again"),
        [CheckpointCallback(save_prefix=str(tmp_path / "again"))],
        ckpt_path=str(resumed / "checkpoints" / "epoch=1-step=12.ckpt"),
    )
    assert _same_weights(again, straight)


def test_mode_switch_changes_loader_and_validation(tmp_path) -> None:
    """YOLOXModeSwitchCallback under Lightning: new loader from the next epoch, L1 term on,
    validation every epoch; a resume past the switch trains that very epoch on the new loader."""
    calls = {}
    for engine in ("native", "lightning"):
        recorder = _Recorder()
        switch = YOLOXModeSwitchCallback(switch_epoch=1)
        _run(
            engine,
            str(tmp_path / engine),
            [switch, recorder],
            multi=True,
            check_val_every_n_epoch=3,
        )
        calls[engine] = recorder.calls
    assert calls["lightning"] == calls["native"]
    tags = {(c[1], c[5]) for c in calls["lightning"] if c[0] == "train_batch_start"}
    assert tags == {(0, 0.0), (1, 1.0), (2, 1.0)}
    val_epochs = [c[1] for c in calls["lightning"] if c[0] == "test_epoch_start"]
    assert val_epochs == [0, 1, 2]  # every 3 epochs before the switch, every epoch after

    out = tmp_path / "resume"
    part = tmp_path / "part"
    _run(
        "native",
        str(part),
        [YOLOXModeSwitchCallback(switch_epoch=2), CheckpointCallback(save_prefix=str(part))],
        multi=True,
        num_epochs=2,
    )
    recorder = _Recorder()
    _run(
        "lightning",
        str(out),
        [YOLOXModeSwitchCallback(switch_epoch=1), recorder],
        multi=True,
        ckpt_path=str(part / "checkpoints" / "epoch=1-step=12.ckpt"),
    )
    tags = {(c[1], c[5]) for c in recorder.calls if c[0] == "train_batch_start"}
    assert tags == {(2, 1.0)}


def _ddp_body(rank: int, world_size: int, out: str) -> list[Any]:
    """Native DDP, then Lightning's DDPStrategy on the same process group."""
    results = []
    for engine in ("native", "lightning"):
        recorder = _Recorder()
        folder = os.path.join(out, engine)
        model = _run(engine, folder, [recorder], sharded=True, check_val_every_n_epoch=2)
        metrics = _metrics(folder) if rank == 0 else None
        results.append((recorder.calls, metrics, model.state_dict()))
    return results


def test_two_process_lightning_ddp_matches_native_ddp(tmp_path) -> None:
    """Under a launcher's process group the bridge trains with Lightning's DDP strategy
    exactly like the native engine's DDP: same hooks, gradients averaged the same way."""
    for rank, (native, pl_run) in enumerate(run_distributed(_ddp_body, 2, str(tmp_path))):
        assert pl_run[0] == native[0]
        assert pl_run[1] == native[1]
        assert all(torch.equal(pl_run[2][k], native[2][k]) for k in native[2]), rank
        assert native[0][-1] == ("fit_end", 18)  # each rank trained on its half: 6 steps/epoch


TOY = ["--set", "num_train_images=64", "--set", "num_val_images=32", "--set", "log_every=2"]


def test_cli_toy_classifier_lightning_then_native_resume(tmp_path) -> None:
    out = str(tmp_path / "run")
    args = ["fit", "--config", "toy_classifier", "--output-dir", out, *TOY]
    assert main([*args, "--engine", "lightning", "--set", "num_epochs=2"]) == 0
    tags = {record[0] for record in _metrics(out)}
    assert {"val/Cls/top1", "train/loss", "lr"} <= tags
    ckpt = load_checkpoint(os.path.join(out, "checkpoints", "last.ckpt"))
    assert (ckpt["epoch"], ckpt["global_step"], ckpt["epoch_finished"]) == (1, 4, True)
    assert main([*args, "--set", "num_epochs=3", "--resume"]) == 0
    assert os.path.isfile(os.path.join(out, "checkpoints", "epoch=2-step=6.ckpt"))
    val_steps = [r[1] for r in _metrics(out) if r[0] == "val/Cls/top1"]
    assert val_steps == [2, 4, 6]


def test_default_yolox_experiment_end_to_end_with_mode_switch(tmp_path) -> None:
    out = str(tmp_path / "yolox")
    tiny = {
        "num_epochs": 2,
        "switch_epoch": 1,
        "val_every": 2,
        "image_size": 64,
        "batch_size": 4,
        "num_train_images": 8,
        "num_val_images": 4,
        "num_threads": 1,
        "log_every": 1,
        "vis_every": 2,
        "cache_dir": str(tmp_path / "cache"),
    }
    sets = [item for key, value in tiny.items() for item in ("--set", f"{key}={value}")]
    assert main(["fit", "--engine", "lightning", "--output-dir", out, *sets]) == 0
    records = _metrics(out)
    assert [r[1] for r in records if r[0] == "val/Det/AP"] == [2, 4]  # every epoch after switch
    l1_epochs = {r[2] for r in records if r[0].startswith("train/") and "l1" in r[0]}
    assert l1_epochs == {1}
    assert os.listdir(os.path.join(out, "vis", "train")) and os.listdir(
        os.path.join(out, "vis", "test")
    )
    ckpt = load_checkpoint(os.path.join(out, "checkpoints", "last.ckpt"))
    assert ckpt["global_step"] == 4 and "YOLOXSyncRandomResizeCallback" in ckpt["callbacks"]


def test_eval_mode_warning_is_silenced_only_for_ema_copies() -> None:
    from vistrain.model.adapter import ModelEMAAdapter
    from vistrain.pl.fit import _only_ema_copies_in_eval_mode

    wrapper = nn.Module()
    wrapper.model = ModelEMAAdapter(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)))
    wrapper.train()
    assert _only_ema_copies_in_eval_mode(wrapper)
    wrapper.model.model[1].eval()  # a user module left in eval mode: Lightning must warn
    assert not _only_ema_copies_in_eval_mode(wrapper)


def test_training_module_refuses_an_optimizer_of_another_model() -> None:
    from vistrain.engine.connectors import DataConnector, LossConnector, data_key, pred_key
    from vistrain.engine.loss_module import LossModule
    from vistrain.pl.training_module import TrainingModule

    loss = LossModule(
        {
            "loss": nn.functional.mse_loss,
            "connector": LossConnector({"input": pred_key(""), "target": data_key("y")}),
        }
    )
    model, other = nn.Linear(2, 1), nn.Linear(2, 1)
    with pytest.raises(ValueError, match="holds none of the parameters"):
        TrainingModule(
            model,
            loss,
            torch.optim.SGD(other.parameters(), lr=0.1),
            None,
            DataConnector({"input": "x"}),
            None,
        )
