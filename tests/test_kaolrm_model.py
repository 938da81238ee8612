"""KaoLRM's modules: the released layout (keys, shapes, parameter count) and the checks of
seed-formats.md §C.6/C.7 on a small config. Random weights: plumbing only."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from kaolrm_synthetic import SMALL

from headforge.models.dinov2 import Dinov2, Dinov2Config
from headforge.models.kaolrm import (
    FLAME_BUFFERS,
    SOURCE_CAMERA,
    KaoLRM,
    KaoLRMConfig,
    KaoLRMConfigError,
    KaoLRMImageGraph,
    config_from_weights,
    cull_back_faces,
    expected_shapes,
    parameter_count,
    split_flame_params,
)

KEY_FILE = Path(__file__).parent / "data" / "kaolrm_state_dict_keys.txt"


def read_key_file() -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in KEY_FILE.read_text().splitlines():
        name, rest = line.split(" [", 1)
        keys[name] = tuple(int(x) for x in rest.split("]")[0].split(",") if x.strip())
    return keys


def test_full_config_matches_the_released_key_set_and_parameter_count() -> None:
    released = read_key_file()
    assert len(released) == 460
    network = {k: v for k, v in released.items() if k not in FLAME_BUFFERS}
    assert len(network) == 446
    ours = expected_shapes(KaoLRMConfig())
    assert ours == network
    assert {k: v[0] for k, v in FLAME_BUFFERS.items()} == {k: released[k] for k in FLAME_BUFFERS}
    assert parameter_count(KaoLRMConfig()) == 288_338_660


@pytest.fixture(scope="module")
def small_model() -> KaoLRM:
    torch.manual_seed(0)
    return KaoLRM(SMALL).eval()


def test_intermediate_shapes_and_output_ranges(small_model: KaoLRM) -> None:
    torch.manual_seed(1)
    image = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        cond = small_model.encoder(image)
        planes, params = small_model(image)
    assert cond.shape == (2, 257, 48)  # CLS + 16 × 16 patches, registers dropped
    assert planes.shape == (2, 3, 8, 16, 16)
    assert params.shape == (2, 160)
    parts = split_flame_params(params)
    assert [parts[k].shape[1] for k in ("shape", "expression", "pose", "scale", "translation")] == [
        100,
        50,
        6,
        1,
        3,
    ]
    assert bool((parts["scale"] >= 0.1).all())
    points = torch.randn(2, 8000, 3) * 0.05
    with torch.no_grad():
        gaussians = small_model.gaussian_decoder(planes, points, 20.0)
    assert gaussians.shape == (2, 8000, 11)
    assert torch.allclose(gaussians[..., 4:8].norm(dim=-1), torch.ones(2, 8000), atol=1e-5)
    assert bool(((gaussians[..., 0] > 0) & (gaussians[..., 0] < 1)).all())
    assert bool((gaussians[..., 1:4] >= 0).all())
    assert float(gaussians[..., 8:].min()) >= -0.001 and float(gaussians[..., 8:].max()) <= 1.001
    kept = cull_back_faces(points)
    assert kept.shape == (2, 4444)
    # The kept points are the nearest ones: every kept z ≥ every dropped z.
    z = points[0, :, 2]
    dropped = torch.ones(8000, dtype=torch.bool)
    dropped[kept[0]] = False
    assert float(z[kept[0]].min()) >= float(z[dropped].max())


def test_full_size_intermediate_shapes_on_meta() -> None:
    with torch.device("meta"):
        model = KaoLRM(KaoLRMConfig())
        image = torch.empty(1, 3, 224, 224)
        cond = model.encoder(image)
        planes, params = model(image)
        gaussians = model.gaussian_decoder(planes, torch.empty(1, 8000, 3), 20.0)
    assert cond.shape == (1, 257, 768)
    assert model.pos_embed.shape == (1, 3072, 768)
    assert planes.shape == (1, 3, 48, 64, 64)
    assert model.flame_decoder.decoder[0].in_features == 12288
    assert params.shape == (1, 160)
    assert gaussians.shape == (1, 8000, 11)


def test_source_camera_is_the_fixed_raw16() -> None:
    assert SOURCE_CAMERA == (1, 0, 0, 0, 0, 0, -1, -2, 0, 1, 0, 0, 0.75, 0.75, 0.5, 0.5)


def test_points_map_to_focal_over_075_times_x_minus_z_y(small_model: KaoLRM) -> None:
    """Planes whose channels hold their own grid coordinates read back where each point lands."""
    size = 16
    centres = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1  # align_corners=False
    u = centres[None, :].expand(size, size)  # varies along width (grid x)
    v = centres[:, None].expand(size, size)  # varies along height (grid y)
    planes = torch.zeros(1, 3, 8, size, size)
    planes[0, :, 0] = u
    planes[0, :, 1] = v
    rng = np.random.default_rng(0)
    points = torch.from_numpy(rng.uniform(-0.025, 0.025, size=(1, 50, 3)).astype(np.float32))
    features = small_model.gaussian_decoder.sample(planes, points, 20.0)[0].view(50, 3, 8)
    mapped = points[0] * (20.0 / 0.75)
    assert math.isclose(20.0 / 0.75, 26.6667, rel_tol=1e-4)
    x, y, z = mapped[:, 0], -mapped[:, 2], mapped[:, 1]
    expected = torch.stack([torch.stack([x, y], 1), torch.stack([x, z], 1), torch.stack([z, y], 1)], 1)
    # Bilinear interpolation of a linear ramp is exact between the outermost pixel centres.
    assert torch.allclose(features[:, :, :2], expected, atol=1e-5)


def test_image_graph_equals_eager_model(small_model: KaoLRM) -> None:
    image = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        eager = small_model(image)
        graph = KaoLRMImageGraph(small_model)(image)
    for a, b in zip(eager, graph, strict=True):
        assert torch.equal(a, b)


def test_pos_embed_is_resampled_to_the_input_grid() -> None:
    vit = Dinov2(Dinov2Config(embed_dim=32, depth=1, num_heads=4))
    assert vit.interpolated_pos_embed(224, 224).shape == (1, 257, 32)
    assert vit.interpolated_pos_embed(336, 336).shape == (1, 577, 32)
    assert vit.interpolated_pos_embed(518, 518) is vit.pos_embed
    # A constant grid stays constant under the antialiased bicubic resampling.
    with torch.no_grad():
        vit.pos_embed[:, 1:] = 0.25
    assert torch.allclose(
        vit.interpolated_pos_embed(224, 224)[:, 1:], torch.full((1, 256, 32), 0.25), atol=1e-5
    )


def test_config_reading_and_errors() -> None:
    released = {
        "camera_embed_dim": 1024, "transformer_dim": 768, "transformer_layers": 12, "transformer_heads": 12,
        "triplane_low_res": 32, "triplane_high_res": 64, "triplane_dim": 48, "encoder_type": "dinov2",
        "encoder_model_name": "dinov2_vitb14_reg", "encoder_feat_dim": 768, "encoder_freeze": False,
    }  # fmt: skip
    assert KaoLRMConfig.from_dict(released) == KaoLRMConfig()
    assert KaoLRMConfig.from_dict({**released, "unknown_key": 1}) == KaoLRMConfig()
    with pytest.raises(KaoLRMConfigError, match="triplane_dim"):
        KaoLRMConfig.from_dict({k: v for k, v in released.items() if k != "triplane_dim"})
    with pytest.raises(KaoLRMConfigError, match="encoder_type"):
        KaoLRMConfig.from_dict({**released, "encoder_type": "dino"})
    with pytest.raises(KaoLRMConfigError, match="transformer_heads"):
        KaoLRMConfig.from_dict({**released, "transformer_heads": 7})
    with pytest.raises(KaoLRMConfigError, match="positive integer"):
        KaoLRMConfig.from_dict({**released, "triplane_dim": "48"})


def test_config_implied_by_weights() -> None:
    implied = config_from_weights(expected_shapes(SMALL))
    assert implied == {
        "transformer_dim": 48,
        "triplane_low_res": 8,
        "triplane_high_res": 16,
        "camera_embed_dim": 64,
        "triplane_dim": 8,
        "encoder_feat_dim": 48,
        "transformer_layers": 2,
        "encoder_depth": 2,
    }
