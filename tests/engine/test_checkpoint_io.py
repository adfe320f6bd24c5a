from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from collections import OrderedDict, namedtuple
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from vistrain.engine import checkpoint_io as ckpt_io
from vistrain.engine.checkpoint_io import (
    AsyncCheckpointWriter,
    CheckpointError,
    check_model_state,
    cleanup_stale_temp_files,
    is_temp_file,
    link_checkpoint,
    load_checkpoint,
    save_checkpoint,
    snapshot_to_cpu,
    temp_path_for,
)


def _ckpt(step: int, **extra: Any) -> dict[str, Any]:
    return {
        "format": "vistrain-checkpoint",
        "version": 1,
        "global_step": step,
        "state_dict": {"w": torch.full((4, 3), float(step))},
        **extra,
    }


def _temp_files(folder: Path) -> list[str]:
    return [name for name in os.listdir(folder) if is_temp_file(name)]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------ atomic writes


def test_save_and_load_round_trip_leaves_no_temp_files(tmp_path: Path) -> None:
    rng = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    path = tmp_path / "a.ckpt"
    save_checkpoint(_ckpt(3, rng=[rng], val_logs={"AP": np.float64(0.5)}), path)
    save_checkpoint(_ckpt(4, rng=[rng]), path)  # replace an existing file
    loaded = load_checkpoint(path)  # weights_only loading accepts the RNG states
    assert loaded["global_step"] == 4
    assert torch.equal(loaded["state_dict"]["w"], torch.full((4, 3), 4.0))
    np.testing.assert_array_equal(loaded["rng"][0]["numpy"][1], rng["numpy"][1])
    assert loaded["rng"][0]["python"] == rng["python"]
    assert sorted(os.listdir(tmp_path)) == ["a.ckpt"]


def test_failed_save_keeps_the_old_file_and_removes_its_temp(tmp_path: Path) -> None:
    path = tmp_path / "a.ckpt"
    save_checkpoint(_ckpt(1), path)
    with pytest.raises(Exception):  # noqa: B017 - pickling a lambda fails inside torch.save
        save_checkpoint(_ckpt(2, bad=lambda: None), path)
    assert load_checkpoint(path)["global_step"] == 1
    assert _temp_files(tmp_path) == []


def test_save_into_missing_folder_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_checkpoint(_ckpt(1), tmp_path / "nope" / "a.ckpt")


def test_cleanup_removes_leftovers_of_dead_writers_only(tmp_path: Path) -> None:
    dead = Path(temp_path_for(tmp_path / "x.ckpt").replace(f"-{os.getpid()}-", f"-{_dead_pid()}-"))
    own = Path(temp_path_for(tmp_path / "last.ckpt"))
    alive = tmp_path / f".y.ckpt.tmp-{os.getppid()}-abcd"  # a live process: maybe writing now
    other = tmp_path / ".hidden"
    for path in (dead, own, alive, other):
        path.write_bytes(b"partial")
    save_checkpoint(_ckpt(1), tmp_path / "x.ckpt")
    removed = cleanup_stale_temp_files(tmp_path)
    assert sorted(removed) == sorted([str(dead), str(own)])
    assert sorted(os.listdir(tmp_path)) == sorted([alive.name, other.name, "x.ckpt"])
    assert cleanup_stale_temp_files(tmp_path / "missing") == []


# ------------------------------------------------------------------ links


def test_link_points_at_the_same_bytes_and_survives_source_deletion(tmp_path: Path) -> None:
    first, second, last = tmp_path / "1.ckpt", tmp_path / "2.ckpt", tmp_path / "last.ckpt"
    save_checkpoint(_ckpt(1), first)
    save_checkpoint(_ckpt(2), second)
    link_checkpoint(first, last)
    assert os.path.samefile(first, last)
    link_checkpoint(second, last)  # atomically replaced
    assert os.path.samefile(second, last)
    link_checkpoint(second, last)  # already the same file: a no-op
    os.remove(second)
    assert load_checkpoint(last)["global_step"] == 2
    save_checkpoint(_ckpt(3), first)  # a rewrite never changes a linked name's bytes
    assert load_checkpoint(last)["global_step"] == 2
    assert _temp_files(tmp_path) == []


