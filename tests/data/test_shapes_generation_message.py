from __future__ import annotations

import logging
from pathlib import Path

import pytest

from vistrain.data.datasets import ensure_shapes_dataset


def test_generating_a_split_says_what_where_and_how_many(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger("vistrain")
    propagate, logger.propagate = logger.propagate, True  # setup_logger may have turned it off
    try:
        with caplog.at_level(logging.INFO, logger="vistrain"):
            ensure_shapes_dataset(tmp_path, "val", 3, image_size=32, seed=0)
            generated = [r.getMessage() for r in caplog.records]
            caplog.clear()
            ensure_shapes_dataset(tmp_path, "val", 3, image_size=32, seed=0)  # reused: quiet
            reused = [r.getMessage() for r in caplog.records]
    finally:
        logger.propagate = propagate
    assert generated == [
        f"Generating the shapes data set's 'val' split: 3 images of 32x32 pixels into "
        f"{tmp_path / 'val'} (once; later runs reuse it)."
    ]
    assert reused == []
