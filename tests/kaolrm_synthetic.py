"""A KaoLRM release folder written in KaoLRM's layout (`config.json` + `model.safetensors`, no key
prefix) from our modules with seeded random weights, optionally with FLAME's buffers built from
the synthetic FLAME of `tests/flame_synthetic.py`. Plumbing only: the outputs mean nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from headforge.models.kaolrm import KaoLRM, KaoLRMConfig

SMALL = KaoLRMConfig(
    camera_embed_dim=64,
    transformer_dim=48,
    transformer_layers=2,
    transformer_heads=4,
    triplane_low_res=8,
    triplane_high_res=16,
    triplane_dim=8,
    encoder_feat_dim=48,
    encoder_depth=2,
    encoder_num_heads=4,
)


def flame_buffers(seed: int = 0) -> dict[str, torch.Tensor]:
    """The 14 `flame_model.*` buffers KaoLRM saves, from the synthetic FLAME (100 shape + 50 expression)."""
    from flame_synthetic import make_synthetic_flame

    flame = make_synthetic_flame(seed)
    rng = np.random.default_rng(seed)
    shapedirs = np.concatenate([flame.shapedirs[:, :, :100], flame.shapedirs[:, :, 300:350]], axis=2)
    bary = rng.dirichlet(np.ones(3), size=(79, 17)).astype(np.float32)
    arrays = {
        "faces_tensor": flame.faces.astype(np.int64),
        "v_template": flame.v_template.astype(np.float32),
        "shapedirs": shapedirs.astype(np.float32),
        "posedirs": flame.posedirs.reshape(-1, 36).T.astype(np.float32),
        "J_regressor": flame.j_regressor.toarray().astype(np.float32),
        "parents": np.array([-1, 0, 1, 1, 1], dtype=np.int64),
        "lbs_weights": flame.weights.astype(np.float32),
        "lmk_faces_idx": rng.integers(0, 9976, 51).astype(np.int64),
        "lmk_bary_coords": bary[0, :, :].repeat(3, axis=0)[:51],
        "dynamic_lmk_faces_idx": rng.integers(0, 9976, (79, 17)).astype(np.int64),
        "dynamic_lmk_bary_coords": bary,
        "full_lmk_faces_idx": rng.integers(0, 9976, (1, 68)).astype(np.int64),
        "full_lmk_bary_coords": rng.dirichlet(np.ones(3), size=(1, 68)).astype(np.float32),
        "neck_kin_chain": np.array([1, 0], dtype=np.int64),
    }
    return {f"flame_model.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def kaolrm_tensors(config: KaoLRMConfig = SMALL, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = KaoLRM(config)
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def write_release(
    directory: Path,
    config: KaoLRMConfig = SMALL,
    seed: int = 0,
    with_flame: bool = True,
    tensors: dict[str, torch.Tensor] | None = None,
    config_document: dict[str, object] | None = None,
) -> Path:
    """`directory/config.json` + `directory/model.safetensors`; returns `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = dict(tensors) if tensors is not None else kaolrm_tensors(config, seed)
    if with_flame and tensors is None:
        weights.update(flame_buffers(seed))
    save_file(weights, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config_document or config.to_dict()))
    return directory
