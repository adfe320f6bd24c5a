"""Visualizers: turn predictions into pictures people can look at."""

from vistrain.vis.base import Visualizer
from vistrain.vis.image import BoundingBoxVisualizer

__all__ = ["BoundingBoxVisualizer", "Visualizer"]
