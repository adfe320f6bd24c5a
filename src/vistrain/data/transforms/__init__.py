"""Transforms that move boxes with the pixels, for detection training and testing.

Per-sample transforms (:class:`Transform`) take one sample dict; multi-sample ones
(:class:`MultiSampleTransform`: mosaic, mixup) also draw other samples from the data set
through :class:`~vistrain.data.pipe.MultiSampleDataPipe`. All randomness comes from Python's
global :mod:`random` module (see :mod:`vistrain.data.transforms.base`). Pixels are processed
as uint8 arrays with OpenCV and become float only when the sample leaves the pipe (see
:mod:`vistrain.data.transforms.image`); boxes are processed as NumPy views of their tensors.
"""

from vistrain.data.transforms.affine import RandomAffine
from vistrain.data.transforms.base import PAD_VALUE, MultiSampleTransform, Transform
from vistrain.data.transforms.flip import RandomHorizontalFlip
from vistrain.data.transforms.mixup import MixUp
from vistrain.data.transforms.mosaic import Mosaic
from vistrain.data.transforms.pad import Pad
from vistrain.data.transforms.photometric import RandomHSV
from vistrain.data.transforms.resize import ResizeKeepRatio

__all__ = [
    "PAD_VALUE",
    "MixUp",
    "Mosaic",
    "MultiSampleTransform",
    "Pad",
    "RandomAffine",
    "RandomHSV",
    "RandomHorizontalFlip",
    "ResizeKeepRatio",
    "Transform",
]
