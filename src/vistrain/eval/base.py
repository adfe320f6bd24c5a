"""Evaluator: the interface every evaluation metric implements.

An evaluator collects predictions batch by batch, merges what every process collected
and turns the whole into scalar metrics plus a printable report. ``EvaluatorCallback``
(``vistrain.engine.callbacks.evaluator``) drives it through a test epoch::

    evaluator.reset()                                  # callback.setup(), every rank
    for batch in test_loader:                          # every rank, its shard of the data
        outputs = model(**test_connector(batch))
        evaluator.process_batch(**callback_connector(outputs, batch))
        evaluator.save_batch(metric, out_dir)          # only with save_predictions
    evaluator.gather(all_gather_object)                # collective: every rank calls it
    if rank == 0:
        evaluator.process()                            # once, after the gather
        for metric in metrics_to_eval:
            logs, text = evaluator.evaluate(metric)    # {"AP": 0.41, ...}, readable report
            evaluator.save(metric, out_dir)            # only with save_predictions
    evaluator.reset()                                  # every rank, ready for the next epoch

``process_batch`` runs once per test batch, so it must stay cheap: no per-element device
syncs and no file system calls. Everything expensive belongs in ``process``/``evaluate``,
which run once per evaluation on rank 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

GatherFunc = Callable[[Any], "list[Any] | None"]
"""An ``all_gather_object``-like function: takes this rank's object, returns every rank's
objects ordered by rank (or ``None`` on ranks that do not receive them)."""

MetricResult = tuple[dict[str, float], str]
"""What ``Evaluator.evaluate`` returns: scalar metrics and a printable report."""


class Evaluator:
    """Base class of evaluators; see the module docstring for where each method runs.

    Subclasses implement ``metrics``, ``reset``, ``process_batch``, ``gather`` (for
    multi-process use) and ``evaluate``; ``process``, ``save_batch`` and ``save`` are
    optional.
    """

    @property
    def metrics(self) -> list[str]:
        """Names of the metrics ``evaluate`` accepts (e.g. ``["Det"]``)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget every collected prediction (start of a new evaluation)."""
        raise NotImplementedError

    def process_batch(self, *args: Any, **kwargs: Any) -> None:
        """Collect the predictions (and targets) of one test batch on this rank."""
        raise NotImplementedError

    def gather(self, gather_func: GatherFunc) -> None:
        """Collective: merge the predictions collected by every rank.

        Called on every rank after the last batch. ``gather_func`` behaves like
        ``vistrain.common.distributed.all_gather_object``. After the call, rank 0 (at
        least) must hold everything ``evaluate`` needs.

        The default suits evaluators used in a single process only: it still takes part
        in the collective (so no rank hangs) and raises when there is more than one rank.

        Raises:
            NotImplementedError: With more than one rank, since the subclass does not
                say how to merge its state.
        """
        gathered = gather_func(None)
        if gathered is not None and len(gathered) > 1:
            raise NotImplementedError(
                f"{type(self).__name__} does not implement gather(), so it cannot merge the "
                f"predictions of {len(gathered)} processes; implement gather() or evaluate "
                "in a single process."
            )

    def process(self) -> None:
        """Post-process the gathered predictions once, before the first ``evaluate``."""

    def evaluate(self, metric: str) -> MetricResult:
        """Compute ``metric`` over everything collected.

        Args:
            metric: One of ``self.metrics``.

        Returns:
            The scalar results keyed by short name (``{"AP": 0.41, ...}``) and a readable
            report to print.
        """
        raise NotImplementedError

    def save_batch(self, metric: str, output_dir: str) -> None:
        """Write the predictions of the batch just processed (optional, every rank).

        Evaluators that keep all predictions in memory write them in ``save`` instead and
        leave this a no-op. An override runs on every rank and must write rank-unique
        file names.
        """

    def save(self, metric: str, output_dir: str, tag: str | None = None) -> str | None:
        """Write the gathered predictions of ``metric`` under ``output_dir`` (rank 0).

        Args:
            metric: One of ``self.metrics``.
            output_dir: Folder to write into (created if missing).
            tag: Optional label put into the file name (e.g. ``"epoch=3-step=1200"``) so
                later evaluations never overwrite earlier ones.

        Returns:
            The path written, or ``None`` if nothing was written.

        Raises:
            NotImplementedError: If the evaluator cannot save predictions.
        """
        raise NotImplementedError(
            f"{type(self).__name__} cannot save predictions; use save_predictions=False."
        )

    def supports_saving(self) -> bool:
        """Whether ``save`` is implemented (checked by the callback at construction)."""
        return type(self).save is not Evaluator.save
