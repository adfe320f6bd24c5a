"""The ``vistrain`` command line from tests: tiny-run arguments and real processes.

Tests import it as ``from cli_helpers import ...`` (pytest puts ``tests/`` on the path for its
``conftest.py``, as for ``trainer_fixtures``). Each test keeps its own run sizes; what is shared
is how ``--set`` lists are spelled and how a ``vistrain`` process is started, so that every
child process imports the same ``vistrain`` sources as the test that starts it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import vistrain

SRC = str(Path(vistrain.__file__).resolve().parents[1])
"""The folder holding the ``vistrain`` package the tests import (``src/`` of a checkout)."""

TINY_TOY_SETS = ("num_train_images=64", "num_val_images=32", "log_every=2")
"""``--set`` items of a toy_classifier run of seconds: 2 steps an epoch at the default batch
of 32, one validation batch, a log line every other step."""


def set_args(*items: str) -> list[str]:
    """``KEY=VALUE`` items as command-line arguments: ``["--set", item, ...]``."""
    return [arg for item in items for arg in ("--set", item)]


def toy_args(*items: str) -> list[str]:
    """Arguments that pick the toy_classifier experiment with the ``--set`` ``items``."""
    return ["--config", "toy_classifier", *set_args(*items)]


def vistrain_command(*args: str) -> list[str]:
    """The command line ``python -m vistrain ARGS`` with this test's interpreter."""
    return [sys.executable, "-m", "vistrain", *args]


def vistrain_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """``base`` (default: this process's environment) with ``extra`` set and :data:`SRC`
    first on ``PYTHONPATH``, so that the child runs the sources under test."""
    env = dict(os.environ if base is None else base, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH")) if p)
    return env


def run_vistrain(
    *args: str,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``vistrain ARGS`` to its end; its output is captured as text.

    Args:
        args: The command-line arguments after ``vistrain``.
        cwd: Working folder of the process (default: this one's).
        env: Its environment before :func:`vistrain_env` (default: this process's).
        timeout: Seconds after which the test fails.
        check: Raise ``CalledProcessError`` on a nonzero exit status.
    """
    return subprocess.run(
        vistrain_command(*args),
        cwd=cwd,
        env=vistrain_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )


def start_vistrain(
    *args: str,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    **popen: Any,
) -> subprocess.Popen[Any]:
    """Start ``vistrain ARGS`` without waiting; ``popen`` goes to ``subprocess.Popen``
    (its pipes, ``text``, ``start_new_session``...)."""
    return subprocess.Popen(vistrain_command(*args), cwd=cwd, env=vistrain_env(env), **popen)
