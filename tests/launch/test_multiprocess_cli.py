"""``vistrain fit --devices 2``: real processes started through torch.distributed.run."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from cli_helpers import run_vistrain, toy_args
from trainer_fixtures import read_metrics

TOY = toy_args(
    "num_epochs=2",
    "num_train_images=128",
    "num_val_images=64",
    "norm=group",
    "log_every=2",
    "lr=0.02",
)


def _fit(out: str, *extra: str, timeout: int = 240) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return run_vistrain("fit", "--output-dir", out, *TOY, *extra, timeout=timeout, env=env)


def _logs(out: str) -> dict[tuple[str, int], float]:
    """Validation metrics and training losses by (tag, step); timings left out."""
    return {
        (r["tag"], r["step"]): r["value"]
        for r in read_metrics(out)
        if r["tag"].startswith("val/") or r["tag"].startswith("train/")
    }


def test_norm_group_gives_the_toy_classifier_group_norm() -> None:
    """``--set norm=group`` swaps every BatchNorm for a GroupNorm (the batch split is moot)."""
    from torch import nn

    from vistrain.zoo import load_config
    from vistrain.zoo.base import apply_overrides

    module = load_config("toy_classifier")
    for norm, present, absent in (
        ("group", nn.GroupNorm, nn.modules.batchnorm._BatchNorm),
        ("batch", nn.modules.batchnorm._BatchNorm, nn.GroupNorm),
    ):
        params = apply_overrides(module.Params(), [f"norm={norm}", "num_train_images=8"])
        model = module.build(params, "unused").model
        kinds = [type(m) for m in model.modules()]
        assert sum(issubclass(k, present) for k in kinds) >= 3, (norm, kinds)
        assert not any(issubclass(k, absent) for k in kinds), (norm, kinds)


def test_two_processes_match_one_process(tmp_path) -> None:
    one = str(tmp_path / "one")
    two = str(tmp_path / "two")
    proc = _fit(one, "--set", "batch_size=32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _fit(two, "--set", "batch_size=16", "--devices", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs_one, logs_two = _logs(one), _logs(two)
    assert logs_one.keys() == logs_two.keys() and ("val/Cls/top1", 8) in logs_one
    assert ("train/loss", 6) in logs_one
    # With GroupNorm a step does not depend on how the batch is split, so the runs differ
    # only by float summation order: the same predictions (accuracies are multiples of
    # 1/64, any flip would show) and the same losses to float32 precision.
    for key, value in logs_one.items():
        if key[0].startswith("val/"):
            assert logs_two[key] == pytest.approx(value, abs=1e-9), key
        elif key[0].startswith("train/") and "lr" not in key[0]:
            assert logs_two[key] == pytest.approx(value, rel=1e-5), key
    # rank 0 alone writes: one metrics file, one event file, one set of checkpoints
    events = [n for n in os.listdir(two) if n.startswith("events.out.tfevents")]
    assert len(events) == 1
    assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == sorted(
        os.listdir(os.path.join(one, "checkpoints"))
    )


def test_a_failing_rank_ends_the_run_with_its_error(tmp_path) -> None:
    config = os.path.join(os.path.dirname(__file__), "failing_experiment.py")
    start = time.monotonic()
    proc = run_vistrain(
        "fit",
        "--config",
        config,
        "--devices",
        "2",
        "--output-dir",
        str(tmp_path / "out"),
        "--set",
        "num_train_images=64",
        timeout=240,
    )
    assert proc.returncode != 0
    assert "rank 1 failed on purpose" in proc.stdout + proc.stderr
    assert time.monotonic() - start < 200
