"""Where logged scalars go: one small writer per destination, chosen by name.

``ScalarLogger`` hands every logged step to each writer it holds (rank 0 only)::

    name     writer              output
    jsonl    JsonlWriter         <run>/metrics.jsonl   {"tag","value","step","epoch","time"}
    tb       TensorBoardWriter   <run>/events.out.tfevents.*
    csv      CsvWriter           <run>/metrics.csv     tag,value,step,epoch,time
    wandb    WandbWriter         a Weights & Biases run (pip install vistrain[wandb])
    mlflow   MlflowWriter        an MLflow run (pip install vistrain[mlflow])

A resumed run (``purge_after_step`` set) drops file records past its step, and the tracker
writers continue the tracker run of the earlier segment: its id is kept in
``<run>/trackers.json``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from vistrain.engine.checkpoint_io import write_bytes_atomic
from vistrain.engine.event_file import ScalarEventWriter

WRITER_NAMES = ("jsonl", "tb", "csv", "wandb", "mlflow")
TRACKER_RECORD = "trackers.json"


class ScalarWriter(Protocol):
    """One destination of scalars (files are buffered; ``flush`` hands them to the OS)."""

    def write(self, scalars: Mapping[str, float], step: int, epoch: int, wall_time: float) -> None:
        """Write all ``scalars`` of one logged step."""

    def flush(self) -> None:
        """Hand buffered records over (called at most every ``flush_secs``)."""

    def close(self) -> None:
        """Flush and release the destination."""


def check_logger_names(names: Sequence[str] | str | None) -> list[str] | None:
    """The writer names as a list (a comma-separated string is split); None stays None.

    Raises:
        TypeError: If ``names`` is not a string or a sequence of strings.
        ValueError: Naming an unknown writer and the known ones.
    """
    if names is None:
        return None
    if isinstance(names, str):
        names = [part.strip() for part in names.split(",") if part.strip()]
    if not all(isinstance(name, str) for name in names):
        raise TypeError(f"loggers must be names of writers, got {names!r}.")
    unknown = [name for name in names if name not in WRITER_NAMES]
    if unknown:
        raise ValueError(
            f"Unknown logger(s) {unknown}; choose from {', '.join(WRITER_NAMES)} "
            "(e.g. loggers=tb,jsonl,csv)."
        )
    return list(dict.fromkeys(names))


def _json_number(value: float) -> str:
    """A float as ``json.dumps`` writes it (``NaN`` and ``Infinity`` included), without it."""
    return repr(value) if math.isfinite(value) else json.dumps(value)


def _keep_lines(path: str, keep: Any, header: int = 0) -> None:
    """Rewrite ``path`` atomically with its first ``header`` lines and the lines ``keep`` likes."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as handle:
        lines = handle.readlines()
    kept = lines[:header] + [line for line in lines[header:] if keep(line)]
    text = "".join(line if line.endswith("\n") else line + "\n" for line in kept)
    write_bytes_atomic(text.encode("utf-8"), path)


