"""End to end: the default experiment ``yolox_shapes`` through the command line.

One tiny run (64-pixel images, 4 steps per epoch) trains two epochs with the mode switch
after the first, resumes to a third epoch and is evaluated with ``vistrain test``; the
checks cover the output folder, the L1 term appearing exactly after the switch (also from
the first step of the resumed run) and the parameter validation's one-line errors.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from cli_helpers import run_vistrain, set_args
from trainer_fixtures import read_metrics
from vistrain.cli import main
from vistrain.data.datasets.shapes import CACHE_ENV, shapes_cache_dir
from vistrain.engine.optim import fused_sgd_supported, sgd_param_groups
from vistrain.zoo import load_config

TINY = [
    "image_size=64",
    "batch_size=8",
    "num_train_images=32",
    "num_val_images=8",
    "num_workers=0",
    "switch_epoch=1",
    "val_every=1",
    "log_every=1",
    "vis_every=2",
    "resize_steps=1",
    "resize_interval=2",
    "ema_warmup_steps=2",
    "num_threads=1",
]
STEPS_PER_EPOCH = 4  # 32 images / batch 8


def _vistrain(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``vistrain ARGS`` in ``tmp`` with its shapes cache there; it must succeed."""
    env = dict(os.environ, **{CACHE_ENV: str(tmp / "cache")})
    proc = run_vistrain(*args, cwd=tmp, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _output(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def _records(run: Path) -> list[dict[str, Any]]:
    return read_metrics(str(run))


def _steps_by_tag(records: list[dict[str, Any]]) -> dict[str, set[int]]:
    steps: dict[str, set[int]] = defaultdict(set)
    for record in records:
        steps[record["tag"]].add(int(record["step"]))
    return steps


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Fit 2 epochs (switch after 1), resume to 3, test the last checkpoint."""
    tmp = tmp_path_factory.mktemp("yolox_e2e")
    run = tmp / "run"
    first = _vistrain(tmp, "fit", "--output-dir", str(run), *set_args(*TINY, "num_epochs=2"))
    first_records = _records(run)
    first_files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    resumed = _vistrain(
        tmp, "fit", "--output-dir", str(run), "--resume", *set_args(*TINY, "num_epochs=3")
    )
    tested = _vistrain(
        tmp,
        "test",
        "--ckpt",
        str(run / "checkpoints" / "last.ckpt"),
        "--output-dir",
        str(tmp / "test"),
        *set_args(*TINY),
    )
    return {
        "tmp": tmp,
        "run": run,
        "first": first,
        "first_records": first_records,
        "first_files": first_files,
        "resumed": resumed,
        "tested": tested,
    }


def test_output_folder_layout(tiny_run: dict[str, Any]) -> None:
    run: Path = tiny_run["run"]
    ckpts = set(os.listdir(run / "checkpoints"))
    assert {"last.ckpt", "epoch=1-step=8.ckpt", "epoch=2-step=12.ckpt"} <= ckpts
    assert list((run / "vis" / "train").glob("step*.png")), "no training pictures"
    assert list((run / "vis" / "test").glob("step*/*.png")), "no validation pictures"
    saved = list((run / "eval" / "Det").glob("*.json"))
    assert saved, "no saved Det predictions"
    with open(saved[0], encoding="utf-8") as handle:
        predictions = json.load(handle)
    assert isinstance(predictions, list)
    assert list(run.glob("events.out.tfevents*")), "no TensorBoard file"
    tags = _steps_by_tag(_records(run))
    # validation after each of the 3 epochs, at the epoch ends
    assert tags["val/Det/AP50"] == {4, 8, 12}
    assert {"val/Det/AP", "train/loss", "train/det.loss_cls", "train/det.loss_obj"} <= set(tags)
    # the cache folder came from VISTRAIN_CACHE
    cache = tiny_run["tmp"] / "cache"
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["train", "val"]


def test_l1_term_only_after_the_switch(tiny_run: dict[str, Any]) -> None:
    tags = _steps_by_tag(tiny_run["first_records"])
    loss_steps = tags["train/loss"]
    assert loss_steps == set(range(1, 2 * STEPS_PER_EPOCH + 1))
    # epoch 0 (steps 1-4) trains without L1, epoch 1 (steps 5-8) with it
    assert tags["train/det.loss_l1"] == set(range(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH + 1))
    assert "YOLOX mode switch at epoch 0" in _output(tiny_run["first"])


def test_resume_continues_in_switched_mode(tiny_run: dict[str, Any]) -> None:
    records = _records(tiny_run["run"])
    tags = _steps_by_tag(records)
    resumed_steps = set(range(2 * STEPS_PER_EPOCH + 1, 3 * STEPS_PER_EPOCH + 1))
    assert tags["train/loss"] == set(range(1, 3 * STEPS_PER_EPOCH + 1))
    # L1 from the resumed run's very first step on
    assert resumed_steps <= tags["train/det.loss_l1"]
    epochs = {r["step"]: r["epoch"] for r in records if r["tag"] == "train/loss"}
    assert {epochs[s] for s in resumed_steps} == {2}
    log = _output(tiny_run["resumed"])
    assert "YOLOX mode switch at epoch 2" in log
    assert "Resumed from" in log
    # the first run's pictures and predictions are still there
    run: Path = tiny_run["run"]
    kept = [f for f in tiny_run["first_files"] if f.startswith(("vis/", "eval/"))]
    assert kept and all((run / f).is_file() for f in kept)


def test_test_command_evaluates_the_checkpoint(tiny_run: dict[str, Any]) -> None:
    out = tiny_run["tested"].stdout
    assert "test/Det/AP50:" in out and "test/Det/AP:" in out
    assert "EMA weights" in _output(tiny_run["tested"])
    records = _records(tiny_run["tmp"] / "test")
    assert {"test/Det/AP", "test/Det/AP50"} <= {r["tag"] for r in records}
    # Scored at last.ckpt's step, the resumed run's end. Which weights were scored is pinned
    # where the detections differ between checkpoints (this run finds none above the score
    # threshold, AP 0 either way): test_short_run_on_awkward_coco_folder (zoo/test_yolox_coco)
    # and test_test_evaluates_the_ema_weights_of_the_checkpoint_named (test_cli).
    assert [r["step"] for r in records if r["tag"] == "test/Det/AP"] == [3 * STEPS_PER_EPOCH]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["image_size=100"], "image_size=100"),
        (["image_size=32"], "image_size=32"),
        (["switch_epoch=-1"], "switch_epoch=-1"),
        (["no_aug_epochs=-1"], "no_aug_epochs=-1"),
        (["batch_size=0"], "batch_size=0"),
        (["lr=-1"], "lr=-1"),
        (["num_classes=9"], "num_classes=9"),
    ],
)
def test_bad_params_are_one_line_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], key: str
) -> None:
    out = tmp_path / "out"
    assert main(["fit", "--output-dir", str(out), *set_args(*overrides)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vistrain: error:") and err.count("\n") == 1
    assert key in err
    assert not out.exists()


def test_defaults_are_valid_and_documented() -> None:
    module = load_config("yolox_shapes")
    params = module.Params()
    params.validate()
    for key in (
        "num_epochs",
        "batch_size",
        "image_size",
        "num_train_images",
        "num_val_images",
        "num_workers",
        "seed",
        "lr",
        "checkpoint_period",
        "switch_epoch",
        "val_every",
        "log_every",
        "vis_every",
    ):
        assert hasattr(params, key)
        assert f"{key}:" in (module.Params.__doc__ or "")
    assert params.mode_switch_epoch() == 22 < params.num_epochs  # the last 8 of 30 epochs


def test_switch_epoch_follows_the_run_length() -> None:
    params_cls = load_config("yolox_shapes").Params
    assert params_cls(num_epochs=40).mode_switch_epoch() == 32  # the last 8 epochs
    assert params_cls(num_epochs=1).mode_switch_epoch() == 0  # shorter than no_aug_epochs
    explicit = params_cls(num_epochs=4, switch_epoch=5)
    explicit.validate()  # at or past the end: the run never switches (the callback warns)
    assert explicit.mode_switch_epoch() == 5


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert shapes_cache_dir() == Path.home() / ".cache" / "vistrain" / "shapes"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert shapes_cache_dir() == tmp_path / "env"
    assert shapes_cache_dir(str(tmp_path / "given")) == tmp_path / "given"


def test_norms_and_biases_get_no_weight_decay() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1, bias=True))
    decay, no_decay = sgd_param_groups(net, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in decay["params"]}
    assert ids == {id(net[0].weight), id(net[2].weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(net[0].bias),
        id(net[1].weight),
        id(net[1].bias),
        id(net[2].bias),
    }
    torch.optim.SGD([decay, no_decay], lr=0.1)  # valid groups for torch


def test_the_run_steps_with_fused_sgd_when_torch_has_it(tiny_run: dict[str, Any]) -> None:
    ckpt = torch.load(tiny_run["run"] / "checkpoints" / "last.ckpt", weights_only=False)
    groups = ckpt["optimizers"][0]["param_groups"]
    assert [bool(group.get("fused")) for group in groups] == [fused_sgd_supported()] * len(groups)


def test_fused_sgd_makes_the_looped_update() -> None:
    if not fused_sgd_supported():
        pytest.skip("this torch has no fused SGD for CPU tensors")
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))]
    nets.append(copy.deepcopy(nets[0]))
    start = copy.deepcopy(nets[0])
    optimizers = [
        torch.optim.SGD(sgd_param_groups(net, 5e-4), lr=0.05, momentum=0.9, nesterov=True, **extra)
        for net, extra in zip(nets, ({}, {"fused": True}))
    ]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in nets[0].parameters()]
        for net, optimizer in zip(nets, optimizers):
            for param, grad in zip(net.parameters(), grads):
                param.grad = grad.clone()
            optimizer.step()
    for looped, fused in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(fused, looped, rtol=1e-6, atol=1e-7)
    moved = [not torch.equal(p, q) for p, q in zip(nets[1].parameters(), start.parameters())]
    assert all(moved), "the fused optimizer left a parameter unchanged"
