"""The runner's texture step: one head's texture from its photo, or a subject's texture fused across
its photos, with the shares `result.json` reports.

- `texture_head`: the head's photo, masked (`texture_mask.person_masks`), unwrapped and finished.
- `fuse_subject`: in a subject capture of several photos, the subject is the largest head of each
  photo (by box area). Each photo is unwrapped into the shared UV layout with its own head's mesh
  (FLAME pipelines: FLAME's layout; `facemesh`: the face mesh's), the views are fused
  (`texture.fuse_views`) and the fused texture finished once; every subject head carries it. The
  most frontal view (smallest |yaw|) is recorded: its mesh is the subject's face-mesh head.

`texture_seen` is the share of UV-island texels seen directly in some photo (not mirrored, not
inpainted); `texture_coverage` also counts the mirrored ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from headforge.pipeline.texture import ViewTexels, build_texture, finish_texture, fuse_views, unwrap_view
from headforge.pipeline.texture_mask import person_masks
from headforge.pipeline.types import Head, StageContext


@dataclass(frozen=True)
class TextureStats:
    """Shares of a texture's UV-island texels: colored from a photo (directly or mirrored), and seen
    directly."""

    coverage: float
    seen: float


@dataclass
class SubjectTexture:
    """The fused texture of a subject capture and what each photo alone gives."""

    stats: TextureStats
    frontal_view: int
    views: list[tuple[Head, TextureStats]]  # each fused head with its photo's own shares, in view order

    def stats_of(self, head: Head) -> TextureStats | None:
        """The shares `head`'s photo alone gives, when it is one of the fused heads."""
        return next((stats for fused, stats in self.views if fused is head), None)

    def document(self) -> dict[str, Any]:
        """The `subject_texture` record of result.json."""
        return {
            "texture_seen": round(self.stats.seen, 4),
            "texture_coverage": round(self.stats.coverage, 4),
            "frontal_view": self.frontal_view,
            "views": [
                {"view": head.view, "head": head.index, "texture_seen": round(stats.seen, 4)}
                for head, stats in self.views
            ],
        }


def _symmetry_for(head: Head, symmetry: NDArray[np.int32] | None) -> NDArray[np.int32] | None:
    mesh = head.mesh_image
    if symmetry is None or mesh is None or len(symmetry) != len(mesh.vertices):
        return None
    return symmetry


def texture_head(
    ctx: StageContext, head: Head, size: int, symmetry: NDArray[np.int32] | None
) -> TextureStats:
    """Set `head.texture` from its photo; return its coverage and seen shares."""
    mesh = head.mesh_image
    if mesh is None:
        raise ValueError("texture needs head.mesh_image")
    rgb = ctx.image(head)
    mask = person_masks(rgb, [mesh], ctx.models)[0]
    result = build_texture(rgb, mesh, size, _symmetry_for(head, symmetry), mask)
    head.texture = result.texture
    return TextureStats(result.coverage_share, result.seen_share)


def subject_heads(heads: list[Head]) -> list[Head]:
    """The subject's heads with a mesh, in view order, all in one layout. The runner has already
    kept one head per photo (`pick_subject_heads`, the largest)."""
    ordered = sorted(
        (head for head in heads if head.mesh_image is not None and head.texture is None), key=lambda h: h.view
    )
    if not ordered:
        return []
    layout = _layout_key(ordered[0])
    return [head for head in ordered if _layout_key(head) == layout]


def _layout_key(head: Head) -> tuple[str, int]:
    mesh = head.mesh_image
    assert mesh is not None
    return mesh.topology, len(mesh.vertices)


def fuse_subject(
    ctx: StageContext, heads: list[Head], size: int, symmetry: NDArray[np.int32] | None
) -> SubjectTexture | None:
    """Fuse the subject's texture across the photos (see the module docstring) and set it on every
    subject head; None when fewer than two photos show the subject."""
    subject = subject_heads(heads)
    if len(subject) < 2:
        return None
    shares: list[TextureStats] = []

    def views() -> Iterator[ViewTexels]:
        for head in subject:
            assert head.mesh_image is not None
            rgb = ctx.image(head)
            mask = person_masks(rgb, [head.mesh_image], ctx.models)[0]
            texels = unwrap_view(
                rgb, head.mesh_image, size, _symmetry_for(head, symmetry), mask, for_fusion=True
            )
            seen = texels.seen()
            shares.append(TextureStats(texels.share(texels.covered(seen)), texels.share(seen)))
            yield texels

    result = finish_texture(fuse_views(views()))
    for head in subject:
        head.texture = result.texture
    frontal = min(subject, key=lambda head: abs(head.pose.yaw) if head.pose is not None else 180.0)
    return SubjectTexture(
        TextureStats(result.coverage_share, result.seen_share),
        frontal.view,
        list(zip(subject, shares, strict=True)),
    )
