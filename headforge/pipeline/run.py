"""The pipeline's public entry points in one import: options, the registry and the runner.

The code lives by concern: `options.py` (the job options), `registry.py` (the `Pipeline` rows),
`runner.py` (a capture → artifacts), `result.py` (the `result.json` document) and `process.py`
(process set-up). See docs/architecture.md.
"""

from __future__ import annotations

from headforge.pipeline.facemesh_stage import facemesh_symmetry, fit_facemesh
from headforge.pipeline.options import ALL_OUTPUTS, MAX_HEADS_LIMIT, ReconstructOptions
from headforge.pipeline.registry import (
    PIPELINES,
    HeadSource,
    Pipeline,
    Stage,
    get_pipeline,
    pipeline_missing_reason,
    register_pipeline,
)
from headforge.pipeline.result import RESULT_SCHEMA_VERSION, describe_networks
from headforge.pipeline.runner import Progress, reconstruct_capture, reconstruct_image

__all__ = [
    "ALL_OUTPUTS",
    "MAX_HEADS_LIMIT",
    "PIPELINES",
    "RESULT_SCHEMA_VERSION",
    "HeadSource",
    "Pipeline",
    "Progress",
    "ReconstructOptions",
    "Stage",
    "describe_networks",
    "facemesh_symmetry",
    "fit_facemesh",
    "get_pipeline",
    "pipeline_missing_reason",
    "reconstruct_capture",
    "reconstruct_image",
    "register_pipeline",
]
