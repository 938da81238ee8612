"""`headforge models import vggheads PATH`: a VGGHeads checkpoint → our module → ONNX → repository.

Accepted files (see docs/models.md):
- a training state dict (`.pth`/`.pt`, read with `torch.load(weights_only=True)`, or
  `.safetensors`), unfused (training form) or partially fused, with or without a wrapper prefix
  (`module.`, `model.`, `_orig_mod.`);
- a TorchScript archive (`.trcd`, as released), fused or not: its tensors are read by name
  (`model.*` inside the released wrapper; `post_process.*`, `pre_process.*` and non-persistent
  buffers such as anchors are ignored) into our module, which is then exported;
- an `.onnx` graph, served as it is after its signature is checked (one float input
  [B, 3, 640, 640]; outputs [B, N, 4], [B, N, 1], [B, N, 413]).

The variant (S, M, L) and fused-or-not are detected from the tensors' names and shapes; `--variant`
restricts the check to one. Any mismatch raises `InvalidCheckpointError` naming the first missing
or unexpected key or the first tensor whose shape differs, before anything is written.

Our exported graph returns every anchor decoded (boxes [B, 8400, 4], scores [B, 8400, 1], FLAME
[B, 8400, 413]); the head source takes the top 1000 and runs NMS. Parity is checked over all
8,400 anchors, which a top-k graph cannot do reliably: near-equal scores may swap places between
PyTorch and ONNX Runtime and move whole rows.
"""

from __future__ import annotations

import datetime as dt
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from headforge.errors import InvalidCheckpointError
from headforge.export.onnx import ExportSpec, TensorSpec
from headforge.export.repository import (
    MANIFEST,
    MANIFEST_SCHEMA_VERSION,
    RepositoryEntry,
    entry_dir,
    list_entries,
    staged_entry,
    write_json_atomic,
)
from headforge.files import sha256_file
from headforge.models import vggheads as vh
from headforge.models.checkpoints import (
    Tensors,
    check_state_dict,
    load_checked,
    read_tensors,
    select_prefix,
    strip_prefix,
)
from headforge.models.importers import ImportOptions, ImportReport

FAMILY = "vggheads"
ENTRY_NAME = "vggheads"
INPUT_NAME = "input"
OUTPUT_NAMES = ("boxes", "scores", "flame")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
IGNORED_PREFIXES = ("post_process.", "pre_process.")
NON_PERSISTENT = re.compile(r"(^|\.)(id_tensor|proj_conv|anchor_points|stride_tensor)$")
EXPORT_SPEC = ExportSpec(
    inputs=(TensorSpec(INPUT_NAME, (3, vh.INPUT_SIZE, vh.INPUT_SIZE)),),
    outputs=OUTPUT_NAMES,
    max_batch=64,
)


class DenseVGGHeads(nn.Module):
    """What we export: every anchor decoded, no top-k (see the module docstring)."""

    def __init__(self, model: vh.VGGHeads):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.model.decode_all(x)


# --------------------------------------------------------------------------------------------
# Reading and matching


def _ignored(key: str) -> bool:
    return key.startswith(IGNORED_PREFIXES) or bool(NON_PERSISTENT.search(key))


def normalise_keys(tensors: Tensors) -> Tensors:
    """Strip wrapper prefixes; inside a traced wrapper keep `model.*` (dropping post/pre-processing)."""
    tensors = strip_prefix(tensors, WRAPPER_PREFIXES)
    if any(k.startswith("model.") for k in tensors) and not any(k.startswith("backbone.") for k in tensors):
        tensors = select_prefix(tensors, "model.")
    tensors = strip_prefix(tensors, WRAPPER_PREFIXES)
    return {k: v for k, v in tensors.items() if not _ignored(k)}


@lru_cache(maxsize=6)
def _skeleton(variant: str, fused: bool) -> vh.VGGHeads:
    """A weightless (meta-device) network to compare names and shapes against."""
    return vh.build(variant, fused=fused, device="meta")


def _is_fused(tensors: Tensors) -> bool:
    return not any(k.endswith("branch_3x3.conv.weight") for k in tensors)


