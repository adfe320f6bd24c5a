"""What a person reads from a real ``vistrain fit``: one epoch numbering, lr, summary, commands."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

from cli_helpers import TINY_TOY_SETS, run_vistrain, set_args

TINY = set_args(*TINY_TOY_SETS)


def _messages(args: list[str], cwd: Path) -> str:
    """Run the command line (output into a pipe, so plain lines); return its messages."""
    proc = run_vistrain(*args, cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return "\n".join(line.split("] ", 1)[-1] for line in proc.stdout.splitlines())


def _printed_command(out: str, label: str) -> list[str]:
    """The arguments of the ``<label>: vistrain ...`` line of the summary."""
    line = next(line for line in out.splitlines() if line.startswith(f"{label}:"))
    args = shlex.split(line.split(":", 1)[1])
    assert args[0] == "vistrain"
    return args[1:]


def test_one_epoch_numbering_summary_and_its_commands(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["fit", "--config", "toy_classifier", "--output-dir", str(run)]
    out = _messages([*args, *TINY, "--set", "num_epochs=2"], tmp_path)

    # Log lines, checkpoint names and metrics.jsonl all count epochs from 0.
    epochs_logged = sorted({int(e) for e in re.findall(r"^Epoch (\d+): \d+/2", out, re.M)})
    assert epochs_logged == [0, 1]
    assert sorted(os.listdir(run / "checkpoints")) == [
        "epoch=0-step=2.ckpt",
        "epoch=1-step=4.ckpt",
        "last.ckpt",
    ]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last_train = [r for r in records if r["tag"] == "train/loss" and r["step"] == 4]
    assert last_train and last_train[0]["epoch"] == 1
    assert "Validation (epoch 1, step 4): Cls/top1: " in out  # the same epoch as its scalars

    # Every training line carries the learning rate (the same value metrics.jsonl logged).
    train_lines = [line for line in out.splitlines() if re.match(r"Epoch \d+: \d+/2, ETA", line)]
    lr_at_4 = next(r["value"] for r in records if r["tag"] == "lr" and r["step"] == 4)
    assert all(re.search(r", lr: \d\.\d{3}e[-+]\d\d, ", line) for line in train_lines)
    assert f"lr: {lr_at_4:.3e}" in train_lines[-1]
    assert "top-5 1.0000 (all 4 classes are within the top 5)" in out

    # The summary: wall time, no best checkpoint (no monitor), commands that work as printed.
    assert re.search(r"^Run finished in \d+:\d\d:\d\d: .*run$", out, re.M)
    assert "No best checkpoint" in out
    resume = _printed_command(out, "Resume")
    assert resume[:3] == ["fit", "--config", "toy_classifier"]
    assert resume[-3:] == ["--output-dir", str(run), "--resume"]
    assert "num_epochs=2" in resume and "log_every=2" in resume  # the run's own --set values
    test = _printed_command(out, "Test")
    assert test[-2:] == ["--ckpt", str(run / "checkpoints" / "last.ckpt")]
    tested = _messages(test, tmp_path)
    assert re.search(r"^Test: Cls/top1: \d\.\d{4}, Cls/top5: 1\.0000$", tested, re.M)

    # Resumed one epoch further: the messages name the epoch the lines then show.
    resumed = _messages([*resume, "--set", "num_epochs=3"], tmp_path)
    ckpt = run / "checkpoints" / "last.ckpt"
    assert f"Resumed from {ckpt} at the start of epoch 2." in resumed
    assert re.findall(r"^Epoch (\d+): ", resumed, re.M) and all(
        e == "2" for e in re.findall(r"^Epoch (\d+): ", resumed, re.M)
    )
    assert "epoch=2-step=6.ckpt" in os.listdir(run / "checkpoints")


def test_summary_names_the_best_checkpoint_and_tests_it(tmp_path: Path) -> None:
    from vistrain.run_summary import run_summary
    from vistrain.zoo import load_config
    from vistrain.zoo.base import apply_overrides

    module = load_config("toy_classifier")
    params = apply_overrides(module.Params(), ["num_epochs=7", "ema=false"])
    folder = tmp_path / "my run"
    (folder / "checkpoints").mkdir(parents=True)
    for name in ("best.ckpt", "last.ckpt", "epoch=5-step=60.ckpt"):
        (folder / "checkpoints" / name).write_bytes(b"")
    record = {"monitor": "Cls/top1", "mode": "max", "value": 0.8125, "global_step": 60}
    record["file"] = "epoch=5-step=60.ckpt"
    (folder / "checkpoints" / "best.json").write_text(json.dumps(record))

    lines = run_summary(module, params, str(folder), wall_seconds=3725.4).splitlines()
    best = folder / "checkpoints" / "best.ckpt"
    assert lines[0] == f"Run finished in 1:02:05: {folder}"
    assert lines[1] == f"Best Cls/top1: 0.8125 (max) at step 60: {best} (= epoch=5-step=60.ckpt)"
    config = ["--config", "toy_classifier", "--set", "num_epochs=7", "--set", "ema=false"]
    assert _printed_command("\n".join(lines), "Resume") == [
        "fit",
        *config,
        "--output-dir",
        str(folder),  # quoted in the line: the folder name has a space
        "--resume",
    ]
    assert _printed_command("\n".join(lines), "Test") == ["test", *config, "--ckpt", str(best)]
