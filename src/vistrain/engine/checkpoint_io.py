"""Checkpoint file IO: crash-consistent writes, links, loading checks, a background writer.

Nothing here knows about training; the ``CheckpointCallback`` decides *what* and *when*,
this module decides *how* bytes reach the disk so that a reader never sees a torn file:

1. ``save_checkpoint`` serialises into a temporary file in the destination folder
   (``.<name>.tmp-<pid>-<random>``), flushes and fsyncs it, renames it onto the destination
   with ``os.replace`` (atomic on POSIX) and fsyncs the folder so the rename itself survives a
   power cut. A crash at any moment leaves either the old file or the new one, plus at worst
   a temporary file that ``cleanup_stale_temp_files`` removes at the next start.
2. ``link_checkpoint`` makes ``last.ckpt`` / ``best.ckpt`` point at the bytes of a periodic
   file without serialising again: a hard link to a temporary name, then ``os.replace``.
   Files are never written in place, so hard-linked names never change under each other.
3. ``load_checkpoint`` / ``check_model_state`` / ``check_training_state`` turn a missing,
   truncated, foreign or ill-fitting file into a clear error *before* any state is touched.
4. ``AsyncCheckpointWriter`` takes a CPU snapshot on the calling thread and writes it on one
   background thread, one write at a time.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any

import numpy as np
import torch
from torch import nn

from vistrain.common.distributed import unwrap_model

CHECKPOINT_FORMAT = "vistrain-checkpoint"
"""Value of the ``"format"`` key that marks a vistrain checkpoint."""

CHECKPOINT_VERSION = 1
"""Newest checkpoint layout this code reads and writes."""

_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-(?P<token>[0-9a-f]+)$")
_MAX_LISTED = 20


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: unreadable, foreign, or not fitting the model."""


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def temp_path_for(path: str | os.PathLike[str]) -> str:
    """A fresh temporary name next to ``path``: ``<folder>/.<name>.tmp-<pid>-<random>``.

    The temporary file lives in the destination folder because ``os.replace`` is only
    atomic within one file system; the pid tells ``cleanup_stale_temp_files`` whether the
    writer is still alive.
    """
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def is_temp_file(name: str) -> bool:
    """True if ``name`` (a base name) follows the temporary-file pattern of this module."""
    return _TEMP_RE.match(name) is not None


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Fsync a folder so that renames and unlinks in it are durable (no-op where unsupported)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(os.fspath(folder), flags)
    except OSError:
        return  # e.g. Windows cannot open folders; nothing more can be done there
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Write through ``write(handle)`` into a temp file, fsync it, rename onto ``path``."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"Cannot write {path}: folder {folder} does not exist; create it first."
        )
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(folder)


def save_checkpoint(obj: Any, path: str | os.PathLike[str]) -> None:
    """Serialise ``obj`` with ``torch.save`` to ``path`` crash-consistently.

    Readers of ``path`` see the previous file or the complete new one, never a mix; once this
    returns, the file and its name are on disk (fsync of file and folder).

    Raises:
        FileNotFoundError: If the destination folder does not exist.
    """
    _atomic_write(path, lambda handle: torch.save(obj, handle))


def write_bytes_atomic(data: bytes, path: str | os.PathLike[str]) -> None:
    """Write ``data`` to ``path`` crash-consistently (small side files such as ``best.json``)."""

    def write(handle: IO[bytes]) -> None:
        handle.write(data)

    _atomic_write(path, write)


def link_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Make ``dst`` name the same bytes as ``src``, atomically, without serialising again.

    A hard link is made under a temporary name and renamed onto ``dst``, so ``dst`` always
    names a complete file (the old or the new one). Hard links survive deleting ``src`` later,
    which lets retention remove old periodic files while ``best.ckpt`` stays valid. Where hard
    links are not supported (some network or FAT file systems) the bytes are copied instead.

    Raises:
        FileNotFoundError: If ``src`` does not exist.
    """
    src = os.path.abspath(os.fspath(src))
    dst = os.path.abspath(os.fspath(dst))
    if not os.path.isfile(src):
        raise FileNotFoundError(f"Cannot link {dst} to {src}: {src} does not exist.")
    if os.path.exists(dst) and os.path.samefile(src, dst):
        return
    tmp = temp_path_for(dst)
    try:
        try:
            os.link(src, tmp)
        except OSError as err:
            if err.errno == errno.ENOENT:
                raise
            with open(src, "rb") as source, open(tmp, "wb") as target:
                shutil.copyfileobj(source, target, length=16 * 1024 * 1024)
                target.flush()
                os.fsync(target.fileno())
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(dst))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def cleanup_stale_temp_files(folder: str | os.PathLike[str]) -> list[str]:
    """Delete temporary files left behind by interrupted writes in ``folder``.

    Call it at start-up, before this process writes there. Files of another process that is
    still alive are kept (it may be writing right now); files of this process or of a process
    that no longer exists are removed. A missing folder is not an error.

    Returns:
        The paths that were removed.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    removed = []
    own_pid = os.getpid()
    for name in sorted(os.listdir(folder)):
        match = _TEMP_RE.match(name)
        if match is None:
            continue
        pid = int(match.group("pid"))
        if pid != own_pid and _pid_alive(pid):
            continue
        path = os.path.join(folder, name)
        try:
            os.remove(path)
        except FileNotFoundError:
            continue
        removed.append(path)
    if removed:
        fsync_dir(folder)
    return removed


