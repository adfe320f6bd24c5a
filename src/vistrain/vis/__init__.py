"""Visualizers: turn predictions into pictures people can look at."""

from vistrain.vis.base import Visualizer
from vistrain.vis.detection import DetectionVisualizer
from vistrain.vis.image import BoundingBoxVisualizer

__all__ = ["BoundingBoxVisualizer", "DetectionVisualizer", "Visualizer"]
