"""Importing FLAME files: the round trip pickle → import → npz → layer, the restricted unpickler's
refusals, and messages that name the problem."""

from __future__ import annotations

import os
import pickle
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flame_synthetic import (
    SyntheticFiles,
    dump_flame_pickle,
    flame_model_dict,
    imported_synthetic_flame,
    write_obj,
)
from typer.testing import CliRunner

from headforge.errors import AssetError, PipelineUnavailableError
from headforge.models.flame import FlameLayer
from headforge.models.flame_import import (
    flame_available,
    flame_unavailable_reason,
    import_flame,
    load_flame_asset,
    restricted_load,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> SyntheticFiles:
    return imported_synthetic_flame(tmp_path_factory.getbasetemp())[0]


def test_round_trip_pickle_to_layer(files: SyntheticFiles, tmp_path: Path) -> None:
    destination = import_flame(
        files.model,
        [files.mediapipe_embedding, files.ibug_embedding],
        files.head_template,
        tmp_path / "flame.npz",
    )
    source = files.arrays
    asset = load_flame_asset(destination)
    np.testing.assert_allclose(asset.v_template, source.v_template, atol=1e-6)
    np.testing.assert_array_equal(asset.faces, source.faces)
    np.testing.assert_allclose(asset.shapedirs, source.shapedirs[:, :, :300], atol=1e-6)
    np.testing.assert_allclose(asset.exprdirs, source.shapedirs[:, :, 300:], atol=1e-6)
    np.testing.assert_allclose(asset.j_regressor, source.j_regressor.toarray(), atol=1e-7)
    np.testing.assert_array_equal(asset.parents, [-1, 0, 1, 1, 1])
    assert asset.uvs is not None and asset.uv_faces is not None
    np.testing.assert_allclose(asset.uvs, source.uvs, atol=1e-6)
    np.testing.assert_array_equal(asset.uv_faces, source.uv_faces)
    np.testing.assert_array_equal(asset.mp_landmark_indices, source.landmark_indices)
    assert asset.ibug is not None and asset.ibug["ibug_static_face_idx"].shape == (51,)
    assert asset.ibug["ibug_dynamic_bary"].shape == (79, 17, 3)
    assert asset.metadata["sources"]["model"]["file"] == "generic_model.pkl"
    # The served asset is a plain npz: it loads without pickle.
    with np.load(destination, allow_pickle=False) as npz:
        assert "shapedirs" in npz.files
    # ... and drives the layer: a shape coefficient moves the mesh along its basis vector.
    layer = FlameLayer(asset)
    shape = torch.zeros(1, 100)
    shape[0, 4] = 1.5
    with torch.no_grad():
        vertices = layer(shape, torch.zeros(1, 50), torch.zeros(1, 15), torch.zeros(1, 3))[0].numpy()
    np.testing.assert_allclose(vertices, source.v_template + 1.5 * source.shapedirs[:, :, 4], atol=1e-6)


def test_imported_asset_is_owner_only(files: SyntheticFiles, tmp_path: Path) -> None:
    """FLAME's licence forbids redistribution: the asset is 0600, also when it replaces a file
    that was readable by others, whatever the umask."""
    destination = tmp_path / "assets" / "flame.npz"
    destination.parent.mkdir()
    destination.write_bytes(b"an older asset")
    destination.chmod(0o644)
    previous = os.umask(0o000)
    try:
        import_flame(files.model, [files.mediapipe_embedding], files.head_template, destination)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(destination.stat().st_mode) == 0o600
    assert flame_available(destination)
    assert not [path.name for path in destination.parent.iterdir() if path != destination]  # no temp files


def test_asset_this_user_cannot_read_is_unavailable_with_the_reason(
    files: SyntheticFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 0600 asset copied or mounted for another user: the reason says what to fix, not "re-import"."""
    destination = import_flame(
        files.model, [files.mediapipe_embedding], files.head_template, tmp_path / "f.npz"
    )
    assert flame_unavailable_reason(destination) is None
    # The tests may run as root, which reads any file: stand in for another user's permission check.
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != destination)
    reason = flame_unavailable_reason(destination)
    assert reason is not None and "not readable by this process's user" in reason
    assert "0600" in reason and "docs/flame.md" in reason
    with pytest.raises(PipelineUnavailableError, match="not readable by this process's user"):
        load_flame_asset(destination)


def test_protocol_0_pickle_imports(files: SyntheticFiles, tmp_path: Path) -> None:
    """Python 2's default protocol rebuilds objects through copy_reg._reconstructor."""
    path = tmp_path / "generic_model.pkl"
    dump_flame_pickle(flame_model_dict(files.arrays), path, protocol=0)
    assert b"copy_reg" in path.read_bytes() and b"chumpy.ch" in path.read_bytes()
    asset = load_flame_asset(import_flame(path, destination=tmp_path / "flame.npz"))
    np.testing.assert_allclose(asset.exprdirs, files.arrays.shapedirs[:, :, 300:], atol=1e-6)


def test_plain_dict_without_chumpy_imports_too(files: SyntheticFiles, tmp_path: Path) -> None:
    """FLAME 2023 Open and re-saved files hold plain arrays and a modern scipy matrix."""
    path = tmp_path / "flame2023_open.pkl"
    with path.open("wb") as stream:
        pickle.dump(flame_model_dict(files.arrays, chumpy=False), stream, protocol=4)
    asset = load_flame_asset(import_flame(path, destination=tmp_path / "flame.npz"))
    np.testing.assert_allclose(asset.j_regressor, files.arrays.j_regressor.toarray(), atol=1e-7)
    assert asset.uvs is None and not asset.has_mediapipe_embedding
    reason = flame_unavailable_reason(tmp_path / "flame.npz")
    assert reason is not None and "--uv" in reason


class _Exploit:
    """Pickles into a call of os.system: the classic malicious pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(files: SyntheticFiles, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    model = flame_model_dict(files.arrays)
    model["bs_style"] = _Exploit(marker)
    evil = tmp_path / "generic_model.pkl"
    dump_flame_pickle(model, evil)
    with pytest.raises(AssetError, match=r"refusing to load posix\.system") as caught:
        import_flame(evil, destination=tmp_path / "flame.npz")
    assert caught.value.code == "invalid_asset"
    assert not marker.exists()
    assert not (tmp_path / "flame.npz").exists()


def test_malicious_npy_embedding_is_refused(files: SyntheticFiles, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "landmark_embedding.npy"
    np.save(evil, np.array({"static_lmk_faces_idx": _Exploit(marker)}, dtype=object), allow_pickle=True)
    with pytest.raises(AssetError, match="refusing to load"):
        import_flame(files.model, [evil], destination=tmp_path / "flame.npz")
    assert not marker.exists()


def test_unexpected_class_is_named() -> None:
    from collections import OrderedDict

    with pytest.raises(AssetError, match=r"collections\.OrderedDict"):
        restricted_load(pickle.dumps(OrderedDict(a=1), protocol=2))


def _import_modified(files: SyntheticFiles, tmp_path: Path, **changes: Any) -> None:
    model = flame_model_dict(files.arrays)
    for key, value in changes.items():
        if value is None:
            del model[key]
        else:
            model[key] = value
    path = tmp_path / "generic_model.pkl"
    dump_flame_pickle(model, path)
    import_flame(path, destination=tmp_path / "flame.npz")


def test_missing_key_is_named(files: SyntheticFiles, tmp_path: Path) -> None:
    with pytest.raises(AssetError, match=r"missing key `posedirs`"):
        _import_modified(files, tmp_path, posedirs=None)


def test_wrong_shape_is_named(files: SyntheticFiles, tmp_path: Path) -> None:
    with pytest.raises(
        AssetError, match=r"`shapedirs` has shape \(5023, 3, 200\), expected \(5023, 3, 400\)"
    ):
        _import_modified(files, tmp_path, shapedirs=files.arrays.shapedirs[:, :, :200])
    with pytest.raises(AssetError, match=r"`weights` rows must be non-negative and sum to 1"):
        _import_modified(files, tmp_path, weights=files.arrays.weights * 2)
    bad_tree = files.arrays.kintree_table.copy()
    bad_tree[0, 2] = 3
    with pytest.raises(AssetError, match=r"kintree_table"):
        _import_modified(files, tmp_path, kintree_table=bad_tree)


def test_bad_embedding_and_template_are_named(files: SyntheticFiles, tmp_path: Path) -> None:
    embedding = tmp_path / "embedding.npz"
    np.savez(
        embedding,
        lmk_face_idx=np.array([1, 2]),
        lmk_b_coords=np.full((2, 3), 0.5),
        landmark_indices=np.array([3, 4]),
    )
    with pytest.raises(AssetError, match="must sum to 1"):
        import_flame(files.model, [embedding], destination=tmp_path / "flame.npz")
    np.savez(embedding, something_else=np.zeros(3))
    with pytest.raises(AssetError, match="not a landmark embedding"):
        import_flame(files.model, [embedding], destination=tmp_path / "flame.npz")
    short = tmp_path / "head_template.obj"
    arrays = files.arrays
    trimmed = type(arrays)(
        **{**arrays.__dict__, "uvs": arrays.uvs[:5000], "uv_faces": np.minimum(arrays.uv_faces, 4999)}
    )
    write_obj(trimmed, short)
    with pytest.raises(AssetError, match=r"expected 5023 v, 5118 vt and 9976 f"):
        import_flame(files.model, uv_path=short, destination=tmp_path / "flame.npz")


def test_without_an_asset_the_pipeline_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEADFORGE_HOME", str(tmp_path))
    assert not flame_available()
    with pytest.raises(PipelineUnavailableError, match=r"docs/flame\.md"):
        load_flame_asset()


def test_cli_import_and_info(files: SyntheticFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from headforge.cli import app

    monkeypatch.setenv("HEADFORGE_HOME", str(tmp_path))
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "flame",
            "import",
            str(files.model),
            "--landmarks",
            str(files.mediapipe_embedding),
            "--uv",
            str(files.head_template),
        ],
    )
    assert result.exit_code == 0, result.output
    assert flame_available()
    info = runner.invoke(app, ["flame", "info"])
    assert info.exit_code == 0, info.output
    document = json.loads(info.output)
    assert (
        document["available"] is True
        and document["vertices"] == 5023
        and document["mediapipe_landmarks"] == 105
    )
