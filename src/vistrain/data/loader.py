"""Batching: the collate function and the data loader builders.

Reproducibility: the training loader orders samples with a ``DistributedSampler`` (one
replica when not distributed) seeded with ``seed``, so the order of epoch ``e`` depends only
on ``(seed, e)`` once the loop calls ``sampler.set_epoch(e)``. The loader also gets a
``torch.Generator`` seeded with ``seed``, from which each worker's ``torch.initial_seed()``
is derived; :func:`seed_worker` seeds Python's :mod:`random` and NumPy from it, so the random
transforms of every worker are reproducible. With ``num_workers=0`` the transforms use the
main process's :mod:`random` state, which checkpoints save and restore.
"""

from __future__ import annotations

import inspect
import random
import signal
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from vistrain.common import distributed as vdist
from vistrain.common.parent_death import die_with_parent
from vistrain.common.typing import DictData
from vistrain.data.const import CommonKeys
from vistrain.data.samplers import ShardSampler
from vistrain.data.transforms.base import PAD_VALUE


def collate_batch(samples: Sequence[DictData]) -> DictData:
    """Combine sample dicts into one batch dict.

    ``images`` are padded at the bottom and right with grey 114 to the largest height and
    width in the batch and stacked to ``(B, 3, H, W)`` float32; ``labels`` (image-level
    classes) are stacked to a ``(B,)`` long tensor; every other key becomes a list with one
    entry per sample (``input_hw``, ``boxes2d``, ``boxes2d_classes``, ``original_images``,
    ``original_hw``, ``sample_names``, ``coco_image_id``, ...).

    Raises:
        ValueError: If ``samples`` is empty or the samples do not share the same keys.
    """
    if not samples:
        raise ValueError("collate_batch got no samples; check the data set is not empty.")
    keys = list(samples[0].keys())
    for index, sample in enumerate(samples[1:], start=1):
        if set(sample.keys()) != set(keys):
            raise ValueError(
                f"Sample {index} has keys {sorted(sample.keys())} but sample 0 has "
                f"{sorted(keys)}; every sample of a batch needs the same keys."
            )
    batch: DictData = {}
    for key in keys:
        values = [sample[key] for sample in samples]
        if key == CommonKeys.images:
            batch[key] = stack_padded(values)
        elif key == CommonKeys.labels:
            batch[key] = torch.as_tensor([int(value) for value in values], dtype=torch.long)
        else:
            batch[key] = values
    return batch


