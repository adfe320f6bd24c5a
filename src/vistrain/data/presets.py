"""Ready-made YOLOX training and test pipelines (used by the default experiment)."""

from __future__ import annotations

from torch.utils.data import Dataset

from vistrain.common.typing import DictData
from vistrain.data.pipe import DataPipe, MultiSampleDataPipe
from vistrain.data.transforms import (
    MixUp,
    Mosaic,
    MultiSampleTransform,
    Pad,
    RandomAffine,
    RandomHorizontalFlip,
    RandomHSV,
    ResizeKeepRatio,
    Transform,
)
from vistrain.data.transforms.base import to_hw


def yolox_train_pipe(
    dataset: Dataset[DictData],
    image_size: int | tuple[int, int],
    mosaic_prob: float = 1.0,
    mosaic_scale: tuple[float, float] = (0.1, 2.0),
    degrees: float = 10.0,
    translate: float = 0.1,
    shear: float = 2.0,
    mixup_prob: float = 1.0,
    mixup_scale: tuple[float, float] = (0.5, 1.5),
    hsv_prob: float = 1.0,
    flip_prob: float = 0.5,
) -> MultiSampleDataPipe:
    """YOLOX's training augmentation.

    With probability ``mosaic_prob``: mosaic of four samples, random affine cropping the
    mosaic back to ``image_size`` (rotation ``degrees``, zoom ``mosaic_scale``, ``shear``,
    ``translate``), then mixup with probability ``mixup_prob`` (``mixup_prob=0`` disables
    it). Then for every sample: HSV jitter, horizontal flip, resize keeping the aspect ratio
    to fit ``image_size`` and pad to ``image_size``. The defaults are the YOLOX paper's;
    its nano and tiny models use ``mosaic_scale=(0.5, 1.5)`` and no mixup.
    ``pipe.without_multi_sample()`` gives the pipe of YOLOX's last epochs.
    """
    size = to_hw(image_size)
    stage: list[Transform | MultiSampleTransform] = [
        Mosaic(size),
        RandomAffine(
            degrees=degrees,
            translate=translate,
            scale=mosaic_scale,
            shear=shear,
            output_size=size,
        ),
    ]
    if mixup_prob > 0:
        stage.append(MixUp(scale=mixup_scale, prob=mixup_prob))
    transforms: list[Transform] = [
        RandomHSV(prob=hsv_prob),
        RandomHorizontalFlip(prob=flip_prob),
        ResizeKeepRatio(size),
        Pad(size),
    ]
    return MultiSampleDataPipe(dataset, stage, transforms, multi_sample_prob=mosaic_prob)


def yolox_test_pipe(dataset: Dataset[DictData], image_size: int | tuple[int, int]) -> DataPipe:
    """YOLOX's test preprocessing: resize keeping the aspect ratio, pad to ``image_size``.

    Predictions in input pixels map back to the original image by dividing by
    ``input_hw / original_hw`` per axis.
    """
    size = to_hw(image_size)
    return DataPipe(dataset, [ResizeKeepRatio(size), Pad(size)])
