from __future__ import annotations

import codecs
import fcntl
import io
import logging
import os
import re
import select
import struct
import subprocess
import sys
import termios
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pyte
import pytest

import vistrain.common.log_setup as log_setup
import vistrain.common.progress as progress
from cli_helpers import TINY_TOY_SETS, run_vistrain, toy_args
from vistrain.common.log_setup import setup_logger
from vistrain.common.progress import (
    ProgressDisplay,
    RichProgressDisplay,
    create_progress_display,
    progress_mode,
)

PROGRAM = textwrap.dedent(
    """
    import torch
    from vistrain.engine.callbacks.logging import LoggingCallback

    callback = LoggingCallback(refresh_rate=10)
    callback.setup()
    state = {"current_epoch": 0, "num_epochs": 1, "global_step": 0, "num_steps": -1,
             "train_dataloader": None, "num_train_batches": 30, "test_dataloader": None,
             "num_test_batches": [5]}
    callback.on_train_epoch_start(state, None, None)
    for batch_idx in range(30):
        batch = {"images": torch.zeros(2, 3, 4, 4)}
        callback.on_train_batch_start(state, None, None, batch, batch_idx)
        state["global_step"] += 1
        state["metrics"] = {"loss": torch.tensor(1.0 / (batch_idx + 1))}
        callback.on_train_batch_end(state, None, None, {}, batch, batch_idx)
    callback.on_test_epoch_start(state, None)
    for batch_idx in range(5):
        callback.on_test_batch_end(state, None, {}, {}, batch_idx)
    callback.on_test_epoch_end(state, None)
    callback.on_fit_end(state, None)
    print("DONE")
    """
)


def child_env(term: str, columns: int = 160, lines: int = 40) -> dict[str, str]:
    env = dict(os.environ, TERM=term, COLUMNS=str(columns), LINES=str(lines))
    for name in (
        "VISTRAIN_PROGRESS",
        "FORCE_COLOR",
        "NO_COLOR",
        "TTY_COMPATIBLE",
        "TTY_INTERACTIVE",
    ):
        env.pop(name, None)
    return env


def run_in_pty(script: Path, term: str) -> str:
    """Run ``script`` with stdout and stderr on a pseudo-terminal; return what it printed."""
    return "".join(run_in_pty_chunks(script, term))


