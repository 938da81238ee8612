"""Layers shared by the MediaPipe network ports, with TFLite semantics, and the weight loader.

The modules compute in NCHW (what ONNX Runtime and cuDNN are fastest at); the networks' `forward`
transposes the NHWC input once. TFLite 'SAME' padding is asymmetric for stride 2 (the extra row
and column go at the bottom and right), so convolutions pad explicitly when needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from headforge.errors import AssetError
from headforge.models.tflite_weights import TFLiteGraph


def same_padding(kernel: int, stride: int) -> tuple[int, int]:
    """TFLite 'SAME' padding (before, after) for an input size divisible by the stride."""
    total = max(kernel - stride, 0)
    return total // 2, total - total // 2


class TFConv2d(nn.Module):
    """A 2D convolution (dense or depthwise) with TFLite padding and an optional fused ReLU.

    `padding` is "SAME", "VALID", or an int for a symmetric explicit pad.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int = 1,
        padding: str | int = "SAME",
        depthwise: bool = False,
        relu: bool = False,
    ):
        super().__init__()
        if depthwise and in_channels != out_channels:
            raise ValueError("depthwise convolutions keep the channel count")
        self.depthwise = depthwise
        self.relu = relu
        self.stride = stride
        if isinstance(padding, int):  # an explicit PAD op before a 'VALID' convolution
            before, after = padding, padding
        else:
            before, after = same_padding(kernel, stride) if padding == "SAME" else (0, 0)
        symmetric = before == after
        self.explicit_pad = (0, 0, 0, 0) if symmetric else (before, after, before, after)
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel,
            stride=stride,
            padding=before if symmetric else 0,
            groups=in_channels if depthwise else 1,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.explicit_pad):
            x = F.pad(x, self.explicit_pad)
        x = self.conv(x)
        return F.relu(x) if self.relu else x

    def load_tflite(self, kernel: np.ndarray, bias: np.ndarray) -> None:
        """Copy a TFLite kernel (OHWI, or 1HWC for depthwise) and bias into this layer."""
        weight = kernel.transpose(3, 0, 1, 2) if self.depthwise else kernel.transpose(0, 3, 1, 2)
        _copy(self.conv.weight, weight, "kernel")
        assert self.conv.bias is not None
        _copy(self.conv.bias, bias, "bias")


