"""The uint8 array <-> tensor views the transforms pass on, and the pipe's one float conversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_test_utils import ListDataset, make_sample

from vistrain.data.const import CommonKeys
from vistrain.data.pipe import DataPipe
from vistrain.data.transforms import RandomHorizontalFlip
from vistrain.data.transforms.image import as_array, as_tensor, to_float_image

K = CommonKeys


def test_array_and_tensor_views_share_memory_and_round_floats() -> None:
    array = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    view = as_tensor(array)
    assert view.shape == (3, 5, 7) and view.dtype == torch.uint8
    assert int(view[2, 4, 6]) == int(array[4, 6, 2])
    assert np.shares_memory(as_array(view), array)  # no copy either way
    floats = torch.tensor([[[-3.0, 0.4, 0.6, 254.6, 300.0]]]).expand(3, 1, 5)
    assert as_array(floats)[0, :, 0].tolist() == [0, 0, 1, 255, 255]
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        as_array(torch.zeros(4, 4))


def test_float_image_is_a_contiguous_float_copy_of_the_bytes() -> None:
    array = np.random.default_rng(1).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    out = to_float_image(as_tensor(array))
    assert out.dtype == torch.float32 and out.is_contiguous() and out.shape == (3, 6, 9)
    assert torch.equal(out, torch.from_numpy(array).permute(2, 0, 1).float())
    assert not np.shares_memory(out.numpy(), array)


def test_a_pipe_hands_out_float_images_whatever_its_transforms_pass_on() -> None:
    dataset = ListDataset([make_sample((10, 12), [(1, 2, 5, 6)], [0])])
    flipped = DataPipe(dataset, [RandomHorizontalFlip(1.0)])[0][K.images]
    plain = DataPipe(dataset, [])[0][K.images]
    for image in (flipped, plain):
        assert image.dtype == torch.float32 and image.is_contiguous()
    assert torch.equal(flipped, plain.flip(-1))


def test_collate_turns_uint8_images_into_the_float_batch() -> None:
    from vistrain.data.loader import collate_batch

    array = np.random.default_rng(2).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    sample = make_sample((4, 6), [], [])
    sample[K.images] = as_tensor(array)
    batch = collate_batch([sample, make_sample((5, 3), [], [])])
    assert batch[K.images].dtype == torch.float32 and batch[K.images].shape == (2, 3, 5, 6)
    assert torch.equal(
        batch[K.images][0, :, :4, :6], torch.from_numpy(array).permute(2, 0, 1).float()
    )
