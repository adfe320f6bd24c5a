from __future__ import annotations

import json
import math
import os

from vistrain.engine.scalar_log import ScalarLogger


def test_scalar_logger_buffers_until_the_flush_interval(tmp_path) -> None:
    logger = ScalarLogger(str(tmp_path), flush_secs=3600.0)
    logger.log({"a": 1.0}, step=1, epoch=0)  # the first call flushes (nothing written yet)
    logger.log({"a": 2.0}, step=2, epoch=0)
    path = os.path.join(tmp_path, "metrics.jsonl")
    with open(path, encoding="utf-8") as handle:
        assert len(handle.readlines()) == 1, "the second record waits in the buffer"
    logger.flush()
    with open(path, encoding="utf-8") as handle:
        assert len(handle.readlines()) == 2
    logger.log({"a": 3.0}, step=3, epoch=0)
    logger.close()
    with open(path, encoding="utf-8") as handle:
        assert len(handle.readlines()) == 3, "close writes what was buffered"


def test_jsonl_records_escape_tags_and_keep_non_finite_values(tmp_path) -> None:
    logger = ScalarLogger(str(tmp_path), tensorboard=False)
    logger.log({'odd "tag"\\x': 1.5, "nan": float("nan"), "inf": float("-inf"), "int": 3}, 7, 2)
    logger.close()
    with open(os.path.join(tmp_path, "metrics.jsonl"), encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    assert [r["tag"] for r in records] == ['odd "tag"\\x', "nan", "inf", "int"]
    assert records[0]["value"] == 1.5 and records[3]["value"] == 3.0
    assert math.isnan(records[1]["value"]) and records[2]["value"] == -math.inf
    assert all(r["step"] == 7 and r["epoch"] == 2 and r["time"] > 0 for r in records)


def test_resumed_logger_tells_one_history_in_both_files(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = ScalarLogger(str(tmp_path))
    for step in range(1, 11):
        first.log({"train/loss": float(step)}, step=step, epoch=0)
    first.close()
    resumed = ScalarLogger(str(tmp_path), purge_after_step=5)  # the checkpoint was at step 5
    for step in range(6, 9):
        resumed.log({"train/loss": 100.0 + step}, step=step, epoch=0)
    resumed.close()
    with open(os.path.join(tmp_path, "metrics.jsonl"), encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    assert [(r["step"], r["value"]) for r in records] == [(s, float(s)) for s in range(1, 6)] + [
        (s, 100.0 + s) for s in range(6, 9)
    ]
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    events = acc.Scalars("train/loss")
    assert [(e.step, e.value) for e in events] == [(s, float(s)) for s in range(1, 6)] + [
        (s, 100.0 + s) for s in range(6, 9)
    ]
