from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vistrain.cli import main
from vistrain.engine.checkpoint_io import load_checkpoint

TINY = [
    "--set",
    "num_epochs=2",
    "--set",
    "num_train_images=64",
    "--set",
    "num_val_images=32",
    "--set",
    "log_every=2",
]


def _vistrain(*args: str, cwd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vistrain", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", "--config", "toy_classifier", "--set", "nope=1"], "unknown key 'nope'"),
        (["fit", "--config", "toy_classifier", "--set", "batch_size=abc"], "expected int"),
        (["fit", "--config", "toy_classifier", "--set", "batch_size"], "is not KEY=VALUE"),
        (["fit", "--config", "missing_file.py"], "does not exist"),
        (["fit", "--config", "no_such_experiment"], "choose one of"),
        (["fit", "--config", "toy_classifier", "--set", "num_epochs=0"], "num_epochs=0"),
        (["test", "--config", "toy_classifier", "--ckpt", "missing.ckpt"], "does not exist"),
        (["fit", "--config", "toy_classifier", "--resume"], "no run with a checkpoint"),
    ],
)
def test_usage_errors_are_one_line_and_write_nothing(tmp_path, capsys, args, message) -> None:
    os.chdir(tmp_path)
    assert (
        main([*args, "--output-dir", str(tmp_path / "out")] if "--resume" not in args else args)
        == 2
    )
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and err.startswith("vistrain: error:")
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_unknown_key_lists_valid_keys(capsys) -> None:
    assert main(["fit", "--config", "toy_classifier", "--set", "epochs=3"]) == 2
    err = capsys.readouterr().err
    for key in ("num_epochs", "batch_size", "lr", "seed"):
        assert key in err


def test_configs_lists_experiments_and_params(capsys) -> None:
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert "toy_classifier" in out and "num_epochs (int)" in out


def test_fit_test_and_resume_end_to_end(tmp_path) -> None:
    out = tmp_path / "run"
    proc = _vistrain(
        "fit", "--config", "toy_classifier", "--output-dir", str(out), *TINY, cwd=str(tmp_path)
    )
    assert proc.returncode == 0, proc.stderr
    ckpts = sorted(os.listdir(out / "checkpoints"))
    assert "last.ckpt" in ckpts and "epoch=1-step=4.ckpt" in ckpts
    with open(out / "metrics.jsonl") as handle:
        tags = {json.loads(line)["tag"] for line in handle}
    assert {"val/Cls/top1", "val/Cls/top5", "train/loss", "lr", "epoch"} <= tags
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out))
    # resume to 3 epochs from the run folder's last.ckpt
    proc = _vistrain(
        "fit",
        "--config",
        "toy_classifier",
        "--output-dir",
        str(out),
        "--resume",
        *TINY,
        "--set",
        "num_epochs=3",
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert "epoch=2-step=6.ckpt" in os.listdir(out / "checkpoints")
    assert "Resumed from" in proc.stdout + proc.stderr
    proc = _vistrain(
        "test",
        "--config",
        "toy_classifier",
        "--ckpt",
        str(out / "checkpoints" / "last.ckpt"),
        "--output-dir",
        str(tmp_path / "test"),
        *TINY,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert "EMA weights" in proc.stdout + proc.stderr
    assert "test/Cls/" in proc.stdout
    # The test run evaluated the checkpoint's weights: its accuracy is the validation's at
    # the checkpoint's step (an untrained or unloaded model would not match).
    step = load_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"]
    for key in ("Cls/top1", "Cls/top5"):
        val = _scalars(out, f"val/{key}")
        assert list(_scalars(tmp_path / "test", f"test/{key}").values()) == [val[step]]


def _scalars(folder, tag: str) -> dict[int, float]:
    """Step -> value of ``tag`` in ``folder/metrics.jsonl``."""
    with open(folder / "metrics.jsonl", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    return {r["step"]: r["value"] for r in records if r["tag"] == tag}
