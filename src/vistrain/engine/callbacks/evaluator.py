"""Callback that runs an ``Evaluator`` over every test epoch, across processes."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, cast

from torch import nn

from vistrain.common.distributed import all_gather_object, broadcast, get_rank, is_rank_zero
from vistrain.common.typing import DictData, MetricLogs
from vistrain.engine.callbacks.base import Callback
from vistrain.engine.callbacks.trainer_state import TrainerState
from vistrain.eval.base import Evaluator

logger = logging.getLogger("vistrain")


class EvaluatorCallback(Callback):
    """Callback for model evaluation.

    Where it sits in the loop (every rank runs the hooks; collectives are marked)::

        setup()                      -> evaluator.reset()
        on_test_batch_end(...)       -> evaluator.process_batch(**test_connector(outputs, batch))
                                        (+ evaluator.save_batch(...) with save_predictions)
        on_test_epoch_end(...)       -> evaluator.gather(all_gather_object)   # collective
                                        rank 0: self.evaluate(): process(), evaluate() each
                                                metric, log the report, save predictions
                                        broadcast the logs from rank 0        # collective
                                        evaluator.reset()
                                        return {"<metric>/<key>": value}      # on every rank

    Gathering uses torch.distributed object collectives, so no shared folder is needed.
    If evaluating fails on rank 0, every rank raises (none is left waiting).

    Args:
        evaluator: The evaluator to drive.
        metrics_to_eval: Metrics to evaluate. If None, all metrics in the evaluator will be
            evaluated. Defaults to None.
        save_predictions: If the predictions should be saved (rank 0, after each
            evaluation, under ``<save_prefix>/<metric>/``; file names carry the epoch and
            step so later evaluations never overwrite earlier ones). Defaults to False.
        save_prefix: Output directory for saving the evaluation results. Defaults to None.
        *args: Passed on to ``Callback`` (``epoch_based``, connectors).
        **kwargs: Passed on to ``Callback``; set ``test_connector`` to map outputs and
            batch to the evaluator's ``process_batch`` arguments.

    Raises:
        TypeError: If ``evaluator`` is not an ``Evaluator`` or ``metrics_to_eval`` is not a
            list of names.
        ValueError: If a metric name is not one of the evaluator's, or
            ``save_predictions`` is set without ``save_prefix`` (or with an evaluator that
            cannot save).
    """

    def __init__(
        self,
        *args: Any,
        evaluator: Evaluator,
        metrics_to_eval: Sequence[str] | None = None,
        save_predictions: bool = False,
        save_prefix: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(evaluator, Evaluator):
            raise TypeError(
                f"evaluator must be a vistrain.eval.base.Evaluator, got {type(evaluator).__name__}."
            )
        available = list(evaluator.metrics)
        if metrics_to_eval is None:
            metrics = available
        elif isinstance(metrics_to_eval, str) or not isinstance(metrics_to_eval, Sequence):
            raise TypeError(
                f"metrics_to_eval must be a list of metric names (e.g. {available}), got "
                f"{metrics_to_eval!r}."
            )
        else:
            metrics = list(metrics_to_eval)
            unknown = [m for m in metrics if m not in available]
            if unknown:
                raise ValueError(
                    f"metrics_to_eval has {unknown}, which {type(evaluator).__name__} does not "
                    f"compute; its metrics are {available}."
                )
        if save_predictions and not save_prefix:
            raise ValueError(
                "save_predictions=True needs save_prefix (the folder the predictions go "
                "under, as <save_prefix>/<metric>/)."
            )
        if save_predictions and not evaluator.supports_saving():
            raise ValueError(
                f"{type(evaluator).__name__} cannot save predictions; use save_predictions=False."
            )
        self.evaluator = evaluator
        self.metrics_to_eval = metrics
        self.save_predictions = save_predictions
        self.save_prefix = save_prefix

    def setup(self) -> None:
        """Setup callback: start from an empty evaluator."""
        self.evaluator.reset()

    def _metric_dir(self, metric: str) -> str:
        assert self.save_prefix is not None  # checked in __init__ when saving
        return os.path.join(self.save_prefix, metric)

    def on_test_batch_end(
        self,
        trainer_state: TrainerState,
        model: nn.Module,
        outputs: DictData,
        batch: DictData,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Hook to run at the end of a testing batch: hand the batch to the evaluator."""
        self.evaluator.process_batch(**self.get_test_callback_inputs(outputs, batch))
        if self.save_predictions:
            for metric in self.metrics_to_eval:
                self.evaluator.save_batch(metric, self._metric_dir(metric))

    def on_test_epoch_end(self, trainer_state: TrainerState, model: nn.Module) -> MetricLogs:
        """Hook to run at the end of a testing epoch (collective: every rank must call it).

        Returns:
            ``{"<metric>/<key>": value}`` on every rank.
        """
        self.evaluator.gather(all_gather_object)
        outcome: tuple[str, Any]
        if is_rank_zero():
            tag = _save_tag(trainer_state)
            try:
                outcome = ("ok", self.evaluate(tag=tag))
            except Exception as err:
                # Let the other ranks fail too instead of waiting in the broadcast forever.
                broadcast(("error", f"{type(err).__name__}: {err}"))
                self.evaluator.reset()
                raise
        else:
            outcome = ("ok", None)
        status, payload = broadcast(outcome)
        self.evaluator.reset()
        if status == "error":
            raise RuntimeError(
                f"Evaluation failed on rank 0 (this is rank {get_rank()}): {payload}"
            )
        return dict(cast(MetricLogs, payload))

    def evaluate(self, tag: str | None = None) -> MetricLogs:
        """Evaluate the performance after processing all input/output pairs (rank 0).

        Runs ``process`` once, then ``evaluate`` for each metric, logs each report through
        the ``"vistrain"`` logger and, with ``save_predictions``, saves the predictions.
        In several processes call it on rank 0 after ``evaluator.gather``;
        ``on_test_epoch_end`` does both.

        Args:
            tag: Label for saved file names (``on_test_epoch_end`` passes the epoch and step).

        Returns:
            A dictionary containing the evaluation results. The keys are formatted as
            {metric_name}/{key_name}, and the values are the corresponding evaluated values.
        """
        self.evaluator.process()
        logs: MetricLogs = {}
        for metric in self.metrics_to_eval:
            values, report = self.evaluator.evaluate(metric)
            logger.info("Evaluation %s:\n%s", metric, report)
            for key, value in values.items():
                logs[f"{metric}/{key}"] = value
            if self.save_predictions:
                path = self.evaluator.save(metric, self._metric_dir(metric), tag=tag)
                if path is not None:
                    logger.info("Saved %s predictions to %s", metric, path)
        return logs


def _save_tag(trainer_state: TrainerState) -> str | None:
    """``epoch=<E>-step=<S>`` from the trainer state, for saved file names."""
    epoch = trainer_state.get("current_epoch")
    step = trainer_state.get("global_step")
    if epoch is None or step is None:
        return None
    return f"epoch={epoch}-step={step}"
