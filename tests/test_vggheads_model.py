"""VGGHeads: our module against the training code's key lists, the paper's parameter counts, and
the decoding facts (DFL, anchors, the 413-d layout and its channel permutation)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from headforge.models import vggheads as vh

KEYS = Path(__file__).parent / "data" / "vggheads"
FUSED = {"s": 17_004_954, "m": 32_378_236, "l": 50_442_706}
TRAINING_ALL = {"s": 26_736_206, "m": 53_763_120, "l": 84_508_312}
TRAINING_USED = {"s": 17_987_822, "m": 34_532_560, "l": 53_872_952}
KEY_COUNTS = {"s": (1551, 931), "m": (1595, 959), "l": (2015, 1169)}


def _recorded(variant: str) -> dict[str, tuple[tuple[int, ...], str]]:
    rows = {}
    for line in (KEYS / f"vggheads_{variant}_unfused_state_dict_keys.txt").read_text().splitlines():
        key, rest = line.split(" ", 1)
        shape, kind = rest.rsplit(" ", 1)
        rows[key] = (tuple(int(d) for d in shape.strip("[]").replace(",", " ").split()), kind)
    return rows


@pytest.mark.parametrize("variant", vh.VARIANTS)
def test_training_keys_shapes_and_counts(variant: str) -> None:
    model = vh.build(variant, device="meta")
    recorded = _recorded(variant)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(recorded)  # same keys, in the same order
    assert ours == {k: shape for k, (shape, _) in recorded.items()}
    assert len(ours) == KEY_COUNTS[variant][0]
    assert vh.count_parameters(model) == TRAINING_ALL[variant]
    placeholders = sum(math.prod(s) for s, kind in recorded.values() if kind == "placeholder")
    assert vh.count_parameters(model) - placeholders == TRAINING_USED[variant]
    params = dict(model.named_parameters())
    assert all((k in params) == (kind != "buffer") for k, (_, kind) in recorded.items())
    model.fuse()
    assert vh.count_parameters(model) == FUSED[variant]  # the paper's Table 9
    assert len(model.state_dict()) == KEY_COUNTS[variant][1]
    assert all(m.eps == vh.BN_EPS for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def _small(variant: str = "s") -> vh.VGGHeadsConfig:
    """The same network on a 64² canvas (8²+4²+2² = 84 anchors): cheap, and exercises every layer."""
    return dataclasses.replace(vh.CONFIGS[variant], input_size=64, top_k=84)  # type: ignore[index]


def test_anchor_grid_and_output_shapes() -> None:
    points, strides = vh.anchor_grid(640)
    assert points.shape == (8400, 2) and strides.shape == (8400, 1)
    assert points[0].tolist() == [0.5, 0.5] and points[1].tolist() == [1.5, 0.5]
    assert points[80].tolist() == [0.5, 1.5]  # row-major within a level
    assert strides[6399, 0] == 8 and strides[6400, 0] == 16 and strides[-1, 0] == 32
    torch.manual_seed(0)
    model = vh.VGGHeads(_small()).eval()
    assert model.heads.head1.reg_pred.out_channels == 68
    assert model.heads.head1.cls_pred.bias is not None
    assert model.heads.head1.cls_pred.bias.item() == pytest.approx(-4.59512, abs=1e-5)
    with torch.no_grad():
        boxes, scores, flame = model(torch.rand(2, 3, 64, 64))
    assert boxes.shape == (2, 84, 4) and scores.shape == (2, 84, 1) and flame.shape == (2, 84, 413)
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())  # sorted, best first


def test_fast_decoding_matches_the_numpy_reference() -> None:
    config = _small()
    rng = np.random.default_rng(3)
    width = config.heads[0].shape_out + config.heads[0].expression_out + 16
    levels = []
    for stride in vh.STRIDES:
        cells = 64 // stride
        levels.append(
            tuple(
                rng.normal(0, 2, size=(2, channels, cells, cells)).astype(np.float32)
                for channels in (68, 1, width)
            )
        )
    points, strides = vh.anchor_grid(64)
    fast = vh.decode_levels(
        [tuple(torch.from_numpy(t) for t in level) for level in levels],  # type: ignore[misc]
        config,
        torch.from_numpy(points),
        torch.from_numpy(strides),
        torch.arange(17, dtype=torch.float32),
    )
    reference = vh.decode_reference(levels, config)  # type: ignore[arg-type]
    for ours, theirs in zip(fast, reference, strict=True):
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-5, atol=1e-4)


def test_channel_permutation_through_the_network() -> None:
    """§C.3: only the branches' final biases set: R = I, jaw = (a, b, c), anchor-centred translation."""
    torch.manual_seed(0)
    model = vh.VGGHeads(_small()).eval()
    a, b, c = 0.1, -0.2, 0.3
    with torch.no_grad():
        for head in (model.heads.head1, model.heads.head2, model.heads.head3):
            for name in ("shape", "expression", "rotation", "jaw", "scale", "translation"):
                final = getattr(head, f"flame_{name}_pred")[-1]
                final.weight.zero_()
                final.bias.zero_()
            _final_bias(head.flame_jaw_pred).copy_(torch.tensor([1.0, 0.0, 0.0]))
            _final_bias(head.flame_rotation_pred).copy_(torch.tensor([0.0, 1.0, 0.0, a, b, c]))
        _, _, decoded = model.decode_all(torch.rand(1, 3, 64, 64))
    flame = decoded[0].numpy()
    layout = vh.FLAME_LAYOUT
    rotation = vh_rotation(flame[:, layout["rotation_6d"]])
    np.testing.assert_allclose(rotation, np.broadcast_to(np.eye(3), rotation.shape), atol=1e-6)
    np.testing.assert_allclose(flame[:, layout["jaw"]], np.tile([a, b, c], (84, 1)), atol=1e-6)
    assert not flame[:, layout["shape"]].any() and not flame[:, layout["expression"]].any()
    points, strides = vh.anchor_grid(64)
    np.testing.assert_allclose(flame[:, 412], 20 * strides[:, 0], rtol=1e-6)
    np.testing.assert_allclose(flame[:, 409:411], points * strides, atol=1e-5)
    assert flame[:, 411].tolist() == [0.0] * 84


