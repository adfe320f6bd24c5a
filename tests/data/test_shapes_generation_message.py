from __future__ import annotations

import logging
from pathlib import Path

from vistrain.data.datasets import ensure_shapes_dataset


class _Collect(logging.Handler):
    """Keeps the messages that reach the ``vistrain`` logger (whatever else is configured)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_generating_a_split_says_what_where_and_how_many(tmp_path: Path) -> None:
    logger = logging.getLogger("vistrain")
    collect = _Collect()
    level = logger.level
    logger.addHandler(collect)
    logger.setLevel(logging.INFO)
    try:
        ensure_shapes_dataset(tmp_path, "val", 3, image_size=32, seed=0)
        generated, collect.messages = collect.messages, []
        ensure_shapes_dataset(tmp_path, "val", 3, image_size=32, seed=0)  # reused: quiet
        reused = collect.messages
    finally:
        logger.removeHandler(collect)
        logger.setLevel(level)
    assert generated == [
        f"Generating the shapes data set's 'val' split: 3 images of 32x32 pixels into "
        f"{tmp_path / 'val'} (once; later runs reuse it)."
    ]
    assert reused == []
