"""`headforge models import kaolrm`: a checkpoint written in KaoLRM's layout from our modules with
seeded random weights (a small config) → strict load → two ONNX graphs with parity → manifests;
every bad input exits non-zero with `invalid_checkpoint` naming the problem and changes nothing."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from kaolrm_synthetic import SMALL, flame_buffers, kaolrm_tensors, write_release
from safetensors.torch import save_file
from typer.testing import CliRunner

from headforge.cli import app
from headforge.errors import HeadforgeError
from headforge.models.kaolrm import KaoLRM, KaoLRMGaussianGraph
from headforge.models.kaolrm_import import (
    FLAME_FILE,
    GAUSSIAN_POINTS,
    gaussian_entry_name,
    image_entry_name,
    import_kaolrm,
    latest_entries,
    load_checkpoint,
)


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_release(tmp_path_factory.mktemp("kaolrm") / "mono")


@pytest.fixture(scope="module")
def imported(release: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    """The CLI run once, in a subprocess, on a fresh HEADFORGE_HOME."""
    home = tmp_path_factory.mktemp("home")
    result = subprocess.run(
        [sys.executable, "-m", "headforge", "models", "import", "kaolrm", str(release), "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "HEADFORGE_HOME": str(home), "OMP_NUM_THREADS": "2"},
        check=False,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return home, json.loads(result.stdout.strip().splitlines()[-1])


def test_strict_load_reproduces_the_module(release: Path) -> None:
    model, flame, sha = load_checkpoint(release / "model.safetensors", release / "config.json")
    reference = kaolrm_tensors()
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key
    assert len(flame) == 14 and len(sha) == 64


def test_import_writes_both_graphs_with_parity(
    imported: tuple[Path, dict[str, object]], release: Path
) -> None:
    home, summary = imported
    assert summary["family"] == "kaolrm" and summary["variant"] == "mono"  # from the folder name
    assert summary["parameters"] == sum(p.numel() for p in KaoLRM(SMALL).parameters())
    assert set(summary) >= {"family", "variant", "version", "parameters", "parity_max_abs"}
    root = home / "models"
    pair = latest_entries("mono", root)
    assert pair is not None
    image_dir, gaussian_dir = pair
    assert image_dir.parent.name == image_entry_name(
        "mono"
    ) and gaussian_dir.parent.name == gaussian_entry_name("mono")
    for directory in pair:
        manifest = json.loads((directory / "manifest.json").read_text())
        assert manifest["parity"]["max_rel_error"] <= 1e-4
        assert manifest["kaolrm"]["synth_focal"] == 20.0
        assert manifest["source"]["config"]["transformer_dim"] == 48
    assert (image_dir / FLAME_FILE).is_file()
    assert float(summary["parity_max_abs"]) >= 0.0  # type: ignore[arg-type]

    # Our own parity check on a real photo: ONNX Runtime against the eager module.
    from PIL import Image

    photo = (
        Image.open(Path(__file__).parents[1] / "examples" / "astronaut.jpg").convert("RGB").resize((224, 224))
    )
    image = (np.asarray(photo, dtype=np.float32) / 255.0).transpose(2, 0, 1)[None]
    model, _, _ = load_checkpoint(release / "model.safetensors", release / "config.json")
    with torch.no_grad():
        planes, params = model(torch.from_numpy(image))
    session = ort.InferenceSession(str(image_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    got_planes, got_params = session.run(["planes", "flame"], {"image": image})
    assert np.abs(got_params - params.numpy()).max() <= 1e-4 * np.abs(params.numpy()).max()
    assert np.abs(got_planes - planes.numpy()).max() <= 1e-4 * np.abs(planes.numpy()).max()
    points = np.zeros((1, GAUSSIAN_POINTS, 3), dtype=np.float32)
    points[0, :, :] = np.random.default_rng(0).uniform(-0.03, 0.03, size=(GAUSSIAN_POINTS, 3))
    gaussians = ort.InferenceSession(
        str(gaussian_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    ).run(["gaussians"], {"planes": got_planes, "points": points})[0]
    with torch.no_grad():
        expected = KaoLRMGaussianGraph(model, 20.0)(planes, torch.from_numpy(points)).numpy()
    assert np.abs(gaussians - expected).max() <= 1e-4 * np.abs(expected).max()


def test_the_kaolrm_flame_tensors_are_kept_as_an_asset(imported: tuple[Path, dict[str, object]]) -> None:
    home, _ = imported
    pair = latest_entries("mono", home / "models")
    assert pair is not None
    with np.load(pair[0] / FLAME_FILE, allow_pickle=False) as npz:
        assert npz["shapedirs"].shape == (5023, 3, 100)
        assert npz["exprdirs"].shape == (5023, 3, 50)
        assert npz["posedirs"].shape == (5023, 3, 36)
        buffers = flame_buffers()
        # posedirs goes back to the smplx layout exactly.
        assert np.array_equal(npz["posedirs"].reshape(-1, 36).T, buffers["flame_model.posedirs"].numpy())


# ------------------------------------------------------------------------------------------------
# Bad input


def snapshot(root: Path) -> dict[str, bytes]:
    return (
        {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        if root.exists()
        else {}
    )


def run_cli(home: Path, *args: str) -> tuple[int, str]:
    """The command in-process; a `HeadforgeError` is rendered as `headforge.cli.main` renders it
    (`error [code]: message`, exit 2). `test_cli_exit_status_and_message` runs the real entry point."""
    runner = CliRunner()
    result = runner.invoke(app, ["models", "import", "kaolrm", *args], env={"HEADFORGE_HOME": str(home)})
    if isinstance(result.exception, HeadforgeError):
        return 2, f"error [{result.exception.code}]: {result.exception.message}"
    return result.exit_code, result.output


def expect_refused(home: Path, fragment: str, *args: str, code: str = "invalid_checkpoint") -> None:
    before = snapshot(home / "models")
    exit_code, output = run_cli(home, *args)
    assert exit_code != 0
    assert code in output, output
    assert fragment in output, output
    assert snapshot(home / "models") == before


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A repository that already holds an entry, to show a refused import leaves it alone."""
    root = tmp_path / "home" / "models" / "kaolrm-mono-image" / "old"
    root.mkdir(parents=True)
    (root / "manifest.json").write_text("{}")
    return tmp_path / "home"


