"""One-line errors instead of tracebacks: exit 2, nothing half-written, the line in log.txt.

Read-only folders: ``chmod`` does not stop root (CI runs the tests as root), so as root the
tests use a folder of ``/sys``, which the kernel keeps read-only for every user.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from cli_helpers import SRC, start_vistrain, toy_args
from vistrain.cli import main
from vistrain.common import writable
from vistrain.engine.checkpoint_io import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CheckpointError,
    save_checkpoint,
)
from vistrain.engine.optim import LRSchedulerConfig, LRSchedulerWrapper, warmup_cosine
from vistrain.engine.resume import restore_checkpoint
from vistrain.zoo import available_experiments, load_config
from vistrain.zoo.base import apply_overrides, param_types

TOY = toy_args("num_epochs=1", "num_train_images=32", "num_val_images=16", "batch_size=16")


def _one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """The error line printed to stderr; asserts it is one line holding ``needles``."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vistrain: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """An existing folder this process cannot write into (see the module docstring)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    folder = Path("/sys/fs")
    try:
        (folder / "vistrain-probe").open("w").close()
    except OSError:
        yield folder
        return
    pytest.skip("running as root and /sys is writable here: no read-only folder to test with")


# --------------------------------------------------------------------------------------------
# The output folder at start
# --------------------------------------------------------------------------------------------


def test_output_path_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "out"
    target.write_text("my notes\n")
    assert main(["fit", *TOY, "--output-dir", str(target)]) == 2
    _one_line_error(capsys, "--output-dir", "is a file")
    assert target.read_text() == "my notes\n"
    assert main(["fit", *TOY, "--output-dir", str(target / "run")]) == 2
    _one_line_error(capsys, "is under the file")


@pytest.mark.parametrize("devices", ["1", "2"])
def test_read_only_output_folder(
    read_only_dir: Path, capsys: pytest.CaptureFixture[str], devices: str
) -> None:
    output = read_only_dir / "vistrain-run"
    assert main(["fit", *TOY, "--devices", devices, "--output-dir", str(output)]) == 2
    _one_line_error(capsys, "cannot be written", "pass another --output-dir")
    assert not output.exists()


def test_full_disk_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = writable.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(writable.shutil, "disk_usage", lambda _: usage._replace(free=3 * 2**20))
    assert main(["fit", *TOY, "--output-dir", str(tmp_path / "run")]) == 2
    _one_line_error(capsys, "3.0 MiB free", "free some space")

    def no_space(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writable, "open", no_space, raising=False)
    assert main(["fit", *TOY, "--output-dir", str(tmp_path / "run")]) == 2
    _one_line_error(capsys, "the disk is full")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("engine", ["native", "lightning"])
def test_checkpoint_folder_not_writable_is_found_before_training(
    tmp_path: Path, read_only_dir: Path, capsys: pytest.CaptureFixture[str], engine: str
) -> None:
    if engine == "lightning":
        pytest.importorskip("lightning")
    run = tmp_path / "run"
    run.mkdir()
    if os.geteuid() == 0:
        (run / "checkpoints").symlink_to(read_only_dir, target_is_directory=True)
    else:
        (run / "checkpoints").mkdir(mode=0o555)
    try:
        started = time.perf_counter()
        assert main(["fit", *TOY, "--engine", engine, "--output-dir", str(run)]) == 2
        line = _one_line_error(capsys, "checkpoint folder", "cannot be written")
    finally:
        if os.geteuid() != 0:
            (run / "checkpoints").chmod(0o755)
    assert time.perf_counter() - started < 60
    assert not (run / "metrics.jsonl").exists()  # no step was trained
    log = (run / "log.txt").read_text()
    assert line in log and "Epoch" not in log


def test_checkpoint_folder_that_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a folder")
    assert main(["fit", *TOY, "--output-dir", str(run)]) == 2
    _one_line_error(capsys, "checkpoint folder", "is a file")
    assert (run / "checkpoints").read_text() == "not a folder"


# --------------------------------------------------------------------------------------------
# Data cache, config files, --set ranges
# --------------------------------------------------------------------------------------------

