"""Data pipes: a data set plus the transforms that turn its samples into training inputs.

Where this sits::

    loader = DataLoader(DataPipe(dataset, transforms), collate_fn=collate_batch, ...)
    for batch in loader:              # each sample: dataset[i] -> transforms -> collate
        ...

:class:`MultiSampleDataPipe` adds a first stage whose transforms (mosaic, mixup) combine
the sample with others drawn at random from the same data set. The YOLOX mode switch turns
that stage off for the last epochs with :meth:`MultiSampleDataPipe.without_multi_sample` and
:func:`vistrain.data.loader.rebuild_dataloader`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset

from vistrain.common.typing import DictData
from vistrain.data.const import CommonKeys
from vistrain.data.transforms.base import MultiSampleTransform, Transform, check_prob
from vistrain.data.transforms.image import to_float_image


def _check_transforms(transforms: Sequence[Any], name: str, allow_multi: bool) -> list[Any]:
    allowed = (Transform, MultiSampleTransform) if allow_multi else (Transform,)
    for index, transform in enumerate(transforms):
        if not isinstance(transform, allowed):
            hint = (
                " Multi-sample transforms belong in MultiSampleDataPipe's multi_sample_transforms."
                if isinstance(transform, MultiSampleTransform)
                else ""
            )
            raise TypeError(
                f"{name}[{index}]={transform!r} is not a vistrain Transform"
                f"{' or MultiSampleTransform' if allow_multi else ''}.{hint}"
            )
    return list(transforms)


class DataPipe(Dataset[DictData]):
    """A map-style data set that applies per-sample transforms to another one.

    Args:
        dataset: Map-style data set returning sample dicts (``__getitem__`` and ``__len__``).
        transforms: Per-sample transforms applied in order.

    Raises:
        TypeError: If a transform is not a :class:`~vistrain.data.transforms.base.Transform`.
    """

    has_multi_sample = False
    """True when the pipe mixes several samples into one (never for a plain pipe)."""

    def __init__(self, dataset: Dataset[DictData], transforms: Sequence[Transform] = ()) -> None:
        self.dataset = dataset
        self.transforms: list[Transform] = _check_transforms(transforms, "transforms", False)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def apply_transforms(self, sample: DictData) -> DictData:
        """Run the per-sample transforms on ``sample``; its image leaves as float32.

        Transforms pass the image on as a uint8 tensor (see
        :mod:`vistrain.data.transforms.image`); it becomes the float network input here, once.
        """
        for transform in self.transforms:
            sample = transform(sample)
        if CommonKeys.images in sample:
            sample[CommonKeys.images] = to_float_image(sample[CommonKeys.images])
        return sample

    def __getitem__(self, index: int) -> DictData:
        return self.apply_transforms(self.dataset[index])


class MultiSampleDataPipe(DataPipe):
    """A data pipe whose first stage may combine each sample with random others.

    For each sample, with probability ``multi_sample_prob``, the transforms of
    ``multi_sample_transforms`` run in order: a
    :class:`~vistrain.data.transforms.base.MultiSampleTransform` gets the sample and a
    ``draw()`` function returning ``dataset[j]`` for a ``j`` drawn uniformly with Python's
    :mod:`random`; a plain :class:`~vistrain.data.transforms.base.Transform` in that stage (the
    affine that crops a mosaic back down) gets the sample alone. Then ``transforms`` run on
    every sample. This is YOLOX's "mosaic with probability p, else the plain image" rule.

    Args:
        dataset: Map-style data set returning sample dicts.
        multi_sample_transforms: The multi-sample stage (e.g. mosaic, affine, mixup).
        transforms: Per-sample transforms applied to every sample afterwards.
        multi_sample_prob: Chance that the multi-sample stage runs for a sample.

    Raises:
        TypeError: If an element of a transform list has the wrong kind.
        ValueError: If ``multi_sample_prob`` is outside [0, 1].
    """

    def __init__(
        self,
        dataset: Dataset[DictData],
        multi_sample_transforms: Sequence[Transform | MultiSampleTransform],
        transforms: Sequence[Transform] = (),
        multi_sample_prob: float = 1.0,
    ) -> None:
        super().__init__(dataset, transforms)
        self.multi_sample_transforms: list[Transform | MultiSampleTransform] = _check_transforms(
            multi_sample_transforms, "multi_sample_transforms", True
        )
        self.multi_sample_prob = check_prob(multi_sample_prob, "multi_sample_prob")

    @property
    def has_multi_sample(self) -> bool:  # type: ignore[override]
        """True when the multi-sample stage can run (non-empty and with non-zero chance)."""
        return bool(self.multi_sample_transforms) and self.multi_sample_prob > 0.0

    def without_multi_sample(self) -> MultiSampleDataPipe:
        """A new pipe over the same data set and per-sample transforms, minus the first stage.

        Used by the YOLOX mode switch: no mosaic, affine or mixup in the last epochs.
        """
        return MultiSampleDataPipe(self.dataset, [], self.transforms, self.multi_sample_prob)

    def draw(self) -> DictData:
        """A sample of the data set chosen uniformly at random, untransformed."""
        return self.dataset[random.randrange(len(self))]

    def __getitem__(self, index: int) -> DictData:
        sample = self.dataset[index]
        if self.has_multi_sample and random.random() < self.multi_sample_prob:
            for transform in self.multi_sample_transforms:
                if isinstance(transform, MultiSampleTransform):
                    sample = transform(sample, self.draw)
                else:
                    sample = transform(sample)
        return self.apply_transforms(sample)
