from __future__ import annotations

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vistrain.engine.event_file import ScalarEventWriter


def test_scalars_read_back_with_tensorboards_reader(tmp_path) -> None:
    writer = ScalarEventWriter(str(tmp_path))
    for step in range(1, 6):
        writer.add_scalars({"train/loss": 1.0 / step, "lr": 0.1}, step, wall_time=100.0 + step)
    writer.close()
    writer.close()  # idempotent
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["lr", "train/loss"]
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5]
    assert [e.wall_time for e in loss] == [101.0, 102.0, 103.0, 104.0, 105.0]
    assert [round(e.value, 6) for e in loss] == [round(1.0 / s, 6) for s in range(1, 6)]


def test_resumed_history_hides_the_old_steps_after_the_purge_step(tmp_path) -> None:
    first = ScalarEventWriter(str(tmp_path))
    for step in range(1, 11):
        first.add_scalars({"x": float(step)}, step, wall_time=float(step))
    first.close()
    second = ScalarEventWriter(str(tmp_path), purge_step=6)  # resumed from step 5
    for step in range(6, 9):
        second.add_scalars({"x": 100.0 + step}, step, wall_time=50.0 + step)
    second.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    events = acc.Scalars("x")
    assert [e.step for e in events] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [e.value for e in events][5:] == [106.0, 107.0, 108.0]


def test_events_wait_in_the_buffer_until_the_flush_interval(tmp_path) -> None:
    import os

    writer = ScalarEventWriter(str(tmp_path), flush_secs=3600.0)
    header_size = os.path.getsize(writer.path)
    assert header_size > 0, "the file-version record is on disk at once"
    writer.add_scalars({"a": 1.0}, 1, wall_time=1.0)
    assert os.path.getsize(writer.path) == header_size
    writer.flush()
    assert os.path.getsize(writer.path) > header_size
    writer.close()