def stack_padded(images: Sequence[Tensor], value: float = PAD_VALUE) -> Tensor:
    """Stack ``(C, H, W)`` images, padding each at the bottom and right to the largest size."""
    height = max(int(image.shape[-2]) for image in images)
    width = max(int(image.shape[-1]) for image in images)
    out = torch.full((len(images), images[0].shape[0], height, width), value, dtype=torch.float32)
    for index, image in enumerate(images):
        out[index, :, : image.shape[-2], : image.shape[-1]] = image
    return out


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed Python's :mod:`random` and NumPy from ``torch.initial_seed()``.

    PyTorch gives each worker ``torch.initial_seed() = base_seed + worker_id``, with
    ``base_seed`` drawn from the loader's generator, so seeding from it makes each worker's
    transforms reproducible and different from the other workers'.
    """
    del worker_id
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def init_worker(worker_id: int) -> None:
    """``worker_init_fn`` of the loaders built here: seed the worker and tie it to its parent.

    Seeds as :func:`seed_worker`. The worker ends as soon as the process that started it
    ends, however it ends (a killed main process otherwise leaves the worker blocked for ever
    on a full pipe), and it ignores SIGINT: Ctrl-C reaches every process of the terminal's
    group, and the main process decides how to stop (``vistrain.engine.stop_signal``).
    """
    seed_worker(worker_id)
    die_with_parent(signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _resolve_distributed(distributed: bool | None) -> tuple[int, int]:
    if distributed is None:
        distributed = vdist.is_distributed()
    if distributed:
        return vdist.get_world_size(), vdist.get_rank()
    return 1, 0


def resolve_pin_memory(pin_memory: bool | None) -> bool:
    """``pin_memory`` as given, or (None) whether CUDA is available.

    ``vistrain.run`` trains on the GPU whenever one is available, so pinning by default puts
    every batch where a non-blocking copy to the GPU can overlap with the host's work.
    """
    return torch.cuda.is_available() if pin_memory is None else bool(pin_memory)


def _check_loader_args(dataset: Dataset[Any], batch_size: int, num_workers: int) -> None:
    if not hasattr(dataset, "__len__"):
        raise TypeError(f"dataset={dataset!r} must be a map-style data set with __len__.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1.")
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers!r} must be >= 0.")


def build_train_dataloader(
    dataset: Dataset[DictData],
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    distributed: bool | None = None,
    collate_fn: Callable[[list[Any]], Any] = collate_batch,
    persistent_workers: bool = False,
    pin_memory: bool | None = None,
) -> DataLoader[DictData]:
    """A training loader: seeded shuffling per epoch, per-rank shards, seeded workers.

    The sampler is a ``DistributedSampler`` (with one replica outside a process group), so
    the loop must call ``loader.sampler.set_epoch(epoch)`` each epoch for a new order.

    Args:
        dataset: Map-style data set (usually a data pipe).
        batch_size: Samples per batch on each rank.
        num_workers: Worker processes (0 loads in the main process).
        seed: Seeds the shuffling and the workers' random number generators.
        shuffle: Shuffle the order each epoch.
        drop_last: Drop the last incomplete batch (keeps every step's batch size equal).
        distributed: Split across ranks; ``None`` does so when a process group with more
            than one rank is initialised.
        collate_fn: Batch builder.
        persistent_workers: Keep workers alive across epochs (needs ``num_workers > 0``).
        pin_memory: Pin batches in page-locked memory, so copies to a GPU are asynchronous
            (non-blocking); None pins when CUDA is available (the run then trains there).

    Raises:
        TypeError: If ``dataset`` has no length.
        ValueError: If ``batch_size`` or ``num_workers`` is out of range.
    """
    _check_loader_args(dataset, batch_size, num_workers)
    world_size, rank = _resolve_distributed(distributed)
    sampler: DistributedSampler[int] = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed
    )
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=resolve_pin_memory(pin_memory),
        drop_last=drop_last,
        worker_init_fn=init_worker,
        generator=generator,
        persistent_workers=persistent_workers and num_workers > 0,
    )


def build_test_dataloader(
    dataset: Dataset[DictData],
    batch_size: int,
    num_workers: int = 0,
    distributed: bool | None = None,
    collate_fn: Callable[[list[Any]], Any] = collate_batch,
    pin_memory: bool | None = None,
) -> DataLoader[DictData]:
    """A test loader: data set order, no dropped samples; each sample on exactly one rank.

    When distributed, a :class:`~vistrain.data.samplers.ShardSampler` (a
    ``DistributedSampler`` that neither shuffles nor repeats samples) splits the data, so an
    evaluator gathering every rank's results sees each image once.

    Args:
        dataset: Map-style data set.
        batch_size: Samples per batch on each rank.
        num_workers: Worker processes.
        distributed: As in :func:`build_train_dataloader`.
        collate_fn: Batch builder.
        pin_memory: Pin batches in page-locked memory, so copies to a GPU are asynchronous
            (non-blocking); None pins when CUDA is available (the run then trains there).

    Raises:
        TypeError: If ``dataset`` has no length.
        ValueError: If ``batch_size`` or ``num_workers`` is out of range.
    """
    _check_loader_args(dataset, batch_size, num_workers)
    world_size, rank = _resolve_distributed(distributed)
    sampler = ShardSampler(dataset, world_size, rank) if world_size > 1 else None  # type: ignore[arg-type]
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=resolve_pin_memory(pin_memory),
        drop_last=False,
        worker_init_fn=init_worker,
    )


_DATALOADER_PARAMS = frozenset(inspect.signature(DataLoader.__init__).parameters) - {"self"}


def rebuild_dataloader(loader: DataLoader[Any], dataset: Dataset[Any]) -> DataLoader[Any]:
    """A new ``DataLoader`` over ``dataset`` with every setting of ``loader``.

    The sampler (or batch sampler) *object* is reused, so its seed, epoch and shard stay
    the same; so are the generator, worker settings and collate function. Used when the
    data pipeline changes mid-run (the YOLOX mode switch). The new loader is a plain
    ``DataLoader`` even if ``loader`` was a subclass.

    Raises:
        ValueError: If the two data sets differ in length (the reused sampler indexes the old
            one's range).
    """
    old_len = len(loader.dataset) if hasattr(loader.dataset, "__len__") else None  # type: ignore[arg-type]
    new_len = len(dataset) if hasattr(dataset, "__len__") else None  # type: ignore[arg-type]
    if old_len != new_len:
        raise ValueError(
            f"rebuild_dataloader: the new data set has {new_len} samples but the loader's has "
            f"{old_len}; the reused sampler would index the wrong range. Build a new loader."
        )
    kwargs: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
        "prefetch_factor": loader.prefetch_factor,
        "persistent_workers": loader.persistent_workers,
        "pin_memory_device": getattr(loader, "pin_memory_device", ""),
        "in_order": getattr(loader, "in_order", True),
    }
    if isinstance(loader.dataset, IterableDataset):
        kwargs.update(batch_size=loader.batch_size, drop_last=loader.drop_last)
    elif loader.batch_size is not None:
        # Built from batch_size (+ sampler): the batch sampler is DataLoader's own wrapper.
        kwargs.update(
            batch_size=loader.batch_size, sampler=loader.sampler, drop_last=loader.drop_last
        )
    else:
        # A user batch sampler, or no automatic batching (batch_size=None).
        if loader.batch_sampler is not None:
            kwargs["batch_sampler"] = loader.batch_sampler
        else:
            kwargs.update(batch_size=None, sampler=loader.sampler)
    kwargs = {key: value for key, value in kwargs.items() if key in _DATALOADER_PARAMS}
    return DataLoader(dataset, **kwargs)
