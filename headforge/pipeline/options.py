"""The job options, declared once: the CLI, the API form, the Celery payload and the OpenAPI
document all read `ReconstructOptions`.

Adding an option is one field here (with a default, so existing jobs keep their meaning), then the
CLI flag in `cli_pipeline.py`; the API form and the Celery payload take every field from this model.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator

from headforge.errors import InvalidOptionError

# The limits the texture and splat steps enforce (texture.py and splats.py hold the same values;
# tests/test_options.py checks they agree).
MIN_TEXTURE_SIZE = 512
MAX_TEXTURE_SIZE = 4096
MAX_SPLATS = 1_000_000
MAX_HEADS_LIMIT = 64
MAX_SEED = 2**32 - 1

Output = Literal["glb", "obj", "splats", "preview"]
ALL_OUTPUTS: frozenset[str] = frozenset({"glb", "obj", "splats", "preview"})


class ReconstructOptions(BaseModel):
    """What to build. `outputs` picks artifacts among glb, obj (+ mtl + texture png), splats, preview."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pipeline: Annotated[str, Field(description="Pipeline name (GET /v1/models lists them).")] = "facemesh"
    outputs: Annotated[
        frozenset[Output], Field(description="Artifacts to write: glb, obj, splats, preview.")
    ] = ALL_OUTPUTS  # type: ignore[assignment]
    texture_size: Annotated[
        int,
        Field(strict=True, ge=MIN_TEXTURE_SIZE, le=MAX_TEXTURE_SIZE, description="Texture side in pixels."),
    ] = 1024
    splats: Annotated[
        int,
        Field(strict=True, ge=0, le=MAX_SPLATS, description="Gaussian splats per head (0: no splat file)."),
    ] = 8192
    max_heads: Annotated[
        int | None,
        Field(strict=True, ge=1, le=MAX_HEADS_LIMIT, description="Keep at most N heads per photo."),
    ] = None
    seed: Annotated[int, Field(strict=True, ge=0, le=MAX_SEED, description="Seed for splat sampling.")] = 0
    topology: Annotated[
        str | None,
        Field(
            description="A stored studio template (`headforge template list`) to register onto every head: "
            "the meshes come out in its vertices, faces and UVs (docs/topology.md).",
        ),
    ] = None
    subject: Annotated[
        bool,
        Field(
            strict=True,
            description="All photos of the job show one person: they reach the stages as one capture.",
        ),
    ] = False
    kaolrm_checkpoint: Annotated[
        Literal["mono", "multiview"] | None,
        Field(
            description="kaolrm pipeline: the imported checkpoint to run (default: mono when imported, "
            "else multiview)."
        ),
    ] = None
    kaolrm_points: Annotated[
        Literal["sampled", "vertices"],
        Field(
            description="kaolrm pipeline: learned splats at 8000 area-weighted surface points drawn with the "
            "job seed, or at FLAME's 5023 vertices."
        ),
    ] = "sampled"

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise _invalid(error) from None

    @field_validator("outputs", mode="before")
    @classmethod
    def _split_outputs(cls, value: Any) -> Any:
        if isinstance(value, str):
            return frozenset(part.strip() for part in value.split(",") if part.strip())
        if isinstance(value, list | tuple | set):
            return frozenset(value)
        return value

    @field_validator("pipeline")
    @classmethod
    def _known_pipeline(cls, value: str) -> str:
        from headforge.pipeline.registry import get_pipeline

        return get_pipeline(value.strip()).name  # UnknownPipelineError otherwise

    @field_validator("topology")
    @classmethod
    def _template_name(cls, value: str | None) -> str | None:
        from headforge.templates import check_name

        if value is None or not value.strip():
            return None
        return check_name(value.strip())

    @field_serializer("outputs")
    def _sorted_outputs(self, outputs: frozenset[str]) -> list[str]:
        return sorted(outputs)

    def validate(self) -> None:  # type: ignore[override]
        """Kept for callers of the former dataclass: the values were checked when the model was built."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (Celery payload, `result.json` `options`); `from_dict` reads it back."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ReconstructOptions:
        """Options from JSON-like input (API form fields, Celery payloads); unknown keys are refused."""
        return cls(**values)

    @classmethod
    def field_names(cls) -> list[str]:
        return list(cls.model_fields)


def _invalid(error: ValidationError) -> InvalidOptionError:
    """A pydantic error as headforge's `invalid_option`, naming the first offending option."""
    problems = error.errors(include_url=False)
    first = problems[0] if problems else {"loc": (), "msg": str(error), "input": None, "type": ""}
    option = ".".join(str(part) for part in first["loc"][:1]) or "options"
    value = first.get("input")
    if first.get("type") == "extra_forbidden":
        unknown = sorted(
            str(p["loc"][0]) for p in problems if p.get("type") == "extra_forbidden" and p["loc"]
        )
        return InvalidOptionError(f"unknown options {unknown}", details={"unknown": unknown})
    if option == "outputs":
        allowed = sorted(ALL_OUTPUTS)
        return InvalidOptionError(
            f"outputs: {first['msg']}; choose among {allowed}", details={"option": option, "allowed": allowed}
        )
    shown = value if isinstance(value, int | float | str | bool) or value is None else repr(value)
    return InvalidOptionError(
        f"{option}: {first['msg']}, got {value!r}", details={"option": option, "value": shown}
    )
