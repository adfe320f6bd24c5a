"""params.json, parameters in checkpoints, and ``--resume`` with changed settings."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from cli_helpers import toy_args
from vistrain.cli import main
from vistrain.engine.checkpoint_io import load_checkpoint
from vistrain.run import run_fit
from vistrain.run_info import RUN_INFO_KEY
from vistrain.run_params import (
    APPLIED,
    REFUSED,
    REPLANNED,
    RESUME_POLICY,
    ResumeRefusedError,
)
from vistrain.zoo import BUILTIN_EXPERIMENTS, load_config
from vistrain.zoo.base import apply_overrides

TINY = [
    "num_train_images=32",
    "batch_size=16",
    "image_size=16",
    "num_val_images=16",
    "log_every=1",
    "ema=false",
]


def _toy(*extra: str):
    module = load_config("toy_classifier")
    return module, apply_overrides(module.Params(), [*TINY, *extra])


def _lrs(folder: str) -> dict[int, float]:
    with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    return {r["step"]: r["value"] for r in records if r["tag"] == "lr"}


def test_policy_classifies_every_key_of_every_builtin_experiment():
    for name in BUILTIN_EXPERIMENTS:
        keys = {f.name for f in dataclasses.fields(load_config(name).Params)}
        missing = keys - set(RESUME_POLICY)
        assert not missing, f"{name}: keys without a resume policy: {sorted(missing)}"
    assert {action for action, _ in RESUME_POLICY.values()} == {APPLIED, REPLANNED, REFUSED}
    assert RESUME_POLICY["batch_size"][0] == REFUSED
    assert RESUME_POLICY["num_epochs"][0] == REPLANNED


@pytest.mark.parametrize("engine", ["native", "lightning"])
def test_longer_run_and_new_lr_are_replanned_as_if_planned_from_the_start(tmp_path, engine):
    module, params = _toy("num_epochs=2")
    resumed = str(tmp_path / "resumed")
    run_fit(module, params, resumed, engine=engine)
    record = json.loads((tmp_path / "resumed" / "params.json").read_text())
    assert record == {"experiment": "toy_classifier", "params": dataclasses.asdict(params)}
    last = os.path.join(resumed, "checkpoints", "last.ckpt")
    saved = load_checkpoint(last)["callbacks"][RUN_INFO_KEY]["params"]
    assert saved["num_epochs"] == 2 and saved["lr"] == 0.05

    _, longer = _toy("num_epochs=4", "lr=0.1")
    run_fit(module, longer, resumed, ckpt_path=last, engine=engine)
    planned = str(tmp_path / "planned")
    run_fit(module, longer, planned, engine="native")
    got, want = _lrs(resumed), _lrs(planned)
    assert set(got) == set(want) == set(range(1, 9))
    for step in range(5, 9):  # the resumed epochs 2 and 3 follow the 4-epoch, lr=0.1 plan
        assert got[step] == pytest.approx(want[step], rel=1e-9), step
    assert got[5] < 0.1 and got[8] < got[5]  # the cosine goes on down, no restart at its peak
    record = json.loads((tmp_path / "resumed" / "params.json").read_text())
    assert record["params"]["num_epochs"] == 4 and record["params"]["lr"] == 0.1


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("finished"))
    module, params = _toy("num_epochs=1")
    run_fit(module, params, folder)
    return folder


def _cli(folder: str, *sets: str) -> list[str]:
    return ["fit", *toy_args(*TINY, *sets), "--output-dir", folder, "--resume"]


def test_refused_change_lists_every_refused_key_and_changes_nothing(finished_run, capsys):
    before = os.path.getmtime(os.path.join(finished_run, "metrics.jsonl"))
    code = main(_cli(finished_run, "num_epochs=2", "batch_size=8", "norm=group"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("vistrain: error:")
    assert "batch_size: 16 -> 8 (refused" in err and "norm: 'batch' -> 'group'" in err
    assert "num_epochs" not in err  # a re-planned key is not among the refused ones
    assert os.path.getmtime(os.path.join(finished_run, "metrics.jsonl")) == before
    module, params = _toy("num_epochs=2", "batch_size=8")
    with pytest.raises(ResumeRefusedError, match="batch_size"):
        run_fit(module, params, finished_run, ckpt_path=_last(finished_run))


def _last(folder: str) -> str:
    return os.path.join(folder, "checkpoints", "last.ckpt")


def test_resuming_a_finished_run_says_so_and_trains_nothing(finished_run, capsys):
    metrics = os.path.join(finished_run, "metrics.jsonl")
    before = Path(metrics).read_text(encoding="utf-8")
    assert main(_cli(finished_run, "num_epochs=1")) == 0
    out = capsys.readouterr()
    assert "already trained all 1 epochs" in out.out + out.err
    assert Path(metrics).read_text(encoding="utf-8") == before


def test_fewer_epochs_than_trained_is_refused(finished_run):
    module, params = _toy("num_epochs=1")
    run_dir = finished_run
    ckpt = _last(run_dir)
    # A 1-epoch checkpoint resumed with num_epochs=0 cannot be asked for (validate refuses
    # it), so check the epoch rule against a 2-epoch checkpoint written by hand below.
    state = load_checkpoint(ckpt)
    state["epoch"], state["global_step"] = 1, 4
    two = os.path.join(run_dir, "two_epochs.ckpt")
    torch.save(state, two)
    with pytest.raises(ResumeRefusedError, match="trained 2 epochs, more than num_epochs=1"):
        run_fit(module, params, run_dir, ckpt_path=two)
    os.remove(two)
