"""CSPDarknet backbone of YOLOX and the convolution blocks the neck and head share.

The backbone turns a normalised image into three feature maps at strides 8, 16 and 32
(``dark3``, ``dark4``, ``dark5``), which the PAFPN neck fuses. Its size is set by two
multipliers, as in the YOLOX paper's model family: ``depth`` scales how many bottlenecks
each CSP stage stacks, ``width`` scales every channel count. The small models (nano)
replace each 3x3 convolution by a depthwise-separable one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.03


class ConvBNAct(nn.Sequential):
    """Convolution (no bias) + BatchNorm + SiLU, "same" padding.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Square kernel size (odd).
        stride: Convolution stride.
        groups: Convolution groups (``in_channels`` for a depthwise convolution).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__(
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=(kernel_size - 1) // 2,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM),
            nn.SiLU(inplace=True),
        )


class DepthwiseSeparableConv(nn.Sequential):
    """Depthwise ``k x k`` ConvBNAct followed by a pointwise 1x1 ConvBNAct."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1
    ) -> None:
        super().__init__(
            ConvBNAct(in_channels, in_channels, kernel_size, stride, groups=in_channels),
            ConvBNAct(in_channels, out_channels, 1),
        )


def make_conv(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, depthwise: bool = False
) -> nn.Module:
    """A ``k x k`` block: depthwise-separable when ``depthwise`` else a plain ConvBNAct."""
    if depthwise:
        return DepthwiseSeparableConv(in_channels, out_channels, kernel_size, stride)
    return ConvBNAct(in_channels, out_channels, kernel_size, stride)


class Bottleneck(nn.Module):
    """1x1 then 3x3 convolution, with a residual connection when shapes allow it."""

    def __init__(
        self, in_channels: int, out_channels: int, shortcut: bool = True, depthwise: bool = False
    ) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(in_channels, out_channels, 1)
        self.conv2 = make_conv(out_channels, out_channels, 3, depthwise=depthwise)
        self.use_residual = shortcut and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        y = self.conv2(self.conv1(x))
        return x + y if self.use_residual else y


class CSPLayer(nn.Module):
    """Cross-stage-partial block: half the channels go through bottlenecks, half bypass.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        num_blocks: Bottlenecks stacked on the processed half.
        shortcut: Residual connections inside the bottlenecks.
        depthwise: Depthwise-separable 3x3 convolutions.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int = 1,
        shortcut: bool = True,
        depthwise: bool = False,
    ) -> None:
        super().__init__()
        hidden = out_channels // 2
        self.main = ConvBNAct(in_channels, hidden, 1)
        self.bypass = ConvBNAct(in_channels, hidden, 1)
        self.blocks = nn.Sequential(
            *(Bottleneck(hidden, hidden, shortcut, depthwise) for _ in range(num_blocks))
        )
        self.fuse = ConvBNAct(2 * hidden, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        return self.fuse(torch.cat((self.blocks(self.main(x)), self.bypass(x)), dim=1))


class SpatialPyramidPooling(nn.Module):
    """Max-pools at several kernel sizes (stride 1) concatenated, to widen the receptive field."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_sizes: tuple[int, ...] = (5, 9, 13)
    ) -> None:
        super().__init__()
        hidden = in_channels // 2
        self.reduce = ConvBNAct(in_channels, hidden, 1)
        self.pools = nn.ModuleList(nn.MaxPool2d(k, stride=1, padding=k // 2) for k in kernel_sizes)
        self.fuse = ConvBNAct(hidden * (len(kernel_sizes) + 1), out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        x = self.reduce(x)
        return self.fuse(torch.cat([x, *(pool(x) for pool in self.pools)], dim=1))


class Focus(nn.Module):
    """Space-to-depth stem: each 2x2 pixel block becomes 4x the channels, then a 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = ConvBNAct(4 * in_channels, out_channels, kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the stem; ``x`` must have even height and width."""
        top_left = x[..., ::2, ::2]
        bottom_left = x[..., 1::2, ::2]
        top_right = x[..., ::2, 1::2]
        bottom_right = x[..., 1::2, 1::2]
        return self.conv(torch.cat((top_left, bottom_left, top_right, bottom_right), dim=1))


def scaled_depth(num: int, depth: float) -> int:
    """Number of blocks for a depth multiplier (at least one)."""
    return max(round(num * depth), 1)


class CSPDarknet(nn.Module):
    """YOLOX backbone: Focus stem and four stride-2 CSP stages.

    Args:
        depth: Depth multiplier (0.33 for nano and tiny).
        width: Width multiplier (0.25 nano, 0.375 tiny); the stem has ``int(64 * width)``
            channels and every stage doubles it.
        depthwise: Depthwise-separable 3x3 convolutions (nano).

    Attributes:
        out_channels: Channels of the three outputs (strides 8, 16, 32).
    """

    def __init__(self, depth: float, width: float, depthwise: bool = False) -> None:
        super().__init__()
        base = int(64 * width)
        blocks = scaled_depth(3, depth)
        self.stem = Focus(3, base)
        self.dark2 = self._stage(base, base * 2, blocks, depthwise)
        self.dark3 = self._stage(base * 2, base * 4, blocks * 3, depthwise)
        self.dark4 = self._stage(base * 4, base * 8, blocks * 3, depthwise)
        self.dark5 = nn.Sequential(
            make_conv(base * 8, base * 16, 3, 2, depthwise),
            SpatialPyramidPooling(base * 16, base * 16),
            CSPLayer(base * 16, base * 16, blocks, shortcut=False, depthwise=depthwise),
        )
        self.out_channels = (base * 4, base * 8, base * 16)

    @staticmethod
    def _stage(in_ch: int, out_ch: int, blocks: int, depthwise: bool) -> nn.Sequential:
        return nn.Sequential(
            make_conv(in_ch, out_ch, 3, 2, depthwise),
            CSPLayer(out_ch, out_ch, blocks, depthwise=depthwise),
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return the stride-8, 16 and 32 feature maps."""
        x = self.dark2(self.stem(x))
        c3 = self.dark3(x)
        c4 = self.dark4(c3)
        c5 = self.dark5(c4)
        return c3, c4, c5
