"""A DINOv2 vision transformer with register tokens (ViT-B/14-reg by default), as KaoLRM embeds it.

Our own module; its parameter names follow the published DINOv2 state dict, so a checkpoint's
`encoder.model.*` tensors load into `Dinov2Encoder.model` with strict key matching:
`cls_token`, `register_tokens`, `pos_embed` (a 37 × 37 grid for img_size 518, plus CLS),
`patch_embed.proj`, `blocks.K.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}`
and the final `norm`. There is no `mask_token` (KaoLRM removed it).

The forward pass: patchify, prepend CLS, add the position embedding (bicubic-resampled to the input's
patch grid), insert the registers after CLS, run the pre-norm blocks (LayerScale on both branches),
apply the final LayerNorm and return CLS followed by the patch tokens; the registers are dropped.
The position embedding is resampled with `scale_factor` (not `size`), antialiased and with offset 0,
which is how the register models call it. The input is RGB in [0, 1] with no mean/std normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Width, depth and heads of the DINOv2 backbones, by hub name.
BACKBONES: dict[str, tuple[int, int, int]] = {
    "dinov2_vits14_reg": (384, 12, 6),
    "dinov2_vitb14_reg": (768, 12, 12),
    "dinov2_vitl14_reg": (1024, 24, 16),
}


@dataclass(frozen=True)
class Dinov2Config:
    """Dimensions of the ViT; the defaults are ViT-B/14 with 4 registers."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 14
    img_size: int = 518
    num_register_tokens: int = 4
    interpolate_offset: float = 0.0
    interpolate_antialias: bool = True
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

    @property
    def grid(self) -> int:
        """Side of the position-embedding grid the weights were trained at (37 for 518/14)."""
        return self.img_size // self.patch_size

    @classmethod
    def from_name(cls, name: str, embed_dim: int | None = None) -> Dinov2Config:
        """The config of a hub backbone name such as `dinov2_vitb14_reg`."""
        if name not in BACKBONES:
            raise ValueError(f"unknown DINOv2 backbone {name!r} (known: {', '.join(sorted(BACKBONES))})")
        width, depth, heads = BACKBONES[name]
        return cls(embed_dim=embed_dim or width, depth=depth, num_heads=heads)


class PatchEmbed(nn.Module):
    """Non-overlapping patches → tokens (N, H/p · W/p, D)."""

    def __init__(self, config: Dinov2Config) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, config.embed_dim, config.patch_size, stride=config.patch_size)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.proj(image).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a packed qkv projection (bias on) and an output projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale on the attention and MLP branches."""

    def __init__(self, config: Dinov2Config) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=config.eps)
        self.attn = Attention(dim, config.num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=config.eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class Dinov2(nn.Module):
    """The ViT itself: image (N, 3, H, W) in [0, 1] → normed tokens (N, 1 + H/14 · W/14, D)."""

    def __init__(self, config: Dinov2Config | None = None) -> None:
        super().__init__()
        self.config = config = config or Dinov2Config()
        dim = config.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, config.grid**2 + 1, dim) * 0.02)
        self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, dim))
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(dim, eps=config.eps)

    def interpolated_pos_embed(self, height: int, width: int) -> torch.Tensor:
        """The position embedding resampled to an input of `height` × `width` pixels: (1, 1 + h·w, D)."""
        config = self.config
        rows, cols = height // config.patch_size, width // config.patch_size
        if rows == cols == config.grid:
            return self.pos_embed
        grid = config.grid
        patch = self.pos_embed[:, 1:].float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        scale = ((rows + config.interpolate_offset) / grid, (cols + config.interpolate_offset) / grid)
        resized = F.interpolate(
            patch, scale_factor=scale, mode="bicubic", antialias=config.interpolate_antialias
        )
        if resized.shape[-2:] != (rows, cols):  # float rounding of scale × grid
            raise ValueError(f"position grid resampled to {tuple(resized.shape[-2:])}, wanted {(rows, cols)}")
        patch_tokens = resized.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([self.pos_embed[:, :1], patch_tokens.to(self.pos_embed.dtype)], dim=1)

    def forward(self, image: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        """`pos_embed` may be given precomputed (`interpolated_pos_embed`) for a fixed input size."""
        batch = image.shape[0]
        if pos_embed is None:
            pos_embed = self.interpolated_pos_embed(int(image.shape[2]), int(image.shape[3]))
        x = torch.cat([self.cls_token.expand(batch, -1, -1), self.patch_embed(image)], dim=1) + pos_embed
        registers = self.register_tokens.expand(batch, -1, -1)
        x = torch.cat([x[:, :1], registers, x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        skip = 1 + self.config.num_register_tokens
        return torch.cat([x[:, :1], x[:, skip:]], dim=1)


class Dinov2Encoder(nn.Module):
    """KaoLRM's wrapper: holds the ViT as `.model`, so its keys are `encoder.model.*`."""

    def __init__(self, config: Dinov2Config | None = None) -> None:
        super().__init__()
        self.model = Dinov2(config)

    def forward(self, image: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(image, pos_embed)
