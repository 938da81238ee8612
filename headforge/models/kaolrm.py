"""KaoLRM: one face image → an LRM triplane → FLAME parameters and surface-bound 2D Gaussians.

Our own modules, with KaoLRM's parameter names so its `model.safetensors` loads with strict key
matching (facts: `../shared/research/seed-formats.md` §B, checked against the public code):

- `encoder.model.*`: DINOv2 ViT-B/14 with 4 registers (`headforge.models.dinov2`), CLS + 256 patch
  tokens at 224 px;
- `camera_embedder.mlp.{0,2}`: the 16-number source camera (3 × 4 camera-to-world, row-major, then
  fx, fy, cx, cy normalised by the image size) → 1024, SiLU between;
- `pos_embed`: 3 · 32² learned triplane query tokens;
- `transformer.layers.K`: cross-attention to the image tokens, self-attention and an MLP, each behind
  a LayerNorm modulated by the camera embedding (`normK.mlp.1` gives [shift | scale]); attention has
  packed projections and no biases; then `transformer.norm`;
- `upsampler`: a stride-2 transposed convolution per plane → planes (N, 3, 48, 64, 64);
- `flame_decoder.decoder`: the channel mean of the planes (N, 3·64²) → MLP with a channel gate → 160 =
  shape 100 | expression 50 | global + jaw pose 6 | scale 1 (softplus, ≥ 0.1) | translation 3;
- `gaussian_decoder.decoder.net`: the triplane sampled at FLAME surface points → 11 = opacity 1
  (sigmoid) | scales 3 (0.5 · softplus) | quaternion w, x, y, z (normalised) | RGB 3 (sigmoid,
  widened by 0.001 on each side);
- `flame_model.{eye_pose, neck_pose}`: FLAME's frozen pose parameters (zeros); a release very likely
  carries FLAME's own buffers beside them (`FLAME_BUFFERS`), which are optional here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from headforge.models.dinov2 import BACKBONES, Dinov2Config, Dinov2Encoder

IMAGE_SIZE = 224  # KaoLRM's source_image_res
NUM_FLAME_PARAMS = 160
NUM_GAUSSIAN_CHANNELS = 11
PRETRAIN_FOCAL = 0.75  # the focal the LRM triplane was pre-trained with; its box is [-1, 1]^3
SOURCE_CAMERA_DISTANCE = 2.0
# Inference focal per released checkpoint (KaoLRM's configs/infer-base-*.yaml).
SYNTH_FOCAL = {"mono": 20.0, "multiview": 0.75}
# The fixed source camera: c2w [[1,0,0,0],[0,0,-1,-2],[0,1,0,0]] (at (0,-2,0) looking along +Y,
# world +Z up), then fx, fy, cx, cy = 0.75, 0.75, 0.5, 0.5.
SOURCE_CAMERA = (1.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, -SOURCE_CAMERA_DISTANCE, 0.0, 1.0, 0.0, 0.0,
                 PRETRAIN_FOCAL, PRETRAIN_FOCAL, 0.5, 0.5)  # fmt: skip
CULL_DIVISOR = 1.8  # mono back-face culling keeps the int(N / 1.8) points nearest the camera

# FLAME tensors a KaoLRM release may hold beside the network (persistent buffers of its FLAME layer).
FLAME_BUFFERS: dict[str, tuple[tuple[int, ...], str]] = {
    "flame_model.faces_tensor": ((9976, 3), "int"),
    "flame_model.v_template": ((5023, 3), "float"),
    "flame_model.shapedirs": ((5023, 3, 150), "float"),
    "flame_model.posedirs": ((36, 15069), "float"),
    "flame_model.J_regressor": ((5, 5023), "float"),
    "flame_model.parents": ((5,), "int"),
    "flame_model.lbs_weights": ((5023, 5), "float"),
    "flame_model.lmk_faces_idx": ((51,), "int"),
    "flame_model.lmk_bary_coords": ((51, 3), "float"),
    "flame_model.dynamic_lmk_faces_idx": ((79, 17), "int"),
    "flame_model.dynamic_lmk_bary_coords": ((79, 17, 3), "float"),
    "flame_model.full_lmk_faces_idx": ((1, 68), "int"),
    "flame_model.full_lmk_bary_coords": ((1, 68, 3), "float"),
    "flame_model.neck_kin_chain": ((2,), "int"),
}


class KaoLRMConfigError(ValueError):
    """`config.json` is not a usable KaoLRM configuration."""


@dataclass(frozen=True)
class KaoLRMConfig:
    """The model kwargs KaoLRM saves as `config.json` (defaults: the released base model).

    `encoder_depth` and `encoder_num_heads` are headforge's own optional keys for small test
    models; KaoLRM ignores unknown keys. Without them the backbone named by `encoder_model_name`
    sets the encoder's depth and heads, and `encoder_feat_dim` its width.
    """

    camera_embed_dim: int = 1024
    transformer_dim: int = 768
    transformer_layers: int = 12
    transformer_heads: int = 12
    triplane_low_res: int = 32
    triplane_high_res: int = 64
    triplane_dim: int = 48
    encoder_type: str = "dinov2"
    encoder_model_name: str = "dinov2_vitb14_reg"
    encoder_feat_dim: int = 768
    encoder_freeze: bool = False
    encoder_depth: int | None = None
    encoder_num_heads: int | None = None

    def __post_init__(self) -> None:
        if self.encoder_type != "dinov2":
            raise KaoLRMConfigError(f"encoder_type {self.encoder_type!r}: only 'dinov2' is supported")
        if self.encoder_model_name not in BACKBONES:
            raise KaoLRMConfigError(
                f"encoder_model_name {self.encoder_model_name!r} is not one of {', '.join(sorted(BACKBONES))}"
            )
        for name in ("camera_embed_dim", "transformer_dim", "transformer_layers", "transformer_heads",
                     "triplane_low_res", "triplane_high_res", "triplane_dim", "encoder_feat_dim"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise KaoLRMConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.transformer_dim % self.transformer_heads:
            raise KaoLRMConfigError(
                f"transformer_dim {self.transformer_dim} is not divisible by transformer_heads {self.transformer_heads}"
            )
        if self.triplane_high_res != 2 * self.triplane_low_res:
            raise KaoLRMConfigError(
                f"triplane_high_res {self.triplane_high_res} must be twice triplane_low_res {self.triplane_low_res}"
            )
        if self.encoder_feat_dim != self.transformer_dim:
            raise KaoLRMConfigError(
                f"encoder_feat_dim {self.encoder_feat_dim} ≠ transformer_dim {self.transformer_dim} is not supported"
            )
        encoder = self.encoder_config()
        if encoder.embed_dim % encoder.num_heads:
            raise KaoLRMConfigError(
                f"encoder_feat_dim {encoder.embed_dim} is not divisible by the encoder's {encoder.num_heads} heads"
            )

    def encoder_config(self) -> Dinov2Config:
        _, depth, heads = BACKBONES[self.encoder_model_name]
        return Dinov2Config(
            embed_dim=self.encoder_feat_dim,
            depth=self.encoder_depth or depth,
            num_heads=self.encoder_num_heads or heads,
        )

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> KaoLRMConfig:
        """Read KaoLRM's config keys; unknown keys are ignored as KaoLRM ignores them."""
        if not isinstance(document, Mapping):
            raise KaoLRMConfigError("config.json must hold a JSON object")
        known = {f.name for f in fields(cls)}
        required = known - {"encoder_depth", "encoder_num_heads", "encoder_freeze"}
        missing = sorted(required - set(document))
        if missing:
            raise KaoLRMConfigError(f"config.json lacks {', '.join(missing)}")
        try:
            return cls(**{k: v for k, v in document.items() if k in known})
        except TypeError as error:
            raise KaoLRMConfigError(str(error)) from error

    @classmethod
    def from_json(cls, path: Path) -> KaoLRMConfig:
        try:
            document = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise KaoLRMConfigError(f"cannot read {path.name}: {error}") from error
        return cls.from_dict(document)

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        return {k: v for k, v in document.items() if v is not None}


