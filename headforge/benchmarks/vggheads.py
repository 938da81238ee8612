"""Benchmark section `vggheads` (opt-in: `headforge bench --vggheads`): the network with seeded
random weights (timing does not depend on the values) in its deployed, fused form.

1. PyTorch eager against ONNX Runtime (CPU) on the same export, same thread count, same inputs,
   at 640² with batch 1 and 4: ms per image and the ratio ORT / eager (goal ≤ 0.7). The export is
   checked for parity first (its max |Δ| is reported).
2. VGGHeads-S as a head source (letterbox, network, NMS, mapping back) against the `facemesh`
   head source (MediaPipe detection with tiles + FaceMesh), ms per photo, on the astronaut and the
   voc-faces group photos when ../shared/data is present.

Quick mode: S only, batch 1, fewer repeats. The full run builds S, M and L (several minutes).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from headforge.benchmarks.timing import cpu_session, median_ms
from headforge.export.onnx import export_onnx
from headforge.models import vggheads as vh

THREADS = 2
GOAL_RATIO = 0.7


def _variant(variant: str, batches: tuple[int, ...], repeats: int, folder: Path) -> dict[str, Any]:
    from headforge.models.vggheads_import import EXPORT_SPEC, DenseVGGHeads, parity_samples

    model = vh.seeded_random(variant, seed=0).fuse().eval()
    dense = DenseVGGHeads(model)
    exported = export_onnx(dense, EXPORT_SPEC, folder / f"vggheads_{variant}.onnx", samples=parity_samples())
    session = cpu_session(exported.path, THREADS)
    canvas = parity_samples()[0][:1]
    result: dict[str, Any] = {f"vggheads_{variant}_parity_max_abs": exported.max_abs_error}
    for batch in batches:
        x = np.repeat(canvas, batch, axis=0)
        tensor = torch.from_numpy(x)

        def eager(tensor: torch.Tensor = tensor) -> None:
            with torch.no_grad():
                dense(tensor)

        def ort(x: np.ndarray = x) -> None:
            session.run(None, {"input": x})

        eager_ms = median_ms(eager, repeats) / batch
        ort_ms = median_ms(ort, repeats) / batch
        key = f"vggheads_{variant}_b{batch}"
        result[f"{key}_eager_ms_per_image"] = round(eager_ms, 1)
        result[f"{key}_ort_ms_per_image"] = round(ort_ms, 1)
        result[f"{key}_ratio_ort_vs_eager"] = round(ort_ms / eager_ms, 3)
    return result


def _head_sources(onnx_path: Path, quick: bool) -> dict[str, Any]:
    from headforge.benchmarks.landmarks import benchmark_photos
    from headforge.models.runtime import OrtNetwork, load_default_networks
    from headforge.pipeline.landmarks import find_heads
    from headforge.pipeline.vggheads import detect_batch

    photos = benchmark_photos(quick=True)
    network = OrtNetwork(onnx_path, "vggheads", THREADS, ["CPUExecutionProvider"])
    networks = load_default_networks(threads=THREADS, providers=("cpu",))
    repeats = 1 if quick else 3

    def vgg() -> None:
        for _, rgb in photos:
            detect_batch(network, [rgb])

    def facemesh() -> None:
        for _, rgb in photos:
            find_heads(rgb, networks)

    vgg_ms = median_ms(vgg, repeats) / len(photos)
    facemesh_ms = median_ms(facemesh, repeats) / len(photos)
    return {
        "vggheads_photos": len(photos),
        "vggheads_s_head_source_ms_per_photo": round(vgg_ms, 1),
        "vggheads_facemesh_head_source_ms_per_photo": round(facemesh_ms, 1),
        "vggheads_s_vs_facemesh_ratio": round(vgg_ms / facemesh_ms, 3),
    }


def run(quick: bool) -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    variants = ("s",) if quick else vh.VARIANTS
    batches = (1,) if quick else (1, 4)
    repeats = 2 if quick else 3
    result: dict[str, Any] = {"vggheads_threads": THREADS, "vggheads_goal_ratio": GOAL_RATIO}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        for variant in variants:
            result.update(_variant(variant, batches, repeats, folder))
        result.update(_head_sources(folder / "vggheads_s.onnx", quick))
    return result
