"""Evaluators: turn collected predictions into metrics (COCO detection, classification)."""

from vistrain.eval.base import Evaluator
from vistrain.eval.classification import ClassificationEvaluator
from vistrain.eval.coco import COCODetectEvaluator

__all__ = ["COCODetectEvaluator", "ClassificationEvaluator", "Evaluator"]
