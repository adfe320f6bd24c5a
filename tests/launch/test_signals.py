"""Graceful stop and no orphans: real ``vistrain fit`` processes, real signals.

Each run waits for a training line before it signals, so the tests hold on a loaded machine.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from cli_helpers import run_vistrain, start_vistrain, toy_args
from trainer_fixtures import read_metrics
from vistrain.engine.checkpoint_io import load_checkpoint

TOY = toy_args(
    "num_epochs=2",
    "num_train_images=192",
    "num_val_images=32",
    "batch_size=16",
    "log_every=1",
    "norm=group",
)
TRAIN_LINE = re.compile(r"Epoch (\d+): (\d+)/\d+")
STOP_LINE = re.compile(
    r"Stopped by (\w+) at epoch (\d+), step (\d+); checkpoint (\S+); resume with: "
)
ACK_LINE = re.compile(r"interrupted; stopping after this step")
TIMEOUT = 240


class Run:
    """A ``vistrain fit`` process whose output is collected line by line."""

    def __init__(self, out: Path, *extra: str, config: list[str] | None = None) -> None:
        self.out = out
        self.proc = start_vistrain(
            "fit",
            "--output-dir",
            str(out),
            *(TOY if config is None else config),
            *extra,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
            start_new_session=True,  # signals reach this process only
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: re.Pattern[str], count: int = 1) -> None:
        """Wait until ``count`` lines match ``pattern`` (fails if the process ends first)."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if sum(1 for line in list(self.lines) if pattern.search(line)) >= count:
                return
            if self.proc.poll() is not None:
                self._reader.join(5)
                pytest.fail(f"process ended ({self.proc.returncode}):\n{self.output[-3000:]}")
            time.sleep(0.05)
        pytest.fail(f"no {pattern.pattern!r} within {TIMEOUT}s:\n{self.output[-3000:]}")

    def finish(self) -> int:
        code = self.proc.wait(TIMEOUT)
        self._reader.join(10)
        return code


