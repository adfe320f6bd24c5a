"""A sampler that splits a data set across ranks without repeating samples (for testing)."""

from __future__ import annotations

from collections.abc import Iterator, Sized

from torch.utils.data import DistributedSampler


class ShardSampler(DistributedSampler):
    """Rank ``r`` of ``n`` gets indices ``r, r + n, r + 2n, ...``, in order, without padding.

    :class:`~torch.utils.data.DistributedSampler` repeats samples so every rank gets the same
    count; an evaluator would then count those images twice. This subclass (still a
    ``DistributedSampler``, so Lightning leaves it in place) never repeats or shuffles, so
    ranks may get one sample more or less than each other. Use it for evaluation only:
    training needs equal counts per rank.

    Args:
        dataset: The data set to split (only its length is used).
        num_replicas: Number of ranks.
        rank: This rank.
    """

    def __init__(self, dataset: Sized, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)  # type: ignore[arg-type]
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.num_samples