def config_from_weights(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """The config values a state dict's shapes imply (for naming a config that does not match)."""
    implied: dict[str, int] = {}
    if "pos_embed" in shapes and len(shapes["pos_embed"]) == 3:
        tokens, dim = shapes["pos_embed"][1], shapes["pos_embed"][2]
        implied["transformer_dim"] = dim
        low = math.isqrt(tokens // 3)
        if 3 * low * low == tokens:
            implied["triplane_low_res"] = low
            implied["triplane_high_res"] = 2 * low
    if "camera_embedder.mlp.0.weight" in shapes:
        implied["camera_embed_dim"] = shapes["camera_embedder.mlp.0.weight"][0]
    if "upsampler.weight" in shapes and len(shapes["upsampler.weight"]) == 4:
        implied["triplane_dim"] = shapes["upsampler.weight"][1]
    if "encoder.model.cls_token" in shapes:
        implied["encoder_feat_dim"] = shapes["encoder.model.cls_token"][-1]
    layers = {int(k.split(".")[2]) for k in shapes if k.startswith("transformer.layers.")}
    if layers:
        implied["transformer_layers"] = max(layers) + 1
    blocks = {int(k.split(".")[3]) for k in shapes if k.startswith("encoder.model.blocks.")}
    if blocks:
        implied["encoder_depth"] = max(blocks) + 1
    return implied


# ----------------------------------------------------------------------------------------------
# Modules


class CameraEmbedder(nn.Module):
    def __init__(self, embed_dim: int, raw_dim: int = 16) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(raw_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))

    def forward(self, camera: torch.Tensor) -> torch.Tensor:
        return self.mlp(camera)


class ModLN(nn.Module):
    """LayerNorm, then · (1 + scale) + shift, with [shift | scale] from the modulation vector."""

    def __init__(self, dim: int, mod_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(mod_dim, 2 * dim))

    def forward(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        shift, scale = self.mlp(mod).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class PackedAttention(nn.Module):
    """Multi-head attention without biases, laid out as `nn.MultiheadAttention` stores it
    (`in_proj_weight` packs q, k, v; `out_proj.weight`)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        nn.init.xavier_uniform_(self.in_proj_weight)
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, length, dim = query.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3, dim=0)
        q = F.linear(query, w_q).view(batch, length, heads, head_dim).transpose(1, 2)
        k = F.linear(context, w_k).view(batch, -1, heads, head_dim).transpose(1, 2)
        v = F.linear(context, w_v).view(batch, -1, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


class ConditionModulationBlock(nn.Module):
    """x += CrossAttn(ModLN1(x), cond); x += SelfAttn(ModLN2(x)); x += MLP(ModLN3(x))."""

    def __init__(self, dim: int, mod_dim: int, num_heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = ModLN(dim, mod_dim, eps)
        self.cross_attn = PackedAttention(dim, num_heads)
        self.norm2 = ModLN(dim, mod_dim, eps)
        self.self_attn = PackedAttention(dim, num_heads)
        self.norm3 = ModLN(dim, mod_dim, eps)
        # Indices 0 and 3 as in KaoLRM's Sequential(Linear, GELU, Dropout, Linear, Dropout).
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        x = x + self.cross_attn(self.norm1(x, mod), cond)
        normed = self.norm2(x, mod)
        x = x + self.self_attn(normed, normed)
        return x + self.mlp(self.norm3(x, mod))


class TransformerDecoder(nn.Module):
    def __init__(self, config: KaoLRMConfig) -> None:
        super().__init__()
        dim = config.transformer_dim
        self.layers = nn.ModuleList(
            ConditionModulationBlock(dim, config.camera_embed_dim, config.transformer_heads)
            for _ in range(config.transformer_layers)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, cond, mod)
        return self.norm(x)


class ChannelGating(nn.Module):
    """x · sigmoid(MLP(x)) with an 8× bottleneck."""

    def __init__(self, dim: int, reduction: int = 8) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(dim, dim // reduction), nn.ReLU(), nn.Linear(dim // reduction, dim), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x)


class FlameDecoder(nn.Module):
    """Planes (N, 3, C, H, W) → (N, 160) with the scale channel (index 156) through softplus, ≥ 0.1."""

    def __init__(self, triplane_res: int) -> None:
        super().__init__()
        self.decoder = nn.Sequential(
            nn.Linear(3 * triplane_res * triplane_res, 2048),
            nn.GELU(),
            nn.Linear(2048, 1024),
            nn.GELU(),
            ChannelGating(1024),
            nn.Linear(1024, 512),
            nn.GELU(),
            nn.Linear(512, NUM_FLAME_PARAMS),
        )

    def forward(self, planes: torch.Tensor) -> torch.Tensor:
        raw = self.decoder(planes.mean(dim=2).flatten(1))
        scale = F.softplus(raw[:, 156:157]).clamp(min=0.1)
        return torch.cat([raw[:, :156], scale, raw[:, 157:]], dim=1)


class _GaussianMLP(nn.Module):
    def __init__(self, features: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, NUM_GAUSSIAN_CHANNELS),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GaussianDecoder(nn.Module):
    """Triplane features at FLAME-frame points → 11 activated Gaussian channels per point.

    A point p (FLAME frame, after the decoded scale and translation) is scaled by focal / 0.75 and
    remapped to the triplane frame as (x, −z, y); the three planes are read at (x, y), (x, z) and
    (z, y) of that point (bilinear, zero outside [−1, 1], align_corners False), and the three
    features are concatenated plane by plane.
    """

    def __init__(self, triplane_dim: int) -> None:
        super().__init__()
        self.decoder = _GaussianMLP(3 * triplane_dim)

    def sample(self, planes: torch.Tensor, points: torch.Tensor, focal: float) -> torch.Tensor:
        """The concatenated triplane features (N, M, 3C) at `points` (N, M, 3)."""
        batch, _, channels, height, width = planes.shape
        count = points.shape[1]
        scaled = points * (focal / PRETRAIN_FOCAL)
        x, y, z = scaled[..., 0], -scaled[..., 2], scaled[..., 1]
        grids = torch.stack(
            [torch.stack([x, y], -1), torch.stack([x, z], -1), torch.stack([z, y], -1)], dim=1
        )  # (N, 3, M, 2)
        sampled = F.grid_sample(
            planes.reshape(batch * 3, channels, height, width),
            grids.reshape(batch * 3, 1, count, 2),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )  # (N·3, C, 1, M)
        return (
            sampled.reshape(batch, 3, channels, count).permute(0, 3, 1, 2).reshape(batch, count, 3 * channels)
        )

    def forward(self, planes: torch.Tensor, points: torch.Tensor, focal: float) -> torch.Tensor:
        raw = self.decoder(self.sample(planes, points, focal))
        opacity = torch.sigmoid(raw[..., 0:1])
        scales = 0.5 * F.softplus(raw[..., 1:4])
        rotation = F.normalize(raw[..., 4:8], dim=-1)
        rgb = torch.sigmoid(raw[..., 8:11]) * 1.002 - 0.001
        return torch.cat([opacity, scales, rotation, rgb], dim=-1)


class FlamePoseParameters(nn.Module):
    """The two frozen pose parameters KaoLRM's FLAME layer saves (eyes and neck are held at zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.eye_pose = nn.Parameter(torch.zeros(1, 6), requires_grad=False)
        self.neck_pose = nn.Parameter(torch.zeros(1, 3), requires_grad=False)


class KaoLRM(nn.Module):
    """The network up to the triplane, and both decoders."""

    source_camera: torch.Tensor

    def __init__(self, config: KaoLRMConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or KaoLRMConfig()
        dim = config.transformer_dim
        self.encoder = Dinov2Encoder(config.encoder_config())
        self.camera_embedder = CameraEmbedder(config.camera_embed_dim)
        self.pos_embed = nn.Parameter(torch.randn(1, 3 * config.triplane_low_res**2, dim) / math.sqrt(dim))
        self.transformer = TransformerDecoder(config)
        self.upsampler = nn.ConvTranspose2d(dim, config.triplane_dim, kernel_size=2, stride=2)
        self.flame_decoder = FlameDecoder(config.triplane_high_res)
        self.flame_model = FlamePoseParameters()
        self.gaussian_decoder = GaussianDecoder(config.triplane_dim)
        self.register_buffer("source_camera", torch.tensor(SOURCE_CAMERA)[None], persistent=False)

    def planes(self, image: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        """Image (N, 3, 224, 224) RGB in [0, 1] → triplane (N, 3, C, 2L, 2L), from the fixed source camera."""
        batch = image.shape[0]
        cond = self.encoder(image, pos_embed)
        mod = self.camera_embedder(self.source_camera.expand(batch, -1))
        tokens = self.transformer(self.pos_embed.expand(batch, -1, -1), cond, mod)
        low = self.config.triplane_low_res
        grid = tokens.view(batch, 3, low, low, -1).permute(0, 1, 4, 2, 3).reshape(batch * 3, -1, low, low)
        up = self.upsampler(grid)
        return up.view(batch, 3, *up.shape[1:])

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image → (planes, FLAME parameters (N, 160))."""
        planes = self.planes(image)
        return planes, self.flame_decoder(planes)


def split_flame_params(params: torch.Tensor) -> dict[str, torch.Tensor]:
    """(N, 160) → shape 100, expression 50, pose 6 (global 3, jaw 3), scale 1, translation 3."""
    return {
        "shape": params[:, :100],
        "expression": params[:, 100:150],
        "pose": params[:, 150:156],
        "scale": params[:, 156:157],
        "translation": params[:, 157:160],
    }


def cull_back_faces(points: torch.Tensor, divisor: float = CULL_DIVISOR) -> torch.Tensor:
    """Indices (N, int(M / divisor)) of the points with the largest z (nearest KaoLRM's camera)."""
    keep = int(points.shape[1] / divisor)
    return torch.topk(points[..., 2], keep, dim=1).indices


def expected_shapes(config: KaoLRMConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter key of the network and its shape, without allocating weights."""
    with torch.device("meta"):
        model = KaoLRM(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def parameter_count(config: KaoLRMConfig) -> int:
    with torch.device("meta"):
        model = KaoLRM(config)
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Export graphs


class KaoLRMImageGraph(nn.Module):
    """ONNX graph 1: image (N, 3, 224, 224) in [0, 1] → planes, FLAME parameters (160).

    The position embedding is resampled once for 224 px and held as a constant, so the graph needs
    no antialiased bicubic resize.
    """

    pos_embed_224: torch.Tensor

    def __init__(self, model: KaoLRM) -> None:
        super().__init__()
        self.model = model
        with torch.no_grad():
            pos = model.encoder.model.interpolated_pos_embed(IMAGE_SIZE, IMAGE_SIZE)
        self.register_buffer("pos_embed_224", pos.detach().clone())

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        planes = self.model.planes(image, self.pos_embed_224)
        return planes, self.model.flame_decoder(planes)


class KaoLRMGaussianGraph(nn.Module):
    """ONNX graph 2: planes and FLAME-frame points (N, M, 3) → Gaussians (N, M, 11), at one focal."""

    def __init__(self, model: KaoLRM, focal: float) -> None:
        super().__init__()
        self.decoder = model.gaussian_decoder
        self.focal = float(focal)

    def forward(self, planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        return self.decoder(planes, points, self.focal)