def test_cli_exit_status_and_message(home: Path, tmp_path: Path) -> None:
    tensors = kaolrm_tensors()
    tensors["upsampler.weight"] = torch.zeros(48, 9, 2, 2)
    release = write_release(tmp_path / "mono", tensors=tensors, with_flame=False)
    before = snapshot(home / "models")
    result = subprocess.run(
        [sys.executable, "-m", "headforge", "models", "import", "kaolrm", str(release)],
        capture_output=True,
        text=True,
        env={**os.environ, "HEADFORGE_HOME": str(home)},
        check=False,
        timeout=300,
    )
    assert result.returncode == 2
    assert (
        "error [invalid_checkpoint]" in result.stderr and "triplane_dim is 8 in config.json" in result.stderr
    )
    assert snapshot(home / "models") == before


def test_missing_key(home: Path, tmp_path: Path) -> None:
    tensors = kaolrm_tensors()
    del tensors["transformer.layers.1.cross_attn.in_proj_weight"]
    release = write_release(tmp_path / "mono", tensors=tensors)
    expect_refused(home, "transformer.layers.1.cross_attn.in_proj_weight", str(release))


def test_unexpected_key(home: Path, tmp_path: Path) -> None:
    tensors = {**kaolrm_tensors(), "synthesizer.renderer.weight": torch.zeros(3)}
    release = write_release(tmp_path / "mono", tensors=tensors)
    expect_refused(home, "synthesizer.renderer.weight", str(release))


def test_wrong_shape(home: Path, tmp_path: Path) -> None:
    tensors = kaolrm_tensors()
    tensors["gaussian_decoder.decoder.net.6.weight"] = torch.zeros(12, 64)
    release = write_release(tmp_path / "mono", tensors=tensors)
    expect_refused(home, "gaussian_decoder.decoder.net.6.weight", str(release))


def test_config_that_does_not_match_the_weights(home: Path, tmp_path: Path) -> None:
    document = {**SMALL.to_dict(), "transformer_dim": 64, "encoder_feat_dim": 64}
    release = write_release(tmp_path / "mono", config_document=document)
    expect_refused(home, "config.json does not match the weights: transformer_dim is 64", str(release))


def test_bad_config(home: Path, tmp_path: Path) -> None:
    release = write_release(tmp_path / "mono")
    (release / "config.json").write_text("{not json")
    expect_refused(home, "config.json", str(release))
    document = {k: v for k, v in SMALL.to_dict().items() if k != "triplane_dim"}
    (release / "config.json").write_text(json.dumps(document))
    expect_refused(home, "lacks triplane_dim", str(release))


