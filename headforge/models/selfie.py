"""MediaPipe's selfie-segmentation network (general model, 256 × 256) as a PyTorch module.

Input: NHWC float32 in [0, 1], 256 × 256 RGB. Output, as the `.tflite` gives it: `mask (N, 256, 256, 1)`,
the probability that a pixel shows a person.

The graph (read from `selfie_segmentation.tflite` in the mediapipe wheel, Apache-2.0) is a
MobileNetV3-style encoder (hard-swish and ReLU inverted residuals, squeeze-excitation gates) down
to 1/16 resolution, an LR-ASPP-like head (a global-pool sigmoid gate over a 1 × 1 ReLU branch), and
a decoder that upsamples ×2 three times, each time mixing in the encoder feature of that size
through a pooled gate and refining with a 1 × 1 and a depthwise 3 × 3 convolution, then a 2 × 2
stride-2 transposed convolution (MediaPipe's custom `Convolution2DTransposeBias`) and a sigmoid.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from headforge.errors import AssetError
from headforge.models.layers import TFConv2d, load_tflite_weights, nchw
from headforge.models.tflite_weights import TFLiteGraph

INPUT_SIZE = 256


class SqueezeExcite(nn.Module):
    """x · sigmoid(W2 relu(W1 mean(x)))."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.reduce = TFConv2d(channels, hidden, 1, padding="VALID", relu=True)
        self.expand = TFConv2d(hidden, channels, 1, padding="VALID")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.expand(self.reduce(x.mean(dim=(2, 3), keepdim=True))))
        return x * gate

    def layers(self) -> list[nn.Module]:
        return [self.reduce, self.expand]


class InvertedResidual(nn.Module):
    """1 × 1 expand → depthwise k × k (stride s) → optional squeeze-excite → 1 × 1 project (+ input)."""

    def __init__(
        self, cin: int, mid: int, cout: int, kernel: int, stride: int, swish: bool, se: int | None
    ) -> None:
        super().__init__()
        self.swish = swish
        self.expand = TFConv2d(cin, mid, 1, relu=not swish)
        self.depthwise = TFConv2d(mid, mid, kernel, stride, depthwise=True, relu=not swish)
        self.se = SqueezeExcite(mid, se) if se else None
        self.project = TFConv2d(mid, cout, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x)
        y = F.hardswish(y) if self.swish else y
        y = self.depthwise(y)
        y = F.hardswish(y) if self.swish else y
        if self.se is not None:
            y = self.se(y)
        y = self.project(y)
        return x + y if self.residual else y

    def layers(self) -> list[nn.Module]:
        return [self.expand, self.depthwise, *(self.se.layers() if self.se else []), self.project]


class FirstBlock(nn.Module):
    """The first block: 1 × 1 ReLU, depthwise 3 × 3 stride 2 ReLU, squeeze-excite, 1 × 1 (no residual)."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = TFConv2d(16, 16, 1, relu=True)
        self.depthwise = TFConv2d(16, 16, 3, 2, depthwise=True, relu=True)
        self.se = SqueezeExcite(16, 8)
        self.project = TFConv2d(16, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.se(self.depthwise(self.expand(x))))

    def layers(self) -> list[nn.Module]:
        return [self.expand, self.depthwise, *self.se.layers(), self.project]


class DecoderStage(nn.Module):
    """Upsampled x and an encoder skip s of the same size: g = gate(s + x); b = s·g + x;
    c = relu(1 × 1 (b)); out = c + relu(depthwise 3 × 3 (c))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gate_reduce = TFConv2d(channels, channels, 1, padding="VALID", relu=True)
        self.gate_expand = TFConv2d(channels, channels, 1, padding="VALID")
        self.mix = TFConv2d(channels, channels, 1, padding="VALID", relu=True)
        self.refine = TFConv2d(channels, channels, 3, depthwise=True, relu=True)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        pooled = (skip + x).mean(dim=(2, 3), keepdim=True)
        gate = torch.sigmoid(self.gate_expand(self.gate_reduce(pooled)))
        mixed = self.mix(skip * gate + x)
        return mixed + self.refine(mixed)

    def layers(self) -> list[nn.Module]:
        return [self.gate_reduce, self.gate_expand, self.mix, self.refine]


