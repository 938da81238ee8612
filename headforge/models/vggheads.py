"""VGGHeads (Kupyn et al. 2024): one network that finds every head in a photo and regresses its
FLAME parameters. Our own PyTorch module, written from the layer list of the public training code
(a YOLO-NAS backbone and PAN neck from super-gradients, and DFL heads with six FLAME branches).

Training form: the state-dict keys are those of the VGGHeads training code, so its checkpoints load
with `strict=True` (tests compare against the recorded key lists). `fuse()` performs the partial
re-parameterisation the deployed model uses: each QARepVGG block's 3×3, 1×1 and identity branches
collapse into one 3×3 convolution (`rbr_reparam`), keeping `post_bn`. The fused S/M/L parameter
counts are 17,004,954 / 32,378,236 / 50,442,706 (the paper's Table 9).

Input: float32 NCHW [B, 3, 640, 640] in [0, 1] (see `headforge.pipeline.vggheads` for how a photo
becomes one). Output, as the released graph: the 1000 best of the 8,400 anchors by score, sorted,
before NMS: boxes [B, 1000, 4] (xyxy, 640-canvas pixels), scores [B, 1000, 1] and the 413-d FLAME
vector [B, 1000, 413] laid out as `FLAME_LAYOUT`.

`decode_levels` is the vectorised decoding; `decode_reference` is a plain NumPy version of the same
arithmetic, kept beside it as the test oracle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor, nn

BN_EPS = 1e-6
REG_MAX = 16
INPUT_SIZE = 640
TOP_K = 1000
STRIDES = (8, 16, 32)
NUM_PARAMS = 413
SHAPE_DIM, EXPRESSION_DIM = 300, 100
MESH_OFFSET_Z = 0.05
SCALE_DIVISOR = 0.05  # scale = exp(raw) / 0.05 · stride (pixels per FLAME unit)

# The consumer layout of the 413-d vector (after the channel permutation, see `decode_levels`).
FLAME_LAYOUT: dict[str, slice] = {
    "shape": slice(0, 300),
    "expression": slice(300, 400),
    "jaw": slice(400, 403),
    "rotation_6d": slice(403, 409),
    "translation": slice(409, 412),
    "scale": slice(412, 413),
}

Variant = Literal["s", "m", "l"]
VARIANTS: tuple[Variant, ...] = ("s", "m", "l")


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class StageConfig:
    out_channels: int
    blocks: int
    hidden: int
    concat_intermediates: bool


@dataclass(frozen=True)
class NeckStageConfig:
    out_channels: int
    blocks: int
    hidden: int


@dataclass(frozen=True)
class HeadConfig:
    bbox_inter: int
    flame_inter: int
    flame_blocks: int
    shape_inter: int
    shape_out: int
    expression_inter: int
    expression_out: int
    transform_inter: int
    stride: int


@dataclass(frozen=True)
class VGGHeadsConfig:
    name: Variant
    stem: int
    stages: tuple[StageConfig, StageConfig, StageConfig, StageConfig]
    necks: tuple[NeckStageConfig, NeckStageConfig, NeckStageConfig, NeckStageConfig]
    heads: tuple[HeadConfig, HeadConfig, HeadConfig]
    spp_kernels: tuple[int, int, int] = (5, 9, 13)
    input_size: int = INPUT_SIZE
    top_k: int = TOP_K


def _heads(
    bbox: tuple[int, int, int],
    flame: tuple[int, int, int],
    blocks: int,
    shape: tuple[int, int],
    expression: tuple[int, int],
    transform: int,
) -> tuple[HeadConfig, HeadConfig, HeadConfig]:
    made = [
        HeadConfig(b, f, blocks, shape[0], shape[1], expression[0], expression[1], transform, stride)
        for b, f, stride in zip(bbox, flame, STRIDES, strict=True)
    ]
    return made[0], made[1], made[2]


# Widths after the configs' width multipliers (S, M: 0.75; L: 1), as the key lists record them.
CONFIGS: dict[Variant, VGGHeadsConfig] = {
    "s": VGGHeadsConfig(
        "s", 48,
        (StageConfig(96, 2, 32, False), StageConfig(192, 3, 64, False),
         StageConfig(384, 5, 96, False), StageConfig(768, 2, 192, False)),
        (NeckStageConfig(192, 2, 64), NeckStageConfig(96, 2, 48),
         NeckStageConfig(192, 2, 64), NeckStageConfig(384, 2, 64)),
        _heads((96, 192, 384), (96, 384, 384), 2, (128, 64), (64, 32), 16),
    ),
    "m": VGGHeadsConfig(
        "m", 48,
        (StageConfig(96, 2, 64, True), StageConfig(192, 3, 128, True),
         StageConfig(384, 5, 256, True), StageConfig(768, 2, 384, False)),
        (NeckStageConfig(192, 2, 192), NeckStageConfig(96, 3, 64),
         NeckStageConfig(192, 2, 192), NeckStageConfig(384, 3, 256)),
        _heads((192, 192, 192), (192, 192, 192), 2, (128, 64), (64, 32), 16),
    ),
    "l": VGGHeadsConfig(
        "l", 48,
        (StageConfig(96, 2, 96, True), StageConfig(192, 3, 128, True),
         StageConfig(384, 5, 256, True), StageConfig(768, 2, 512, True)),
        (NeckStageConfig(192, 4, 128), NeckStageConfig(96, 4, 128),
         NeckStageConfig(192, 4, 128), NeckStageConfig(384, 4, 256)),
        _heads((128, 256, 512), (256, 256, 256), 3, (256, 128), (128, 64), 32),
    ),
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Building blocks (key names follow the training code)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class ConvBN(nn.Module):
    """Conv (no bias) → BN → ReLU; keys `conv`, `bn`."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
        self.bn = _bn(cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class ConvBNReLU(nn.Module):
    """The same layer under `seq.conv`, `seq.bn` (the heads' stems and 3×3 towers)."""

    def __init__(self, cin: int, cout: int, kernel: int):
        super().__init__()
        self.seq = nn.Sequential()
        self.seq.add_module("conv", nn.Conv2d(cin, cout, kernel, 1, kernel // 2, bias=False))
        self.seq.add_module("bn", _bn(cout))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.seq(x))


class QARepVGG(nn.Module):
    """ReLU(post_bn(bn(conv3×3(x)) + α·conv1×1(x) + [x])). After `fuse()`: ReLU(post_bn(rbr_reparam(x)))."""

    def __init__(self, cin: int, cout: int, stride: int = 1, *, residual: bool = False, alpha: bool = False):
        super().__init__()
        self.stride = stride
        self.has_identity = residual and cin == cout and stride == 1
        self.has_alpha = alpha
        if alpha:
            self.alpha = nn.Parameter(torch.ones(1))
        self.branch_3x3 = nn.Sequential()
        self.branch_3x3.add_module("conv", nn.Conv2d(cin, cout, 3, stride, 1, bias=False))
        self.branch_3x3.add_module("bn", _bn(cout))
        self.branch_1x1 = nn.Conv2d(cin, cout, 1, stride, 0, bias=True)
        self.post_bn = _bn(cout)
        self.rbr_reparam = nn.Conv2d(cin, cout, 3, stride, 1, bias=True)  # unused until fused
        self.fused = False

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            return F.relu(self.post_bn(self.rbr_reparam(x)))
        y = self.branch_3x3(x)
        y = y + (self.alpha * self.branch_1x1(x) if self.has_alpha else self.branch_1x1(x))
        if self.has_identity:
            y = y + x
        return F.relu(self.post_bn(y))

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold the three branches into `rbr_reparam` (exact in eval mode); drop them."""
        if self.fused:
            return
        conv, bn = self.branch_3x3[0], self.branch_3x3[1]
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        assert bn.running_var is not None and bn.running_mean is not None
        gain = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        kernel = conv.weight * gain.reshape(-1, 1, 1, 1)
        bias = bn.bias - bn.running_mean * gain
        alpha = self.alpha if self.has_alpha else torch.ones(1, device=kernel.device)
        kernel = kernel + alpha * F.pad(self.branch_1x1.weight, [1, 1, 1, 1])
        assert self.branch_1x1.bias is not None
        bias = bias + alpha * self.branch_1x1.bias
        if self.has_identity:
            eye = torch.zeros_like(kernel)
            index = torch.arange(kernel.shape[0], device=kernel.device)
            eye[index, index, 1, 1] = 1.0
            kernel = kernel + eye
        self.rbr_reparam.weight.copy_(kernel)
        assert self.rbr_reparam.bias is not None
        self.rbr_reparam.bias.copy_(bias)
        del self.branch_3x3, self.branch_1x1
        if self.has_alpha:
            del self.alpha
        self.fused = True


class Bottleneck(nn.Module):
    """α·x + cv2(cv1(x)); keys `alpha`, `cv1`, `cv2`."""

    def __init__(self, channels: int, repvgg: bool):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1))
        self.cv1: nn.Module
        self.cv2: nn.Module
        if repvgg:
            self.cv1 = QARepVGG(channels, channels, residual=True)
            self.cv2 = QARepVGG(channels, channels, residual=True)
        else:
            self.cv1 = ConvBN(channels, channels, 3)
            self.cv2 = ConvBN(channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.alpha * x + self.cv2(self.cv1(x))


class CSPLayer(nn.Module):
    """conv3(cat(path, conv2(x))), path = bottlenecks over conv1(x) (all intermediates, or the last)."""

    def __init__(self, cin: int, cout: int, blocks: int, hidden: int, concat: bool, repvgg: bool = True):
        super().__init__()
        self.concat = concat
        self.conv1 = ConvBN(cin, hidden)
        self.conv2 = ConvBN(cin, hidden)
        self.conv3 = ConvBN(hidden * (2 + (blocks if concat else 0)), cout)
        self.bottlenecks = nn.Sequential(*[Bottleneck(hidden, repvgg) for _ in range(blocks)])

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv1(x)
        parts = [y]
        for block in self.bottlenecks:
            y = block(y)
            parts.append(y)
        path = parts if self.concat else [y]
        return self.conv3(torch.cat([*path, self.conv2(x)], dim=1))


class Stem(nn.Module):
    def __init__(self, cout: int):
        super().__init__()
        self.conv = QARepVGG(3, cout, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Stage(nn.Module):
    def __init__(self, cin: int, config: StageConfig):
        super().__init__()
        self.downsample = QARepVGG(cin, config.out_channels, stride=2)
        self.blocks = CSPLayer(
            config.out_channels,
            config.out_channels,
            config.blocks,
            config.hidden,
            config.concat_intermediates,
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class SPP(nn.Module):
    def __init__(self, channels: int, kernels: tuple[int, ...]):
        super().__init__()
        hidden = channels // 2
        self.kernels = kernels
        self.cv1 = ConvBN(channels, hidden)
        self.cv2 = ConvBN(hidden * (len(kernels) + 1), channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.cv1(x)
        pooled = [F.max_pool2d(x, k, 1, k // 2) for k in self.kernels]
        return self.cv2(torch.cat([x, *pooled], dim=1))


class Backbone(nn.Module):
    def __init__(self, config: VGGHeadsConfig):
        super().__init__()
        self.stem = Stem(config.stem)
        widths = [config.stem, *(s.out_channels for s in config.stages)]
        self.stage1 = Stage(widths[0], config.stages[0])
        self.stage2 = Stage(widths[1], config.stages[1])
        self.stage3 = Stage(widths[2], config.stages[2])
        self.stage4 = Stage(widths[3], config.stages[3])
        self.context_module = SPP(widths[4], config.spp_kernels)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c2 = self.stage1(self.stem(x))
        c3 = self.stage2(c2)
        c4 = self.stage3(c3)
        c5 = self.context_module(self.stage4(c4))
        return c2, c3, c4, c5


class UpStage(nn.Module):
    """Upsample x, join two reduced skips (the finer one strided down), CSP; returns (conv(x), out)."""

    def __init__(self, cin: int, skip1: int, skip2: int, config: NeckStageConfig):
        super().__init__()
        out = config.out_channels
        self.reduce_skip1 = ConvBN(skip1, out)
        self.reduce_skip2 = ConvBN(skip2, out)
        self.conv = ConvBN(cin, out)
        self.upsample = nn.ConvTranspose2d(out, out, 2, 2)
        self.downsample = ConvBN(out, out, 3, 2)
        self.reduce_after_concat = ConvBN(3 * out, out)
        self.blocks = CSPLayer(out, out, config.blocks, config.hidden, False)

    def forward(self, x: Tensor, skip1: Tensor, skip2: Tensor) -> tuple[Tensor, Tensor]:
        inter = self.conv(x)
        joined = torch.cat(
            [self.upsample(inter), self.reduce_skip1(skip1), self.downsample(self.reduce_skip2(skip2))], dim=1
        )
        return inter, self.blocks(self.reduce_after_concat(joined))


class DownStage(nn.Module):
    def __init__(self, cin: int, skip: int, config: NeckStageConfig):
        super().__init__()
        out = config.out_channels
        self.conv = ConvBN(cin, out // 2, 3, 2)
        self.blocks = CSPLayer(out // 2 + skip, out, config.blocks, config.hidden, False, repvgg=False)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.blocks(torch.cat([self.conv(x), skip], dim=1))


class Neck(nn.Module):
    def __init__(self, config: VGGHeadsConfig):
        super().__init__()
        c2, c3, c4, c5 = (s.out_channels for s in config.stages)
        n1, n2, n3, n4 = config.necks
        self.neck1 = UpStage(c5, c4, c3, n1)
        self.neck2 = UpStage(n1.out_channels, c3, c2, n2)
        self.neck3 = DownStage(n2.out_channels, n2.out_channels, n3)
        self.neck4 = DownStage(n3.out_channels, n1.out_channels, n4)

    def forward(self, c2: Tensor, c3: Tensor, c4: Tensor, c5: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        inter1, x = self.neck1(c5, c4, c3)
        inter2, p3 = self.neck2(x, c3, c2)
        p4 = self.neck3(p3, inter2)
        p5 = self.neck4(p4, inter1)
        return p3, p4, p5

    @property
    def out_channels(self) -> tuple[int, int, int]:
        return (
            self.neck2.blocks.conv3.conv.out_channels,
            self.neck3.blocks.conv3.conv.out_channels,
            self.neck4.blocks.conv3.conv.out_channels,
        )


class FlameBranch(nn.Sequential):
    """`flame_*_pred.{0..n-1}` QARepVGG blocks (α on, no identity) and `.{n}` a 1×1 conv."""

    def __init__(self, cin: int, inter: int, blocks: int, cout: int):
        layers: list[nn.Module] = []
        for _ in range(blocks):
            layers.append(QARepVGG(cin, inter, alpha=True))
            cin = inter
        layers.append(nn.Conv2d(inter, cout, 1))
        super().__init__(*layers)


class Head(nn.Module):
    """One stride's head: DFL box logits [B,68,H,W], score logit [B,1,H,W] and the six FLAME
    branches' raw outputs concatenated in the head's own order [B, k_shape+k_expr+16, H, W]:
    shape, expression, rotation (6), jaw (3), translation (3), scale (1)."""

    def __init__(self, cin: int, config: HeadConfig):
        super().__init__()
        self.stride = config.stride
        self.pose_stem = ConvBNReLU(cin, config.flame_inter, 1)
        self.bbox_stem = ConvBNReLU(cin, config.bbox_inter, 1)
        self.cls_convs = nn.Sequential(ConvBNReLU(config.bbox_inter, config.bbox_inter, 3))
        self.reg_convs = nn.Sequential(ConvBNReLU(config.bbox_inter, config.bbox_inter, 3))
        self.reg_pred = nn.Conv2d(config.bbox_inter, 4 * (REG_MAX + 1), 1)
        self.cls_pred = nn.Conv2d(config.bbox_inter, 1, 1)
        f, n, t = config.flame_inter, config.flame_blocks, config.transform_inter
        self.flame_shape_pred = FlameBranch(f, config.shape_inter, n, config.shape_out)
        self.flame_expression_pred = FlameBranch(f, config.expression_inter, n, config.expression_out)
        self.flame_rotation_pred = FlameBranch(f, t, n, 6)
        self.flame_jaw_pred = FlameBranch(f, t, n, 3)
        self.flame_scale_pred = FlameBranch(f, t, n, 1)
        self.flame_translation_pred = FlameBranch(f, t, n, 3)
        assert self.cls_pred.bias is not None
        nn.init.constant_(self.cls_pred.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        pose = self.pose_stem(x)
        box = self.bbox_stem(x)
        reg = self.reg_pred(self.reg_convs(box))
        cls = self.cls_pred(self.cls_convs(box))
        flame = torch.cat(
            [
                self.flame_shape_pred(pose),
                self.flame_expression_pred(pose),
                self.flame_rotation_pred(pose),
                self.flame_jaw_pred(pose),
                self.flame_translation_pred(pose),
                self.flame_scale_pred(pose),
            ],
            dim=1,
        )
        return reg, cls, flame


class Heads(nn.Module):
    def __init__(self, in_channels: tuple[int, int, int], config: VGGHeadsConfig):
        super().__init__()
        self.head1 = Head(in_channels[0], config.heads[0])
        self.head2 = Head(in_channels[1], config.heads[1])
        self.head3 = Head(in_channels[2], config.heads[2])
        self.register_buffer("proj_conv", torch.arange(REG_MAX + 1, dtype=torch.float32), persistent=False)
        points, strides = anchor_grid(config.input_size)
        self.register_buffer("anchor_points", torch.from_numpy(points), persistent=False)
        self.register_buffer("stride_tensor", torch.from_numpy(strides), persistent=False)

    def forward(self, p3: Tensor, p4: Tensor, p5: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        return [self.head1(p3), self.head2(p4), self.head3(p5)]


# --------------------------------------------------------------------------------------------
# The network


class VGGHeads(nn.Module):
    """The whole network; `forward` returns the pre-NMS top-k (boxes, scores, flame)."""

    def __init__(self, config: VGGHeadsConfig):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.neck = Neck(config)
        self.heads = Heads(self.neck.out_channels, config)

    @property
    def fused(self) -> bool:
        return all(m.fused for m in self.modules() if isinstance(m, QARepVGG))

    def fuse(self) -> VGGHeads:
        """Partial re-parameterisation of every QARepVGG block (see the module docstring)."""
        for module in self.modules():
            if isinstance(module, QARepVGG):
                module.fuse()
        return self

    def raw(self, x: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per-level head outputs (reg logits, score logit, FLAME branch outputs) before decoding."""
        return self.heads(*self.neck(*self.backbone(x)))

    def decode_all(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Every anchor decoded: boxes [B,A,4], scores [B,A,1], flame [B,A,413]."""
        heads = self.heads
        buffers = (heads.anchor_points, heads.stride_tensor, heads.proj_conv)
        points, strides, proj = (b for b in buffers if isinstance(b, Tensor))
        return decode_levels(self.raw(x), self.config, points, strides, proj)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        boxes, scores, flame = self.decode_all(x)
        k = min(self.config.top_k, scores.shape[1])
        top, index = torch.topk(scores[..., 0], k, dim=1, sorted=True)
        boxes = torch.gather(boxes, 1, index.unsqueeze(-1).expand(-1, -1, 4))
        flame = torch.gather(flame, 1, index.unsqueeze(-1).expand(-1, -1, flame.shape[-1]))
        return boxes, top.unsqueeze(-1), flame


def build(
    variant: Variant | str, *, fused: bool = False, device: str | torch.device | None = None
) -> VGGHeads:
    """A VGGHeads network of the variant in eval mode (default PyTorch init), fused if asked.
    `device="meta"` builds it without allocating weights (for shapes and counts)."""
    config = CONFIGS[variant]  # type: ignore[index]
    with torch.device(device or "cpu"):
        model = VGGHeads(config)
    if fused:
        model.fuse()
    return model.eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Decoding (vectorised, used by the network and its ONNX export)


def anchor_grid(size: int = INPUT_SIZE) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Anchor points (x+0.5, y+0.5) in grid units, row-major per level, levels in stride order,
    and each anchor's stride; [A, 2] and [A, 1] with A = Σ (size/stride)²."""
    points, strides = [], []
    for stride in STRIDES:
        cells = size // stride
        ys, xs = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
        points.append(np.stack([xs.ravel(), ys.ravel()], axis=1) + 0.5)
        strides.append(np.full((cells * cells, 1), stride))
    return np.concatenate(points).astype(np.float32), np.concatenate(strides).astype(np.float32)


def decode_levels(
    levels: list[tuple[Tensor, Tensor, Tensor]],
    config: VGGHeadsConfig,
    anchor_points: Tensor,
    stride_tensor: Tensor,
    proj: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Head outputs → boxes, scores and the 413-d FLAME vectors of every anchor.

    - boxes: DFL (softmax over 17 bins per side, expectation) gives l,t,r,b in grid units; the box
      is (anchor − lt, anchor + rb)·stride.
    - scores: sigmoid of the logit.
    - FLAME: shape and expression are tanh·3, zero-padded to 300/100; the scale is
      exp(raw)/0.05·stride; translation x, y get the anchor centre in pixels added. The head emits
      [shape, expr, rot6, jaw3, trans3, scale], which the training code reads back as
      [shape, expr, jaw3, rot6, trans3, scale]; the net effect on the final vector is
      jaw = rotation-branch ch 3–5, rotation_6d = (jaw-branch ch 0–2, rotation-branch ch 0–2).
    """
    batch = levels[0][0].shape[0]
    regs, logits, flames = [], [], []
    for (reg, cls, flame), head in zip(levels, config.heads, strict=True):
        regs.append(reg.flatten(2))
        logits.append(cls.flatten(2))
        flames.append(flame.flatten(2))
        del head
    reg = torch.cat(regs, dim=2).reshape(batch, 4, REG_MAX + 1, -1)  # [B,4,17,A]
    distance = (reg.softmax(dim=2) * proj.reshape(1, 1, -1, 1)).sum(dim=2).permute(0, 2, 1)  # [B,A,4]
    lt, rb = distance[..., :2], distance[..., 2:]
    boxes = torch.cat([anchor_points - lt, anchor_points + rb], dim=-1) * stride_tensor
    scores = torch.cat(logits, dim=2).permute(0, 2, 1).sigmoid()
    raw = torch.cat(flames, dim=2).permute(0, 2, 1)  # [B,A,k_s+k_e+16]
    ks, ke = config.heads[0].shape_out, config.heads[0].expression_out
    shape = torch.tanh(raw[..., :ks]) * 3
    expression = torch.tanh(raw[..., ks : ks + ke]) * 3
    rest = raw[..., ks + ke :]
    rotation, jaw, translation, scale_raw = rest[..., 0:6], rest[..., 6:9], rest[..., 9:12], rest[..., 12:13]
    centres = anchor_points * stride_tensor
    translation = torch.cat([translation[..., :2] + centres, translation[..., 2:]], dim=-1)
    scale = torch.exp(scale_raw) / SCALE_DIVISOR * stride_tensor
    zeros = raw.new_zeros(())
    flame = torch.cat(
        [
            shape,
            zeros.expand(*shape.shape[:-1], SHAPE_DIM - ks),
            expression,
            zeros.expand(*shape.shape[:-1], EXPRESSION_DIM - ke),
            rotation[..., 3:6],  # → jaw
            jaw[..., 0:3],  # → a1
            rotation[..., 0:3],  # → a2
            translation,
            scale,
        ],
        dim=-1,
    )
    return boxes, scores, flame


# --------------------------------------------------------------------------------------------
# Plain NumPy reference of the same decoding (the test oracle; loops instead of broadcasting)


def decode_reference(
    levels: list[tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]],
    config: VGGHeadsConfig,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Decode one level list anchor by anchor, in float64, following the training code's steps
    literally: build the head-order vector, read it back in from_3dmm order (jaw before the 6D
    rotation), write it out in to_3dmm order (rotation before jaw)."""
    ks, ke = config.heads[0].shape_out, config.heads[0].expression_out
    batch = levels[0][0].shape[0]
    boxes, scores, flames = [], [], []
    for b in range(batch):
        for (reg, cls, flame), head in zip(levels, config.heads, strict=True):
            height, width = cls.shape[2:]
            for y in range(height):
                for x in range(width):
                    ax, ay = x + 0.5, y + 0.5
                    bins = reg[b, :, y, x].astype(np.float64).reshape(4, REG_MAX + 1)
                    prob = np.exp(bins - bins.max(axis=1, keepdims=True))
                    prob /= prob.sum(axis=1, keepdims=True)
                    left, top, right, bottom = prob @ np.arange(REG_MAX + 1)
                    s = head.stride
                    boxes.append([(ax - left) * s, (ay - top) * s, (ax + right) * s, (ay + bottom) * s])
                    scores.append([1.0 / (1.0 + math.exp(-float(cls[b, 0, y, x])))])
                    v = flame[b, :, y, x].astype(np.float64)
                    head_order = np.concatenate(
                        [
                            np.pad(3 * np.tanh(v[:ks]), (0, SHAPE_DIM - ks)),
                            np.pad(3 * np.tanh(v[ks : ks + ke]), (0, EXPRESSION_DIM - ke)),
                            v[ks + ke : ks + ke + 12],  # rot6, jaw3, trans3 in head order
                            [math.exp(v[ks + ke + 12]) * s / SCALE_DIVISOR],
                        ]
                    )
                    # from_3dmm: shape, expr, jaw (3), rotation (6), translation, scale
                    read_jaw, read_rotation = head_order[400:403], head_order[403:409]
                    translation = head_order[409:412].copy()
                    translation[0] += ax * s
                    translation[1] += ay * s
                    # to_3dmm_tensor: shape, expr, rotation, jaw, translation, scale
                    flames.append(
                        np.concatenate(
                            [head_order[:400], read_rotation, read_jaw, translation, head_order[412:413]]
                        )
                    )
    count = len(scores) // batch
    return (
        np.array(boxes).reshape(batch, count, 4),
        np.array(scores).reshape(batch, count, 1),
        np.array(flames).reshape(batch, count, NUM_PARAMS),
    )


# --------------------------------------------------------------------------------------------
# Seeded random weights (tests, benchmarks, plumbing: never presented as results)


@torch.no_grad()
def seeded_random(variant: Variant | str, seed: int = 0, *, calibration: Tensor | None = None) -> VGGHeads:
    """An unfused network with seeded random weights whose activations stay in range.

    Convolutions keep PyTorch's seeded default init; BN affine parameters and the α scalars are
    drawn near 1/0; then one forward pass in training mode over `calibration` (a smooth and a
    white-noise seeded random image if None) sets every BN's running statistics to that pass's statistics, so the
    eval-mode network neither explodes nor collapses over its ~70 blocks.
    """
    torch.manual_seed(seed)
    model = build(variant)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.2, 0.2)
            module.momentum = None  # cumulative average: one pass gives exactly its statistics
        elif isinstance(module, QARepVGG | Bottleneck) and hasattr(module, "alpha"):
            module.alpha.uniform_(0.5, 1.5)
    if calibration is None:  # one smooth image and one of white noise: both stay in range after
        generator = torch.Generator().manual_seed(seed)
        size = model.config.input_size
        coarse = torch.rand(1, 3, 20, 20, generator=generator)
        smooth = F.interpolate(coarse, size=size, mode="bilinear")
        calibration = torch.cat([smooth, torch.rand(1, 3, size, size, generator=generator)])
    model.train()
    model.raw(calibration)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    return model.eval()
