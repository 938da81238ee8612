"""The pipeline's contracts: the options model (one declaration for the CLI, the API form and the
Celery payload), the model set, splats with spherical harmonics in the 3DGS PLY layout, and
captures of several photos (subject=true) on real photos of one person."""

from __future__ import annotations

import inspect
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from needs import shared_data
from plyfile import PlyData

from headforge.errors import InvalidOptionError, ModelsMissingError, UnknownPipelineError
from headforge.models.runtime import ModelSet
from headforge.pipeline import splats as splats_module
from headforge.pipeline import texture as texture_module
from headforge.pipeline.options import MAX_SPLATS, MAX_TEXTURE_SIZE, MIN_TEXTURE_SIZE, ReconstructOptions
from headforge.pipeline.package import splats_ply_bytes
from headforge.pipeline.registry import PIPELINES, networks_for
from headforge.pipeline.run import reconstruct_capture, reconstruct_image
from headforge.pipeline.types import Splats
from headforge.schemas import validate_result
from headforge.service.forms import option_fields

# --- options ----------------------------------------------------------------------------------------


def test_option_limits_match_the_steps() -> None:
    assert (MIN_TEXTURE_SIZE, MAX_TEXTURE_SIZE) == (
        texture_module.MIN_TEXTURE_SIZE,
        texture_module.MAX_TEXTURE_SIZE,
    )
    assert MAX_SPLATS == splats_module.MAX_SPLATS


def test_options_round_trip_and_refusals() -> None:
    options = ReconstructOptions(seed=9, subject=True, outputs="glb,preview")  # type: ignore[arg-type]
    payload = options.to_dict()
    assert json.loads(json.dumps(payload)) == payload  # the Celery payload is plain JSON
    assert payload["outputs"] == ["glb", "preview"] and payload["subject"] is True
    assert ReconstructOptions.from_dict(payload) == options
    for bad in ({"seed": 2**32}, {"subject": "maybe"}, {"splats": 1.5}, {"outputs": ["glb", "fbx"]}):
        with pytest.raises(InvalidOptionError):
            ReconstructOptions.from_dict(bad)
    with pytest.raises(UnknownPipelineError):
        ReconstructOptions.from_dict({"pipeline": "nosuch"})


def test_api_form_fields_come_from_the_model() -> None:
    parameters = inspect.signature(option_fields).parameters
    assert list(parameters) == list(ReconstructOptions.model_fields)
    assert {"seed", "subject"} <= set(parameters)
    sent = option_fields(
        **{name: None for name in parameters} | {"outputs": ["glb, obj", "splats"], "seed": 4}
    )
    assert sent == {"outputs": ["glb", "obj", "splats"], "seed": 4}
    assert ReconstructOptions.from_dict(sent).outputs == {"glb", "obj", "splats"}


# --- model set ----------------------------------------------------------------------------------------


class _Stub:
    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        return [x]


def test_model_set_opens_lazily_once_and_records_use() -> None:
    opened: list[str] = []

    def opener(name: str) -> _Stub:
        opened.append(name)
        return _Stub(name)

    models = ModelSet(opener=opener)
    assert models.loaded() == []
    job = models.used()
    assert job["a"] is job["a"] and opened == ["a"]
    models.preload(["b"])
    assert opened == ["a", "b"] and models.handed_out == []  # preloading is not use
    assert job.handed_out == ["a"] and models.used().handed_out == []
    with pytest.raises(ModelsMissingError):
        ModelSet({"a": _Stub("a")})["b"]
    assert networks_for(["facemesh", "flame"]) == ["face_detection_full_range", "face_landmark"]


# --- splats with spherical harmonics -------------------------------------------------------------------


def _splats(count: int, sh_rest: np.ndarray | None, source: str = "learned") -> Splats:
    rng = np.random.default_rng(0)
    return Splats(
        means=rng.normal(size=(count, 3)).astype(np.float32),
        normals=np.tile(np.float32([0, 0, 1]), (count, 1)),
        colors=rng.uniform(size=(count, 3)).astype(np.float32),
        opacities=np.full(count, 0.5, np.float32),
        scales=np.full((count, 3), 0.01, np.float32),
        rotations=np.tile(np.float32([1, 0, 0, 0]), (count, 1)),
        sh_rest=sh_rest,
        source=source,
    )


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_ply_writes_f_rest_in_the_3dgs_layout(degree: int) -> None:
    count, rest = 5, (degree + 1) ** 2 - 1
    coefficients = np.arange(count * rest * 3, dtype=np.float32).reshape(count, rest, 3) if rest else None
    splats = _splats(count, coefficients)
    assert splats.sh_degree == degree
    vertex = PlyData.read(io.BytesIO(splats_ply_bytes(splats)))["vertex"]
    names = [p.name for p in vertex.properties]
    expected_rest = [f"f_rest_{i}" for i in range(3 * rest)]
    assert names == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", *expected_rest,
                     "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]  # fmt: skip
    if coefficients is not None:
        # Channel-major, as 3DGS stores features_rest transposed: f_rest_{c*K+k} = sh_rest[:, k, c].
        for channel in range(3):
            for k in range(rest):
                np.testing.assert_array_equal(
                    vertex[f"f_rest_{channel * rest + k}"], coefficients[:, k, channel]
                )


