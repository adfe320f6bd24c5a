"""Data sets, transforms, pipelines and loaders.

The usual chain: a data set (:class:`~vistrain.data.datasets.COCODataset`, e.g. over the
generated shapes of :func:`~vistrain.data.datasets.ensure_shapes_dataset`) wrapped in a
pipe (:func:`~vistrain.data.presets.yolox_train_pipe`) and batched by
:func:`~vistrain.data.loader.build_train_dataloader`.
"""

from vistrain.data.datasets import COCODataset, ensure_shapes_dataset, generate_shapes_dataset
from vistrain.data.loader import (
    build_test_dataloader,
    build_train_dataloader,
    collate_batch,
    rebuild_dataloader,
)
from vistrain.data.pipe import DataPipe, MultiSampleDataPipe
from vistrain.data.presets import yolox_test_pipe, yolox_train_pipe

__all__ = [
    "COCODataset",
    "DataPipe",
    "MultiSampleDataPipe",
    "build_test_dataloader",
    "build_train_dataloader",
    "collate_batch",
    "ensure_shapes_dataset",
    "generate_shapes_dataset",
    "rebuild_dataloader",
    "yolox_test_pipe",
    "yolox_train_pipe",
]
