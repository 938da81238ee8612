"""Template registration accuracy on a generated 24,049-vertex head template (fixed thresholds)."""

from __future__ import annotations

import numpy as np
import pytest
from template_synthetic import SyntheticTemplate, deform, icosphere_target, landmark_vertices, make_template

from headforge.errors import TargetNotOverlappingError
from headforge.pipeline.registration import (
    Landmarks,
    TargetSurface,
    TemplateGeometry,
    prepare_template,
    register,
)

MM = 1e-3


@pytest.fixture(scope="module")
def template() -> SyntheticTemplate:
    return make_template()


@pytest.fixture(scope="module")
def geometry(template: SyntheticTemplate) -> TemplateGeometry:
    return prepare_template(template.vertices, template.faces)


def _landmarks(template: SyntheticTemplate, targets: np.ndarray, count: int = 60) -> Landmarks:
    ids = landmark_vertices(template, count)
    return Landmarks(np.repeat(ids[:, None], 3, axis=1), np.tile([1.0, 0.0, 0.0], (count, 1)), targets[ids])


def _surface_distance(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    closest, _, _ = TargetSurface(vertices, faces).closest(points)
    return np.linalg.norm(closest - points, axis=1)


def test_template_is_head_sized_with_seams_and_a_face_region(template: SyntheticTemplate) -> None:
    extent = template.vertices.max(0) - template.vertices.min(0)
    assert len(template.vertices) == 24_049
    assert 0.18 < extent[1] < 0.25
    assert len(template.uvs) > len(template.vertices)  # seam vertices carry several UVs
    assert 0.05 < template.face_region.mean() < 0.3


def test_a_known_smooth_deformation_of_itself(
    template: SyntheticTemplate, geometry: TemplateGeometry
) -> None:
    """(a) mean vertex error ≤ 0.5 mm, max ≤ 2 mm, against the known deformation."""
    truth = deform(template.vertices)
    moved = np.linalg.norm(truth - template.vertices, axis=1)
    assert moved.max() > 10 * MM  # the deformation is not trivial
    result = register(geometry, truth, template.faces, _landmarks(template, truth))
    error = np.linalg.norm(result.vertices - truth, axis=1)
    assert error.mean() <= 0.5 * MM, error.mean()
    assert error.max() <= 2.0 * MM, error.max()
    assert result.driven_share > 0.95


def test_b_the_same_surface_remeshed(template: SyntheticTemplate, geometry: TemplateGeometry) -> None:
    """(b) onto the deformed surface meshed as a subdivided icosahedron (40,962 vertices): mean surface
    distance ≤ 0.5 mm, both from the fitted template to the target and back."""
    sphere_vertices, sphere_faces = icosphere_target(6)
    target = deform(sphere_vertices)
    truth = deform(template.vertices)
    result = register(geometry, target, sphere_faces, _landmarks(template, truth))
    forward = _surface_distance(result.vertices, target, sphere_faces)
    backward = _surface_distance(target, result.vertices, template.faces)
    assert forward.mean() <= 0.5 * MM, forward.mean()
    assert backward.mean() <= 0.5 * MM, backward.mean()
    assert result.residual <= 0.5 * MM


def test_face_region_follows_a_face_only_target(
    template: SyntheticTemplate, geometry: TemplateGeometry
) -> None:
    """A target that is only the face: the face region lands on it, the rest moves smoothly along."""
    truth = deform(template.vertices)
    keep = template.face_region[template.faces].all(axis=1)
    used = np.unique(template.faces[keep])
    remap = np.full(len(truth), -1)
    remap[used] = np.arange(len(used))
    face_vertices, face_faces = truth[used], remap[template.faces[keep]]
    face_ids = np.flatnonzero(template.face_region)[::40]
    landmarks = Landmarks(
        np.repeat(face_ids[:, None], 3, axis=1), np.tile([1.0, 0, 0], (len(face_ids), 1)), truth[face_ids]
    )
    result = register(geometry, face_vertices, face_faces, landmarks, data_mask=template.face_region)
    inner = template.face_region & (np.linalg.norm(result.vertices - truth, axis=1) >= 0)
    distance = _surface_distance(result.vertices[inner], face_vertices, face_faces)
    assert np.median(distance) <= 0.5 * MM
    assert not result.driven[~template.face_region].any()
    # The rest of the head keeps its shape: no triangle turns over.
    before = np.cross(
        *(template.vertices[template.faces[:, k]] - template.vertices[template.faces[:, 0]] for k in (1, 2))
    )
    after = np.cross(
        *(result.vertices[template.faces[:, k]] - result.vertices[template.faces[:, 0]] for k in (1, 2))
    )
    assert (np.einsum("ij,ij->i", before, after) > 0).mean() > 0.999


def test_target_that_does_not_overlap_is_refused(
    template: SyntheticTemplate, geometry: TemplateGeometry
) -> None:
    far = template.vertices + np.array([1.0, 0.0, 0.0])
    with pytest.raises(TargetNotOverlappingError) as caught:
        register(geometry, far, template.faces)
    assert caught.value.code == "target_not_overlapping"