def remove_files(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Delete files that may already be gone, then fsync their folders."""
    folders = set()
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            continue
        folders.add(os.path.dirname(os.path.abspath(os.fspath(path))))
    for folder in folders:
        fsync_dir(folder)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _numpy_safe_globals() -> list[Any]:
    """Numpy classes needed to unpickle plain arrays and scalars (RNG states, metric values).

    These rebuild data only (no code runs), so allowing them keeps ``weights_only`` loading
    safe while numpy's RNG state (a tuple holding a uint32 array) round-trips.
    """
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    dtype_classes = {type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"}
    return [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype, *dtype_classes]


def _short_reason(err: BaseException) -> str:
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].strip().splitlines()[0]
    else:
        text = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def load_checkpoint(
    path: str | os.PathLike[str],
    map_location: str | torch.device | None = "cpu",
    weights_only: bool = True,
) -> dict[str, Any]:
    """Load and validate a vistrain checkpoint.

    Args:
        path: The ``.ckpt`` file.
        map_location: Where tensors go (default CPU; the caller moves them on).
        weights_only: Use torch's restricted unpickler (tensors, containers, numbers,
            strings, plus numpy arrays and scalars for RNG states), which cannot run code
            from the file. Pass ``False`` only for a trusted file that holds other objects
            (for example a callback state with custom classes).

    Returns:
        The checkpoint dict (``format``, ``version``, ``state_dict``, ...).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        CheckpointError: If the file is truncated or corrupt, holds objects the restricted
            unpickler refuses, is not a vistrain checkpoint, or is from a newer version.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint file {path} does not exist; check the path.")
    try:
        if weights_only:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                obj = torch.load(path, map_location=map_location, weights_only=True)
        else:
            obj = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:
        hint = (
            " If the file is complete and trusted, it may hold objects the safe loader refuses;"
            " load it with weights_only=False."
            if weights_only and "Unsupported global" in str(err)
            else " The file is truncated, corrupt or not a torch checkpoint."
        )
        raise CheckpointError(
            f"Cannot read checkpoint {path}: {_short_reason(err)}.{hint}"
        ) from err
    if not isinstance(obj, Mapping) or obj.get("format") != CHECKPOINT_FORMAT:
        found = (
            f"a dict with keys {sorted(map(str, obj))[:_MAX_LISTED]}"
            if isinstance(obj, Mapping)
            else f"a {type(obj).__name__}"
        )
        raise CheckpointError(
            f"{path} is not a vistrain checkpoint: expected a dict with "
            f"format={CHECKPOINT_FORMAT!r}, found {found}."
        )
    version = obj.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {version!r}; this vistrain reads versions up to "
            f"{CHECKPOINT_VERSION}. Upgrade vistrain to load it."
        )
    if not isinstance(obj.get("state_dict"), Mapping):
        raise CheckpointError(f"{path} has no model 'state_dict'; the file is incomplete.")
    return dict(obj)


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f", ... and {more} more" if more > 0 else "")


def check_model_state(
    model: nn.Module, state_dict: Mapping[str, Any], path: str | os.PathLike[str]
) -> None:
    """Check that ``state_dict`` fits ``model`` exactly, before any weight is changed.

    Compares names and shapes against ``model.state_dict()`` (DDP and compile wrappers are
    stripped), so a failed resume leaves the model untouched.

    Raises:
        CheckpointError: Naming ``path`` and listing missing keys, unexpected keys and shape
            mismatches (``name: checkpoint shape vs model shape``).
    """
    expected = unwrap_model(model).state_dict()
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(str(k) for k in state_dict if k not in expected)
    mismatched = []
    for key, value in expected.items():
        if key not in state_dict:
            continue
        stored = state_dict[key]
        stored_shape = tuple(stored.shape) if isinstance(stored, torch.Tensor) else None
        if stored_shape != tuple(value.shape):
            what = list(stored_shape) if stored_shape is not None else type(stored).__name__
            mismatched.append(f"{key}: checkpoint {what} vs model {list(value.shape)}")
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listed(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_listed(mismatched)}")
    raise CheckpointError(
        f"The weights in {os.fspath(path)} do not fit the model ({type(model).__name__}); "
        + "; ".join(problems)
        + ". Check that the configuration matches the one the checkpoint was trained with."
    )