SHAPES = ["--set", "num_train_images=4", "--set", "num_val_images=2", "--set", "batch_size=2"]


def test_file_shaped_or_read_only_data_cache(
    tmp_path: Path, read_only_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache_file = tmp_path / "cache"
    cache_file.write_text("")
    for cache in (cache_file, read_only_dir / "vistrain-cache"):
        run = tmp_path / f"run-{cache.name}"
        code = main(["fit", *SHAPES, "--set", f"cache_dir={cache}", "--output-dir", str(run)])
        assert code == 2
        line = _one_line_error(capsys, "shapes data cache", "cannot be written", "cache_dir")
        assert line in (run / "log.txt").read_text()
        assert not (run / "checkpoints").exists()
    assert cache_file.read_text() == ""


def test_error_inside_a_config_files_build(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "my_exp.py"
    config.write_text(
        "from vistrain.zoo.toy_classifier import Params\n\n\n"
        "def build(params, output_dir):\n"
        "    servers = {}\n"
        "    return servers['data']\n"
    )
    run = tmp_path / "run"
    assert main(["fit", "--config", str(config), "--output-dir", str(run)]) == 2
    _one_line_error(capsys, "config 'my_exp'", "build() raised KeyError: 'data'", "my_exp.py:6")
    assert not (run / "checkpoints").exists()


def test_error_on_importing_a_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "broken.py"
    config.write_text("import no_such_module_for_vistrain\n")
    assert main(["fit", "--config", str(config), "--output-dir", str(tmp_path / "r")]) == 2
    _one_line_error(capsys, "could not be loaded", "ModuleNotFoundError")


def _numeric_keys(name: str) -> list[str]:
    types = param_types(load_config(name).Params)
    return [key for key, kind in types.items() if "int" in str(kind) or "float" in str(kind)]


REQUIRED = {"yolox_coco": ["train_ann=a", "train_images=b", "val_ann=c", "val_images=d"]}


@pytest.mark.parametrize("name", available_experiments())
def test_every_numeric_set_key_is_range_checked(name: str) -> None:
    """-1 is no sensible value for any count, interval, seed, rate or angle."""
    module = load_config(name)
    for key in _numeric_keys(name):
        with pytest.raises(ValueError, match=key):
            apply_overrides(module.Params(), [*REQUIRED.get(name, []), f"{key}=-1"])
    for key in ("log_every", "checkpoint_period", "val_every"):
        with pytest.raises(ValueError, match=f"{key}=0 must be >= 1"):
            apply_overrides(module.Params(), [*REQUIRED.get(name, []), f"{key}=0"])


def test_range_error_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main(["fit", *TOY, "--set", "log_every=0", "--output-dir", str(run)]) == 2
    _one_line_error(capsys, "log_every=0 must be >= 1")
    assert not run.exists()


# --------------------------------------------------------------------------------------------
# Resuming from a checkpoint that cannot continue the run
# --------------------------------------------------------------------------------------------


def test_checkpoint_missing_a_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["fit", *TOY, "--output-dir", str(run)]) == 0
    capsys.readouterr()
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    del ckpt["optimizers"]
    broken = tmp_path / "broken.ckpt"
    save_checkpoint(ckpt, broken)
    before = last.read_bytes()
    code = main(
        ["fit", *TOY, "--set", "num_epochs=2", "--resume", str(broken), "--output-dir", str(run)]
    )
    assert code == 2
    line = _one_line_error(capsys, "lacks 'optimizers'", "broken.ckpt")
    assert line in (run / "log.txt").read_text()
    assert last.read_bytes() == before


def _model_and_optimizer(groups: int = 1, reverse: bool = False) -> tuple[nn.Module, Any, Any]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    params = list(model.parameters())
    if reverse:
        params.reverse()
    if groups == 1:
        optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    else:
        optimizer = torch.optim.SGD([{"params": [p]} for p in params], lr=0.1, momentum=0.9)
    return model, optimizer, warmup_cosine(optimizer, warmup_steps=2, num_epochs=3)


def _saved_run(path: Path) -> None:
    """A checkpoint after one SGD step with momentum, so the optimizer holds buffers."""
    model, optimizer, scheduler = _model_and_optimizer()
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "epoch": 0,
        "epoch_finished": True,
        "batches_done": 1,
        "global_step": 1,
        "state_dict": model.state_dict(),
        "optimizers": [optimizer.state_dict()],
        "lr_schedulers": [scheduler.state_dict()],
        "callbacks": {},
        "world_size": 1,
    }
    save_checkpoint(ckpt, path)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("groups", "optimizer 0 does not fit this run \\(1 parameter groups saved, 2 here\\)"),
        ("order", "'momentum_buffer' of a parameter has shape \\[2, 3\\], the parameter \\[2\\]"),
        ("scheduler", "scheduler 0 does not fit this run \\(2 schedules saved, 1 here\\)"),
    ],
)
def test_optimizer_or_scheduler_that_does_not_fit_changes_nothing(
    tmp_path: Path, case: str, message: str
) -> None:
    path = tmp_path / "run.ckpt"
    _saved_run(path)
    model, optimizer, scheduler = _model_and_optimizer(
        groups=2 if case == "groups" else 1, reverse=case == "order"
    )
    if case == "scheduler":
        scheduler = LRSchedulerWrapper(
            optimizer, [LRSchedulerConfig(torch.optim.lr_scheduler.ConstantLR, {"factor": 1.0})]
        )
    with torch.no_grad():
        model.weight.fill_(7.0)  # the checkpoint's weights differ from these
    opt_before = optimizer.state_dict()
    with pytest.raises(CheckpointError, match=message):
        restore_checkpoint(
            str(path),
            model=model,
            optimizers=[optimizer],
            lr_schedulers=[scheduler],
            callbacks=[],
            train_dataloader=None,
        )
    assert bool((model.weight == 7.0).all())  # the model was not loaded first
    assert optimizer.state_dict()["state"] == opt_before["state"] == {}


