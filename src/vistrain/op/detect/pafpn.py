"""PAFPN neck of YOLOX: a top-down then bottom-up fusion of the backbone's three maps.

Top-down, coarse semantics are upsampled into the finer maps; bottom-up, the fused fine
maps are strided back into the coarse ones, so every output level sees every input level.
Output channels equal the backbone's (``int(256, 512, 1024 * width)``), at strides 8, 16, 32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vistrain.op.detect.csp_darknet import ConvBNAct, CSPLayer, make_conv, scaled_depth


class PAFPN(nn.Module):
    """Path-aggregation feature pyramid.

    Args:
        in_channels: Channels of the stride-8, 16 and 32 inputs.
        depth: Depth multiplier for the CSP blocks.
        depthwise: Depthwise-separable 3x3 convolutions (nano).
    """

    def __init__(
        self, in_channels: tuple[int, int, int], depth: float, depthwise: bool = False
    ) -> None:
        super().__init__()
        c3, c4, c5 = in_channels
        blocks = scaled_depth(3, depth)
        self.reduce5 = ConvBNAct(c5, c4, 1)
        self.td4 = CSPLayer(2 * c4, c4, blocks, shortcut=False, depthwise=depthwise)
        self.reduce4 = ConvBNAct(c4, c3, 1)
        self.td3 = CSPLayer(2 * c3, c3, blocks, shortcut=False, depthwise=depthwise)
        self.down3 = make_conv(c3, c3, 3, 2, depthwise)
        self.bu4 = CSPLayer(2 * c3, c4, blocks, shortcut=False, depthwise=depthwise)
        self.down4 = make_conv(c4, c4, 3, 2, depthwise)
        self.bu5 = CSPLayer(2 * c4, c5, blocks, shortcut=False, depthwise=depthwise)
        self.out_channels = (c3, c4, c5)

    def forward(self, features: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Fuse ``(c3, c4, c5)`` into ``(p3, p4, p5)`` with the same shapes."""
        c3, c4, c5 = features
        lat5 = self.reduce5(c5)
        td4 = self.td4(torch.cat((F.interpolate(lat5, size=c4.shape[-2:]), c4), dim=1))
        lat4 = self.reduce4(td4)
        p3 = self.td3(torch.cat((F.interpolate(lat4, size=c3.shape[-2:]), c3), dim=1))
        p4 = self.bu4(torch.cat((self.down3(p3), lat4), dim=1))
        p5 = self.bu5(torch.cat((self.down4(p4), lat5), dim=1))
        return p3, p4, p5