RESUME_KEYS = ("epoch", "global_step", "optimizers", "lr_schedulers")
"""Keys a checkpoint needs to continue training (``state_dict`` is checked on loading)."""


def _optimizer_misfit(saved: Any, optimizer: Any) -> str | None:
    """Why the optimizer state ``saved`` cannot be loaded into ``optimizer``, or None."""
    if not isinstance(saved, Mapping) or not isinstance(saved.get("param_groups"), list):
        return "its state has no 'param_groups' list"
    groups = optimizer.param_groups
    if len(saved["param_groups"]) != len(groups):
        return f"{len(saved['param_groups'])} parameter groups saved, {len(groups)} here"
    params = []
    for idx, (old, new) in enumerate(zip(saved["param_groups"], groups)):
        count = len(old.get("params", [])) if isinstance(old, Mapping) else -1
        if count != len(new["params"]):
            return f"group {idx} holds {count} parameters saved, {len(new['params'])} here"
        params += list(zip(old["params"], new["params"]))
    state = saved.get("state", {})
    for saved_id, param in params:
        for name, value in (state.get(saved_id) or {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                return (
                    f"its {name!r} of a parameter has shape {list(value.shape)}, the "
                    f"parameter {list(param.shape)}"
                )
    return None


def _scheduler_misfit(saved: Any, scheduler: Any) -> str | None:
    """Why the scheduler state ``saved`` cannot be loaded into ``scheduler``, or None."""
    if not isinstance(saved, Mapping):
        return f"its state is a {type(saved).__name__}, not a dict"
    configs = getattr(scheduler, "configs", None)
    if configs is not None:
        if not isinstance(saved.get("schedulers"), list) or "lrs" not in saved:
            return "its state lacks the 'schedulers' or 'lrs' entry"
        if len(saved["schedulers"]) != len(configs):
            return f"{len(saved['schedulers'])} schedules saved, {len(configs)} here"
        groups = len(scheduler.optimizer.param_groups)
        if len(saved["lrs"]) != groups:
            return f"learning rates of {len(saved['lrs'])} parameter groups saved, {groups} here"
    return None


def check_training_state(
    ckpt: Mapping[str, Any],
    path: str | os.PathLike[str],
    optimizers: Sequence[Any],
    lr_schedulers: Sequence[Any],
) -> None:
    """Check that ``ckpt`` can continue a run with these optimizers and schedulers.

    Call it before any state is changed: loading the weights first and then failing on the
    optimizer would leave a half-restored run.

    Raises:
        CheckpointError: Naming ``path`` and the first problem: a missing key, a different
            number of optimizers or schedulers, or a state that does not fit (other parameter
            groups, parameter counts or shapes).
    """
    where = os.fspath(path)
    required = RESUME_KEYS if ckpt.get("epoch_finished", True) else (*RESUME_KEYS, "batches_done")
    missing = [key for key in required if key not in ckpt]
    if missing:
        raise CheckpointError(
            f"Checkpoint {where} lacks {', '.join(repr(key) for key in missing)}, which a resume "
            "needs; the file is incomplete or was not written by a vistrain training run."
        )
    for what, saved, have, misfit in (
        ("optimizer", ckpt["optimizers"], optimizers, _optimizer_misfit),
        ("scheduler", ckpt["lr_schedulers"], lr_schedulers, _scheduler_misfit),
    ):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(have):
            count = len(saved) if isinstance(saved, (list, tuple)) else "no list of"
            raise CheckpointError(
                f"Checkpoint {where} holds {count} {what} states but this run has "
                f"{len(have)} {what}s; build the run with the same {what}s."
            )
        for idx, (state, target) in enumerate(zip(saved, have)):
            reason = misfit(state, target)
            if reason is not None:
                raise CheckpointError(
                    f"Checkpoint {where}: {what} {idx} does not fit this run ({reason}); "
                    f"build the run with the {what} settings it was trained with, or start a "
                    "new run."
                )


# --------------------------------------------------------------------------------------------
# Asynchronous writing
# --------------------------------------------------------------------------------------------


def snapshot_to_cpu(obj: Any, reuse: Any = None) -> Any:
    """Deep copy of the tensors in a nested state, on CPU, detached from the live training state.

    Dicts (their type and attributes such as a state dict's ``_metadata`` kept), lists and
    tuples (named tuples too) are rebuilt; tensors are cloned to CPU; numpy arrays are copied;
    any other value is kept as is (numbers and strings are immutable).

    Args:
        obj: The state to copy.
        reuse: A previous snapshot of the same layout that nobody reads any more. Its CPU
            tensors are overwritten in place where name, shape and dtype match, which avoids
            allocating (and page-faulting) fresh memory for every save: about three times
            faster for a 94 MB state.
    """
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach()
        if (
            isinstance(reuse, torch.Tensor)
            and reuse.device.type == "cpu"
            and reuse.shape == tensor.shape
            and reuse.dtype == tensor.dtype
            and not reuse.requires_grad
        ):
            return reuse.copy_(tensor)
        if tensor.device.type == "cpu":
            return tensor.clone()
        return tensor.to("cpu", copy=True)
    if isinstance(obj, dict):
        old = reuse if isinstance(reuse, dict) else {}
        out = obj.copy()
        for key, value in out.items():
            out[key] = snapshot_to_cpu(value, old.get(key))
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(obj, (list, tuple)):
        olds = list(reuse) if isinstance(reuse, (list, tuple)) else []
        olds += [None] * (len(obj) - len(olds))
        values = [snapshot_to_cpu(value, olds[idx]) for idx, value in enumerate(obj)]
        if isinstance(obj, list):
            return values
        if hasattr(obj, "_fields"):
            return type(obj)(*values)
        return tuple(values)
    if isinstance(obj, np.ndarray):
        return obj.copy()
    return obj


class AsyncCheckpointWriter:
    """Writes checkpoints on one background thread, one at a time.

    ``save`` snapshots the state to CPU on the calling (training) thread, so training may
    change its tensors right after, and queues the write, followed by optional links and
    deletions that must wait until the new file is durable. A new ``save`` first waits for
    the previous write, so at most one write (and one snapshot) is in flight.

    Errors of a background job are re-raised, once, by the next ``save``, ``run``, ``wait``
    or ``close``. ``wait`` returns only after every queued job finished: the file is
    fsync'd and renamed. The worker thread is joined at interpreter exit, so a write that
    started still completes if the training thread dies.
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vistrain-ckpt")
        self._pending: list[Future[None]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._last_snapshot: Any = None  # buffers reused by the next snapshot

    def save(
        self,
        state: Any,
        path: str | os.PathLike[str],
        links: Iterable[str | os.PathLike[str]] = (),
        delete: Iterable[str | os.PathLike[str]] = (),
    ) -> None:
        """Snapshot ``state`` now, write it to ``path`` in the background.

        Args:
            state: The checkpoint (nested dicts/lists/tuples of tensors and plain values).
            path: Destination file.
            links: Names to point at ``path`` once it is durable (e.g. ``last.ckpt``).
            delete: Files to remove once ``path`` and its links are durable (retention).

        Raises:
            Exception: The error of a previous background job, if it failed.
        """
        self.wait()
        # After wait() no job holds the previous snapshot, so its buffers can be refilled.
        previous, self._last_snapshot = self._last_snapshot, None
        snapshot = snapshot_to_cpu(state, reuse=previous)
        self._last_snapshot = snapshot
        links = list(links)
        delete = list(delete)

        def job() -> None:
            save_checkpoint(snapshot, path)
            for link in links:
                link_checkpoint(path, link)
            remove_files(delete)

        self._submit(job)

    def run(self, job: Callable[[], None]) -> None:
        """Queue a file job (e.g. linking ``best.ckpt``) behind the pending write.

        Raises:
            Exception: The error of a previous background job, if it failed.
        """
        self._raise_finished_errors()
        self._submit(job)

    def _submit(self, job: Callable[[], None]) -> None:
        if self._closed:
            raise RuntimeError("AsyncCheckpointWriter is closed; create a new one to save.")
        with self._lock:
            self._pending.append(self._executor.submit(job))

    def _raise_finished_errors(self) -> None:
        with self._lock:
            done = [future for future in self._pending if future.done()]
            self._pending = [future for future in self._pending if not future.done()]
        for future in done:
            future.result()

    @property
    def in_flight(self) -> bool:
        """True while a queued job has not finished."""
        with self._lock:
            return any(not future.done() for future in self._pending)

    def wait(self) -> None:
        """Block until every queued job finished; re-raise the first error, once."""
        with self._lock:
            pending, self._pending = self._pending, []
        error: BaseException | None = None
        for future in pending:
            exc = future.exception()
            if exc is not None and error is None:
                error = exc
        if error is not None:
            raise error

    def close(self) -> None:
        """Wait for pending jobs (re-raising their error) and stop the worker thread."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._last_snapshot = None
            self._executor.shutdown(wait=True)
