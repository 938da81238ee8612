"""MediaPipe FaceMesh (468 3D landmarks + face presence) as a PyTorch module.

Input: NHWC float32 in [0, 1], 192×192. Outputs, as the `.tflite` orders them:
`landmarks (N, 1, 1, 1404)` (x, y, z per point in input pixels) and `face_flag (N, 1, 1, 1)` (a logit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from headforge.models.layers import ChannelPReLU, DepthwiseResidualBlock, TFConv2d, nchw, nhwc


@dataclass(frozen=True)
class FaceMeshConfig:
    input_size: int = 192
    stem_channels: int = 16
    # (out_channels, stride) per residual block of the shared trunk (ends at 6×6).
    trunk: tuple[tuple[int, int], ...] = (
        (16, 1), (16, 1), (32, 2), (32, 1), (32, 1), (64, 2), (64, 1), (64, 1),
        (128, 2), (128, 1), (128, 1), (128, 2), (128, 1), (128, 1),
    )  # fmt: skip
    # The landmark branch continues the trunk at 6×6 with these blocks before its head.
    landmark_blocks: tuple[tuple[int, int], ...] = ((128, 2), (128, 1), (128, 1))
    # The face-presence branch starts from the trunk's 6×6 output.
    presence_blocks: tuple[tuple[int, int], ...] = ((128, 2),)
    head_channels: int = 32
    num_landmarks: int = 468


class _Head(nn.Module):
    """PReLU blocks, a 1×1 reduction with PReLU, one more block, and a 3×3 'VALID' conv to 1×1."""

    def __init__(
        self, in_channels: int, blocks: tuple[tuple[int, int], ...], head_channels: int, outputs: int
    ):
        super().__init__()
        self.blocks = nn.ModuleList()
        for out_channels, stride in blocks:
            self.blocks.append(DepthwiseResidualBlock(in_channels, out_channels, stride, prelu=True))
            in_channels = out_channels
        self.reduce = TFConv2d(in_channels, head_channels, 1)
        self.reduce_activation = ChannelPReLU(head_channels)
        self.refine = DepthwiseResidualBlock(head_channels, head_channels, 1, prelu=True)
        self.output = TFConv2d(head_channels, outputs, 3, 3, padding="VALID")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        x = self.refine(self.reduce_activation(self.reduce(x)))
        return nhwc(self.output(x))

    def layers(self) -> list[nn.Module]:
        layers: list[nn.Module] = []
        for block in self.blocks:
            layers += cast(DepthwiseResidualBlock, block).layers()
        return [*layers, self.reduce, self.reduce_activation, *self.refine.layers(), self.output]


class FaceMesh(nn.Module):
    def __init__(self, config: FaceMeshConfig | None = None):
        super().__init__()
        self.config = config = config or FaceMeshConfig()
        self.stem = TFConv2d(3, config.stem_channels, 3, 2)
        self.stem_activation = ChannelPReLU(config.stem_channels)
        channels = config.stem_channels
        self.trunk = nn.ModuleList()
        for out_channels, stride in config.trunk:
            self.trunk.append(DepthwiseResidualBlock(channels, out_channels, stride, prelu=True))
            channels = out_channels
        self.landmarks = _Head(
            channels, config.landmark_blocks, config.head_channels, 3 * config.num_landmarks
        )
        self.presence = _Head(channels, config.presence_blocks, config.head_channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem_activation(self.stem(nchw(x)))
        for block in self.trunk:
            x = block(x)
        return self.landmarks(x), self.presence(x)

    def tflite_layer_order(self) -> list[nn.Module]:
        """Weighted layers in `.tflite` execution order.

        The graph runs the landmark branch's first two blocks alone, then alternates layer by
        layer between the face-presence branch and the rest of the landmark branch.
        """
        layers: list[nn.Module] = [self.stem, self.stem_activation]
        for block in self.trunk:
            layers += cast(DepthwiseResidualBlock, block).layers()
        landmark = self.landmarks.layers()
        presence = self.presence.layers()
        lead = len(landmark) - len(presence)
        layers += landmark[:lead]
        for presence_layer, landmark_layer in zip(presence, landmark[lead:], strict=True):
            layers += [presence_layer, landmark_layer]
        return layers
