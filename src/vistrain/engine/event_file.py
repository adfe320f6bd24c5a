"""A small synchronous writer of TensorBoard event files for scalars.

TensorBoard reads ``events.out.tfevents.*`` files: a sequence of records, each an ``Event``
protocol buffer framed as ``length (uint64) | masked CRC-32C of length | data | masked
CRC-32C of data`` (the TFRecord framing). ``torch.utils.tensorboard.SummaryWriter`` hands
every event to a background thread; on a short training step the thread's wake-ups and
its share of the interpreter lock cost more than the write itself (about 5 us per step
at two scalars every 50 steps, see ``benchmarks/overhead.py``). This writer builds one
event per logged step, appends it to a buffered file and flushes on a timer, so logging
costs a few microseconds per logged step and nothing on the others.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Mapping
from itertools import count

from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary

_CRC32C_POLY = 0x82F63B78  # Castagnoli polynomial, bit-reversed
_MASK_DELTA = 0xA282EAD8
_file_ids = count()


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC32C_POLY if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``; records are short, so a table loop is enough."""
    crc = 0xFFFFFFFF
    table = _TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The CRC as TFRecord stores it: rotated and offset, so CRCs of CRCs stay distinct."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """One TFRecord: the length, its masked CRC, the data and its masked CRC."""
    header = struct.pack("<Q", len(data))
    return (
        header
        + struct.pack("<I", masked_crc32c(header))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


class ScalarEventWriter:
    """Appends scalar events to a new event file in ``log_dir``.

    Args:
        log_dir: Folder of the file (created if missing).
        purge_step: On resume, the first step of the new history: TensorBoard hides
            events of earlier files at or after this step (a ``SessionLog.START`` record).
        flush_secs: Longest time written events may stay in the process's buffer.
    """

    def __init__(
        self, log_dir: str, purge_step: int | None = None, flush_secs: float = 1.0
    ) -> None:
        os.makedirs(log_dir, exist_ok=True)
        stamp = f"{int(time.time()):010d}"
        name = f"events.out.tfevents.{stamp}.{socket.gethostname()}.{os.getpid()}.{next(_file_ids)}"
        self.path = os.path.join(log_dir, name)
        self.flush_secs = flush_secs
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        if purge_step is not None:
            self._write(
                Event(
                    wall_time=time.time(),
                    step=purge_step,
                    session_log=SessionLog(status=SessionLog.START),
                )
            )
        self.flush()

    def _write(self, event: Event) -> None:
        self._file.write(frame_record(event.SerializeToString()))

    def add_scalars(self, scalars: Mapping[str, float], step: int, wall_time: float) -> None:
        """Write all ``scalars`` of one step as a single event."""
        values = [Summary.Value(tag=tag, simple_value=value) for tag, value in scalars.items()]
        self._write(Event(wall_time=wall_time, step=step, summary=Summary(value=values)))
        if time.monotonic() >= self._next_flush:
            self.flush()

    def flush(self) -> None:
        """Hand everything written so far to the operating system."""
        self._file.flush()
        self._next_flush = time.monotonic() + self.flush_secs

    def close(self) -> None:
        """Flush and close the file (idempotent)."""
        if not self._file.closed:
            self._file.flush()
            self._file.close()