def test_a_fitting_checkpoint_still_restores(tmp_path: Path) -> None:
    path = tmp_path / "run.ckpt"
    _saved_run(path)
    model, optimizer, scheduler = _model_and_optimizer()
    point = restore_checkpoint(
        str(path),
        model=model,
        optimizers=[optimizer],
        lr_schedulers=[scheduler],
        callbacks=[],
        train_dataloader=None,
    )
    assert point.global_step == 1 and optimizer.state_dict()["state"]


# --------------------------------------------------------------------------------------------
# Broken pipes and Ctrl-C: real processes
# --------------------------------------------------------------------------------------------


def _start_piped(*args: str, cwd: Path) -> subprocess.Popen[bytes]:
    """Start ``vistrain ARGS`` with its stdout and stderr in pipes (bytes)."""
    return start_vistrain(*args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_output_piped_into_a_closed_reader(tmp_path: Path) -> None:
    """``vistrain configs | head -1``: no traceback; a training run goes on silently."""
    proc = _start_piped("configs", cwd=tmp_path)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""

    run = tmp_path / "run"
    proc = _start_piped("fit", *TOY, "--output-dir", str(run), cwd=tmp_path)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert "Traceback" not in err and "Logging error" not in err, err
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert "Resume:" in (run / "log.txt").read_text()


def test_the_command_line_starts_without_importing_torch() -> None:
    """Importing torch takes seconds; a Ctrl-C then must already reach main's handler."""
    code = "import sys, vistrain.cli; print('torch' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=SRC)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_ctrl_c_during_setup_is_one_line(tmp_path: Path) -> None:
    marker = tmp_path / "building"
    config = tmp_path / "slow_exp.py"
    config.write_text(
        "import pathlib, time\n"
        "from vistrain.zoo.toy_classifier import Params\n\n\n"
        "def build(params, output_dir):\n"
        f"    pathlib.Path({str(marker)!r}).touch()\n"
        "    time.sleep(60)\n"
    )
    proc = _start_piped(
        "fit", "--config", str(config), "--output-dir", str(tmp_path / "r"), cwd=tmp_path
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err_bytes = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = err_bytes.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()] == ["vistrain: interrupted (Ctrl-C)"]
