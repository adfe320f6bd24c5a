"""The two kinds of transform a data pipe runs, and small helpers they share.

A *sample* is one dict with :class:`~vistrain.data.const.CommonKeys` keys: ``images`` is a
``(3, H, W)`` RGB tensor in 0..255 (uint8 inside a pipe, float32 when it leaves; see
:mod:`vistrain.data.transforms.image`), ``input_hw`` the ``(h, w)`` of the content before
padding, ``boxes2d`` an ``(N, 4)`` float32 xyxy tensor in current image pixels and
``boxes2d_classes`` the ``(N,)`` long class indices. Pixel coordinates are continuous: pixel
``(i, j)`` covers ``[j, j + 1) x [i, i + 1)``, so a box of a whole ``W``-wide image is
``[0, 0, W, H]``.

Randomness: every random transform draws from Python's global :mod:`random` module, so a
run is reproduced by seeding it (the loader's ``worker_init_fn`` does so in each worker from
``torch.initial_seed()``; with ``num_workers=0`` the main process's state is used, which a
checkpoint saves and restores).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from vistrain.common.typing import DictData

PAD_VALUE = 114.0
"""Grey used for empty canvas and padding (YOLOX's convention)."""


class Transform(ABC):
    """A per-sample transform: takes one sample dict and returns it transformed.

    Implementations may modify the dict they receive and return it; the pipe never reuses
    a sample after handing it to a transform. They should write a new image rather than
    into the one they get (which may share memory with ``original_images``), as every
    built-in transform does.
    """

    @abstractmethod
    def __call__(self, sample: DictData) -> DictData:
        """Return ``sample`` transformed."""


class MultiSampleTransform(ABC):
    """A transform that combines the current sample with others drawn from the data set.

    :class:`~vistrain.data.pipe.MultiSampleDataPipe` calls it with the current sample and a
    ``draw`` function; each call of ``draw()`` returns another untransformed sample, chosen
    uniformly at random from the same data set. Mosaic draws three, mixup one.
    """

    @abstractmethod
    def __call__(self, sample: DictData, draw: Callable[[], DictData]) -> DictData:
        """Return the combined sample."""


def to_hw(size: int | tuple[int, int] | list[int], name: str = "image_size") -> tuple[int, int]:
    """Normalise an ``int`` or ``(h, w)`` size to a pair of positive ints.

    Raises:
        ValueError: If the size is not one or two positive integers.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        pair = (size, size)
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        pair = (int(size[0]), int(size[1]))
    else:
        raise ValueError(f"{name}={size!r} must be an int or an (h, w) pair of ints.")
    if pair[0] <= 0 or pair[1] <= 0:
        raise ValueError(f"{name}={size!r} must be positive.")
    return pair


def check_prob(prob: float, name: str) -> float:
    """Validate a probability in [0, 1].

    Raises:
        ValueError: If ``prob`` lies outside [0, 1].
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"{name}={prob!r} must be a probability in [0, 1].")
    return float(prob)


def check_range(values: tuple[float, float], name: str, low: float = 0.0) -> tuple[float, float]:
    """Validate a ``(min, max)`` range with ``low < min <= max``.

    Raises:
        ValueError: If the range is malformed.
    """
    if len(values) != 2 or not low < values[0] <= values[1]:
        raise ValueError(f"{name}={values!r} must be a (min, max) pair with {low} < min <= max.")
    return float(values[0]), float(values[1])
