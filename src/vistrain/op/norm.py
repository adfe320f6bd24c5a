"""Normalisation layers: which they are, and averaging their state across ranks.

Under DDP each rank's BatchNorm running statistics drift apart (every rank sees other
images); ``all_reduce_norm`` replaces them by their mean, as YOLOX does before evaluating
and saving. ``NORM_TYPES`` also tells the optimizer's parameter groups which weights are
normalisation scales.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vistrain.common.distributed import get_world_size, unwrap_model

__all__ = ["NORM_TYPES", "all_reduce_norm", "norm_float_tensors"]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
)
"""Batch, instance and sync-batch norms (``_NormBase``), group and layer norms."""


def norm_float_tensors(model: nn.Module) -> list[Tensor]:
    """The floating parameters and buffers of every normalisation layer of ``model``.

    Covers batch, instance, sync-batch, group and layer norms (running mean/var, affine
    weight/bias). Integer buffers such as ``num_batches_tracked`` are left out. Shared
    tensors appear once. DDP / compile wrappers are looked through.
    """
    tensors: list[Tensor] = []
    seen: set[int] = set()
    for module in unwrap_model(model).modules():
        if not isinstance(module, NORM_TYPES):
            continue
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            if tensor is None or not tensor.is_floating_point() or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            tensors.append(tensor)
    return tensors


def _collective_device(fallback: torch.device) -> torch.device:
    """Where a collective's tensors must live for the current backend."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if dist.get_backend() == "gloo":
        return torch.device("cpu")
    return fallback


@torch.no_grad()
def all_reduce_norm(model: nn.Module) -> None:
    """Collective: replace each norm layer's floating state by its mean over the ranks.

    One flat ``all_reduce`` over every tensor (accumulated in at least float32), then each
    tensor is written back in place with its own dtype, so optimizers and EMA copies keep
    pointing at the same storage. Integer counters are untouched. Without a process group
    (or with one rank) it does nothing.
    """
    if not dist.is_available() or not dist.is_initialized() or get_world_size() == 1:
        return
    tensors = norm_float_tensors(model)
    if not tensors:
        # Every rank has the same model, so every rank returns here: no collective is skipped.
        return
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    device = _collective_device(tensors[0].device)
    flat = torch.cat([t.detach().reshape(-1).to(device=device, dtype=dtype) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(get_world_size())
    offset = 0
    for tensor in tensors:
        numel = tensor.numel()
        tensor.copy_(flat[offset : offset + numel].view_as(tensor))
        offset += numel
