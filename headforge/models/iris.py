"""MediaPipe Iris landmark network as a PyTorch module.

Input: NHWC float32 in [0, 1], 64×64 eye crop. Outputs, as the `.tflite` orders them:
`eye_contours_and_brows (N, 213)` (71 points × xyz in input pixels) and `iris (N, 15)` (5 points × xyz).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from headforge.models.layers import ChannelPReLU, TFConv2d, add_padded_skip, nchw


@dataclass(frozen=True)
class IrisConfig:
    input_size: int = 64
    stem_channels: int = 64
    # (out_channels, stride) per bottleneck block: shared trunk, then each of the two branches.
    trunk: tuple[tuple[int, int], ...] = (
        (64, 1), (64, 1), (64, 1), (64, 1), (128, 2), (128, 1), (128, 1), (128, 1), (128, 1), (128, 2),
    )  # fmt: skip
    branch: tuple[tuple[int, int], ...] = (
        (128, 1), (128, 1), (128, 2), (128, 1), (128, 1), (128, 2), (128, 1), (128, 1),
    )  # fmt: skip
    contour_outputs: int = 213
    iris_outputs: int = 15


class IrisBlock(nn.Module):
    """Bottleneck: 1×1 (or 2×2 stride-2) conv to half width + PReLU, depthwise 3×3, 1×1 back to full
    width, added to the (pooled, channel-padded) input, then PReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        mid = out_channels // 2
        self.out_channels = out_channels
        self.stride = stride
        self.reduce = TFConv2d(in_channels, mid, stride, stride, padding="VALID")
        self.reduce_activation = ChannelPReLU(mid)
        self.depthwise = TFConv2d(mid, mid, 3, depthwise=True)
        self.expand = TFConv2d(mid, out_channels, 1)
        self.activation = ChannelPReLU(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.depthwise(self.reduce_activation(self.reduce(x)))
        skip = F.max_pool2d(x, 2) if self.stride == 2 else x
        return self.activation(add_padded_skip(skip, self.expand, y))

    def layers(self) -> list[nn.Module]:
        return [self.reduce, self.reduce_activation, self.depthwise, self.expand, self.activation]


class _Branch(nn.Module):
    def __init__(self, in_channels: int, blocks: tuple[tuple[int, int], ...], outputs: int):
        super().__init__()
        self.blocks = nn.ModuleList()
        for out_channels, stride in blocks:
            self.blocks.append(IrisBlock(in_channels, out_channels, stride))
            in_channels = out_channels
        self.output = TFConv2d(in_channels, outputs, 2, padding="VALID")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.output(x).reshape(x.shape[0], -1)

    def layers(self) -> list[nn.Module]:
        layers: list[nn.Module] = []
        for block in self.blocks:
            layers += cast(IrisBlock, block).layers()
        return [*layers, self.output]


class IrisLandmark(nn.Module):
    def __init__(self, config: IrisConfig | None = None):
        super().__init__()
        self.config = config = config or IrisConfig()
        self.stem = TFConv2d(3, config.stem_channels, 3, 2)
        self.stem_activation = ChannelPReLU(config.stem_channels)
        channels = config.stem_channels
        self.trunk = nn.ModuleList()
        for out_channels, stride in config.trunk:
            self.trunk.append(IrisBlock(channels, out_channels, stride))
            channels = out_channels
        self.contours = _Branch(channels, config.branch, config.contour_outputs)
        self.iris = _Branch(channels, config.branch, config.iris_outputs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem_activation(self.stem(nchw(x)))
        for block in self.trunk:
            x = block(x)
        return self.contours(x), self.iris(x)

    def tflite_layer_order(self) -> list[nn.Module]:
        """Weighted layers in `.tflite` execution order: the trunk, then both branches layer by layer."""
        layers: list[nn.Module] = [self.stem, self.stem_activation]
        for block in self.trunk:
            layers += cast(IrisBlock, block).layers()
        for contour_layer, iris_layer in zip(self.contours.layers(), self.iris.layers(), strict=True):
            layers += [contour_layer, iris_layer]
        return layers
