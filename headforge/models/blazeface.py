"""BlazeFace face detectors (short range, 128×128; full range, 192×192) as PyTorch modules.

Both take NHWC float32 in [-1, 1] and return `(regressors, classificators)` with the shapes of the
`.tflite` outputs: `(N, anchors, 16)` box + 6 keypoints and `(N, anchors, 1)` logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from headforge.models.layers import DepthwiseResidualBlock, TFConv2d, depth_to_space_nhwc, nchw, nhwc

# ----------------------------------------------------------------------------- short range


@dataclass(frozen=True)
class ShortRangeConfig:
    """BlazeFace short range: a 5×5 stem and depthwise residual blocks, with heads on 16×16 and 8×8 grids."""

    input_size: int = 128
    stem_channels: int = 24
    # (out_channels, stride) per block; the 16×16 head reads the output of block `fine_head_after`.
    blocks: tuple[tuple[int, int], ...] = (
        (24, 1), (28, 1), (32, 2), (36, 1), (42, 1), (48, 2), (56, 1), (64, 1), (72, 1), (80, 1), (88, 1),
        (96, 2), (96, 1), (96, 1), (96, 1), (96, 1),
    )  # fmt: skip
    fine_head_after: int = 11
    anchors_per_cell: tuple[int, int] = (2, 6)
    num_coords: int = 16


class BlazeFaceShortRange(nn.Module):
    def __init__(self, config: ShortRangeConfig | None = None):
        super().__init__()
        self.config = config = config or ShortRangeConfig()
        self.stem = TFConv2d(3, config.stem_channels, 5, 2, relu=True)
        blocks = []
        channels = config.stem_channels
        for out_channels, stride in config.blocks:
            blocks.append(DepthwiseResidualBlock(channels, out_channels, stride))
            channels = out_channels
        self.blocks = nn.ModuleList(blocks)
        fine_channels = config.blocks[config.fine_head_after - 1][0]
        fine_anchors, coarse_anchors = config.anchors_per_cell
        self.classifier_fine = TFConv2d(fine_channels, fine_anchors, 1)
        self.classifier_coarse = TFConv2d(channels, coarse_anchors, 1)
        self.regressor_fine = TFConv2d(fine_channels, fine_anchors * config.num_coords, 1)
        self.regressor_coarse = TFConv2d(channels, coarse_anchors * config.num_coords, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(nchw(x))
        fine = x
        for index, block in enumerate(self.blocks, start=1):
            x = block(x)
            if index == self.config.fine_head_after:
                fine = x
        n = x.shape[0]
        coords = self.config.num_coords
        classificators = torch.cat(
            [
                nhwc(self.classifier_fine(fine)).reshape(n, -1, 1),
                nhwc(self.classifier_coarse(x)).reshape(n, -1, 1),
            ],
            dim=1,
        )
        regressors = torch.cat(
            [
                nhwc(self.regressor_fine(fine)).reshape(n, -1, coords),
                nhwc(self.regressor_coarse(x)).reshape(n, -1, coords),
            ],
            dim=1,
        )
        return regressors, classificators

    def tflite_layer_order(self) -> list[nn.Module]:
        """Weighted layers in the order the `.tflite` graph runs them."""
        layers: list[nn.Module] = [self.stem]
        for block in self.blocks:
            layers += cast(DepthwiseResidualBlock, block).layers()
        return [
            *layers,
            self.classifier_fine,
            self.classifier_coarse,
            self.regressor_fine,
            self.regressor_coarse,
        ]


# ----------------------------------------------------------------------------- full range


@dataclass(frozen=True)
class EncoderStage:
    out_channels: int
    mid_channels: int
    num_blocks: int
    downsample: bool
    lateral_channels: int | None  # a 1×1 ReLU conv that feeds the decoder at this resolution


@dataclass(frozen=True)
class DecoderStage:
    channels: int
    mid_channels: int
    num_blocks: int


@dataclass(frozen=True)
class FullRangeConfig:
    """BlazeFace full range: an encoder of residual bottlenecks, a feature-pyramid decoder back to
    48×48, and heads that emit one anchor per 48×48 cell via a stride-2 depthwise conv + depth-to-space."""

    input_size: int = 192
    stem_channels: int = 32
    encoder: tuple[EncoderStage, ...] = (
        EncoderStage(32, 8, 2, downsample=False, lateral_channels=None),
        EncoderStage(64, 16, 2, downsample=True, lateral_channels=48),
        EncoderStage(128, 32, 2, downsample=True, lateral_channels=64),
        EncoderStage(192, 48, 2, downsample=True, lateral_channels=96),
        EncoderStage(384, 96, 3, downsample=True, lateral_channels=None),
    )
    decoder: tuple[DecoderStage, ...] = (
        DecoderStage(96, 48, 2),
        DecoderStage(64, 32, 2),
        DecoderStage(48, 24, 1),
    )
    anchors_per_cell: int = 1
    num_coords: int = 16


class Bottleneck(nn.Module):
    """Two (depthwise 3×3, pointwise 1×1) pairs: channels → mid (ReLU) → out.

    As a residual block (stride 1, same width) the input is added before the final ReLU; as a
    downsampling block (stride 2 on the first depthwise) there is no skip path.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.residual = stride == 1 and in_channels == out_channels
        self.depthwise1 = TFConv2d(in_channels, in_channels, 3, stride, padding=1, depthwise=True)
        self.pointwise1 = TFConv2d(in_channels, mid_channels, 1, relu=True)
        self.depthwise2 = TFConv2d(mid_channels, mid_channels, 3, padding=1, depthwise=True)
        self.pointwise2 = TFConv2d(mid_channels, out_channels, 1, relu=not self.residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pointwise2(self.depthwise2(self.pointwise1(self.depthwise1(x))))
        return F.relu(x + y) if self.residual else y

    def layers(self) -> list[nn.Module]:
        return [self.depthwise1, self.pointwise1, self.depthwise2, self.pointwise2]


class _Head(nn.Module):
    """1×1 conv, stride-2 depthwise 3×3, depth-to-space ×2, flattened to (N, cells, values)."""

    def __init__(self, in_channels: int, values_per_cell: int):
        super().__init__()
        self.values_per_cell = values_per_cell
        self.project = TFConv2d(in_channels, 4 * values_per_cell, 1)
        self.depthwise = TFConv2d(4 * values_per_cell, 4 * values_per_cell, 3, 2, padding=1, depthwise=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = depth_to_space_nhwc(self.depthwise(self.project(x)), 2)
        return x.reshape(x.shape[0], -1, self.values_per_cell)

    def layers(self) -> list[nn.Module]:
        return [self.project, self.depthwise]


class BlazeFaceFullRange(nn.Module):
    def __init__(self, config: FullRangeConfig | None = None):
        super().__init__()
        self.config = config = config or FullRangeConfig()
        self.stem = TFConv2d(3, config.stem_channels, 3, 2, padding=1, relu=True)
        channels = config.stem_channels
        self.encoder = nn.ModuleList()
        self.laterals = nn.ModuleDict()
        for index, stage in enumerate(config.encoder):
            blocks = []
            if stage.downsample:
                blocks.append(Bottleneck(channels, stage.mid_channels, stage.out_channels, stride=2))
            elif channels != stage.out_channels:
                raise ValueError("an encoder stage without downsampling keeps its width")
            channels = stage.out_channels
            blocks += [Bottleneck(channels, stage.mid_channels, channels) for _ in range(stage.num_blocks)]
            self.encoder.append(nn.Sequential(*blocks))
            if stage.lateral_channels is not None:
                self.laterals[str(index)] = TFConv2d(channels, stage.lateral_channels, 1, relu=True)
        self.reduce = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in config.decoder:
            self.reduce.append(TFConv2d(channels, level.channels, 1, relu=True))
            blocks = [
                Bottleneck(level.channels, level.mid_channels, level.channels)
                for _ in range(level.num_blocks)
            ]
            self.decoder.append(nn.Sequential(*blocks))
            channels = level.channels
        self.classifier = _Head(channels, config.anchors_per_cell)
        self.regressor = _Head(channels, config.anchors_per_cell * config.num_coords)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(nchw(x))
        skips: list[torch.Tensor] = []
        for index, stage in enumerate(self.encoder):
            x = stage(x)
            if str(index) in self.laterals:
                skips.append(self.laterals[str(index)](x))
        for reduce, stage in zip(self.reduce, self.decoder, strict=True):
            up = F.interpolate(reduce(x), scale_factor=2.0, mode="bilinear", align_corners=False)
            x = stage(skips.pop() + up)
        return self.regressor(x), self.classifier(x)

    def tflite_layer_order(self) -> list[nn.Module]:
        """Weighted layers in the order the `.tflite` graph runs them."""
        layers: list[nn.Module] = [self.stem]
        for index, stage in enumerate(self.encoder):
            for block in cast(nn.Sequential, stage):
                layers += cast(Bottleneck, block).layers()
            if str(index) in self.laterals:
                layers.append(self.laterals[str(index)])
        for reduce, stage in zip(self.reduce, self.decoder, strict=True):
            layers.append(reduce)
            for block in cast(nn.Sequential, stage):
                layers += cast(Bottleneck, block).layers()
        return [*layers, *self.classifier.layers(), *self.regressor.layers()]