def test_weights_file_without_config(home: Path, tmp_path: Path) -> None:
    folder = tmp_path / "loose"
    folder.mkdir()
    save_file(kaolrm_tensors(), str(folder / "model.safetensors"))
    expect_refused(home, "--config", str(folder / "model.safetensors"), "--name", "mono")
    # With --config it imports.
    config = tmp_path / "elsewhere.json"
    config.write_text(json.dumps(SMALL.to_dict()))
    exit_code, output = run_cli(
        home, str(folder / "model.safetensors"), "--config", str(config), "--name", "multiview", "--json"
    )
    assert exit_code == 0, output
    assert json.loads(output.strip().splitlines()[-1])["variant"] == "multiview"


def test_variant_must_be_given_when_the_folder_does_not_say(home: Path, tmp_path: Path) -> None:
    release = write_release(tmp_path / "release")
    expect_refused(home, "--name mono|multiview", str(release), code="invalid_option")
    expect_refused(home, "--name must be one of", str(release), "--name", "stereo", code="invalid_option")


def test_not_a_checkpoint(home: Path, tmp_path: Path) -> None:
    release = write_release(tmp_path / "mono")
    (release / "model.safetensors").write_bytes(b"\x00" * 100)
    expect_refused(home, "model.safetensors", str(release))


def test_pickle_is_never_unpickled(home: Path, tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("unpickled!",))

    folder = tmp_path / "mono"
    folder.mkdir()
    (folder / "model.pth").write_bytes(pickle.dumps({"state_dict": Boom()}))
    (folder / "config.json").write_text(json.dumps(SMALL.to_dict()))
    before = snapshot(home / "models")
    exit_code, output = run_cli(home, str(folder / "model.pth"))
    assert exit_code != 0 and "invalid_checkpoint" in output and "unpickled!" not in output
    assert snapshot(home / "models") == before


def test_incomplete_or_misshapen_flame_tensors(home: Path, tmp_path: Path) -> None:
    tensors = {**kaolrm_tensors(), **flame_buffers()}
    del tensors["flame_model.lbs_weights"]
    release = write_release(tmp_path / "a" / "mono", tensors=tensors)
    expect_refused(home, "flame_model.lbs_weights", str(release))
    tensors = {**kaolrm_tensors(), **flame_buffers()}
    tensors["flame_model.shapedirs"] = torch.zeros(5023, 3, 400)
    release = write_release(tmp_path / "b" / "mono", tensors=tensors)
    expect_refused(home, "flame_model.shapedirs", str(release))


def test_non_finite_weights(home: Path, tmp_path: Path) -> None:
    tensors = kaolrm_tensors()
    tensors["pos_embed"][0, 0, 0] = float("nan")
    release = write_release(tmp_path / "mono", tensors=tensors)
    expect_refused(home, "pos_embed", str(release))


def test_python_api_refuses_unknown_variant(tmp_path: Path, release: Path) -> None:
    from headforge.errors import InvalidCheckpointError

    with pytest.raises(InvalidCheckpointError):
        import_kaolrm(release, variant="stereo", root=tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_layer_count_that_does_not_match_the_weights(home: Path, tmp_path: Path) -> None:
    document = {**SMALL.to_dict(), "transformer_layers": 3}
    release = write_release(tmp_path / "mono", config_document=document)
    expect_refused(
        home, "config.json does not match the weights: transformer_layers is 3 in config.json, the weights have 2",
        str(release),
    )  # fmt: skip


def test_a_failed_second_export_leaves_the_repository_unchanged(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image graph's entry is written, then the Gaussian graph's export fails: neither entry may
    appear (they are staged and swapped in together). The first export is stood in by files
    written into its staging folder, which is what a real export leaves there; the second raises
    what a failed export raises."""
    import headforge.export.model as export_model
    from headforge.errors import ModelExportError

    calls: list[str] = []

    def export_then_fail(
        module: object, spec: object, name: str, version: str, directory: Path, **_: object
    ) -> dict:  # type: ignore[type-arg]
        calls.append(name)
        if len(calls) == 2:
            raise ModelExportError(f"{name}: ONNX Runtime differs from PyTorch by 1.0 (bound 1e-4)")
        (directory / "model.onnx").write_bytes(b"onnx")
        (directory / "manifest.json").write_text("{}")
        return {"parity": {"max_abs_error": 0.0}}

    monkeypatch.setattr(export_model, "write_entry_files", export_then_fail)
    release = write_release(tmp_path / "mono", with_flame=False)
    before = snapshot(home / "models")
    with pytest.raises(ModelExportError):
        import_kaolrm(release, variant="mono", root=home / "models")
    assert calls == [image_entry_name("mono"), gaussian_entry_name("mono")]
    assert snapshot(home / "models") == before
    assert latest_entries("mono", home / "models") is None
