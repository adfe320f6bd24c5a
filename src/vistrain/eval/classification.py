"""Image classification accuracy (top-1 and top-5) for small experiments."""

from __future__ import annotations

import torch
from torch import Tensor

from vistrain.eval.base import Evaluator, GatherFunc, MetricResult

CLS_METRIC = "Cls"


class ClassificationEvaluator(Evaluator):
    """Top-1 and top-5 accuracy (metric ``"Cls"``, keys ``top1`` and ``top5``).

    In a test epoch (see ``vistrain.eval.base`` for the whole loop)::

        evaluator.process_batch(logits, labels)    # every batch, every rank
        evaluator.gather(all_gather_object)        # every rank
        logs, report = evaluator.evaluate("Cls")   # rank 0: {"top1": 0.71, "top5": 0.93}

    Counts stay on the logits' device as tensors, so ``process_batch`` never waits for the
    device; they are read once, in ``gather``. With five classes or fewer, every label is
    within the top five and ``top5`` is 1.0; the report names the k it computed, ``top-5``,
    like the key. Samples are not de-duplicated: a sample a
    ``DistributedSampler`` repeats to pad the last batch counts twice (at most
    ``world_size - 1`` extra samples).

    Args:
        num_classes: Number of classes (the width of the logits).

    Raises:
        ValueError: If ``num_classes`` is not a positive integer.
    """

    def __init__(self, num_classes: int) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
        self.num_classes = num_classes
        self._topk = min(5, num_classes)
        self._counts: Tensor | None = None  # [top-1 hits, top-5 hits, invalid labels]
        self._num_samples = 0

    @property
    def metrics(self) -> list[str]:
        """The single metric ``"Cls"``."""
        return [CLS_METRIC]

    def reset(self) -> None:
        """Zero the counts."""
        self._counts = None
        self._num_samples = 0

    def process_batch(self, logits: Tensor, labels: Tensor) -> None:  # type: ignore[override]
        """Count the hits of one batch (no device sync).

        Args:
            logits: (B, num_classes) class scores (logits or probabilities).
            labels: (B,) integer class labels in ``[0, num_classes)``.

        Raises:
            TypeError: If an argument is not a tensor.
            ValueError: If the shapes do not match ``(B, num_classes)`` and ``(B,)``.
        """
        if not isinstance(logits, Tensor) or not isinstance(labels, Tensor):
            raise TypeError(
                f"logits and labels must be tensors, got {type(logits).__name__} and "
                f"{type(labels).__name__}."
            )
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits must have shape (B, {self.num_classes}), got {tuple(logits.shape)}."
            )
        if labels.shape != (logits.shape[0],):
            raise ValueError(
                f"labels must have shape ({logits.shape[0]},) to match the logits, got "
                f"{tuple(labels.shape)}."
            )
        labels = labels.to(logits.device)
        top = logits.detach().topk(self._topk, dim=1).indices
        hits = top == labels[:, None]
        invalid = (labels < 0) | (labels >= self.num_classes)
        counts = torch.stack((hits[:, 0].sum(), hits.any(dim=1).sum(), invalid.sum()))
        self._counts = counts if self._counts is None else self._counts + counts
        self._num_samples += int(logits.shape[0])

    def _host_counts(self) -> list[int]:
        """``[top-1 hits, top-k hits, invalid labels, samples]`` as Python ints."""
        counts = [0, 0, 0] if self._counts is None else [int(c) for c in self._counts.tolist()]
        return [*counts, self._num_samples]

    def gather(self, gather_func: GatherFunc) -> None:
        """Collective: sum the counts of every rank."""
        parts = gather_func(self._host_counts())
        if parts is None:
            return
        total = [sum(values) for values in zip(*parts)]
        self._counts = torch.tensor(total[:3])
        self._num_samples = total[3]

    def evaluate(self, metric: str) -> MetricResult:
        """Top-1 and top-5 accuracy over every sample processed (0.0 with no samples).

        Raises:
            ValueError: If ``metric`` is not ``"Cls"``, or a label was outside
                ``[0, num_classes)``.
        """
        if metric != CLS_METRIC:
            raise ValueError(
                f"Unknown metric {metric!r}; ClassificationEvaluator has {self.metrics}."
            )
        top1, top5, invalid, num = self._host_counts()
        if invalid:
            raise ValueError(
                f"{invalid} labels were outside [0, {self.num_classes}); labels must be class "
                "indices matching the logits' columns."
            )
        logs = {"top1": top1 / num if num else 0.0, "top5": top5 / num if num else 0.0}
        report = (
            f"Classification accuracy over {num} samples: top-1 {logs['top1']:.4f}, "
            f"top-5 {logs['top5']:.4f}"
        )
        if self.num_classes <= 5:
            report += f" (all {self.num_classes} classes are within the top 5)"
        return logs, report