class SelfieSegmentation(nn.Module):
    """NHWC (N, 256, 256, 3) in [0, 1] → mask (N, 256, 256, 1) in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = TFConv2d(3, 16, 3, 2)
        self.block1 = FirstBlock()
        self.blocks = nn.ModuleList(
            [
                InvertedResidual(16, 72, 24, 3, 2, swish=False, se=None),
                InvertedResidual(24, 88, 24, 3, 1, swish=False, se=None),
                InvertedResidual(24, 96, 32, 5, 2, swish=True, se=24),
                InvertedResidual(32, 128, 32, 5, 1, swish=True, se=32),
                InvertedResidual(32, 128, 32, 5, 1, swish=True, se=32),
                InvertedResidual(32, 96, 32, 5, 1, swish=True, se=24),
                InvertedResidual(32, 96, 32, 5, 1, swish=True, se=24),
            ]
        )
        self.head_branch = TFConv2d(32, 128, 1, padding="VALID", relu=True)
        self.head_gate = TFConv2d(32, 128, 1, padding="VALID")
        self.up1 = TFConv2d(128, 24, 1, padding="VALID")
        self.stage1 = DecoderStage(24)
        self.up2 = TFConv2d(24, 16, 1, padding="VALID")
        self.stage2 = DecoderStage(16)
        self.up3 = TFConv2d(16, 16, 1, padding="VALID")
        self.stage3 = DecoderStage(16)
        self.final = nn.ConvTranspose2d(16, 1, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nchw(x)
        s128 = F.hardswish(self.stem(x))
        s64 = self.block1(s128)
        y = s64
        skips = []
        for index, block in enumerate(self.blocks):
            y = block(y)
            if index == 1:
                skips.append(y)  # 32 × 32 × 24
        s32 = skips[0]
        gate = torch.sigmoid(self.head_gate(y.mean(dim=(2, 3), keepdim=True)))
        head = self.head_branch(y) * gate
        y = self.stage1(self.up1(_upsample(head)), s32)
        y = self.stage2(self.up2(_upsample(y)), s64)
        y = self.stage3(self.up3(_upsample(y)), s128)
        mask = torch.sigmoid(self.final(y))
        return mask.permute(0, 2, 3, 1)

    def tflite_layer_order(self) -> list[nn.Module]:
        """The convolutions in the order the `.tflite` graph runs them (the transposed one is loaded apart)."""
        layers: list[nn.Module] = [self.stem, *self.block1.layers()]
        for block in self.blocks:
            assert isinstance(block, InvertedResidual)
            layers += block.layers()
        layers += [self.head_branch, self.head_gate, self.up1, *self.stage1.layers()]
        layers += [self.up2, *self.stage2.layers(), self.up3, *self.stage3.layers()]
        return layers

    def load_tflite(self, graph: TFLiteGraph) -> None:
        """All weights: the convolutions by `load_tflite_weights`, then the custom transposed conv."""
        load_tflite_weights(self.tflite_layer_order(), graph)
        custom = [op for op in graph.compute_ops() if op.opcode == "CUSTOM"]
        if len(custom) != 1:
            raise AssetError(f"expected one custom transposed convolution, found {len(custom)}")
        kernel = graph.constant(custom[0].inputs[1])  # (out, kh, kw, in)
        bias = graph.constant(custom[0].inputs[2])
        weight = kernel.transpose(3, 0, 1, 2)  # (in, out, kh, kw)
        if weight.shape != tuple(self.final.weight.shape) or bias.shape != (1,):
            raise AssetError(f"transposed convolution shape {kernel.shape} does not fit the module")
        with torch.no_grad():
            self.final.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)))
            assert self.final.bias is not None
            self.final.bias.copy_(torch.from_numpy(bias.astype(np.float32)))


def _upsample(x: torch.Tensor) -> torch.Tensor:
    """×2 bilinear with half-pixel centres (TFLite RESIZE_BILINEAR, half_pixel_centers=True)."""
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
