"""Model size in the units papers report: parameters and GFLOPs at an input size.

Detection papers (YOLOX among them) count FLOPs as twice the multiply-adds that the
``thop`` profiler reports: per output element, a convolution or linear layer does
``in_channels / groups * kernel area`` multiply-adds plus one for its bias, and a
BatchNorm layer two (its scale and its shift); activations, pooling and additions are not
counted. With that convention YOLOX-nano at 416 x 416 is 1.08 GFLOPs, tiny 6.45 and s at
640 26.8, the figures of the YOLOX paper's tables. The count runs one forward pass with
hooks on a zero image, without extra dependencies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class ModelSummary(NamedTuple):
    """Size of a model.

    Attributes:
        parameters: Number of parameters (trainable or not).
        trainable: Number of parameters that require gradients.
        gflops: GFLOPs of one forward pass at ``input_hw`` (2 x multiply-adds).
        input_hw: The ``(height, width)`` the FLOPs were counted at.
    """

    parameters: int
    trainable: int
    gflops: float
    input_hw: tuple[int, int]

    def __str__(self) -> str:
        """One log line, e.g. ``0.91M parameters (0.91M trainable), 1.08 GFLOPs at 416x416``."""
        h, w = self.input_hw
        return (
            f"{self.parameters / 1e6:.2f}M parameters ({self.trainable / 1e6:.2f}M trainable), "
            f"{self.gflops:.2f} GFLOPs at {h}x{w}"
        )


def _multiply_adds(module: nn.Module, output: Tensor) -> int:
    """Multiply-adds of one call of ``module`` that produced ``output`` (see module doc)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        per_output = module.weight[0].numel() + (1 if module.bias is not None else 0)
        return output.numel() * per_output
    if isinstance(module, nn.Linear):
        return output.numel() * (module.in_features + (1 if module.bias is not None else 0))
    if isinstance(module, _BatchNorm):
        return output.numel() * (2 if module.affine else 1)
    return 0


def count_gflops(
    model: nn.Module, input_hw: tuple[int, int], forward: Callable[[Tensor], Any] | None = None
) -> float:
    """GFLOPs (2 x multiply-adds) of one forward pass on a ``(1, 3, H, W)`` image.

    Args:
        model: The model; its train/eval mode is restored afterwards.
        input_hw: ``(height, width)`` of the image.
        forward: What to run on the image; ``model`` itself when None.
    """
    total = [0]

    def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            total[0] += _multiply_adds(module, output)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    was_training = model.training
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        image = torch.zeros(1, 3, *input_hw, device=device)
        model.eval()
        with torch.no_grad():
            (forward or model)(image)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return 2 * total[0] / 1e9


def summarize(
    model: nn.Module, input_hw: tuple[int, int], forward: Callable[[Tensor], Any] | None = None
) -> ModelSummary:
    """Parameters and GFLOPs of ``model`` at ``input_hw`` (see ``count_gflops``)."""
    params = list(model.parameters())
    return ModelSummary(
        parameters=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        gflops=count_gflops(model, input_hw, forward),
        input_hw=(int(input_hw[0]), int(input_hw[1])),
    )


__all__ = ["ModelSummary", "count_gflops", "summarize"]
