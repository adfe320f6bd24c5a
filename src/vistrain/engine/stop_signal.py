"""Graceful stop on signals: SIGTERM, SIGINT and SIGUSR1 become a stop request.

What schedulers and users send to end a run -- SIGTERM (``kill``, SLURM and Kubernetes at the
end of a job), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's warning ahead of the time limit, with
``--signal=USR1@T``) -- must not kill a run half-way through a step or a checkpoint write.
While ``StopSignals`` is installed, the handler only remembers the signal; the loop reads it
at the next step boundary (``LoopState.stop_requested``), where the ranks agree, write a
checkpoint at that step and leave with exit status 128 + the signal number (130, 143, 138).

Nothing is raised inside the handler, so a checkpoint being written when the signal arrives
is finished, never torn (an exception raised inside ``torch.save`` is what produces torch's
``enforce fail at inline_container.cc``). A second Ctrl-C is the way out of a stop that takes
too long: it ends the process at once with status 130 and one line, without a traceback and
without the checkpoint (the atomic writes leave the previous files intact, and a temporary
file is removed at the next start).
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

from vistrain.engine.stop_request import StopRequest

STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name)
)
"""The signals that request a graceful stop (SIGUSR1 only where the platform has it)."""

_received: int | None = None  # the first stop signal since the handlers were installed
_interrupts = 0  # Ctrl-Cs since then


def _say(text: str) -> None:
    """Write one line to stderr from a signal handler (no buffered stream, rank 0 only)."""
    if os.environ.get("RANK", "0") == "0":
        os.write(2, f"vistrain: {text}\n".encode())


def _handle(signum: int, frame: FrameType | None) -> None:
    """Remember the signal; a second SIGINT ends the process at once."""
    global _received, _interrupts
    del frame
    if signum == signal.SIGINT:
        _interrupts += 1
        if _interrupts > 1:
            _say("interrupted again; exiting now without a checkpoint")
            os._exit(128 + signum)
    if _received is None:
        _received = signum
        if signum == signal.SIGINT:
            _say("interrupted; stopping after this step (Ctrl-C again to exit at once)")


def received_stop() -> StopRequest | None:
    """The stop request of the first signal received, or None."""
    if _received is None:
        return None
    name = signal.Signals(_received).name
    return StopRequest(reason=name, exit_code=128 + _received, checkpoint=True)


class StopSignals:
    """Routes ``STOP_SIGNALS`` to the stop request while installed (a context manager too).

    Handlers can only be set from the main thread; elsewhere ``install`` does nothing and the
    signals keep their previous handling.
    """

    def __init__(self) -> None:
        self._previous: dict[signal.Signals, Any] | None = None

    def install(self) -> None:
        """Take over the stop signals (forgetting earlier ones); again: re-assert our handler.

        The second form serves the Lightning engine: Lightning installs its own SIGTERM
        handler after the fit starts; ``uninstall`` still restores what was there before the
        first call.
        """
        global _received, _interrupts
        if threading.current_thread() is not threading.main_thread():
            return
        if self._previous is None:
            _received, _interrupts = None, 0
            self._previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        for sig in STOP_SIGNALS:
            signal.signal(sig, _handle)

    def uninstall(self) -> None:
        """Restore the handlers found by the first ``install`` (idempotent)."""
        if self._previous is None:
            return
        previous, self._previous = self._previous, None
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uninstall()


__all__ = ["STOP_SIGNALS", "StopSignals", "received_stop"]