def test_splats_refuse_bad_sh_and_source() -> None:
    with pytest.raises(ValueError, match="coefficients"):
        _splats(4, np.zeros((4, 5, 3), np.float32))
    with pytest.raises(ValueError, match="sh_rest"):
        _splats(4, np.zeros((3, 3, 3), np.float32))
    with pytest.raises(ValueError, match="source"):
        _splats(4, None, source="guessed")


# --- captures -------------------------------------------------------------------------------------------

FAST: dict[str, Any] = {"texture_size": 512, "splats": 300}


def _obama() -> list[tuple[str, bytes]]:
    folder = shared_data("subjects", "obama")
    return [(name, (folder / name).read_bytes()) for name in ("obama.jpg", "obama1.jpg")]


def test_subject_capture_names_views(networks: ModelSet, tmp_path: Path) -> None:
    photos = _obama()
    options = ReconstructOptions(subject=True, **FAST)
    document = reconstruct_capture(photos, options, tmp_path, networks=networks)
    validate_result(document)
    assert [view["source"]["filename"] for view in document["views"]] == ["obama.jpg", "obama1.jpg"]
    assert document["source"] == document["views"][0]["source"]
    assert [(head["view"], head["index"]) for head in document["heads"]] == [(0, 0), (1, 0)]
    names = sorted(path.name for path in tmp_path.iterdir())
    for view in (0, 1):
        assert {f"v{view}_h0.glb", f"v{view}_h0_splats.ply", f"v{view}_preview.png"} <= set(names)
    assert not any(name.startswith("h") for name in names)
    assert {a["view"] for a in document["artifacts"]} == {0, 1}
    # Each view's head is the one found in that photo alone.
    for view, (name, data) in enumerate(photos):
        alone = reconstruct_image(
            data, name, ReconstructOptions(**FAST), tmp_path / f"alone{view}", networks=networks
        )
        head = next(h for h in document["heads"] if h["view"] == view)
        assert head["box"] == alone["heads"][0]["box"]
        assert head["landmarks_3d"] == alone["heads"][0]["landmarks_3d"]


def test_several_photos_need_subject(networks: ModelSet, tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match="subject"):
        reconstruct_capture(_obama(), ReconstructOptions(**FAST), tmp_path, networks=networks)


def test_one_photo_subject_keeps_one_photo_names(networks: ModelSet, tmp_path: Path) -> None:
    name, data = _obama()[0]
    document = reconstruct_capture(
        [(name, data)], ReconstructOptions(subject=True, **FAST), tmp_path, networks=networks
    )
    assert "views" not in document
    assert {"h0.glb", "preview.png", "result.json"} <= {path.name for path in tmp_path.iterdir()}


def test_registry_rows_are_callables() -> None:
    for row in PIPELINES.values():
        assert callable(row.heads.find) and all(callable(stage.run) for stage in row.stages)
        assert row.queue in ("cpu", "gpu")
        assert all(callable(requirement) for requirement in row.requires)


# --- one Rodrigues ------------------------------------------------------------------------------------


def test_rodrigues_is_one_formula_for_numpy_and_torch() -> None:
    import torch

    from headforge.models.rotations import rodrigues

    rng = np.random.default_rng(5)
    vectors = np.concatenate([rng.normal(0, 1.5, (64, 3)), np.zeros((1, 3)), np.full((1, 3), 1e-9)])
    matrices = rodrigues(vectors)
    np.testing.assert_allclose(
        matrices @ matrices.transpose(0, 2, 1), np.broadcast_to(np.eye(3), matrices.shape), atol=1e-12
    )
    np.testing.assert_allclose(np.linalg.det(matrices), 1.0, atol=1e-12)
    np.testing.assert_allclose(matrices[-2], np.eye(3), atol=1e-15)
    # R v = v (the axis is fixed) and the rotation angle is |v|.
    np.testing.assert_allclose(np.einsum("bij,bj->bi", matrices[:64], vectors[:64]), vectors[:64], atol=1e-12)
    angles = np.arccos(np.clip((np.trace(matrices[:64], axis1=1, axis2=2) - 1) / 2, -1, 1))
    wrapped = np.linalg.norm(vectors[:64], axis=1) % (2 * np.pi)
    np.testing.assert_allclose(angles, np.minimum(wrapped, 2 * np.pi - wrapped), atol=1e-6)
    tensor = torch.tensor(vectors, requires_grad=True)
    torch_matrices = rodrigues(tensor)
    np.testing.assert_allclose(torch_matrices.detach().numpy(), matrices, atol=1e-14)
    torch_matrices.sum().backward()
    assert tensor.grad is not None and torch.isfinite(tensor.grad).all()  # finite at zero rotation too


def test_the_package_resolves_no_import_strings() -> None:
    """Pipelines, pulls and benchmarks hold real callables: nothing in the package imports a module
    by a name built at run time."""
    package = Path(__file__).resolve().parents[1] / "headforge"
    offenders = [
        str(path.relative_to(package))
        for path in sorted(package.rglob("*.py"))
        if "import_module(" in path.read_text(encoding="utf-8")
        or "__import__(" in path.read_text(encoding="utf-8")
    ]
    assert offenders == []
