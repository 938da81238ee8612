"""Benchmark section `kaolrm` (opt-in: `headforge bench --kaolrm`): KaoLRM's two graphs with seeded
random weights (timing does not depend on the values; nothing here is an accuracy figure).

Per head, a KaoLRM head costs one image-graph call (224² crop → triplane and the 160 FLAME numbers)
and one Gaussian-graph call (triplane and 8,000 points → 8,000 Gaussians). Both are timed as PyTorch
eager (`torch.no_grad`, the modules the import exports) and as ONNX Runtime CPU on our export of
those modules, same thread count, same inputs, at batch 1 and 4 heads: ms per head and the ratio
ORT / eager (goal ≤ 0.8). Each export is checked for parity first (max |Δ| reported).

The full run uses the released architecture (`KaoLRMConfig()`, 288,338,660 parameters); `--quick`
uses a small config (same modules, a few layers, narrow widths) that runs in about a minute on 2
cores, for tests.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from headforge.benchmarks.timing import cpu_session, median_ms
from headforge.models.kaolrm import IMAGE_SIZE, PRETRAIN_FOCAL, SYNTH_FOCAL, KaoLRM, KaoLRMConfig

THREADS = 2
GOAL_RATIO = 0.8
BATCHES = (1, 4)
VARIANT = "mono"  # the two checkpoints share one architecture; mono's focal is the default
QUICK_CONFIG = KaoLRMConfig(
    camera_embed_dim=128,
    transformer_dim=96,
    transformer_layers=2,
    transformer_heads=4,
    triplane_low_res=16,
    triplane_high_res=32,
    triplane_dim=16,
    encoder_feat_dim=96,
    encoder_depth=2,
    encoder_num_heads=4,
)


def seeded_model(config: KaoLRMConfig, seed: int = 0) -> KaoLRM:
    torch.manual_seed(seed)
    return KaoLRM(config).eval()


def run(quick: bool, config: KaoLRMConfig | None = None) -> dict[str, Any]:
    from headforge.export.onnx import export_onnx
    from headforge.models.kaolrm import KaoLRMGaussianGraph, KaoLRMImageGraph
    from headforge.models.kaolrm_import import GAUSSIAN_POINTS, export_specs

    torch.set_num_threads(THREADS)
    config = config or (QUICK_CONFIG if quick else KaoLRMConfig())
    repeats = 2
    focal = SYNTH_FOCAL[VARIANT]
    model = seeded_model(config)
    image_graph = KaoLRMImageGraph(model).eval()
    gaussian_graph = KaoLRMGaussianGraph(model, focal).eval()
    image_spec, gaussian_spec = export_specs(config, focal)
    rng = np.random.default_rng(0)
    batch = max(BATCHES)
    images = rng.uniform(0.0, 1.0, (batch, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    reach = PRETRAIN_FOCAL / focal
    points = rng.uniform(-reach, reach, (batch, GAUSSIAN_POINTS, 3)).astype(np.float32)
    with torch.no_grad():
        planes = image_graph(torch.from_numpy(images))[0].numpy()
    result: dict[str, Any] = {
        "kaolrm_threads": THREADS,
        "kaolrm_goal_ratio": GOAL_RATIO,
        "kaolrm_config": "quick"
        if config == QUICK_CONFIG
        else ("full" if config == KaoLRMConfig() else "custom"),
        "kaolrm_parameters": sum(p.numel() for p in model.parameters()),
        "kaolrm_points": GAUSSIAN_POINTS,
    }
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        started = time.perf_counter()
        image_export = export_onnx(image_graph, image_spec, folder / "image.onnx", samples=[images[:2]])
        gaussian_export = export_onnx(
            gaussian_graph, gaussian_spec, folder / "gaussians.onnx", samples=[planes[:2], points[:2]]
        )
        result["kaolrm_export_s"] = round(time.perf_counter() - started, 1)
        result["kaolrm_image_parity_max_abs"] = image_export.max_abs_error
        result["kaolrm_gaussians_parity_max_abs"] = gaussian_export.max_abs_error
        image_session, gaussian_session = (
            cpu_session(image_export.path, THREADS),
            cpu_session(gaussian_export.path, THREADS),
        )
        for heads in BATCHES:
            x, p, q = images[:heads], planes[:heads], points[:heads]
            tx, tp, tq = torch.from_numpy(x), torch.from_numpy(p), torch.from_numpy(q)

            def eager_image(tx: torch.Tensor = tx) -> None:
                with torch.no_grad():
                    image_graph(tx)

            def eager_gaussians(tp: torch.Tensor = tp, tq: torch.Tensor = tq) -> None:
                with torch.no_grad():
                    gaussian_graph(tp, tq)

            def ort_image(x: np.ndarray = x) -> None:
                image_session.run(None, {"image": x})

            def ort_gaussians(p: np.ndarray = p, q: np.ndarray = q) -> None:
                gaussian_session.run(None, {"planes": p, "points": q})

            timings = {
                "image_eager": median_ms(eager_image, repeats) / heads,
                "image_ort": median_ms(ort_image, repeats) / heads,
                "gaussians_eager": median_ms(eager_gaussians, repeats) / heads,
                "gaussians_ort": median_ms(ort_gaussians, repeats) / heads,
            }
            eager = timings["image_eager"] + timings["gaussians_eager"]
            ort = timings["image_ort"] + timings["gaussians_ort"]
            key = f"kaolrm_b{heads}"
            for name, value in timings.items():
                result[f"{key}_{name}_ms_per_head"] = round(value, 1)
            result[f"{key}_eager_ms_per_head"] = round(eager, 1)
            result[f"{key}_ort_ms_per_head"] = round(ort, 1)
            result[f"{key}_ratio_ort_vs_eager"] = round(ort / eager, 3)
    return result
