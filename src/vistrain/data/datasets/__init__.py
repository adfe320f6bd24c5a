"""Data sets: a COCO-format loader and the generated shapes data set."""

from vistrain.data.datasets.coco import COCODataset
from vistrain.data.datasets.shapes import (
    ShapesPaths,
    ensure_shapes_dataset,
    generate_shapes_dataset,
    write_shapes_coco,
)
from vistrain.data.datasets.shapes_render import SHAPE_NAMES

__all__ = [
    "SHAPE_NAMES",
    "COCODataset",
    "ShapesPaths",
    "ensure_shapes_dataset",
    "generate_shapes_dataset",
    "write_shapes_coco",
]
