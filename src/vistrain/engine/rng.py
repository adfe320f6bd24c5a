"""Capture and restore the random number generators a training run draws from.

The global generators (Python, NumPy, torch, CUDA) and the training loader's own generator
(it draws the sampler's permutation and the worker seeds) are captured at every epoch start
and at every checkpoint, so ``start_epoch_iterator`` can replay an epoch's draws on a
mid-epoch resume and the continuation is bit-identical to a straight run.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's global generators (CUDA too if present)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore generators captured by ``capture_rng_state``."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Run a block without changing the global generators' states afterwards.

    Validation runs inside it, so whether and how often a run validates never changes the
    randomness of its training: a resumed run that skips a validation stays bit-identical.
    """
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


def _loader_generator(loader: Any) -> torch.Generator | None:
    generator = getattr(loader, "generator", None)
    return generator if isinstance(generator, torch.Generator) else None


def capture_loop_rng(loader: Any) -> dict[str, Any]:
    """Global generators plus the training loader's own generator (it draws worker seeds)."""
    state = capture_rng_state()
    generator = _loader_generator(loader)
    if generator is not None:
        state["loader_generator"] = generator.get_state()
    return state


def restore_loop_rng(state: dict[str, Any], loader: Any) -> None:
    """Restore what ``capture_loop_rng`` captured."""
    restore_rng_state(state)
    generator = _loader_generator(loader)
    if generator is not None and "loader_generator" in state:
        generator.set_state(state["loader_generator"])


def start_epoch_iterator(
    loader: Any,
    epoch: int,
    skip_batches: int = 0,
    resume_rng: tuple[dict[str, Any], dict[str, Any]] | None = None,
) -> tuple[Iterator[Any], dict[str, Any]]:
    """Start ``loader``'s iterator for ``epoch``; return it and the epoch-start RNG states.

    On a mid-epoch resume, ``resume_rng`` is (RNG at the epoch's start, RNG at the
    checkpoint): the epoch's draws (sampler permutation, worker seeds) are replayed, the
    ``skip_batches`` batches already trained are loaded and dropped (so per-worker random
    streams stay aligned), and the checkpoint's RNG states are restored.
    """
    sampler: Any = getattr(loader, "sampler", None)
    if sampler is not None and hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    if resume_rng is not None:
        restore_loop_rng(resume_rng[0], loader)
    epoch_start_rng = capture_loop_rng(loader)
    iterator = iter(loader)
    for _ in range(skip_batches):
        next(iterator)
    if resume_rng is not None:
        restore_loop_rng(resume_rng[1], loader)
    return iterator, epoch_start_rng