def detect_variant(tensors: Tensors, variant: str | None = None) -> tuple[str, bool]:
    """(variant, fused) whose state dict `tensors` matches exactly; `InvalidCheckpointError`
    for the closest candidate otherwise (its first missing/unexpected key or mismatching shape)."""
    if variant is not None and variant not in vh.VARIANTS:
        raise InvalidCheckpointError(
            f"unknown VGGHeads variant {variant!r}; use one of {', '.join(vh.VARIANTS)}",
            details={"variant": variant},
        )
    fused = _is_fused(tensors)
    candidates = [variant] if variant else list(vh.VARIANTS)
    failures: list[tuple[int, str, InvalidCheckpointError]] = []
    for name in candidates:
        try:
            check_state_dict(_skeleton(name, fused), tensors, what=f"VGGHeads-{name.upper()}")
        except InvalidCheckpointError as refused:
            problems = sum(int(refused.details.get(k, 0)) for k in ("missing", "unexpected", "mismatched"))
            failures.append((problems, name, refused))
            continue
        return name, fused
    _, closest, error = min(failures, key=lambda item: item[0])
    known = set(_skeleton(closest, fused).state_dict()) | set(_skeleton(closest, not fused).state_dict())
    if not known & set(tensors):
        raise InvalidCheckpointError(
            f"not a VGGHeads checkpoint: none of its {len(tensors)} tensor names is a VGGHeads one "
            f"(another model's weights?); {error.message}",
            details={**error.details, "closest_variant": closest},
        )
    form = "partially fused" if fused else "training (unfused)"
    scope = f"VGGHeads-{closest.upper()}" if variant else "any VGGHeads variant (closest: " + closest + ")"
    raise InvalidCheckpointError(
        f"not a {form} checkpoint of {scope}: {error.message}",
        details={**error.details, "closest_variant": closest, "fused": fused},
    )


def load_vggheads(tensors: Tensors, variant: str | None = None) -> tuple[vh.VGGHeads, str, bool]:
    """Our module holding exactly `tensors` (names normalised first), in eval mode."""
    tensors = normalise_keys(tensors)
    name, fused = detect_variant(tensors, variant)
    model = vh.build(name, fused=fused)
    load_checked(model, tensors, what=f"VGGHeads-{name.upper()}")
    return model.eval(), name, fused


# --------------------------------------------------------------------------------------------
# Import


def parity_samples(seed: int = 7) -> list[np.ndarray]:
    """Two photo-like canvases for the parity check: smooth seeded random images (detail at two
    scales) letterboxed with the 127 padding band, in [0, 1]. White noise is left out on purpose:
    far from any photo, it drives a network to activations where float32 round-off alone (PyTorch
    against float64) reaches the 1e-4 bound, which says nothing about the export."""
    rng = np.random.default_rng(seed)
    size = vh.INPUT_SIZE
    canvases = []
    for cells, band in ((20, 80), (80, 140)):
        coarse = torch.from_numpy(rng.uniform(0, 1, size=(1, 3, cells, cells)).astype(np.float32))
        image = torch.nn.functional.interpolate(coarse, size=(size - 2 * band, size), mode="bilinear")
        canvas = torch.full((1, 3, size, size), 127 / 255)
        canvas[:, :, band : size - band] = image
        canvases.append(canvas.numpy())
    return [np.concatenate(canvases)]


def _source(path: Path, kind: str) -> dict[str, Any]:
    return {
        "checkpoint": path.name,
        "sha256": sha256_file(path),
        "format": kind,
        "bytes": path.stat().st_size,
    }


def import_vggheads(path: Path, options: ImportOptions) -> ImportReport:
    """Import one file (see the module docstring); returns what was written."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return _import_onnx(path, options)
    checkpoint = read_tensors(path)
    model, variant, fused = load_vggheads(checkpoint.tensors, options.variant)
    model.fuse()  # exact (tested); the deployed form, and one convolution per block instead of three
    source = _source(path, checkpoint.format)
    version = f"{variant}-{source['sha256'][:12]}"
    parameters = vh.count_parameters(model)
    from headforge.export.model import write_entry_files

    with staged_entry(ENTRY_NAME, version, options.root) as staging:
        manifest = write_entry_files(
            DenseVGGHeads(model),
            EXPORT_SPEC,
            ENTRY_NAME,
            version,
            staging,
            source=source,
            samples=parity_samples(),
            extra=_family_fields(variant, fused, parameters, outputs="all_anchors"),
        )
    directory = entry_dir(ENTRY_NAME, version, options.root)
    return ImportReport(
        family=FAMILY,
        variant=variant,
        name=ENTRY_NAME,
        version=version,
        parameters=parameters,
        parity_max_abs=float(manifest["parity"]["max_abs_error"]),
        directory=directory,
        details={"fused": fused, "format": checkpoint.format},
    )


def _family_fields(variant: str, fused: bool | None, parameters: int, *, outputs: str) -> dict[str, Any]:
    from headforge.pipeline.vggheads import CHANNEL_ORDER

    return {
        "family": FAMILY,
        "variant": variant,
        "parameters": parameters,
        "fused": fused,  # the checkpoint's form; exported graphs are always fused
        "outputs_layout": outputs,  # "all_anchors" (ours) or "top_k" (a released graph)
        "preprocessing": {
            "size": vh.INPUT_SIZE,
            "resize": "lanczos4, longest side",
            "pad": 127,
            "scale": "1/255",
            "channel_order": CHANNEL_ORDER,
        },
        "license_note": "VGGHeads weights are CC BY-NC 4.0 (non-commercial); see docs/models.md",
    }


# Parameter counts of each variant's fused and training forms (for naming a released graph's variant).
_KNOWN_COUNTS = {
    "s": (17_004_954, 17_987_822, 16_993_530),
    "m": (32_378_236, 34_532_560, 32_359_644),
    "l": (50_442_706, 53_872_952, 50_414_898),
}


def _onnx_signature(path: Path) -> tuple[Any, int]:
    """Load an ONNX graph and check its I/O; returns (model, number of float weights)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as error:  # DecodeError, ValidationError, OSError
        raise InvalidCheckpointError(
            f"{path.name} is not a readable ONNX model: {type(error).__name__}: {error}"[:2000],
            details={"path": str(path), "format": "onnx"},
        ) from error
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]

    def dims(value: Any) -> list[int | str]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    def refuse(what: str) -> InvalidCheckpointError:
        return InvalidCheckpointError(
            f"{path.name}: not a VGGHeads graph: {what}",
            details={"inputs": [dims(i) for i in inputs], "outputs": [dims(o) for o in model.graph.output]},
        )

    float32 = onnx.TensorProto.FLOAT
    if len(inputs) != 1 or inputs[0].type.tensor_type.elem_type != float32:
        raise refuse(f"expected one float32 input, found {len(inputs)}")
    shape = dims(inputs[0])
    if len(shape) != 4 or shape[1:] != [3, vh.INPUT_SIZE, vh.INPUT_SIZE]:
        raise refuse(f"input {inputs[0].name!r} has shape {shape}, expected [B, 3, 640, 640]")
    outputs = list(model.graph.output)
    widths = [dims(o)[-1] if len(dims(o)) == 3 else None for o in outputs]
    if len(outputs) < 3 or widths[:3] != [4, 1, vh.NUM_PARAMS]:
        raise refuse(f"outputs {[dims(o) for o in outputs]}, expected [B, N, 4], [B, N, 1], [B, N, 413]")
    weights = sum(int(np.prod(list(i.dims))) for i in model.graph.initializer if i.data_type == float32)
    return model, weights