def run_in_pty_chunks(script: Path, term: str, columns: int = 160, lines: int = 40) -> list[str]:
    """Run ``script`` on a ``columns`` x ``lines`` pseudo-terminal; the output as it was read."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=slave,
        stderr=slave,
        env=child_env(term, columns, lines),
    )
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
        proc.wait(timeout=60)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return [decoder.decode(chunk) for chunk in chunks] + [decoder.decode(b"", final=True)]


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("progress") / "program.py"
    path.write_text(PROGRAM)
    return path


def test_terminal_gets_a_live_bar_and_a_pipe_gets_plain_lines(script: Path) -> None:
    tty = run_in_pty(script, "xterm-256color")
    assert "\x1b[" in tty  # cursor and colour control of the live display
    assert "━" in tty  # rich's bar
    assert "Epoch 0" in tty and "DONE" in tty

    piped = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=child_env("xterm-256color"),
        timeout=120,
        check=True,
    )
    out = piped.stdout
    assert "\x1b" not in out and "\r" not in out and "━" not in out
    assert all(ch == "\n" or ch.isprintable() for ch in out)
    body = out.splitlines()
    assert body[-1] == "DONE"
    messages = [line.split("] ", 1)[1] for line in body[:-1]]
    assert all(line.startswith("[") for line in body[:-1])
    assert messages[0].startswith("Epoch 0: 1/30, ETA: ")
    assert messages[0].endswith("(first batch)")
    assert [m.split(",")[0] for m in messages] == [
        "Epoch 0: 1/30",
        "Epoch 0: 10/30",
        "Epoch 0: 20/30",
        "Epoch 0: 30/30",
        "Testing 5/5",
    ]
    assert f"loss: {sum(1 / k for k in range(21, 31)) / 10:.4f}" in messages[-2]


def test_dumb_terminal_gets_plain_lines(script: Path) -> None:
    out = run_in_pty(script, "dumb")
    assert "\x1b" not in out and "━" not in out
    assert "Epoch 0: 30/30" in out


DETECTION_RUN = textwrap.dedent(
    """
    import logging
    import time
    import torch
    from vistrain.engine.callbacks.logging import LoggingCallback

    callback = LoggingCallback(refresh_rate=10)
    callback.setup()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    state = {"current_epoch": 15, "num_epochs": 20, "global_step": 450, "num_steps": -1,
             "train_dataloader": None, "num_train_batches": 30, "test_dataloader": None,
             "num_test_batches": [5], "optimizers": [optimizer]}
    callback.on_train_epoch_start(state, None, None)
    for batch_idx in range(30):
        batch = {"images": torch.zeros(2, 3, 4, 4)}
        callback.on_train_batch_start(state, None, None, batch, batch_idx)
        time.sleep(0.06)
        state["global_step"] += 1
        state["metrics"] = {
            f"det.{name}": torch.tensor(4.4 + batch_idx)
            for name in ("loss_bbox", "loss_cls", "loss_obj", "loss_l1", "loss_total")
        }
        callback.on_train_batch_end(state, None, None, {}, batch, batch_idx)
    callback.on_test_epoch_start(state, None)
    for batch_idx in range(5):
        time.sleep(0.06)
        callback.on_test_batch_end(state, None, {}, {}, batch_idx)
    callback.on_test_epoch_end(state, None)
    logging.getLogger("vistrain").info("FINAL TABLE\\n| AP | 0.5 |\\n| AP50 | 0.8 |")
    callback.on_fit_end(state, None)
    print("DONE")
    """
)

_BAR_ROW = re.compile(
    r"^Epoch 15 (?P<bar>[━╸╺ ]+) (?P<done>\d+)/30 \d:\d\d:\d\d ETA (\d+:\d\d:\d\d|\?)\s*$"
)


def screens(chunks: list[str], columns: int, lines: int = 40) -> list[list[str]]:
    """What the terminal showed after each chunk of output (pyte emulates the terminal)."""
    screen = pyte.Screen(columns, lines)
    stream = pyte.Stream(screen)
    shown = []
    for chunk in chunks:
        stream.feed(chunk)
        shown.append(list(screen.display))
    return shown


@pytest.mark.parametrize("columns", [80, 120])
def test_bar_fits_the_terminal_with_metrics_on_their_own_line(tmp_path: Path, columns: int) -> None:
    script = tmp_path / "run.py"
    script.write_text(DETECTION_RUN)
    frames = screens(run_in_pty_chunks(script, "xterm-256color", columns=columns), columns)
    with_metrics = 0
    for rows in frames:
        bar_rows = [i for i, row in enumerate(rows) if "━" in row and row.startswith("Epoch")]
        for i in bar_rows:
            match = _BAR_ROW.match(rows[i])
            # Bar, k/N, elapsed and ETA all on the one row, whatever else is shown.
            assert match, f"bar row cut at {columns} columns: {rows[i]!r}"
            assert len(match["bar"]) >= columns // 3  # the bar takes the width that is left
            below = rows[i + 1]
            if "det.loss_bbox" in below:
                with_metrics += 1
                assert below.startswith("  lr: 1.000e-02, det.loss_bbox: ")
                assert len(below.rstrip()) <= columns
                if len(f"  lr: 1.000e-02, {'det.loss_bbox: 14.4000, ' * 5}") > columns:
                    assert below.rstrip().endswith("…")  # cut at the edge, never wrapped
    assert with_metrics > 0, "no frame showed the bar together with its metrics line"
    final = [row.rstrip() for row in frames[-1] if row.strip()]
    assert not any("━" in row for row in final)  # the last frame is erased
    assert final[-3:] == ["| AP | 0.5 |", "| AP50 | 0.8 |", "DONE"]


class FakeStream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_progress_mode_detection_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VISTRAIN_PROGRESS", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert progress_mode(FakeStream(tty=True)) == "rich"
    assert progress_mode(FakeStream(tty=False)) == "plain"
    monkeypatch.setenv("TERM", "dumb")
    assert progress_mode(FakeStream(tty=True)) == "plain"
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("VISTRAIN_PROGRESS", "plain")
    assert progress_mode(FakeStream(tty=True)) == "plain"
    monkeypatch.setenv("VISTRAIN_PROGRESS", "rich")
    assert progress_mode(FakeStream(tty=False)) == "rich"
    display = create_progress_display()
    assert isinstance(display, RichProgressDisplay) and display.live
    monkeypatch.setenv("VISTRAIN_PROGRESS", "fancy")
    with pytest.raises(ValueError, match="VISTRAIN_PROGRESS='fancy'"):
        progress_mode(FakeStream(tty=True))
    with pytest.raises(ValueError, match="mode='bar'"):
        create_progress_display("bar")


def test_other_ranks_draw_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "get_rank", lambda: 1)
    display = create_progress_display("rich")
    assert type(display) is ProgressDisplay and not display.live


@pytest.fixture
def restore_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger("vistrain")
    saved = (logger.level, logger.propagate, list(logger.handlers))
    yield logger
    for handler in list(logger.handlers):
        if handler not in saved[2]:
            logger.removeHandler(handler)
            handler.close()
    logger.setLevel(saved[0])
    logger.propagate = saved[1]


def test_setup_logger_levels_file_and_idempotence(
    restore_logger: logging.Logger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log_file = tmp_path / "logs" / "run.log"
    logger = setup_logger(log_file=log_file)
    setup_logger(log_file=log_file)  # reconfiguring must not duplicate handlers
    assert logger is restore_logger and logger.level == logging.INFO
    logging.getLogger("vistrain.engine.x").info("hello %d", 3)
    logger.debug("hidden")
    out = capsys.readouterr().out
    assert out.count("hello 3") == 1 and "hidden" not in out
    assert out.startswith("[") and "INFO] hello 3" in out
    assert log_file.read_text().count("hello 3") == 1
    with pytest.raises(ValueError, match="Unknown log level 'LOUD'"):
        setup_logger("LOUD")


def test_setup_logger_on_other_ranks_warns_only(
    restore_logger: logging.Logger,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(log_setup, "get_rank", lambda: 1)
    logger = setup_logger("DEBUG", log_file=tmp_path / "rank1.log")
    logger.info("progress")
    logger.warning("careful")
    out = capsys.readouterr().out
    assert "progress" not in out
    assert "[rank 1] careful" in out
    assert not (tmp_path / "rank1.log").exists()  # only rank 0 writes files


def test_real_fit_command_on_a_terminal_and_into_a_pipe(tmp_path: Path) -> None:
    """``vistrain fit`` itself: live bar on a terminal, clean lines in a pipe or log file."""
    args = ["fit", *toy_args("num_epochs=1", *TINY_TOY_SETS)]
    script = tmp_path / "fit.py"
    script.write_text(
        "import sys\nfrom vistrain.cli import main\n"
        f"sys.exit(main({[*args, '--output-dir', str(tmp_path / 'tty')]!r}))\n"
    )
    tty = run_in_pty(script, "xterm-256color")
    assert "\x1b[" in tty and "━" in tty
    piped = run_vistrain(
        *args,
        "--output-dir",
        str(tmp_path / "pipe"),
        env=child_env("xterm-256color"),
        timeout=120,
        check=True,
    )
    for text in (piped.stdout, piped.stderr, (tmp_path / "pipe" / "log.txt").read_text()):
        assert "\x1b" not in text and "\r" not in text and "━" not in text
    assert "Epoch 0: 2/2" in piped.stdout and "Testing 1/1" in piped.stdout
