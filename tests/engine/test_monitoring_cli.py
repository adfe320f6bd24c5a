"""The monitoring keys of the built-in experiments, through the CLI (toy_classifier)."""

from __future__ import annotations

import json
import os

from cli_helpers import TINY_TOY_SETS, set_args
from vistrain.cli import main
from vistrain.engine.checkpoint_io import load_checkpoint

TINY = set_args(*TINY_TOY_SETS)


def test_profile_loggers_and_early_stop_keys(tmp_path, capfd) -> None:
    out = tmp_path / "run"
    sets = ["profile_steps=2", "loggers=jsonl,csv", "early_stop_patience=3", "num_epochs=5"]
    args = ["fit", "--config", "toy_classifier", "--output-dir", str(out), *TINY]
    assert main(args + set_args(*sets)) == 0
    printed = "".join(capfd.readouterr())
    # Profiling: a Chrome trace and the operator table in the log.
    with open(out / "profile" / "trace_rank0.json", encoding="utf-8") as handle:
        trace = json.load(handle)
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert any(name.startswith("aten::conv") for name in names)
    assert "Profiled 2 step(s) after 5 warm-up step(s)" in printed
    assert "Self CPU" in printed and "aten::" in printed
    # Loggers: CSV next to metrics.jsonl, no TensorBoard file (not asked for).
    assert (out / "metrics.csv").read_text().startswith("tag,value,step,epoch,time\n")
    assert not any(name.startswith("events.out.tfevents") for name in os.listdir(out))
    # Early stopping on the classifier's top-1 accuracy, its counters in the checkpoint.
    state = load_checkpoint(str(out / "checkpoints" / "last.ckpt"))["callbacks"]
    assert state["EarlyStoppingCallback"]["monitor"] == "Cls/top1"
    assert (out / "early_stopping.json").exists()


def test_max_time_key_stops_the_run(tmp_path) -> None:
    out = tmp_path / "run"
    args = ["fit", "--config", "toy_classifier", "--output-dir", str(out), *TINY]
    assert main([*args, "--set", "num_epochs=1000", "--set", "max_time=00:00:00:01"]) == 0
    ckpt = load_checkpoint(str(out / "checkpoints" / "last.ckpt"))
    assert 1.0 <= ckpt["train_time_s"] < 30 and ckpt["epoch"] < 999


def test_bad_monitoring_values_are_usage_errors(tmp_path, capsys) -> None:
    base = ["fit", "--config", "toy_classifier", "--output-dir", str(tmp_path)]
    assert main([*base, "--set", "loggers=tb,neptune"]) == 2
    assert "neptune" in capsys.readouterr().err
    assert main([*base, "--set", "max_time=soon"]) == 2
    assert "max_time='soon'" in capsys.readouterr().err
    assert main([*base, "--set", "early_stop_patience=-1"]) == 2
    assert "early_stop_patience=-1" in capsys.readouterr().err