class JsonlWriter:
    """``metrics.jsonl``: one JSON line per scalar (the format documented in the README)."""

    def __init__(self, output_dir: str, purge_after_step: int | None) -> None:
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if purge_after_step is not None:
            _keep_lines(self.path, lambda line: _jsonl_step(line) <= purge_after_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._tag_json: dict[str, str] = {}

    def write(self, scalars: Mapping[str, float], step: int, epoch: int, wall_time: float) -> None:
        """Append one line per scalar."""
        time_text = _json_number(wall_time)
        tail = f', "step": {int(step)}, "epoch": {int(epoch)}, "time": {time_text}}}\n'
        self._file.write(
            "".join(
                f'{{"tag": {self._json_tag(tag)}, "value": {_json_number(number)}{tail}'
                for tag, number in scalars.items()
            )
        )

    def _json_tag(self, tag: str) -> str:
        """The tag as a JSON string, escaped once per tag rather than once per record."""
        text = self._tag_json.get(tag)
        if text is None:
            text = self._tag_json[tag] = json.dumps(tag)
        return text

    def flush(self) -> None:
        """Flush the file."""
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def _jsonl_step(line: str) -> float:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return math.inf  # a line torn by a crash is dropped


class CsvWriter:
    """``metrics.csv``: the jsonl records as rows ``tag,value,step,epoch,time`` (long format)."""

    HEADER = ("tag", "value", "step", "epoch", "time")

    def __init__(self, output_dir: str, purge_after_step: int | None) -> None:
        self.path = os.path.join(output_dir, "metrics.csv")
        if purge_after_step is not None:
            _keep_lines(self.path, lambda line: _csv_step(line) <= purge_after_step, header=1)
        new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        self._file = open(self.path, "a", encoding="utf-8", newline="")  # noqa: SIM115
        self._rows = csv.writer(self._file, lineterminator="\n")
        if new:
            self._rows.writerow(self.HEADER)

    def write(self, scalars: Mapping[str, float], step: int, epoch: int, wall_time: float) -> None:
        """Append one row per scalar."""
        self._rows.writerows(
            (tag, repr(value), int(step), int(epoch), repr(wall_time))
            for tag, value in scalars.items()
        )

    def flush(self) -> None:
        """Flush the file."""
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def _csv_step(line: str) -> float:
    try:
        return int(next(csv.reader(io.StringIO(line)))[2])
    except (IndexError, ValueError, StopIteration):
        return math.inf


class TensorBoardWriter:
    """TensorBoard event files (``vistrain.engine.event_file``)."""

    def __init__(self, output_dir: str, purge_after_step: int | None, flush_secs: float) -> None:
        purge = None if purge_after_step is None else purge_after_step + 1
        self._events = ScalarEventWriter(output_dir, purge_step=purge, flush_secs=flush_secs)

    def write(self, scalars: Mapping[str, float], step: int, epoch: int, wall_time: float) -> None:
        """One event holding all scalars of the step."""
        self._events.add_scalars(scalars, step, wall_time)

    def flush(self) -> None:
        """Flush the event file."""
        self._events.flush()

    def close(self) -> None:
        """Close the event file."""
        self._events.close()


def read_tracker_id(output_dir: str, name: str) -> str | None:
    """The run id of tracker ``name`` kept in ``<output_dir>/trackers.json``, if any."""
    try:
        with open(os.path.join(output_dir, TRACKER_RECORD), encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return None
    run_id = record.get(name) if isinstance(record, dict) else None
    return run_id if isinstance(run_id, str) else None


def write_tracker_id(output_dir: str, name: str, run_id: str) -> None:
    """Keep tracker ``name``'s run id so a resumed run continues that run."""
    path = os.path.join(output_dir, TRACKER_RECORD)
    record: dict[str, Any] = {}
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as handle:
                loaded = json.load(handle)
            record = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            record = {}
    record[name] = run_id
    write_bytes_atomic(json.dumps(record, indent=1).encode("utf-8"), path)


def _import_extra(module: str, extra: str) -> Any:
    try:
        return __import__(module)
    except ImportError as err:
        raise ImportError(
            f"loggers={extra} needs the {module} package: pip install vistrain[{extra}]."
        ) from err


class WandbWriter:
    """A Weights & Biases run (``WANDB_MODE=offline`` writes it under ``<run>/wandb``).

    The project comes from ``WANDB_PROJECT`` (default ``vistrain``); a resumed run continues
    the run whose id ``trackers.json`` holds (``resume="allow"``).
    """

    def __init__(self, output_dir: str, resumed: bool) -> None:
        wandb = _import_extra("wandb", "wandb")
        run_id = read_tracker_id(output_dir, "wandb") if resumed else None
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "vistrain"),
            dir=output_dir,
            id=run_id,
            resume="allow" if run_id else None,
            reinit="create_new",
        )
        self.run_id = str(self._run.id)
        self._wandb = wandb
        write_tracker_id(output_dir, "wandb", self.run_id)

    def write(self, scalars: Mapping[str, float], step: int, epoch: int, wall_time: float) -> None:
        """Log the step's scalars at ``step``."""
        self._run.log(dict(scalars), step=int(step))

    def flush(self) -> None:
        """W&B sends in the background; nothing to do."""

    def close(self) -> None:
        """Finish the run and wait until W&B's background service has written all of it.

        ``finish`` alone can return before an offline run's records reach its file (seen as a
        resumed run's file holding only its header); ``teardown`` waits for the service.
        """
        self._run.finish()
        self._wandb.teardown()


class MlflowWriter:
    """An MLflow run in ``MLFLOW_TRACKING_URI`` (default: a file store ``<run>/mlruns``).

    MLflow 3 refuses new file stores unless ``MLFLOW_ALLOW_FILE_STORE=true``; set that, or
    point ``MLFLOW_TRACKING_URI`` at a database or a tracking server.

    The experiment comes from ``MLFLOW_EXPERIMENT_NAME`` (default ``vistrain``); a resumed
    run continues the run whose id ``trackers.json`` holds. Metrics are sent in one batch
    per logged step.
    """

    def __init__(self, output_dir: str, resumed: bool) -> None:
        _import_extra("mlflow", "mlflow")
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        self._metric = Metric
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (
            "file:" + os.path.abspath(os.path.join(output_dir, "mlruns"))
        )
        self.client = MlflowClient(tracking_uri=uri)
        run_id = read_tracker_id(output_dir, "mlflow") if resumed else None
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "vistrain")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else self.client.create_experiment(name)
            )
            run_id = self.client.create_run(experiment_id).info.run_id
            write_tracker_id(output_dir, "mlflow", run_id)
        self.run_id = run_id

    def write(self, scalars: Mapping[str, float], step: int, epoch: int, wall_time: float) -> None:
        """Send the step's scalars as one batch."""
        stamp = int(wall_time * 1000)
        metrics = [self._metric(tag, value, stamp, int(step)) for tag, value in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def flush(self) -> None:
        """Every batch is sent at once; nothing to do."""

    def close(self) -> None:
        """Mark the run finished."""
        self.client.set_terminated(self.run_id)


def open_writers(
    names: Sequence[str],
    output_dir: str,
    purge_after_step: int | None,
    flush_secs: float,
) -> list[ScalarWriter]:
    """Open the writers named in ``names`` (rank 0 only; ``output_dir`` exists)."""
    resumed = purge_after_step is not None
    writers: list[ScalarWriter] = []
    for name in names:
        if name == "jsonl":
            writers.append(JsonlWriter(output_dir, purge_after_step))
        elif name == "tb":
            writers.append(TensorBoardWriter(output_dir, purge_after_step, flush_secs))
        elif name == "csv":
            writers.append(CsvWriter(output_dir, purge_after_step))
        elif name == "wandb":
            writers.append(WandbWriter(output_dir, resumed))
        elif name == "mlflow":
            writers.append(MlflowWriter(output_dir, resumed))
    return writers
