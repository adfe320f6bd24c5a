"""``vistrain fit --devices 2``: real processes started through torch.distributed.run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

TOY = [
    "--config",
    "toy_classifier",
    "--set",
    "num_epochs=2",
    "--set",
    "num_train_images=128",
    "--set",
    "num_val_images=64",
    "--set",
    "norm=group",
    "--set",
    "log_every=2",
    "--set",
    "lr=0.02",
]


def _fit(out: str, *extra: str, timeout: int = 240) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "vistrain", "fit", "--output-dir", out, *TOY, *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _val_logs(out: str) -> dict[tuple[str, int], float]:
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    return {(r["tag"], r["step"]): r["value"] for r in records if r["tag"].startswith("val/")}


def test_two_processes_match_one_process(tmp_path) -> None:
    one = str(tmp_path / "one")
    two = str(tmp_path / "two")
    proc = _fit(one, "--set", "batch_size=32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _fit(two, "--set", "batch_size=16", "--devices", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs_one, logs_two = _val_logs(one), _val_logs(two)
    assert logs_one.keys() == logs_two.keys() and ("val/Cls/top1", 8) in logs_one
    for key, value in logs_one.items():
        assert logs_two[key] == pytest.approx(value, abs=1.0 / 64 + 1e-9), key
    # rank 0 alone writes: one metrics file, one event file, one set of checkpoints
    events = [n for n in os.listdir(two) if n.startswith("events.out.tfevents")]
    assert len(events) == 1
    assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == sorted(
        os.listdir(os.path.join(one, "checkpoints"))
    )


def test_a_failing_rank_ends_the_run_with_its_error(tmp_path) -> None:
    config = os.path.join(os.path.dirname(__file__), "failing_experiment.py")
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vistrain",
            "fit",
            "--config",
            config,
            "--devices",
            "2",
            "--output-dir",
            str(tmp_path / "out"),
            "--set",
            "num_train_images=64",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode != 0
    assert "rank 1 failed on purpose" in proc.stdout + proc.stderr
    assert time.monotonic() - start < 200
