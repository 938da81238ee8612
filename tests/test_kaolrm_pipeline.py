"""The `kaolrm` pipeline end to end on the astronaut photo, through a small seeded-random KaoLRM
checkpoint written in KaoLRM's layout and imported, with the synthetic FLAME.

Plumbing only: the weights are random, so the parameters, the mesh and the Gaussians mean nothing.
What is checked follows from the code path, not from the weights: the result validates, the
parameters are what the stage says it places the mesh with, the splats are the learned ones and
as many as the culling keeps, and a missing checkpoint or FLAME is reported as documented."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from flame_synthetic import imported_synthetic_flame
from kaolrm_synthetic import write_release
from needs import missing
from numpy.typing import NDArray
from PIL import Image
from plyfile import PlyData, PlyElement

from headforge.config import model_repository
from headforge.errors import HeadforgeError, PipelineUnavailableError
from headforge.models.kaolrm_import import import_kaolrm
from headforge.models.runtime import ModelSet, OrtNetwork, repository_network_path
from headforge.pipeline.kaolrm_stage import CAMERA_DISTANCE, project
from headforge.pipeline.package import SH_C0
from headforge.pipeline.run import ReconstructOptions, pipeline_missing_reason, reconstruct_image
from headforge.pipeline.splats import NORMAL_SCALE_RATIO
from headforge.schemas import validate_result

MONO_FOCAL = 20.0


@pytest.fixture(scope="module")
def kaolrm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A HEADFORGE_HOME holding the imported small mono checkpoint (with the FLAME tensors)."""
    base = tmp_path_factory.mktemp("kaolrm_pipeline")
    release = write_release(base / "release" / "mono")
    import_kaolrm(release, variant="mono", root=base / "home" / "models")
    return base / "home"


@pytest.fixture(scope="module")
def flame_asset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic FLAME's imported `.npz` (with UVs), generated once per process."""
    return imported_synthetic_flame(tmp_path_factory.getbasetemp())[1]


@pytest.fixture(scope="module")
def models(kaolrm_home: Path) -> ModelSet:
    """KaoLRM entries from the test's repository, MediaPipe's networks from the default one."""
    default_root = model_repository()
    for name in ("face_detection_full_range", "face_landmark", "selfie_segmentation"):
        try:
            repository_network_path(name, default_root)
        except HeadforgeError as error:
            missing(f"{name} is not in the model repository ({error}); run `headforge models pull`")

    def opener(name: str) -> OrtNetwork:
        root = kaolrm_home / "models" if name.startswith("kaolrm-") else default_root
        return OrtNetwork(repository_network_path(name, root), name, 2, ["CPUExecutionProvider"])

    return ModelSet(opener=opener)


