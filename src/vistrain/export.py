"""A YOLOX as a TorchScript or ONNX file, without NMS: what ``vistrain export`` writes.

The exported network maps ``(B, 3, S, S)`` float RGB images in 0..255 (resized keeping the
aspect ratio and padded with 114, as ``vistrain predict`` does) to ``(B, N, 5 + C)`` rows,
one per grid point of the three levels: box centre x, y, width, height in input pixels,
objectness and the ``C`` class probabilities (both after the sigmoid), the layout of
official YOLOX's decoded output. The score of a class is objectness x its probability;
thresholding and NMS are left to the caller, whose runtime usually has its own. The
input side ``S`` is fixed at export (``--set image_size=...``); the batch size is free.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from vistrain.model.yolox import YOLOX

logger = logging.getLogger("vistrain")

FORMATS = ("torchscript", "onnx")
SUFFIXES = {"torchscript": ".pt", "onnx": ".onnx"}


class DecodedYOLOX(nn.Module):
    """A YOLOX in eval mode whose output is the decoded predictions before NMS.

    Args:
        model: The detector (its weights are shared, not copied).
    """

    def __init__(self, model: YOLOX) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, S, S)`` float RGB 0..255 to ``(B, N, 5 + C)`` decoded predictions."""
        return self.model.decoded(images)


def default_output(ckpt_path: str, fmt: str) -> str:
    """``<checkpoint stem>.<pt|onnx>`` beside the checkpoint."""
    return str(Path(ckpt_path).with_suffix(SUFFIXES[fmt]))


@torch.no_grad()
def export_detector(model: YOLOX, fmt: str, output: str, image_size: int) -> str:
    """Write ``model`` without NMS as ``fmt`` to ``output``; return the path.

    Args:
        model: The detector.
        fmt: ``"torchscript"`` (a traced module, ``torch.jit.load``) or ``"onnx"``
            (opset 17, input ``images``, output ``predictions``, dynamic batch).
        output: The file to write (its folder is created).
        image_size: Side of the square input the file is traced at.

    Raises:
        ValueError: If ``fmt`` is not one of ``FORMATS``.
        ImportError: If ONNX export is asked for without the ``onnx`` package.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    wrapper = DecodedYOLOX(model.cpu()).eval()
    example = torch.full((1, 3, image_size, image_size), 114.0)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    partial = f"{output}.partial"  # renamed when complete: never a half-written file
    with warnings.catch_warnings():
        # The grid sizes become constants of the traced graph: that is the fixed input size.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        if fmt == "torchscript":
            torch.jit.trace(wrapper, example).save(partial)
        else:
            _export_onnx(wrapper, example, partial)
    os.replace(partial, output)
    logger.info("Wrote %s (%s, input Bx3x%dx%d)", output, fmt, image_size, image_size)
    return output


def _export_onnx(wrapper: nn.Module, example: Tensor, output: str) -> None:
    import onnx  # noqa: F401  (torch.onnx needs it; a clear ImportError when absent)

    torch.onnx.export(
        wrapper,
        (example,),
        output,
        input_names=["images"],
        output_names=["predictions"],
        dynamic_axes={"images": {0: "batch"}, "predictions": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )


__all__ = ["FORMATS", "DecodedYOLOX", "default_output", "export_detector"]
