from __future__ import annotations

import pytest
import torch

from vistrain.eval.classification import ClassificationEvaluator


def _logits(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_top1_and_top5_accuracy() -> None:
    evaluator = ClassificationEvaluator(num_classes=6)
    assert evaluator.metrics == ["Cls"]
    # Ranks of the true class: 1st, 2nd, 6th (last), 5th.
    logits = _logits(
        [
            [9, 1, 2, 3, 4, 5],
            [1, 2, 9, 3, 4, 5],
            [9, 8, 7, 6, 5, 1],
            [9, 8, 7, 6, 1, 5],
        ]
    )
    evaluator.process_batch(logits[:2], torch.tensor([0, 5]))
    evaluator.process_batch(logits[2:], torch.tensor([5, 5]))
    logs, report = evaluator.evaluate("Cls")
    assert logs == {"top1": 0.25, "top5": 0.75}
    assert "4 samples" in report
    evaluator.reset()
    assert evaluator.evaluate("Cls")[0] == {"top1": 0.0, "top5": 0.0}


def test_fewer_than_five_classes() -> None:
    evaluator = ClassificationEvaluator(num_classes=3)
    evaluator.process_batch(_logits([[0, 1, 2], [2, 1, 0]]), torch.tensor([0, 0]))
    assert evaluator.evaluate("Cls")[0] == {"top1": 0.5, "top5": 1.0}


def test_gather_sums_ranks() -> None:
    rank0, rank1 = ClassificationEvaluator(2), ClassificationEvaluator(2)
    rank0.process_batch(_logits([[1, 0], [1, 0], [1, 0]]), torch.tensor([0, 0, 1]))
    rank1.process_batch(_logits([[0, 1]]), torch.tensor([0]))
    parts = [[2, 3, 0, 3], [0, 1, 0, 1]]  # what each rank sends: hits, top-k hits, bad, n
    rank0.gather(lambda obj: [obj, parts[1]])
    assert rank0.evaluate("Cls")[0] == {"top1": 0.5, "top5": 1.0}


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        ClassificationEvaluator(0)
    evaluator = ClassificationEvaluator(4)
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        evaluator.process_batch(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        evaluator.process_batch(torch.zeros(2, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="tensors"):
        evaluator.process_batch([[0.0] * 4], torch.zeros(1, dtype=torch.long))  # type: ignore[arg-type]
    evaluator.process_batch(torch.zeros(2, 4), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"1 labels were outside \[0, 4\)"):
        evaluator.evaluate("Cls")
    with pytest.raises(ValueError, match="Unknown metric"):
        evaluator.evaluate("Det")


@pytest.mark.parametrize("num_classes", [4, 5, 7])
def test_report_names_the_k_of_its_key(num_classes: int) -> None:
    evaluator = ClassificationEvaluator(num_classes)
    logits = torch.arange(num_classes, dtype=torch.float32).repeat(2, 1)  # ranks classes high->low
    labels = torch.tensor([num_classes - 1, 0])  # top-1 hit; last-ranked class
    evaluator.process_batch(logits, labels)
    logs, report = evaluator.evaluate("Cls")
    top5 = 1.0 if num_classes <= 5 else 0.5
    assert logs == {"top1": 0.5, "top5": top5}
    assert f"top-1 0.5000, top-5 {top5:.4f}" in report
    assert ("within the top 5" in report) == (num_classes <= 5)
    assert "top-4" not in report