def _import_onnx(path: Path, options: ImportOptions) -> ImportReport:
    model, weights = _onnx_signature(path)
    variant = options.variant
    if variant is None:
        nearest = min(vh.VARIANTS, key=lambda v: min(abs(weights - c) / c for c in _KNOWN_COUNTS[v]))
        close = min(abs(weights - c) / c for c in _KNOWN_COUNTS[nearest]) < 0.05
        variant = nearest if close else "unknown"
    elif variant not in vh.VARIANTS:
        raise InvalidCheckpointError(
            f"unknown VGGHeads variant {variant!r}; use one of {', '.join(vh.VARIANTS)}"
        )
    source = _source(path, "onnx")
    version = f"{variant}-{source['sha256'][:12]}"
    outputs = [o.name for o in model.graph.output]
    input_name = next(
        i.name for i in model.graph.input if i.name not in {x.name for x in model.graph.initializer}
    )
    top_k = {d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim[1:2]}
    layout = "all_anchors" if top_k == {8400} else "top_k"
    with staged_entry(ENTRY_NAME, version, options.root) as staging:
        target = staging / "model.onnx"
        target.write_bytes(path.read_bytes())
        manifest: dict[str, Any] = {
            "schema_version": MANIFEST_SCHEMA_VERSION,
            "name": ENTRY_NAME,
            "version": version,
            "format": "onnx",
            "model_file": target.name,
            "model_sha256": sha256_file(target),
            "inputs": [
                {"name": input_name, "shape": ["batch", 3, vh.INPUT_SIZE, vh.INPUT_SIZE], "dtype": "float32"}
            ],
            "outputs": [{"name": name} for name in outputs],
            "source": source,
            "export": {"served_as_is": True},
            "parity": None,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            **_family_fields(variant, None, weights, outputs=layout),
        }
        write_json_atomic(staging / MANIFEST, manifest)
    return ImportReport(
        family=FAMILY,
        variant=variant,
        name=ENTRY_NAME,
        version=version,
        parameters=weights,
        parity_max_abs=None,
        directory=entry_dir(ENTRY_NAME, version, options.root),
        details={"format": "onnx", "served_as_is": True},
    )


# --------------------------------------------------------------------------------------------
# Finding the entry to serve


def current_entry(root: Path | None = None) -> RepositoryEntry | None:
    """The most recently imported intact VGGHeads entry, or None."""
    entries = [e for e in list_entries(root) if e.name == ENTRY_NAME and e.is_intact()]
    if not entries:
        return None
    return max(entries, key=lambda e: (str(e.manifest.get("created", "")), e.version))


def unavailable_reason(root: Path | None = None) -> str | None:
    """Why the `vggheads` pipeline cannot run here, or None."""
    if current_entry(root) is None:
        return (
            "no VGGHeads checkpoint is imported; run `headforge models import vggheads PATH` "
            "(see docs/models.md)"
        )
    return None
