"""Seeded random VGGHeads-S weights shared by the VGGHeads tests (built once per test process).

Random weights exercise the plumbing and the export parity only; nothing they produce is a result."""

from __future__ import annotations

from functools import lru_cache

import torch

from headforge.models import vggheads as vh


@lru_cache(maxsize=1)
def seeded_s_state() -> dict[str, torch.Tensor]:
    """The training-form state dict of a seeded random VGGHeads-S (BN statistics calibrated)."""
    return {k: v.clone() for k, v in vh.seeded_random("s", seed=0).state_dict().items()}


def seeded_s(*, fused: bool = False) -> vh.VGGHeads:
    model = vh.build("s")
    model.load_state_dict(seeded_s_state())
    return model.fuse() if fused else model
