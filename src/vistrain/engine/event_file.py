"""A small synchronous writer of TensorBoard event files for scalars (and PNG pictures).

TensorBoard reads ``events.out.tfevents.*`` files: a sequence of ``Event`` protocol buffers,
each framed as a TFRecord by ``tensorboard``'s own ``RecordWriter``. The writer of
``torch.utils.tensorboard`` hands every event to a background thread; on a short training
step the thread's wake-ups and its share of the interpreter lock cost more than the write
itself (about 5 us per step at two scalars every 50 steps, see ``benchmarks/overhead.py``).
This writer builds one event per logged step, appends it to a buffered file and flushes on
a timer, so logging costs a few microseconds per logged step and nothing on the others.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, Sequence
from itertools import count

from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.record_writer import RecordWriter

_file_ids = count()


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
        self._records = RecordWriter(self._file)
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
        self._records.write(event.SerializeToString())

    def add_scalars(self, scalars: Mapping[str, float], step: int, wall_time: float) -> None:
        """Write all ``scalars`` of one step as a single event."""
        values = [Summary.Value(tag=tag, simple_value=value) for tag, value in scalars.items()]
        self._write(Event(wall_time=wall_time, step=step, summary=Summary(value=values)))
        if time.monotonic() >= self._next_flush:
            self.flush()

    def add_png_images(
        self, images: Sequence[tuple[str, bytes, int, int]], step: int, wall_time: float
    ) -> None:
        """Write PNG pictures ``(tag, png, height, width)`` of one step as a single event.

        TensorBoard shows them in its images tab, one slider per tag over the steps.
        """
        values = [
            Summary.Value(
                tag=tag,
                image=Summary.Image(
                    height=height, width=width, colorspace=3, encoded_image_string=png
                ),
            )
            for tag, png, height, width in images
        ]
        self._write(Event(wall_time=wall_time, step=step, summary=Summary(value=values)))
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
