"""Texture fusion across views, the seamless blend of seen and filled texels, and the photo mask.

Views of known yaw are the astronaut's real face mesh turned about its vertical axis (as in
test_texture.py); a photo's colours then need not match the turned mesh, but which texels each view
sees is fixed by the geometry, which is what fusion and `texture_seen` are about. Colour tests use
flat photos, where every correct texel has a known colour. The real multi-photo subjects of
../shared/data run through the whole pipeline when present.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import pytest
from needs import shared_data
from numpy.typing import NDArray
from test_texture import turned

from headforge.pipeline.geometry import cached_uv_raster
from headforge.pipeline.texture import (
    PhotoMask,
    TextureResult,
    ViewTexels,
    build_texture,
    finish_texture,
    fuse_views,
    unwrap_view,
)
from headforge.pipeline.topology import build_image_mesh, load_topology
from headforge.pipeline.types import Mesh

SIZE = 512


@pytest.fixture(scope="module")
def astronaut_mesh(astronaut_landmarks: NDArray[np.float32]) -> Mesh:
    return build_image_mesh(astronaut_landmarks)


def flat(color: tuple[int, int, int]) -> NDArray[np.uint8]:
    return np.broadcast_to(np.array(color, np.uint8), (512, 512, 3)).copy()


def seen_share(texels: ViewTexels) -> float:
    return texels.share(texels.seen())


@pytest.mark.parametrize("mirror", [False, True])
def test_fused_sees_at_least_every_view_and_more_across_yaws(
    astronaut: NDArray[np.uint8], astronaut_mesh: Mesh, mirror: bool
) -> None:
    """Views at −40°, 0° and +40°: the fused texture sees at least what each view sees, strictly more
    than the best of them; views of one yaw add nothing new."""
    symmetry = load_topology().mirror if mirror else None
    views = [
        unwrap_view(astronaut, turned(astronaut_mesh, yaw), SIZE, symmetry, for_fusion=True)
        for yaw in (-40.0, 0.0, 40.0)
    ]
    singles = [seen_share(view) for view in views]
    fused = finish_texture(fuse_views(views))
    assert fused.seen_share >= max(singles)
    assert fused.seen_share > max(singles) + 0.03, (fused.seen_share, singles)
    # Each view's seen texels stay seen in the fused texture.
    for view in views:
        assert not (view.seen() & ~fused.seen).any()
    same = finish_texture(fuse_views([views[1], views[1]]))
    assert same.seen_share == pytest.approx(singles[1], abs=1e-9)


def test_fusion_prefers_the_view_that_faces_the_texel(astronaut_mesh: Mesh) -> None:
    """A red photo at yaw −35° and a blue one at +35°: texels only one view sees take its colour, and
    where both see a texel the colour leans to the view that faces it more squarely (cos²)."""
    left = unwrap_view(flat((230, 20, 20)), turned(astronaut_mesh, -35.0), SIZE, for_fusion=True)
    right = unwrap_view(flat((20, 20, 230)), turned(astronaut_mesh, 35.0), SIZE, for_fusion=True)
    fused = fuse_views([left, right])
    result = finish_texture(fused)
    only_left = left.seen() & ~right.seen()
    only_right = right.seen() & ~left.seen()
    assert only_left.sum() > 500 and only_right.sum() > 500
    texture = result.texture.astype(int)
    assert (texture[only_left][:, 0] > texture[only_left][:, 2]).mean() > 0.98
    assert (texture[only_right][:, 2] > texture[only_right][:, 0]).mean() > 0.98
    both = left.seen() & right.seen() & (left.priority > 0) & (right.priority > 0)
    assert both.sum() > 500
    redder = both & (left.priority > 2.0 * right.priority)
    bluer = both & (right.priority > 2.0 * left.priority)
    assert redder.sum() > 100 and bluer.sum() > 100
    assert (texture[redder][:, 0] > texture[redder][:, 2]).mean() > 0.9
    assert (texture[bluer][:, 2] > texture[bluer][:, 0]).mean() > 0.9


def _seam_ratio(result: TextureResult, repo_script: Callable[[str], ModuleType]) -> float:
    """Median ΔE (CIELAB) across the seen/filled boundary over the median between seen neighbours
    (the measure of bench/texture_seams.py)."""
    seams = repo_script("bench/texture_seams.py")
    boundary, interior = seams.seam_steps(result.texture, result.seen & result.islands, result.islands)
    return float(np.median(boundary) / np.median(interior))


def _naive(texels: ViewTexels) -> TextureResult:
    """The seen texels next to the plain mirror colours, nothing blended: the seam to beat."""
    seen = texels.seen()
    texture = texels.colors.copy()
    assert texels.mirror_colors is not None
    texture[~seen] = texels.mirror_colors[~seen]
    return TextureResult(texture, seen, seen, texels.islands.view(bool))


def test_turned_head_has_no_seam_where_the_mirror_is_lit_differently(
    astronaut: NDArray[np.uint8], astronaut_mesh: Mesh, repo_script: Callable[[str], ModuleType]
) -> None:
    """The astronaut turned 50° under a light falling off across the photo: mirrored texels come from
    the lit side, so pasted beside the seen ones they leave a step. Blended, the step across the
    seen/filled boundary is within 1.5× the step between seen neighbours (the issue's goal)."""
    mesh = turned(astronaut_mesh, 50.0)
    x = np.linspace(0.0, 1.0, astronaut.shape[1], dtype=np.float32)
    light = (0.45 + 0.75 * x)[None, :, None]  # the image's right is brighter
    photo = np.clip(astronaut.astype(np.float32) * light, 0, 255).astype(np.uint8)
    texels = unwrap_view(photo, mesh, 1024, load_topology().mirror)
    naive = _seam_ratio(_naive(texels), repo_script)
    blended = _seam_ratio(finish_texture(texels), repo_script)
    assert naive > 2.0, naive
    assert blended <= 1.5 and blended < 0.6 * naive, (blended, naive)


def test_mask_keeps_the_background_out(astronaut: NDArray[np.uint8], astronaut_mesh: Mesh) -> None:
    """Paint the photo pure green over the face's right third and mask those pixels out: no island
    texel may come out green (the mirror and the inpainting fill them), and what the mask hides
    is not counted as seen."""
    photo = astronaut.copy()
    xy = astronaut_mesh.vertices[:, :2]
    cut = float(xy[:, 0].min() + 0.3 * (xy[:, 0].max() - xy[:, 0].min()))
    photo[:, : int(cut)] = (0, 255, 0)
    values = np.ones((512, 512), np.float32)
    values[:, : int(cut) + 3] = 0.0  # the mask covers the whole photo, one value per pixel
    mask = PhotoMask(values, (0.0, 0.0), 512.0)
    symmetry = load_topology().mirror
    masked = build_texture(photo, astronaut_mesh, SIZE, symmetry, mask)
    unmasked = build_texture(photo, astronaut_mesh, SIZE, symmetry)
    islands = cached_uv_raster(astronaut_mesh.uvs, astronaut_mesh.faces, SIZE).island_mask

    def green(texture: NDArray[np.uint8]) -> NDArray[np.bool_]:
        t = texture.astype(int)
        return islands & (t[..., 1] > 200) & (t[..., 0] < 80) & (t[..., 2] < 80)

    assert green(unmasked.texture).sum() > 1000  # the test can fail: unmasked, green bleeds in
    assert green(masked.texture).sum() == 0
    assert masked.seen_share < unmasked.seen_share - 0.05


def test_person_mask_from_the_segmentation_network(
    astronaut: NDArray[np.uint8], astronaut_mesh: Mesh, networks: object
) -> None:
    """The selfie-segmentation mask keeps the astronaut's face and drops the sky-blue-free corners
    of the square around it: high in the face's middle, low at the square's corners."""
    from headforge.pipeline.texture_mask import person_masks

    (mask,) = person_masks(astronaut, [astronaut_mesh], networks)  # type: ignore[arg-type]
    assert mask is not None
    centre = astronaut_mesh.vertices[:, :2].mean(0).astype(np.float32)
    points = np.array([[centre, centre]], np.float32) - 0.5
    assert mask.sample(points, 1)[0] > 0.9
    corner = np.array([[[mask.origin[0] + 2, mask.origin[1] + 2]] * 2], np.float32) - 0.5
    assert mask.sample(corner, 1)[0] < 0.1


def test_subject_capture_reports_fused_texture_seen(tmp_path: Path, networks: object) -> None:
    """Four real photos of one person through the `facemesh` pipeline: result.json gives each head's
    own `texture_seen` and the subject's fused one, which is at least each view's and strictly above
    them (the photos differ in yaw); every fused head's texture file is the fused texture."""
    from headforge.pipeline.run import ReconstructOptions, reconstruct_capture
    from headforge.schemas import validate_result

    folder = shared_data("subjects", "obama")
    photos = [(path.name, path.read_bytes()) for path in sorted(folder.glob("*.jpg"))]
    options = ReconstructOptions(subject=True, texture_size=512, splats=0, outputs=frozenset({"obj"}))
    document = reconstruct_capture(photos, options, tmp_path, networks=networks)  # type: ignore[arg-type]
    validate_result(document)
    fused = document["subject_texture"]
    singles = [view["texture_seen"] for view in fused["views"]]
    assert len(singles) == len(photos)
    assert fused["texture_seen"] >= max(singles) and fused["texture_seen"] > max(singles) + 0.03
    for head in document["heads"]:
        assert 0 < head["texture_seen"] <= head["texture_coverage"] <= 1
    yaws = {head["view"]: abs(head["pose"]["yaw"]) for head in document["heads"]}
    assert fused["frontal_view"] == min(yaws, key=yaws.__getitem__)
    textures = [
        np.asarray(cv2.imread(str(tmp_path / f"v{view['view']}_h{view['head']}_texture.png")))
        for view in fused["views"]
    ]
    assert all(np.array_equal(textures[0], texture) for texture in textures[1:])
    assert json.loads((tmp_path / "result.json").read_text())["subject_texture"] == fused


def test_flame_subject_fuses_in_flame_layout(
    astronaut: NDArray[np.uint8],
    networks: object,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The `flame` pipeline (synthetic FLAME: FLAME's topology with UV seams and no symmetry map) on
    the astronaut and its mirror image, a second view turned the other way: the fused texture lives
    in FLAME's layout and sees more than either photo alone."""
    from flame_synthetic import imported_synthetic_flame
    from test_reconstruct import jpeg_bytes

    from headforge.pipeline.run import ReconstructOptions, reconstruct_capture
    from headforge.schemas import validate_result

    _, asset = imported_synthetic_flame(tmp_path_factory.getbasetemp())
    monkeypatch.setenv("HEADFORGE_FLAME_ASSET", str(asset))
    photos = [
        ("a.jpg", jpeg_bytes(astronaut)),
        ("b.jpg", jpeg_bytes(np.ascontiguousarray(astronaut[:, ::-1]))),
    ]
    options = ReconstructOptions(
        pipeline="flame", subject=True, texture_size=512, splats=0, outputs=frozenset({"obj"})
    )
    document = reconstruct_capture(photos, options, tmp_path, networks=networks)  # type: ignore[arg-type]
    validate_result(document)
    assert all(head["mesh"]["topology"] == "flame5023" for head in document["heads"])
    fused = document["subject_texture"]
    singles = [view["texture_seen"] for view in fused["views"]]
    assert len(singles) == 2
    assert fused["texture_seen"] > max(singles), (fused, singles)
    # FLAME has no mirror map: coverage is what is seen.
    assert fused["texture_coverage"] == pytest.approx(fused["texture_seen"], abs=1e-3)
