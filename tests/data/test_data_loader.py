"""collate_batch, the loader builders and rebuild_dataloader."""

from __future__ import annotations

import multiprocessing
import random

import numpy as np
import pytest
import torch
from data_test_utils import ListDataset, make_sample
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, SequentialSampler

from dist_utils import run_distributed
from vistrain.data.const import CommonKeys
from vistrain.data.loader import (
    build_test_dataloader,
    build_train_dataloader,
    collate_batch,
    rebuild_dataloader,
    seed_worker,
)
from vistrain.data.pipe import DataPipe
from vistrain.data.samplers import ShardSampler
from vistrain.data.transforms import RandomHorizontalFlip, RandomHSV

K = CommonKeys


def _dataset(n: int) -> ListDataset:
    return ListDataset([make_sample((8, 8), [(1, 1, 3, 3)], [0], name=f"n{i}") for i in range(n)])


def test_collate_pads_images_and_lists_the_rest() -> None:
    a = make_sample((20, 30), [(1, 2, 3, 4)], [1], name="a")
    b = make_sample((25, 10), [(0, 0, 5, 5), (1, 1, 2, 2)], [2, 3], name="b")
    batch = collate_batch([a, b])
    images = batch[K.images]
    assert images.shape == (2, 3, 25, 30) and images.dtype == torch.float32
    assert torch.equal(images[0, :, :20, :30], a[K.images])
    assert (images[0, :, 20:] == 114).all()
    assert torch.equal(images[1, :, :25, :10], b[K.images])
    assert (images[1, :, :, 10:] == 114).all()
    assert batch[K.input_hw] == [(20, 30), (25, 10)]
    assert [x.shape for x in batch[K.boxes2d]] == [(1, 4), (2, 4)]
    assert [x.tolist() for x in batch[K.boxes2d_classes]] == [[1], [2, 3]]
    assert batch[K.sample_names] == ["a", "b"]
    assert batch[K.original_hw] == [(20, 30), (25, 10)]
    assert [x.shape for x in batch[K.original_images]] == [(20, 30, 3), (25, 10, 3)]
    assert batch[K.coco_image_id] == [1, 1]


def test_collate_rejects_empty_and_mismatched_batches() -> None:
    with pytest.raises(ValueError, match="no samples"):
        collate_batch([])
    a = make_sample((4, 4), [], [])
    b = dict(a)
    del b[K.coco_image_id]
    with pytest.raises(ValueError, match="same keys"):
        collate_batch([a, b])


def _names(loader: DataLoader) -> list[str]:  # type: ignore[type-arg]
    return [name for batch in loader for name in batch[K.sample_names]]


def test_train_loader_order_depends_on_seed_and_epoch_only() -> None:
    dataset = _dataset(10)
    loader = build_train_dataloader(dataset, batch_size=3, seed=5, distributed=False)
    assert isinstance(loader.sampler, DistributedSampler) and loader.drop_last
    epoch0 = _names(loader)
    assert len(epoch0) == 9 and epoch0 == _names(loader)  # drop_last; same epoch, same order
    loader.sampler.set_epoch(1)
    assert _names(loader) != epoch0
    again = build_train_dataloader(dataset, batch_size=3, seed=5, distributed=False)
    assert _names(again) == epoch0
    other = build_train_dataloader(dataset, batch_size=3, seed=6, distributed=False)
    assert _names(other) != epoch0


def test_workers_are_seeded_reproducibly() -> None:
    pipe = DataPipe(_dataset(8), [RandomHorizontalFlip(0.5), RandomHSV()])

    def run(seed: int) -> list[torch.Tensor]:
        loader = build_train_dataloader(pipe, 2, num_workers=2, seed=seed, distributed=False)
        return [batch[K.images] for batch in loader]

    first, second, third = run(1), run(1), run(2)
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    assert not all(torch.equal(x, y) for x, y in zip(first, third))


def test_seed_worker_seeds_python_and_numpy_from_torch() -> None:
    torch.manual_seed(1234)
    seed_worker(0)
    values = (random.random(), np.random.rand())
    random.seed(1234)
    np.random.seed(1234)
    assert values == (random.random(), np.random.rand())


def test_test_loader_keeps_order_and_every_sample() -> None:
    loader = build_test_dataloader(_dataset(7), batch_size=3, distributed=False)
    assert _names(loader) == [f"n{i}" for i in range(7)]


def test_rebuild_keeps_every_setting() -> None:
    dataset = _dataset(12)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=3)
    generator = torch.Generator().manual_seed(9)
    context = multiprocessing.get_context("spawn")
    old = DataLoader(
        dataset,
        batch_size=4,
        sampler=sampler,
        num_workers=2,
        collate_fn=collate_batch,
        pin_memory=True,
        drop_last=True,
        timeout=30.0,
        worker_init_fn=seed_worker,
        multiprocessing_context=context,
        generator=generator,
        prefetch_factor=3,
        persistent_workers=True,
    )
    new_dataset = _dataset(12)
    new = rebuild_dataloader(old, new_dataset)
    assert new.dataset is new_dataset
    assert new.sampler is sampler
    assert new.batch_size == 4 and new.drop_last is True
    assert isinstance(new.batch_sampler, BatchSampler) and new.batch_sampler.sampler is sampler
    assert new.num_workers == 2
    assert new.collate_fn is collate_batch
    assert new.pin_memory is True
    assert new.timeout == 30.0
    assert new.worker_init_fn is seed_worker
    assert new.multiprocessing_context is old.multiprocessing_context
    assert new.generator is generator
    assert new.prefetch_factor == 3
    assert new.persistent_workers is True
    assert new.pin_memory_device == old.pin_memory_device
    assert new.in_order == old.in_order


def test_rebuild_reuses_a_batch_sampler_and_checks_length() -> None:
    dataset = _dataset(6)
    batches = BatchSampler(SequentialSampler(dataset), batch_size=4, drop_last=False)
    old = DataLoader(dataset, batch_sampler=batches, collate_fn=collate_batch)
    new = rebuild_dataloader(old, _dataset(6))
    assert new.batch_sampler is batches and new.batch_size is None
    assert [len(b[K.sample_names]) for b in new] == [4, 2]
    with pytest.raises(ValueError, match="5 samples"):
        rebuild_dataloader(old, _dataset(5))


def test_rebuilt_train_loader_continues_the_same_epochs() -> None:
    loader = build_train_dataloader(_dataset(10), batch_size=2, seed=1, distributed=False)
    loader.sampler.set_epoch(3)
    rebuilt = rebuild_dataloader(loader, _dataset(10))
    assert _names(rebuilt) == _names(loader)


def test_shard_sampler_splits_without_repeats() -> None:
    shards = [list(ShardSampler(range(7), 3, rank)) for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(ShardSampler(range(7), 3, rank)) for rank in range(3)] == [3, 2, 2]


def _distributed_loaders(rank: int, world_size: int) -> dict[str, list[str]]:
    dataset = _dataset(7)
    train = build_train_dataloader(dataset, batch_size=2, seed=0, drop_last=False)
    test = build_test_dataloader(dataset, batch_size=2)
    return {"train": _names(train), "test": _names(test)}


def test_loaders_shard_across_two_processes() -> None:
    results = run_distributed(_distributed_loaders, 2)
    train = [r["train"] for r in results]
    assert len(train[0]) == len(train[1]) == 4  # padded to equal length for training
    assert set(train[0]) | set(train[1]) == {f"n{i}" for i in range(7)}
    test = [r["test"] for r in results]
    assert test == [["n0", "n2", "n4", "n6"], ["n1", "n3", "n5"]]  # each sample exactly once