class ChannelPReLU(nn.PReLU):
    """PReLU with one slope per channel, loaded from TFLite's (1, 1, C) alpha.

    Computed as x + (1 - alpha)·relu(-x), with the negation and the scaling as 1×1 depthwise
    convolutions. That is PReLU exactly (up to float rounding), and it exports to Conv+Relu nodes that
    ONNX Runtime keeps in its blocked NCHWc layout and fuses; its `PRelu` kernel is about ten times
    slower on per-channel slopes and forces layout conversions around every activation.
    """

    negate: torch.Tensor

    def __init__(self, channels: int):
        super().__init__(num_parameters=channels)
        self.register_buffer("negate", -torch.ones(channels, 1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = self.num_parameters
        negative_part = F.relu(F.conv2d(x, self.negate, groups=channels))
        return x + F.conv2d(negative_part, (1.0 - self.weight).view(channels, 1, 1, 1), groups=channels)

    def load_tflite(self, alpha: np.ndarray) -> None:
        _copy(self.weight, alpha.reshape(-1), "alpha")


def add_padded_skip(skip: torch.Tensor, pointwise: TFConv2d, x: torch.Tensor) -> torch.Tensor:
    """`pad_channels(skip) + pointwise(x)` without materialising the zero channels.

    The output channels that meet the skip are computed and summed; the rest are computed alone
    and concatenated. ONNX Runtime fuses the sum into the convolution and keeps everything in its
    NCHWc layout, where an explicit channel `Pad` would force conversions.
    """
    skip_channels = skip.shape[1]
    conv = pointwise.conv
    if skip_channels == conv.out_channels or pointwise.relu or conv.kernel_size != (1, 1):
        return pad_channels(skip, conv.out_channels) + pointwise(x)
    assert conv.bias is not None
    weight, bias = conv.weight, conv.bias
    summed = skip + F.conv2d(x, weight[:skip_channels], bias[:skip_channels])
    extra = F.conv2d(x, weight[skip_channels:], bias[skip_channels:])
    return torch.cat([summed, extra], dim=1)


class DepthwiseResidualBlock(nn.Module):
    """Depthwise 3×3 then pointwise 1×1, added to the (max-pooled, zero-channel-padded) input, then
    ReLU (BlazeFace) or per-channel PReLU (FaceMesh)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, prelu: bool = False):
        super().__init__()
        self.out_channels = out_channels
        self.stride = stride
        self.depthwise = TFConv2d(in_channels, in_channels, 3, stride, depthwise=True)
        self.pointwise = TFConv2d(in_channels, out_channels, 1)
        self.activation: nn.Module = ChannelPReLU(out_channels) if prelu else nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = F.max_pool2d(x, 2) if self.stride == 2 else x
        return self.activation(add_padded_skip(skip, self.pointwise, self.depthwise(x)))

    def layers(self) -> list[nn.Module]:
        """The layers that hold weights, in the order the `.tflite` graph stores them."""
        weighted: list[nn.Module] = [self.depthwise, self.pointwise]
        return [*weighted, self.activation] if isinstance(self.activation, ChannelPReLU) else weighted


def pad_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Append zero channels up to `channels` (TFLite's channel PAD on the residual path)."""
    extra = channels - x.shape[1]
    return F.pad(x, (0, 0, 0, 0, 0, extra)) if extra > 0 else x


def nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def depth_to_space_nhwc(x: torch.Tensor, block: int) -> torch.Tensor:
    """TFLite DEPTH_TO_SPACE (channels ordered row-in-block, column-in-block, channel) of an NCHW
    tensor, returned in NHWC: one transpose does both the rearrangement and the layout change."""
    n, c, h, w = x.shape
    out_channels = c // (block * block)
    x = x.permute(0, 2, 3, 1).reshape(n, h, w, block, block * out_channels)
    x = x.permute(0, 1, 3, 2, 4)
    return x.reshape(n, h * block, w * block, out_channels)


def _copy(parameter: torch.Tensor, value: np.ndarray, what: str) -> None:
    if tuple(parameter.shape) != value.shape:
        raise AssetError(f"{what} shape {value.shape} does not fit the module's {tuple(parameter.shape)}")
    with torch.no_grad():
        parameter.copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))


_WEIGHTED_OPS = {"CONV_2D": False, "DEPTHWISE_CONV_2D": True, "PRELU": None}


def load_tflite_weights(layers: Sequence[nn.Module], graph: TFLiteGraph) -> None:
    """Copy weights from the graph's weighted ops, in execution order, into `layers`.

    `layers` lists the module's convolutions and PReLUs in the order the `.tflite` graph runs
    them. Kind, shape, stride and fused activation are checked for every pair, so a layer list
    that drifts from the graph fails loudly instead of loading weights into the wrong place.
    """
    compute = graph.compute_ops()
    relu_inputs = {op.inputs[0] for op in compute if op.opcode == "RELU"}
    ops = [op for op in compute if op.opcode in _WEIGHTED_OPS]
    if len(ops) != len(layers):
        raise AssetError(f"the graph has {len(ops)} weighted ops, the module {len(layers)} layers")
    for position, (op, layer) in enumerate(zip(ops, layers, strict=True)):
        where = f"layer {position} ({op.opcode}, op {op.index})"
        if op.opcode == "PRELU":
            if not isinstance(layer, ChannelPReLU):
                raise AssetError(f"{where}: the module has {type(layer).__name__} here")
            layer.load_tflite(graph.constant(op.inputs[1]))
            continue
        if not isinstance(layer, TFConv2d) or layer.depthwise != _WEIGHTED_OPS[op.opcode]:
            raise AssetError(f"{where}: the module has {type(layer).__name__} here")
        stride = op.options["stride"][0]
        relu = op.options["activation"] == "relu" or op.outputs[0] in relu_inputs
        if stride != layer.stride or relu != layer.relu:
            raise AssetError(f"{where}: stride/activation differ from the module")
        layer.load_tflite(graph.constant(op.inputs[1]), graph.constant(op.inputs[2]))
