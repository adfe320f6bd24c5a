"""DataPipe / MultiSampleDataPipe and the YOLOX presets."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from data_test_utils import ListDataset, make_sample
from torch.utils.data import ConcatDataset, Subset

from vistrain.data.const import CommonKeys
from vistrain.data.datasets import COCODataset, generate_shapes_dataset
from vistrain.data.pipe import DataPipe, MultiSampleDataPipe, MultiSamplePipe, strip_multi_sample
from vistrain.data.presets import yolox_test_pipe, yolox_train_pipe
from vistrain.data.transforms import Mosaic, Pad, RandomAffine, RandomHorizontalFlip

K = CommonKeys


def _dataset(n: int = 5) -> ListDataset:
    return ListDataset(
        [make_sample((20, 30), [(2, 3, 12, 13)], [i % 4], name=f"n{i}") for i in range(n)]
    )


def test_data_pipe_applies_transforms_in_order() -> None:
    pipe = DataPipe(_dataset(), [RandomHorizontalFlip(1.0), Pad(32)])
    out = pipe[2]
    assert len(pipe) == 5 and not pipe.has_multi_sample
    assert out[K.images].shape == (3, 32, 32) and out[K.sample_names] == "n2"
    assert out[K.boxes2d].tolist() == [[18.0, 3.0, 28.0, 13.0]]  # flipped in 30 px, then padded


def test_multi_sample_stage_draws_from_the_data_set() -> None:
    dataset = _dataset()
    pipe = MultiSampleDataPipe(dataset, [Mosaic((20, 30))], [Pad(64)])
    assert pipe.has_multi_sample
    random.seed(0)
    out = pipe[1]
    assert dataset.reads == 4  # the sample itself and three drawn ones
    assert out[K.images].shape == (3, 64, 64) and out[K.input_hw] == (40, 60)
    assert out[K.sample_names] == "n1"


def test_strip_multi_sample_follows_the_protocol_through_wrappers() -> None:
    dataset = _dataset()
    pipe = MultiSampleDataPipe(dataset, [Mosaic((20, 30))], [Pad(32)])
    plain = DataPipe(dataset, [Pad(32)])
    assert isinstance(pipe, MultiSamplePipe) and not isinstance(plain, MultiSamplePipe)
    assert strip_multi_sample(plain) == (plain, False)
    stripped, changed = strip_multi_sample(ConcatDataset([plain, Subset(pipe, [4, 0])]))
    assert changed and isinstance(stripped, ConcatDataset)
    assert stripped.datasets[0] is plain
    subset = stripped.datasets[1]
    assert isinstance(subset, Subset) and list(subset.indices) == [4, 0]
    assert not subset.dataset.has_multi_sample and pipe.has_multi_sample
    assert subset[0][K.sample_names] == "n4" and dataset.reads == 1  # no samples drawn
    off = MultiSampleDataPipe(dataset, [Mosaic((20, 30))], multi_sample_prob=0.0)
    assert strip_multi_sample(off) == (off, False)  # nothing left to strip


def test_without_multi_sample_drops_mosaic_and_its_affine() -> None:
    dataset = _dataset()
    pipe = MultiSampleDataPipe(
        dataset, [Mosaic((20, 30)), RandomAffine(output_size=(20, 30))], [Pad(32)]
    )
    plain = pipe.without_multi_sample()
    assert isinstance(plain, MultiSampleDataPipe) and not plain.has_multi_sample
    assert plain.dataset is dataset and plain.transforms == pipe.transforms
    assert pipe.has_multi_sample  # the original is unchanged
    out = plain[3]
    assert dataset.reads == 1
    assert out[K.input_hw] == (20, 30)  # no mosaic canvas, no affine
    assert out[K.boxes2d].tolist() == [[2.0, 3.0, 12.0, 13.0]]


def test_multi_sample_probability_zero_never_mixes() -> None:
    dataset = _dataset()
    pipe = MultiSampleDataPipe(dataset, [Mosaic((20, 30))], multi_sample_prob=0.0)
    assert not pipe.has_multi_sample
    assert pipe[0][K.input_hw] == (20, 30) and dataset.reads == 1


def test_wrong_transform_kinds_are_rejected() -> None:
    with pytest.raises(TypeError, match="multi_sample_transforms"):
        DataPipe(_dataset(), [Mosaic(8)])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"transforms\[0\]"):
        DataPipe(_dataset(), [lambda s: s])  # type: ignore[list-item]


def test_yolox_presets_on_the_shapes_data(tmp_path: Path) -> None:
    paths = generate_shapes_dataset(tmp_path / "s", 6, image_size=80, seed=1)
    dataset = COCODataset(paths.annotation_file, paths.image_root)
    train = yolox_train_pipe(dataset, 64)
    random.seed(0)
    for index in range(len(train)):
        out = train[index]
        assert out[K.images].shape == (3, 64, 64)
        boxes = out[K.boxes2d]
        assert len(boxes) == len(out[K.boxes2d_classes])
        assert (boxes >= 0).all() and (boxes <= 64).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()
    assert train.has_multi_sample and not train.without_multi_sample().has_multi_sample
    late = train.without_multi_sample()[0]
    assert late[K.input_hw] == (64, 64) and late[K.images].shape == (3, 64, 64)
    test = yolox_test_pipe(dataset, (48, 64))
    sample = test[0]
    raw = dataset[0]
    assert sample[K.images].shape == (3, 48, 64) and sample[K.input_hw] == (48, 48)
    scale = torch.tensor([48 / 80, 48 / 80] * 2)
    assert torch.allclose(sample[K.boxes2d], raw[K.boxes2d] * scale)
