"""FLAME as a PyTorch module: shape and expression blendshapes, pose correctives and linear
blend skinning over FLAME's five joints (global, neck, jaw, left eye, right eye).

The math follows smplx's `lbs.py`:
    v_shaped = v_template + shapedirs · β + exprdirs · ψ
    J        = J_regressor · v_shaped
    R_k      = rodrigues(pose_k)                      k = 0..4
    v_posed  = v_shaped + posedirs · vec(R_1..4 − I)
    G_k      = G_parent(k) · [R_k | J_k − J_parent(k)]  (root: [R_0 | J_0])
    A_k      = G_k · [I | −J_k]                       (joint transforms relative to the rest pose)
    v        = Σ_k w_k A_k · v_posed + translation
The module is batched, differentiable and exports to ONNX (no data-dependent control flow). It is
the reference form of FLAME: the pipeline evaluates FLAME with `FlameLandmarkModel`
(`pipeline/flame_fit.py`, NumPy, neck and eyes at rest), which tests/test_flame_layer.py checks
against this layer; both take their rotations from `models/rotations.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from headforge.models.flame_import import FlameAsset
from headforge.models.rotations import rodrigues

if TYPE_CHECKING:
    from headforge.export.onnx import ExportSpec

NUM_JOINTS = 5


@dataclass(frozen=True)
class FlameConfig:
    """How many shape and expression components the layer uses (FLAME has 300 and 100)."""

    num_shape: int = 100
    num_expression: int = 50

    def __post_init__(self) -> None:
        if not 1 <= self.num_shape <= 300 or not 1 <= self.num_expression <= 100:
            raise ValueError("FLAME has at most 300 shape and 100 expression components")


def _transform(rotation: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """Stack (B, J, 3, 3) rotations and (B, J, 3) translations into (B, J, 4, 4) transforms."""
    top = torch.cat([rotation, translation[..., None]], dim=-1)
    bottom = torch.zeros_like(top[..., :1, :])
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], dim=-2)


def batch_rigid_transform(
    rotations: torch.Tensor, joints: torch.Tensor, parents: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pose the kinematic chain: returns posed joints (B, J, 3) and the skinning transforms
    (B, J, 4, 4) that map rest-pose points to posed points for each joint."""
    relative_joints = joints.clone()
    relative_joints[:, 1:] = joints[:, 1:] - joints[:, parents[1:]]
    local = _transform(rotations, relative_joints)
    chain = [local[:, 0]]
    for joint in range(1, len(parents)):
        chain.append(torch.matmul(chain[parents[joint]], local[:, joint]))
    world = torch.stack(chain, dim=1)
    posed_joints = world[..., :3, 3]
    # Subtract the rest-pose joint location: A = G · [I | -J].
    rest_offset = torch.matmul(world[..., :3, :3], joints[..., None])[..., 0]
    skinning = world.clone()
    skinning[..., :3, 3] = world[..., :3, 3] - rest_offset
    return posed_joints, skinning


class FlameLayer(nn.Module):
    """FLAME: (shape β, expression ψ, pose θ (5 × axis-angle), translation) → vertices (B, 5023, 3)."""

    v_template: torch.Tensor
    shapedirs: torch.Tensor
    exprdirs: torch.Tensor
    posedirs: torch.Tensor
    j_regressor: torch.Tensor
    weights: torch.Tensor
    faces: torch.Tensor

    def __init__(self, asset: FlameAsset, config: FlameConfig | None = None) -> None:
        super().__init__()
        self.config = config or FlameConfig()
        self.parents = [int(p) for p in asset.parents]

        def buffer(name: str, array: np.ndarray) -> None:
            self.register_buffer(name, torch.from_numpy(np.ascontiguousarray(array)))

        buffer("v_template", asset.v_template.astype(np.float32))
        buffer("shapedirs", asset.shapedirs[:, :, : self.config.num_shape].astype(np.float32))
        buffer("exprdirs", asset.exprdirs[:, :, : self.config.num_expression].astype(np.float32))
        # (36, V*3), as smplx lays it out: pose features times a flattened vertex offset.
        buffer("posedirs", asset.posedirs.reshape(-1, asset.posedirs.shape[-1]).T.astype(np.float32))
        buffer("j_regressor", asset.j_regressor.astype(np.float32))
        buffer("weights", asset.weights.astype(np.float32))
        buffer("faces", asset.faces.astype(np.int64))

    def forward(
        self,
        shape: torch.Tensor,
        expression: torch.Tensor,
        pose: torch.Tensor,
        translation: torch.Tensor,
    ) -> torch.Tensor:
        """shape (B, num_shape), expression (B, num_expression), pose (B, 15) as global, neck,
        jaw, left eye, right eye axis-angles, translation (B, 3) → vertices (B, 5023, 3) in meters."""
        batch = shape.shape[0]
        v_shaped = (
            self.v_template[None]
            + torch.einsum("bl,vcl->bvc", shape, self.shapedirs)
            + torch.einsum("bl,vcl->bvc", expression, self.exprdirs)
        )
        joints = torch.einsum("jv,bvc->bjc", self.j_regressor, v_shaped)
        rotations = rodrigues(pose.reshape(batch, NUM_JOINTS, 3))
        identity = torch.eye(3, dtype=pose.dtype, device=pose.device)
        pose_feature = (rotations[:, 1:] - identity).reshape(batch, -1)
        v_posed = v_shaped + torch.matmul(pose_feature, self.posedirs).view(batch, -1, 3)
        _, skinning = batch_rigid_transform(rotations, joints, self.parents)
        per_vertex = torch.einsum("vj,bjrc->bvrc", self.weights, skinning)  # (B, V, 4, 4)
        posed = torch.matmul(per_vertex[..., :3, :3], v_posed[..., None])[..., 0] + per_vertex[..., :3, 3]
        return posed + translation[:, None, :]

    def zero_parameters(
        self, batch: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Neutral inputs for `forward`, e.g. for export."""
        return (
            torch.zeros(batch, self.config.num_shape),
            torch.zeros(batch, self.config.num_expression),
            torch.zeros(batch, 3 * NUM_JOINTS),
            torch.zeros(batch, 3),
        )


def landmarks_from_vertices(
    vertices: torch.Tensor, faces: torch.Tensor, face_idx: torch.Tensor, bary: torch.Tensor
) -> torch.Tensor:
    """Barycentric landmarks: vertices (B, V, 3), faces (F, 3), face_idx (K,), bary (K, 3) → (B, K, 3)."""
    corners = vertices[:, faces[face_idx]]  # (B, K, 3 corners, 3)
    return torch.einsum("bkcd,kc->bkd", corners, bary)


def flame_export_spec(config: FlameConfig) -> ExportSpec:
    """The layer's ONNX interface (dynamic batch): shape, expression, pose, translation → vertices."""
    from headforge.export.onnx import ExportSpec, TensorSpec

    return ExportSpec(
        inputs=(
            TensorSpec("shape", (config.num_shape,), value_range=(-2.0, 2.0)),
            TensorSpec("expression", (config.num_expression,), value_range=(-2.0, 2.0)),
            TensorSpec("pose", (3 * NUM_JOINTS,), value_range=(-0.4, 0.4)),
            TensorSpec("translation", (3,), value_range=(-0.1, 0.1)),
        ),
        outputs=("vertices",),
        parity_tolerance=1e-4,
    )