def _png(rgb: NDArray[np.uint8]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _run(models: ModelSet, astronaut: NDArray[np.uint8], out: Path, **options: object) -> dict:  # type: ignore[type-arg]
    chosen = ReconstructOptions(pipeline="kaolrm", texture_size=512, **options)  # type: ignore[arg-type]
    return reconstruct_image(_png(astronaut), "astronaut.png", chosen, out, networks=models)


def test_unavailable_until_a_checkpoint_is_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADFORGE_HOME", str(tmp_path))
    reason = pipeline_missing_reason("kaolrm")
    assert reason is not None and "headforge models import kaolrm" in reason


def _check_params(head: dict, width: int) -> None:  # type: ignore[type-arg]
    params = head["params"]
    assert params["model"] == "kaolrm" and params["checkpoint"] == "mono"
    assert params["synth_focal"] == MONO_FOCAL and params["image_size"] == [width, width]
    assert len(params["shape"]) == 100 and len(params["expression"]) == 50
    assert params["scale"] >= 0.1
    # The pose is where the stage places KaoLRM's translation (t_z = 0 for mono) in the photo.
    t = np.array([*params["translation"][:2], 0.0])
    where = project(t[None], MONO_FOCAL, tuple(params["crop_origin_px"]), params["crop_side_px"])[0]
    np.testing.assert_allclose(head["pose"]["translation"], where, rtol=1e-5, atol=1e-3)
    expected_scale = params["scale"] * params["crop_side_px"] * MONO_FOCAL / CAMERA_DISTANCE
    assert head["pose"]["scale"] == pytest.approx(expected_scale, rel=1e-5)


def _check_learned_ply(ply: PlyElement) -> None:
    """What tells the learned Gaussians from the sampled ones in the PLY: 2D Gaussians whose normal
    axis is the epsilon of the larger tangent scale, two tangent scales of their own (sampled splats
    share one), opacities that vary (sampled ones are constant) and an SH DC colour that varies."""
    log_scales = np.stack([ply[f"scale_{i}"] for i in range(3)], axis=1).astype(np.float64)
    np.testing.assert_allclose(
        log_scales[:, 2] - log_scales[:, :2].max(axis=1), np.log(NORMAL_SCALE_RATIO), atol=1e-4
    )
    assert not np.allclose(log_scales[:, 0], log_scales[:, 1])
    quats = np.stack([ply[f"rot_{i}"] for i in range(4)], axis=1)
    np.testing.assert_allclose(np.linalg.norm(quats, axis=1), 1.0, atol=1e-5)
    opacity = np.asarray(ply["opacity"], np.float64)
    assert np.isfinite(opacity).all() and np.ptp(opacity) > 0
    dc = np.stack([ply[f"f_dc_{i}"] for i in range(3)], axis=1)
    assert np.ptp(dc) > 0 and bool((np.abs(dc) <= 0.5 / SH_C0 + 1e-5).all())  # colours in [0, 1]


def test_kaolrm_with_synthetic_flame(
    kaolrm_home: Path,
    models: ModelSet,
    flame_asset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    astronaut: NDArray[np.uint8],
) -> None:
    monkeypatch.setenv("HEADFORGE_HOME", str(kaolrm_home))
    monkeypatch.setenv("HEADFORGE_FLAME_ASSET", str(flame_asset))
    assert pipeline_missing_reason("kaolrm") is None
    out = tmp_path / "out"
    document = _run(models, astronaut, out, seed=3)
    validate_result(json.loads((out / "result.json").read_text()))
    assert document["pipeline"] == "kaolrm" and len(document["heads"]) == 1
    head = document["heads"][0]
    _check_params(head, astronaut.shape[1])
    assert head["params"]["flame_model"] == "checkpoint"  # the import kept the checkpoint's FLAME
    assert head["mesh"] == {"topology": "flame5023", "vertices": 5023, "faces": 9976}
    assert head["splat_source"] == "learned" and head["sh_degree"] == 0
    assert head["splats"] == int(8000 / 1.8) == 4444  # mono back-face culling
    ply = PlyData.read(str(out / head["artifacts"]["splats"]))["vertex"]
    assert ply.count == 4444
    _check_learned_ply(ply)
    names = [m["name"] for m in document["models"]]
    assert (
        "kaolrm-mono-image" in names and "kaolrm-mono-gaussians" in names and "selfie_segmentation" in names
    )
    assert names[-1] == "flame"  # the imported FLAME supplied the UVs
    for kind in ("glb", "texture", "splats"):
        assert (out / head["artifacts"][kind]).is_file()

    # The job seed draws the surface points: the same seed repeats them, another one moves them.
    again = _run(models, astronaut, tmp_path / "again", seed=3)
    other = _run(models, astronaut, tmp_path / "other", seed=4)
    same = (tmp_path / "again" / again["heads"][0]["artifacts"]["splats"]).read_bytes()
    assert same == (out / head["artifacts"]["splats"]).read_bytes()
    moved = PlyData.read(str(tmp_path / "other" / other["heads"][0]["artifacts"]["splats"]))["vertex"]
    assert not np.array_equal(np.asarray(moved["x"]), np.asarray(ply["x"]))


def test_kaolrm_at_the_vertices(
    kaolrm_home: Path,
    models: ModelSet,
    flame_asset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    astronaut: NDArray[np.uint8],
) -> None:
    monkeypatch.setenv("HEADFORGE_HOME", str(kaolrm_home))
    monkeypatch.setenv("HEADFORGE_FLAME_ASSET", str(flame_asset))
    out = tmp_path / "out"
    document = _run(models, astronaut, out, kaolrm_points="vertices")
    validate_result(json.loads((out / "result.json").read_text()))
    head = document["heads"][0]
    assert head["splat_source"] == "learned" and head["splats"] == int(5023 / 1.8) == 2790
    ply = PlyData.read(str(out / head["artifacts"]["splats"]))["vertex"]
    assert ply.count == 2790
    _check_learned_ply(ply)
    assert "splats" in head["artifacts"] and "binding" not in head["artifacts"]


def test_kaolrm_without_flame(
    kaolrm_home: Path,
    models: ModelSet,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    astronaut: NDArray[np.uint8],
) -> None:
    monkeypatch.setenv("HEADFORGE_HOME", str(kaolrm_home))
    monkeypatch.setenv("HEADFORGE_FLAME_ASSET", str(tmp_path / "absent.npz"))
    out = tmp_path / "out"
    document = _run(models, astronaut, out)
    validate_result(json.loads((out / "result.json").read_text()))
    head = document["heads"][0]
    _check_params(head, astronaut.shape[1])
    assert head["params"]["flame_model"] is None
    assert head["mesh"] is None and head["splats"] == 0 and head["artifacts"] == {}
    assert any("no FLAME model with UVs is imported" in note for note in document["notes"])
    assert "flame" not in [m["name"] for m in document["models"]]


def test_a_checkpoint_that_is_not_imported_is_refused(
    kaolrm_home: Path,
    models: ModelSet,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    astronaut: NDArray[np.uint8],
) -> None:
    monkeypatch.setenv("HEADFORGE_HOME", str(kaolrm_home))
    with pytest.raises(PipelineUnavailableError, match="multiview checkpoint is not imported"):
        _run(models, astronaut, tmp_path / "out", kaolrm_checkpoint="multiview")


def test_kaolrm_options_are_checked() -> None:
    from headforge.errors import InvalidOptionError

    assert ReconstructOptions(pipeline="kaolrm").kaolrm_points == "sampled"
    with pytest.raises(InvalidOptionError, match="kaolrm_points"):
        ReconstructOptions(pipeline="kaolrm", kaolrm_points="edges")
    with pytest.raises(InvalidOptionError, match="kaolrm_checkpoint"):
        ReconstructOptions(pipeline="kaolrm", kaolrm_checkpoint="stereo")


def test_checkpoint_flame_is_used_only_with_the_imported_triangles(
    flame_asset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The imported UVs are per face of the imported FLAME: the checkpoint's FLAME builds the mesh
    only when its triangle list is the same, else the imported FLAME does."""
    from kaolrm_synthetic import flame_buffers

    from headforge.models.kaolrm_import import FLAME_FILE, flame_arrays
    from headforge.pipeline.kaolrm_stage import flame_source

    monkeypatch.setenv("HEADFORGE_FLAME_ASSET", str(flame_asset))
    arrays = flame_arrays(flame_buffers())
    same, other = tmp_path / "same", tmp_path / "other"
    same.mkdir()
    other.mkdir()
    np.savez(same / FLAME_FILE, **arrays)  # type: ignore[arg-type]
    np.savez(other / FLAME_FILE, **{**arrays, "faces": arrays["faces"][:, [0, 2, 1]]})  # type: ignore[arg-type]
    chosen = flame_source(same)
    assert chosen is not None and chosen.name == "checkpoint"
    np.testing.assert_array_equal(chosen.asset.v_template, arrays["v_template"])
    fallback = flame_source(other)
    assert fallback is not None and fallback.name == "imported"
    assert flame_source(tmp_path) is not None and flame_source(tmp_path).name == "imported"  # type: ignore[union-attr]
