"""One run per folder: a used folder needs --resume, and a live run's folder is locked."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cli_helpers import run_vistrain, toy_args, vistrain_env
from vistrain.run_folder import LOCK_NAME, RunFolderError, RunFolderLock, check_new_run_folder

TINY = toy_args("num_epochs=1", "num_train_images=32", "num_val_images=16", "log_every=2")


def _digest(folder: Path) -> dict[str, str]:
    """Content hash of every file of a run folder (what a second run must not change)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_second_fit_into_a_used_folder_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = run_vistrain("fit", *TINY, "--output-dir", str(out), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert not (out / LOCK_NAME).exists(), "the lock file is removed when the run ends"
    before = _digest(out)
    assert "checkpoints/last.ckpt" in before and "metrics.jsonl" in before

    second = run_vistrain("fit", *TINY, "--output-dir", str(out), cwd=tmp_path)
    assert second.returncode == 2
    err = second.stderr.strip()
    assert err.startswith("vistrain: error:") and err.count("\n") == 0, err
    assert "already holds a run" in err and "--resume" in err and "new --output-dir" in err
    assert _digest(out) == before

    # The same folder with --resume is the way to continue it (a finished run trains no more).
    resumed = run_vistrain(
        "fit", *TINY, "--set", "num_epochs=2", "--output-dir", str(out), "--resume", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr


def test_check_accepts_a_fresh_or_missing_folder(tmp_path: Path) -> None:
    check_new_run_folder(tmp_path / "missing")
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "notes.txt").write_text("mine")
    check_new_run_folder(tmp_path / "fresh")
    (tmp_path / "fresh" / "checkpoints").mkdir()
    (tmp_path / "fresh" / "checkpoints" / "epoch=1-step=8.ckpt").write_bytes(b"x")
    with pytest.raises(RunFolderError, match=r"epoch=1-step=8\.ckpt"):
        check_new_run_folder(tmp_path / "fresh")


HOLDER = textwrap.dedent(
    """
    import sys, time
    from vistrain.run_folder import RunFolderLock
    lock = RunFolderLock(sys.argv[1])
    lock.acquire()
    print("locked", flush=True)
    time.sleep(120)
    """
)


def _start_holder(folder: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        env=vistrain_env(),
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_live_run_locks_its_folder_and_a_dead_ones_lock_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "run"
    holder = _start_holder(out)
    try:
        refused = run_vistrain("fit", *TINY, "--output-dir", str(out), cwd=tmp_path)
        assert refused.returncode == 2
        err = refused.stderr.strip()
        assert err.count("\n") == 0 and f"in use by process {holder.pid}" in err, err
        assert not (out / "checkpoints").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert (out / LOCK_NAME).exists(), "kill -9 leaves the lock file behind"

    started = time.monotonic()
    taken = run_vistrain("fit", *TINY, "--output-dir", str(out), cwd=tmp_path)
    assert taken.returncode == 0, taken.stderr
    assert f"Took over the lock of process {holder.pid}" in taken.stdout + taken.stderr
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert time.monotonic() - started < 240


def test_lock_in_one_process_refuses_another_in_the_same_folder(tmp_path: Path) -> None:
    holder = _start_holder(tmp_path)
    try:
        with pytest.raises(RunFolderError, match=f"process {holder.pid}"):
            RunFolderLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with RunFolderLock(tmp_path) as lock:
        assert lock.path.read_text().split()[0] == str(os.getpid())
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_on_a_file_removed_by_its_releasing_holder_is_taken_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The release race, one step at a time: a starter opens the lock file, the holder removes
    it and unlocks, and the starter's lock then succeeds on the removed file. The starter must
    lock the path's file instead, or a third process would lock a new file alongside it."""
    import fcntl

    holder = RunFolderLock(tmp_path)
    holder.acquire()
    real_flock = fcntl.flock
    locked_fds: list[int] = []

    def flock_after_the_holder_released(fd: int, operation: int) -> None:
        if not locked_fds:
            holder.release()  # between the starter's open and its lock
        locked_fds.append(fd)
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_the_holder_released)
    starter = RunFolderLock(tmp_path)
    starter.acquire()
    monkeypatch.undo()
    try:
        assert len(locked_fds) == 2, "the lock on the removed file was not retried"
        with pytest.raises(RunFolderError, match=f"in use by process {os.getpid()} "):
            RunFolderLock(tmp_path).acquire()
    finally:
        starter.release()
    assert not (tmp_path / LOCK_NAME).exists()


CONTENDER = textwrap.dedent(
    """
    import os, sys, time
    from vistrain.run_folder import RunFolderError, RunFolderLock
    folder, rounds = sys.argv[1], int(sys.argv[2])
    inside = os.path.join(folder, "inside")
    print("ready", flush=True)
    while not os.path.exists(os.path.join(folder, "go")):
        time.sleep(0.001)
    held = overlaps = 0
    for _ in range(rounds):
        lock = RunFolderLock(folder)
        try:
            lock.acquire()
        except RunFolderError:
            continue
        held += 1
        try:  # only the holder may be here: a second one finds the file
            os.close(os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            os.unlink(inside)
        except FileExistsError:
            overlaps += 1
        lock.release()
    print(held, overlaps)
    """
)


def test_processes_racing_for_the_lock_never_hold_it_together(tmp_path: Path) -> None:
    """Three processes take and release the lock 1000 times each. Before the re-check of the
    locked file, a run like this had a few overlapping holders and more false "took over"
    warnings (the starter read the removed file of a live holder) in about a second."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONTENDER, str(tmp_path), "1000"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=vistrain_env(),
        )
        for _ in range(3)
    ]
    for proc in procs:  # all started and imported: they race from the first round on
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    (tmp_path / "go").touch()
    results = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), results
    counts = [tuple(int(n) for n in out.split()) for out, _ in results]
    assert 0 < sum(held for held, _ in counts) < 3000, counts  # taken, and refused when held
    assert [overlaps for _, overlaps in counts] == [0, 0, 0], counts
    assert not any("Took over" in err for _, err in results), results
    assert not (tmp_path / LOCK_NAME).exists()