def test_predicted_shape_beyond_its_width_is_exactly_zero() -> None:
    torch.manual_seed(1)
    model = vh.VGGHeads(_small()).eval()
    with torch.no_grad():
        _, _, flame = model.decode_all(torch.rand(1, 3, 64, 64))
    assert flame[..., 64:300].abs().max().item() == 0.0 and flame[..., 332:400].abs().max().item() == 0.0
    assert flame[..., :64].abs().max().item() > 0


def test_fuse_is_exact() -> None:
    config = _small()
    torch.manual_seed(2)
    model = vh.VGGHeads(config)
    with torch.no_grad():
        for module in model.modules():  # non-trivial BN statistics and α, so every branch matters
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)  # type: ignore[union-attr]
                module.running_var.uniform_(0.5, 2.0)  # type: ignore[union-attr]
                module.weight.uniform_(0.5, 1.5)
            elif isinstance(module, vh.QARepVGG) and module.has_alpha:
                module.alpha.fill_(0.7)
    model.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        before = model.decode_all(x)
        model.fuse()
        after = model.decode_all(x)
    assert model.fused
    for one, two in zip(before, after, strict=True):
        torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-4 * float(one.abs().max()))


def _final_bias(branch: torch.nn.Sequential) -> torch.Tensor:
    final = branch[-1]
    assert isinstance(final, torch.nn.Conv2d) and final.bias is not None
    return final.bias


def vh_rotation(six: np.ndarray) -> np.ndarray:
    from headforge.pipeline.vggheads import rotation_from_6d

    return rotation_from_6d(six)
