"""Kill a process that saves checkpoints continuously; everything left behind must load.

A helper script (written to tmp_path, run as a subprocess) imports torch once and then forks
one writer process per round, so twelve kills cost one interpreter start. Each writer drives
``CheckpointCallback`` step by step (every step saved, ``max_to_keep=3``, ``last.ckpt``),
alternating blocking and asynchronous saving; before each save it fills every weight and
momentum buffer with the step number, so a file mixing two states would be caught. The
helper SIGKILLs the writer after a seeded random delay.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vistrain.engine.callbacks.checkpoint import CheckpointCallback
from vistrain.engine.checkpoint_io import is_temp_file, load_checkpoint

ROUNDS = 12
MAX_TO_KEEP = 3

HELPER = r"""
import json, os, random, signal, sys, time
import torch
from torch import nn
from vistrain.engine.callbacks.checkpoint import CheckpointCallback

folder = sys.argv[1]
rounds, seed, max_to_keep = (int(arg) for arg in sys.argv[2:5])
torch.set_num_threads(1)
torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)  # pay the optimizer's lazy imports once


def writer(round_idx, ready_fd):
    cb = CheckpointCallback(
        save_prefix=os.path.join(folder, f"round{round_idx}"),
        epoch_based=False,
        max_to_keep=max_to_keep,
        async_save=round_idx % 2 == 1,
    )
    cb.setup()
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512))  # about 2 MB
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for param in model.parameters():
        opt.state[param]["momentum_buffer"] = torch.zeros_like(param)
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            for param in model.parameters():
                param.fill_(step)
                opt.state[param]["momentum_buffer"].fill_(step)
        state = {"current_epoch": 0, "global_step": step, "optimizers": [opt],
                 "lr_schedulers": [], "num_train_batches": None, "val_logs": {}}
        cb.on_train_batch_end(state, model, None, {}, {}, step - 1)
        if step == 1:
            os.write(ready_fd, b"1")


rng = random.Random(seed)
report = []
for round_idx in range(rounds):
    read_fd, ready_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            writer(round_idx, ready_fd)  # runs until killed
        finally:
            os._exit(1)
    os.close(ready_fd)
    os.read(read_fd, 1)
    delay = rng.uniform(0.0, 0.3)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(read_fd)
    report.append({"delay": delay, "killed": os.WIFSIGNALED(status)
                   and os.WTERMSIG(status) == signal.SIGKILL})
with open(os.path.join(folder, "report.json"), "w") as handle:
    json.dump(report, handle)
"""

_PERIODIC = re.compile(r"^epoch=0-step=(\d+)\.ckpt$")


def _check_consistent(path: Path) -> int:
    """Load ``path``; every tensor must hold the file's global step. Returns the step."""
    ckpt = load_checkpoint(path)
    step = ckpt["global_step"]
    tensors = list(ckpt["state_dict"].values()) + [
        buf["momentum_buffer"] for buf in ckpt["optimizers"][0]["state"].values()
    ]
    assert len(tensors) == 8
    for tensor in tensors:
        assert torch.all(tensor == float(step)), f"{path} mixes states of different steps"
    saved = ckpt["callbacks"]["CheckpointCallback"]["saved"]
    assert saved[-1] == f"epoch=0-step={step}.ckpt"
    return int(step)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork and SIGKILL")
def test_sigkilled_writers_leave_only_loadable_consistent_checkpoints(tmp_path: Path) -> None:
    helper = tmp_path / "crash_helper.py"
    helper.write_text(HELPER)
    folder = tmp_path / "runs"
    folder.mkdir()
    subprocess.run(
        [sys.executable, str(helper), str(folder), str(ROUNDS), "1234", str(MAX_TO_KEEP)],
        check=True,
        timeout=120,
    )
    report = json.loads((folder / "report.json").read_text())
    assert len(report) == ROUNDS and all(entry["killed"] for entry in report)

    temp_seen = 0
    checked = 0
    for round_idx in range(ROUNDS):
        ckpt_dir = folder / f"round{round_idx}" / "checkpoints"
        names = os.listdir(ckpt_dir)
        temps = [name for name in names if is_temp_file(name)]
        temp_seen += len(temps)
        assert all(name.endswith(".ckpt") for name in names if name not in temps), names
        steps = {}
        for name in names:
            match = _PERIODIC.match(name)
            if match:
                steps[name] = _check_consistent(ckpt_dir / name)
                assert steps[name] == int(match.group(1))
                checked += 1
        if steps:  # the newest files, consecutive; one extra if killed before the deletion
            values = sorted(steps.values())
            assert values == list(range(values[0], values[-1] + 1))
            assert len(values) <= MAX_TO_KEEP + 1
        if "last.ckpt" in names:
            _check_consistent(ckpt_dir / "last.ckpt")
            assert any(os.path.samefile(ckpt_dir / "last.ckpt", ckpt_dir / n) for n in steps)
            checked += 1
        # The next start cleans the leftovers of the killed write up.
        CheckpointCallback(save_prefix=str(folder / f"round{round_idx}")).setup()
        assert not [name for name in os.listdir(ckpt_dir) if is_temp_file(name)]
    assert checked >= ROUNDS  # the writers got to save before they died
    assert temp_seen >= 1  # and at least one kill interrupted a write
