"""KaoLRM's input: MediaPipe's selfie-segmentation network imported into our module (LiteRT parity on
real photos) and the head crop on the astronaut photo (the mask covers the face and leaves out the
background, which turns white)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from needs import missing
from numpy.typing import NDArray
from PIL import Image

from headforge.config import tflite_source_dir
from headforge.models.pull import SELFIE_SEGMENTATION, load_module
from headforge.models.runtime import ModelSet
from headforge.pipeline.kaolrm_crop import SIZE, crop_square, make_crops
from headforge.pipeline.landmarks import find_heads

EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.fixture(scope="module")
def selfie_tflite() -> Path:
    path = tflite_source_dir() / SELFIE_SEGMENTATION.tflite_name
    if not path.is_file():
        missing(f"{path} is missing; run `headforge models pull`")
    return path


def real_inputs() -> NDArray[np.float32]:
    """Real photos resized to 256 × 256, in [0, 1]."""
    shared = Path(__file__).parents[2] / "shared" / "data" / "aflw2000-sample"
    photos = [EXAMPLES / "astronaut.jpg", *sorted(shared.glob("*.jpg"))[:3]]
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((256, 256)), np.float32) / 255 for p in photos]
    return np.stack(arrays)


def test_selfie_module_matches_litert_on_real_photos(selfie_tflite: Path) -> None:
    pytest.importorskip("ai_edge_litert")
    from headforge.models.litert import LiteRTNetwork

    module = load_module(SELFIE_SEGMENTATION, selfie_tflite)
    x = real_inputs()
    reference = LiteRTNetwork(selfie_tflite).run(x)[0]
    with torch.no_grad():
        ours = module(torch.from_numpy(x)).numpy()
    assert ours.shape == reference.shape == (len(x), 256, 256, 1)
    assert float(np.abs(ours - reference).max()) <= 1e-4 * float(np.abs(reference).max())
    # A real photo of a person is not an all-background or all-person mask.
    assert 0.2 < float(reference[0].mean()) < 0.9


def test_the_exported_entry_has_parity(networks: ModelSet) -> None:
    from headforge.export.repository import read_entry
    from headforge.models.pull import DEFAULT_VERSION

    entry = read_entry(SELFIE_SEGMENTATION.name, DEFAULT_VERSION)
    if entry is None:
        missing("selfie_segmentation is not in the model repository; run `headforge models pull`")
    assert entry.is_intact()
    assert entry.manifest["parity"]["max_rel_error"] <= 1e-4
    assert [o["name"] for o in entry.manifest["outputs"]] == ["mask"]


def test_astronaut_crop_keeps_the_face_and_whitens_the_background(
    astronaut: NDArray[np.uint8], networks: ModelSet
) -> None:
    if SELFIE_SEGMENTATION.name not in networks:
        try:
            networks[SELFIE_SEGMENTATION.name]
        except Exception as error:  # ModelsMissingError when `models pull` predates the network
            missing(f"selfie_segmentation is not available: {error}")
    heads = find_heads(astronaut, networks)
    assert len(heads) == 1
    head = heads[0]
    crop = make_crops(astronaut, heads, networks)[0]
    assert crop.image.shape == (3, SIZE, SIZE) and crop.mask.shape == (SIZE, SIZE)
    assert float(crop.image.min()) >= 0.0 and float(crop.image.max()) <= 1.0
    # The crop is centred on the face and holds all of it.
    assert head.landmarks_2d is not None
    landmarks = np.asarray(head.landmarks_2d[:468], np.float64)
    uv = (landmarks - np.asarray(crop.origin)) / crop.side
    assert bool(((uv > 0.05) & (uv < 0.95)).all())
    assert np.allclose(np.asarray(crop.to_image(uv)), landmarks)
    assert abs(float(uv[:, 0].mean()) - 0.5) < 0.1
    # The mask covers the face: the landmarks' crop pixels are person (a few on the silhouette
    # may fall just outside it).
    pixels = np.clip((uv * SIZE).astype(int), 0, SIZE - 1)
    on_face = crop.mask[pixels[:, 1], pixels[:, 0]]
    assert float((on_face > 0.5).mean()) > 0.97 and float(on_face.mean()) > 0.95
    # ... and leaves out the background: the top corners of the crop are the studio backdrop.
    corners = [crop.mask[:24, :24], crop.mask[:24, -24:]]
    assert all(float(c.mean()) < 0.1 for c in corners)
    # Background pixels became white.
    background = crop.mask < 0.05
    assert background.sum() > 0.05 * SIZE * SIZE
    assert float(crop.image[:, background].min()) > 0.9


def test_crop_square_falls_back_to_detector_keypoints(
    astronaut: NDArray[np.uint8], networks: ModelSet
) -> None:
    head = find_heads(astronaut, networks)[0]
    with_landmarks = crop_square(head)
    head.landmarks_2d = None
    from_keypoints = crop_square(head)
    # Both rules find nearly the same square.
    assert abs(with_landmarks[1] - from_keypoints[1]) < 0.2 * with_landmarks[1]
    assert (
        np.hypot(with_landmarks[0][0] - from_keypoints[0][0], with_landmarks[0][1] - from_keypoints[0][1])
        < 0.15 * with_landmarks[1]
    )