def _fit(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return run_vistrain("fit", "--output-dir", str(out), *TOY, *extra, timeout=TIMEOUT, env=env)


def _scalars(out: Path) -> dict[tuple[str, int], float]:
    """Logged values by (tag, step), without wall-clock measurements (``perf/``)."""
    records = read_metrics(str(out))
    return {(r["tag"], r["step"]): r["value"] for r in records if not r["tag"].startswith("perf/")}


def _stop_line(run: Run) -> re.Match[str]:
    matches = [m for m in map(STOP_LINE.search, run.lines) if m]
    assert len(matches) == 1, run.output[-3000:]
    return matches[0]


def _check_stopped(run: Run, signame: str) -> tuple[int, Path]:
    """The common promises of a graceful stop; returns (stop step, checkpoint)."""
    match = _stop_line(run)
    assert match.group(1) == signame
    step, ckpt = int(match.group(3)), Path(match.group(4))
    assert "Traceback" not in run.output and "a worker process failed" not in run.output
    assert f"--output-dir {run.out} --resume" in run.output
    state = load_checkpoint(ckpt)
    assert state["global_step"] == step
    assert os.path.samefile(ckpt, run.out / "checkpoints" / "last.ckpt")
    scalars = _scalars(run.out)  # flushed up to the stop step, nothing beyond
    assert ("train/loss", step) in scalars
    assert max(s for _, s in scalars) == step
    return step, ckpt


def _descendants(pid: int) -> set[int]:
    """Process ids below ``pid`` (children, grandchildren), from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _wait_gone(pids: set[int], seconds: float) -> set[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(map(_alive, pids)):
        time.sleep(0.1)
    return {pid for pid in pids if _alive(pid)}


needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@pytest.mark.parametrize(
    ("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGUSR1, 138)]
)
def test_signal_stops_with_a_checkpoint_at_that_step(tmp_path: Path, sig: int, code: int) -> None:
    run = Run(tmp_path / "run")
    run.wait_for(TRAIN_LINE, count=3)
    run.proc.send_signal(sig)
    assert run.finish() == code, run.output[-3000:]
    step, _ = _check_stopped(run, signal.Signals(sig).name)
    assert step < 24  # before the end of the run (2 epochs of 12 steps)


def test_resume_after_a_stop_matches_a_run_never_stopped(tmp_path: Path) -> None:
    """Mid-epoch SIGTERM with a loader worker, then --resume: same weights, same scalars."""
    workers = ("--set", "num_workers=1")
    straight = _fit(tmp_path / "straight", *workers)
    assert straight.returncode == 0, straight.stderr[-3000:]
    run = Run(tmp_path / "stopped", *workers)
    run.wait_for(re.compile(r"Epoch 1: 3/"))
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 143, run.output[-3000:]
    step, _ = _check_stopped(run, "SIGTERM")
    assert 12 < step < 24, step  # mid-epoch 1
    resumed = _fit(tmp_path / "stopped", *workers, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    again = load_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.ckpt")
    assert final["global_step"] == again["global_step"] == 24
    assert final["state_dict"].keys() == again["state_dict"].keys()
    for key, value in final["state_dict"].items():
        assert torch.equal(value, again["state_dict"][key]), key
    assert _scalars(tmp_path / "straight") == _scalars(tmp_path / "stopped")


def test_lightning_engine_stops_the_same_way(tmp_path: Path) -> None:
    run = Run(tmp_path / "run", "--engine", "lightning")
    run.wait_for(TRAIN_LINE, count=3)
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 143, run.output[-3000:]
    step, _ = _check_stopped(run, "SIGTERM")
    assert step < 24
    assert "--engine lightning" in _stop_line(run).string


def _slow_checkpoint_run(out: Path) -> Run:
    """A run whose checkpoint write is under way (pickling, for 2 s) when this returns."""
    config = ["--config", str(Path(__file__).with_name("slow_checkpoint_experiment.py"))]
    run = Run(out, config=config + TOY[2:])
    marker = out / "pickling"
    deadline = time.monotonic() + TIMEOUT
    while not marker.exists() and run.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), run.output[-3000:]
    return run


def _complete(ckpt: Path) -> bool:
    with zipfile.ZipFile(ckpt) as archive:  # every record's checksum holds
        return archive.testzip() is None


def test_signal_during_a_checkpoint_write_finishes_it(tmp_path: Path) -> None:
    run = _slow_checkpoint_run(tmp_path / "run")
    run.proc.send_signal(signal.SIGINT)  # torch.save is pickling the checkpoint right now
    assert run.finish() == 130, run.output[-3000:]
    assert "inline_container" not in run.output and "Traceback" not in run.output
    match = _stop_line(run)
    assert match.group(1) == "SIGINT"
    ckpt = Path(match.group(4))
    assert _complete(ckpt)
    assert [p.name for p in ckpt.parent.iterdir() if ".tmp-" in p.name] == []


def test_second_ctrl_c_abandons_the_write_at_once_without_traceback(tmp_path: Path) -> None:
    run = _slow_checkpoint_run(tmp_path / "run")
    run.proc.send_signal(signal.SIGINT)
    run.wait_for(ACK_LINE)
    sent = time.monotonic()
    run.proc.send_signal(signal.SIGINT)
    assert run.finish() == 130, run.output[-3000:]
    assert time.monotonic() - sent < 1.5  # the write still had most of its 2 s to go
    assert "interrupted again; exiting now without a checkpoint" in run.output
    assert "inline_container" not in run.output and "Traceback" not in run.output
    assert not STOP_LINE.search(run.output)
    folder = tmp_path / "run" / "checkpoints"
    assert not (folder / "last.ckpt").exists()  # the first write was abandoned, not torn
    # its temporary file is removed when the run is resumed or restarted there
    assert [p for p in folder.iterdir() if not p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("engine", "sig", "code"),
    [
        ("native", signal.SIGTERM, 143),
        ("native", signal.SIGUSR1, 138),
        ("lightning", signal.SIGINT, 130),
    ],
)
def test_two_devices_stop_together_on_a_signal_to_the_launcher(
    tmp_path: Path, engine: str, sig: int, code: int
) -> None:
    run = Run(tmp_path / "run", "--devices", "2", "--engine", engine)
    run.wait_for(TRAIN_LINE, count=3)
    run.proc.send_signal(sig)
    assert run.finish() == code, run.output[-3000:]
    _check_stopped(run, signal.Signals(sig).name)
    assert "--devices 2" in _stop_line(run).string


@needs_linux
def test_ranks_end_when_the_launcher_is_killed(tmp_path: Path) -> None:
    long_run = ("--set", "num_epochs=100", "--set", "num_workers=1")
    run = Run(tmp_path / "run", "--devices", "2", *long_run)
    run.wait_for(TRAIN_LINE, count=2)
    below = _descendants(run.proc.pid)
    assert len(below) >= 4, below  # two ranks and their loader workers
    run.proc.kill()
    run.finish()
    assert _wait_gone(below, 20) == set()  # the run had minutes to go


@needs_linux
def test_a_blocked_loader_worker_ends_when_the_main_process_is_killed(tmp_path: Path) -> None:
    """The worker sleeps in ``__getitem__`` (a hung read): only its parent's death ends it."""
    config = ["--config", str(Path(__file__).with_name("stalling_data_experiment.py"))]
    run = Run(tmp_path / "run", "--set", "num_workers=1", config=config + TOY[2:])
    run.wait_for(TRAIN_LINE, count=2)
    workers = _descendants(run.proc.pid)
    assert workers, "no loader worker found"
    time.sleep(1.0)  # 64 samples served: the worker is asleep in __getitem__ now
    run.proc.kill()
    run.finish()
    assert _wait_gone(workers, 15) == set()  # its read had a minute to go
