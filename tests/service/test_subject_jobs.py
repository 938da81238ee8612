"""Jobs of several photos through the real stack: with subject=true one capture and one result.json
listing the views; without it, independent photos as before; seed reaches the worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from stacklib import FAST_OPTIONS, Stack, wait_job

from headforge.client import ApiError

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def _obama() -> list[tuple[str, bytes]]:
    folder = SHARED_DATA / "subjects" / "obama"
    if not folder.is_dir():
        pytest.skip(f"shared test data not present: {folder}")
    return [(name, (folder / name).read_bytes()) for name in ("obama.jpg", "obama1.jpg")]


def test_subject_job_is_one_capture(redis_stack: Stack, tmp_path: Path) -> None:
    photos = _obama()
    with redis_stack.client() as client:
        job = wait_job(client, client.submit(photos, subject=True, seed=5, **FAST_OPTIONS)["id"])
        assert job["status"] == "succeeded", job["error"]
        result = job["result"]
        assert result["options"]["subject"] is True and result["options"]["seed"] == 5
        assert [view["source"]["filename"] for view in result["views"]] == ["obama.jpg", "obama1.jpg"]
        assert [(head["view"], head["index"]) for head in result["heads"]] == [(0, 0), (1, 0)]
        names = {artifact["name"] for artifact in job["artifacts"]}
        assert {"result.json", "v0_h0.glb", "v1_h0.glb", "v0_preview.png", "v1_preview.png"} <= names
        client.download_artifacts(job, tmp_path)  # sizes and sha256 checked
        assert json.loads((tmp_path / "result.json").read_text()) == result

        separate = wait_job(client, client.submit(photos, seed=5, **FAST_OPTIONS)["id"])
        assert separate["status"] == "succeeded", separate["error"]
        assert [image["source"]["filename"] for image in separate["result"]["images"]] == [
            "obama.jpg",
            "obama1.jpg",
        ]
        assert {"0/h0.glb", "1/h0.glb"} <= {artifact["name"] for artifact in separate["artifacts"]}
        # The same photo gives the same head either way.
        assert separate["result"]["images"][1]["heads"][0]["box"] == result["heads"][1]["box"]


def test_batch_refuses_subject(redis_stack: Stack) -> None:
    with redis_stack.client() as client, pytest.raises(ApiError) as refused:
        client.submit_batch(_obama(), subject=True)
    assert refused.value.http_status == 422 and refused.value.code == "invalid_option"


def test_subject_job_over_eight_photos_is_413(redis_stack: Stack) -> None:
    photos = _obama() * 5  # 10 photos of one person
    with redis_stack.client() as client, pytest.raises(ApiError) as refused:
        client.submit(photos, subject=True)
    assert refused.value.http_status == 413 and refused.value.code == "too_many_subject_photos"
    assert refused.value.details == {"files": 10, "max_files": 8}