def test_link_falls_back_to_a_copy_without_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_link(src: str, dst: str) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(ckpt_io.os, "link", no_link)
    src, dst = tmp_path / "1.ckpt", tmp_path / "last.ckpt"
    save_checkpoint(_ckpt(5), src)
    link_checkpoint(src, dst)
    assert not os.path.samefile(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert _temp_files(tmp_path) == []


def test_link_to_missing_source_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt"):
        link_checkpoint(tmp_path / "missing.ckpt", tmp_path / "last.ckpt")


# ------------------------------------------------------------------ loading errors


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt"):
        load_checkpoint(tmp_path / "nope.ckpt")


def test_truncated_file_names_file_and_problem(tmp_path: Path) -> None:
    path = tmp_path / "cut.ckpt"
    save_checkpoint(_ckpt(1), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt.*truncated"):
        load_checkpoint(path)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"garbage\.ckpt"):
        load_checkpoint(garbage)


def test_foreign_and_newer_files_are_rejected(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, foreign)
    with pytest.raises(CheckpointError, match=r"foreign\.pt is not a vistrain checkpoint.*'model'"):
        load_checkpoint(foreign)
    tensor_only = tmp_path / "tensor.pt"
    torch.save(torch.zeros(2), tensor_only)
    with pytest.raises(CheckpointError, match="found a Tensor"):
        load_checkpoint(tensor_only)
    newer = tmp_path / "newer.ckpt"
    save_checkpoint({**_ckpt(1), "version": 99}, newer)
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(newer)
    assert issubclass(CheckpointError, ValueError)


class _Custom:
    def __init__(self) -> None:
        self.value = 3


def test_unknown_objects_need_weights_only_false(tmp_path: Path) -> None:
    path = tmp_path / "custom.ckpt"
    save_checkpoint(_ckpt(1, callbacks={"X": {"obj": _Custom()}}), path)
    with pytest.raises(CheckpointError, match="weights_only=False"):
        load_checkpoint(path)
    assert load_checkpoint(path, weights_only=False)["callbacks"]["X"]["obj"].value == 3


def test_check_model_state_lists_every_problem(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    good = model.state_dict()
    check_model_state(model, good, tmp_path / "ok.ckpt")  # fits: no error
    bad = OrderedDict(good)
    del bad["1.running_var"]
    bad["0.weight"] = torch.zeros(5, 3)
    bad["2.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        check_model_state(model, bad, tmp_path / "bad.ckpt")
    message = str(info.value)
    assert "bad.ckpt" in message
    assert "missing keys (1): 1.running_var" in message
    assert "unexpected keys (1): 2.extra" in message
    assert "0.weight: checkpoint [5, 3] vs model [4, 3]" in message


# ------------------------------------------------------------------ snapshots


def test_snapshot_is_a_deep_cpu_copy_keeping_structure() -> None:
    pair = namedtuple("pair", "a b")
    model = nn.Linear(2, 2)
    state = {"sd": model.state_dict(), "t": pair(torch.ones(2), [torch.zeros(1), 3]), "n": "x"}
    snap = snapshot_to_cpu(state)
    assert snap["sd"]._metadata == state["sd"]._metadata  # load_state_dict needs it
    assert isinstance(snap["t"], pair)
    with torch.no_grad():
        model.weight.add_(1.0)
    state["t"].a.add_(1.0)
    assert not torch.equal(snap["sd"]["weight"], model.weight)
    assert torch.equal(snap["t"].a, torch.ones(2))
    assert snap["t"].b[1] == 3 and snap["n"] == "x"


def test_snapshot_reuses_buffers_of_a_previous_snapshot() -> None:
    state = {"w": torch.ones(3), "l": [torch.zeros(2)]}
    first = snapshot_to_cpu(state)
    state["w"].fill_(7.0)
    state["l"].append(torch.ones(1))
    second = snapshot_to_cpu(state, reuse=first)
    assert second["w"] is first["w"]
    assert torch.equal(second["w"], torch.full((3,), 7.0))
    assert second["l"][0] is first["l"][0]
    assert len(second["l"]) == 2


# ------------------------------------------------------------------ async writer


def test_async_writer_snapshots_then_writes_links_and_deletes(tmp_path: Path) -> None:
    writer = AsyncCheckpointWriter()
    live = _ckpt(1)
    old = tmp_path / "old.ckpt"
    old.write_bytes(b"x")
    writer.save(live, tmp_path / "1.ckpt", links=[tmp_path / "last.ckpt"], delete=[old])
    live["state_dict"]["w"].fill_(-1.0)  # training goes on right after save returns
    writer.close()
    loaded = load_checkpoint(tmp_path / "last.ckpt")
    assert torch.equal(loaded["state_dict"]["w"], torch.full((4, 3), 1.0))
    assert os.path.samefile(tmp_path / "1.ckpt", tmp_path / "last.ckpt")
    assert not old.exists()
    assert _temp_files(tmp_path) == []


def test_async_writer_runs_one_write_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    active, peak, lock = [0], [0], threading.Lock()
    gates = [threading.Event() for _ in range(3)]  # job i writes only once gates[i] is set
    real_save = ckpt_io.save_checkpoint

    def gated_save(obj: Any, path: Any) -> None:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        assert gates[int(obj["global_step"])].wait(10)
        real_save(obj, path)
        with lock:
            active[0] -= 1

    monkeypatch.setattr(ckpt_io, "save_checkpoint", gated_save)
    writer = AsyncCheckpointWriter()
    for step in range(3):
        writer.save(_ckpt(step), tmp_path / f"{step}.ckpt")  # waits for the previous write
        assert writer.in_flight
        assert not (tmp_path / f"{step}.ckpt").exists()
        gates[step].set()
    writer.wait()
    assert not writer.in_flight
    assert peak[0] == 1
    assert sorted(os.listdir(tmp_path)) == ["0.ckpt", "1.ckpt", "2.ckpt"]


def test_async_error_raises_at_next_save_and_at_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_save(obj: Any, handle: Any) -> None:
        raise OSError(28, "No space left on device")

    writer = AsyncCheckpointWriter()
    monkeypatch.setattr(ckpt_io.torch, "save", broken_save)
    writer.save(_ckpt(1), tmp_path / "1.ckpt", links=[tmp_path / "last.ckpt"])
    with pytest.raises(OSError, match="No space left"):
        writer.save(_ckpt(2), tmp_path / "2.ckpt")
    assert not (tmp_path / "2.ckpt").exists()  # the failing save queued nothing
    writer.save(_ckpt(3), tmp_path / "3.ckpt")
    with pytest.raises(OSError, match="No space left"):
        writer.wait()
    writer.wait()  # an error is raised once
    monkeypatch.undo()
    writer.save(_ckpt(4), tmp_path / "missing" / "4.ckpt")  # unwritable destination
    with pytest.raises(FileNotFoundError, match="missing"):
        writer.close()
    assert sorted(os.listdir(tmp_path)) == []
