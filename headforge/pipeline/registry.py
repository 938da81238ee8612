"""The pipeline registry: each pipeline is a `Pipeline` row of real callables, by name.

A pipeline is a head source (per view: photo → `Head`s with landmarks, or with more) and an ordered
list of stages (batched steps over every head of a capture). The runner (`runner.py`) adds the
shared steps after them: texture and splats (each skipped for a head a stage already filled),
packaging, preview and `result.json`.

Adding a pipeline is one `register_pipeline(Pipeline(...))` call in the rows at the end of this
module; its callables live in the family's own modules (`pipeline/<family>_stage.py`), and heavy
imports (torch, a checkpoint) happen inside them, on first use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from headforge.errors import PipelineUnavailableError, UnknownPipelineError
from headforge.pipeline.types import Head, StageContext, View

FindHeads = Callable[[StageContext, View], list[Head]]
RunStage = Callable[[StageContext, list[Head]], None]
Requirement = Callable[[], str | None]
ModelRecords = Callable[[], list[dict[str, Any]]]
Symmetry = Callable[[], NDArray[np.int32]]
Queue = Literal["cpu", "gpu"]


@dataclass(frozen=True)
class HeadSource:
    """Finds the heads in one view: `find(ctx, view)` returns `Head`s indexed 0..n-1 with `view`
    set, best first, honouring `ctx.options.max_heads`. Its time is recorded under `name`; the
    networks it takes from `ctx.models` are listed in result.json."""

    name: str
    find: FindHeads


@dataclass(frozen=True)
class Stage:
    """One batched step: `run(ctx, heads)` fills fields of every head it is given (all heads of a
    capture at once). Raising a client-side `HeadforgeError` (4xx) refuses the batch: the runner
    then runs the stage on each head alone and skips only the heads it refuses again, with a note.
    Server-side errors (5xx) and `PipelineUnavailableError` fail the whole capture."""

    name: str
    run: RunStage


@dataclass(frozen=True)
class Pipeline:
    """A named composition of a head source and stages, with what it needs to run.

    - `requires`: callables returning why the pipeline cannot run here (a missing checkpoint or
      imported asset), or None; the first reason is shown in /v1/models and in
      `pipeline_unavailable` errors.
    - `networks`: model set names a worker may open up front for this pipeline.
    - `models`: records of non-network models the stages use (e.g. the imported FLAME asset),
      listed in result.json after the networks the run took from the model set.
    - `symmetry`: the mesh's vertex → mirror-vertex map, for texture filling.
    - `prepare`: imports the stages' heavy modules (and may load assets) before a worker's first job.
    """

    name: str
    description: str
    heads: HeadSource
    stages: tuple[Stage, ...] = ()
    queue: Queue = "cpu"
    requires: tuple[Requirement, ...] = ()
    networks: tuple[str, ...] = ()
    models: ModelRecords | None = None
    symmetry: Symmetry | None = None
    prepare: Callable[[], None] | None = None

    def missing_reason(self) -> str | None:
        """Why the pipeline cannot run in this deployment, or None when it can."""
        for requirement in self.requires:
            reason = requirement()
            if reason is not None:
                return reason
        return None


PIPELINES: dict[str, Pipeline] = {}


def register_pipeline(pipeline: Pipeline, *, replace: bool = False) -> Pipeline:
    """Add `pipeline` to the registry (a name is taken once unless `replace`); returns it."""
    if pipeline.name in PIPELINES and not replace:
        raise ValueError(f"pipeline {pipeline.name!r} is already registered")
    PIPELINES[pipeline.name] = pipeline
    return pipeline


def pipeline_names() -> list[str]:
    return sorted(PIPELINES)


def get_pipeline(name: str) -> Pipeline:
    """The row named `name`; `UnknownPipelineError` listing the available ones otherwise."""
    pipeline = PIPELINES.get(name)
    if pipeline is None:
        raise UnknownPipelineError(
            f"unknown pipeline {name!r}; available: {', '.join(pipeline_names())}",
            details={"pipeline": name, "available": pipeline_names()},
        )
    return pipeline


def pipeline_missing_reason(name: str) -> str | None:
    """Why pipeline `name` cannot run in this deployment, or None when it can."""
    pipeline = PIPELINES.get(name)
    if pipeline is None:
        return f"unknown pipeline {name!r}"
    return pipeline.missing_reason()


def require_available(pipeline: Pipeline) -> None:
    """Raise `PipelineUnavailableError` with the reason when `pipeline` cannot run here."""
    reason = pipeline.missing_reason()
    if reason is not None:
        raise PipelineUnavailableError(
            f"pipeline {pipeline.name!r} is unavailable: {reason}", details={"pipeline": pipeline.name}
        )


def networks_for(names: Sequence[str]) -> list[str]:
    """Model set names the pipelines `names` may open, without repeats (a worker's preload list)."""
    seen: list[str] = []
    for name in names:
        for network in get_pipeline(name).networks:
            if network not in seen:
                seen.append(network)
    return seen


# --- the rows --------------------------------------------------------------------------------------
# Stage callables are small adapters in each family's module; they import their heavy modules inside.

from headforge.models.runtime import FACE_LANDMARK, FULL_RANGE  # noqa: E402
from headforge.pipeline import facemesh_stage, vggheads_stage  # noqa: E402


def _fit_flame(ctx: StageContext, heads: list[Head]) -> None:
    from headforge.pipeline.flame_stage import fit_flame_stage

    fit_flame_stage(ctx, heads)


def _flame_missing() -> str | None:
    from headforge.models.flame_import import flame_unavailable_reason

    return flame_unavailable_reason()


def _flame_prepare() -> None:
    from headforge.pipeline import flame_fit, flame_stage  # noqa: F401


def _flame_records() -> list[dict[str, Any]]:
    from headforge.pipeline.flame_stage import describe_flame_asset

    return describe_flame_asset()


def _vggheads_flame_records() -> list[dict[str, Any]]:
    """The FLAME asset, when one is imported (the vggheads meshes use it); nothing otherwise."""
    from headforge.models.flame_import import flame_unavailable_reason

    return [] if flame_unavailable_reason() is not None else _flame_records()


MEDIAPIPE_HEADS = HeadSource("detect_landmarks", facemesh_stage.mediapipe_heads)

register_pipeline(
    Pipeline(
        name="facemesh",
        description="MediaPipe face detection and 468-point face mesh, fixed triangulation and UVs",
        heads=MEDIAPIPE_HEADS,
        stages=(Stage("fit", facemesh_stage.fit_facemesh_heads),),
        networks=(FULL_RANGE, FACE_LANDMARK),
        symmetry=facemesh_stage.facemesh_symmetry,
    )
)
register_pipeline(
    Pipeline(
        name="flame",
        description="FLAME full head with FLAME UVs, fitted to the face-mesh landmarks (needs FLAME files)",
        heads=MEDIAPIPE_HEADS,
        stages=(Stage("fit", _fit_flame),),
        requires=(_flame_missing,),
        networks=(FULL_RANGE, FACE_LANDMARK),
        models=_flame_records,
        prepare=_flame_prepare,
    )
)


def _vggheads_missing() -> str | None:
    from headforge.models.vggheads_import import unavailable_reason

    return unavailable_reason()


register_pipeline(
    Pipeline(
        name="vggheads",
        description="VGGHeads: every head and its FLAME parameters from one network pass per photo "
        "(needs an imported VGGHeads checkpoint; meshes need FLAME files too)",
        heads=HeadSource("vggheads", vggheads_stage.vggheads_heads),
        stages=(Stage("flame", vggheads_stage.vggheads_flame_stage),),
        requires=(_vggheads_missing,),
        models=_vggheads_flame_records,
    )
)


def _kaolrm_stage(ctx: StageContext, heads: list[Head]) -> None:
    from headforge.pipeline.kaolrm_stage import kaolrm_stage

    kaolrm_stage(ctx, heads)


def _kaolrm_missing() -> str | None:
    from headforge.models.kaolrm_import import unavailable_reason

    return unavailable_reason()


register_pipeline(
    Pipeline(
        name="kaolrm",
        description="KaoLRM: FLAME parameters and learned 2D Gaussians from one face crop through an LRM "
        "triplane (needs an imported KaoLRM checkpoint; meshes and splats need FLAME files too)",
        heads=MEDIAPIPE_HEADS,
        stages=(Stage("kaolrm", _kaolrm_stage),),
        queue="gpu",  # a 288 M-parameter network per head (as DEFAULT_QUEUE_ROUTES routes it)
        requires=(_kaolrm_missing,),
        # The KaoLRM graphs are opened on first use (`IMPORTED_NETWORKS`): a worker may serve this
        # row before a checkpoint is imported.
        networks=(FULL_RANGE, FACE_LANDMARK, "selfie_segmentation"),
        models=_vggheads_flame_records,  # the imported FLAME gives the UVs (and geometry without the checkpoint's)
    )
)
