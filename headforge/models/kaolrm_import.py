"""`headforge models import kaolrm`: a user's KaoLRM checkpoint → two checked ONNX graphs.

Input: a release folder holding `config.json` and `model.safetensors` (KaoLRM's PyTorchModelHubMixin
layout, no key prefix), or the weights file itself (`.safetensors`, or a state dict read with
`torch.load(weights_only=True)`) with `--config`. Nothing is unpickled beyond that.

Checks, in order, each raising `InvalidCheckpointError` (`invalid_checkpoint`):
1. `config.json` parses and is a supported KaoLRM config;
2. the config agrees with what the weights imply (widths, triplane size, layer counts): a config
   that does not match the weights is named as such, field by field;
3. every key and shape matches our module strictly (the first missing, unexpected or mismatched key
   is named); FLAME's buffers (`flame_model.*`) are optional, but when any is present all 14 must
   be, with the released shapes;
4. no tensor holds NaN or infinity.

Output, written only when every check and both parity checks pass (the repository is otherwise
left unchanged): `kaolrm-<variant>-image/<version>/` (image (N, 3, 224, 224) in [0, 1] → planes,
FLAME parameters (N, 160)) and `kaolrm-<variant>-gaussians/<version>/` (planes, FLAME-frame points
(N, 8000, 3) → Gaussians (N, 8000, 11), at the variant's focal). When the checkpoint carries FLAME's
tensors they are saved as `flame_model.npz` beside the image graph, so the `kaolrm` pipeline can use
them when no FLAME model is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from headforge.config import model_repository
from headforge.errors import InvalidCheckpointError
from headforge.files import sha256_file
from headforge.models.kaolrm import (
    FLAME_BUFFERS,
    IMAGE_SIZE,
    PRETRAIN_FOCAL,
    SOURCE_CAMERA,
    SYNTH_FOCAL,
    KaoLRM,
    KaoLRMConfig,
    KaoLRMConfigError,
    KaoLRMGaussianGraph,
    KaoLRMImageGraph,
    config_from_weights,
)

if TYPE_CHECKING:
    from headforge.export.onnx import ExportSpec
    from headforge.models.importers import ImportOptions, ImportReport

FAMILY = "kaolrm"
VARIANTS = tuple(SYNTH_FOCAL)
GAUSSIAN_POINTS = 8000  # the Gaussian graph's fixed point count; fewer points are zero-padded
FLAME_FILE = "flame_model.npz"
EXPORT_REVISION = 1


def image_entry_name(variant: str) -> str:
    return f"{FAMILY}-{variant}-image"


def gaussian_entry_name(variant: str) -> str:
    return f"{FAMILY}-{variant}-gaussians"


@dataclass(frozen=True)
class KaoLRMImport:
    """What an import wrote; `summary()` is the `--json` line."""

    variant: str
    version: str
    parameters: int
    parity_max_abs: float
    image_entry: Path
    gaussian_entry: Path
    flame_in_checkpoint: bool
    checkpoint_sha256: str

    def summary(self) -> dict[str, Any]:
        return {
            "family": FAMILY,
            "variant": self.variant,
            "version": self.version,
            "parameters": self.parameters,
            "parity_max_abs": self.parity_max_abs,
            "entries": [self.image_entry.parent.name, self.gaussian_entry.parent.name],
            "flame_in_checkpoint": self.flame_in_checkpoint,
        }


def resolve_inputs(path: Path, config: Path | None) -> tuple[Path, Path]:
    """(weights file, config.json) from a release folder or a weights file (+ `--config`)."""
    if path.is_dir():
        candidates = [path / "model.safetensors", path / "pytorch_model.bin", path / "model.pth"]
        weights = next((c for c in candidates if c.is_file()), None)
        if weights is None:
            raise InvalidCheckpointError(
                f"{path} holds no model.safetensors (a KaoLRM release folder holds config.json and model.safetensors)",
                details={"path": str(path)},
            )
    elif path.is_file():
        weights = path
    else:
        raise InvalidCheckpointError(f"{path}: no such file or folder", details={"path": str(path)})
    config_path = config or weights.parent / "config.json"
    if not config_path.is_file():
        raise InvalidCheckpointError(
            f"no config.json beside {weights.name}; pass --config PATH (KaoLRM saves it with the weights)",
            details={"path": str(config_path)},
        )
    return weights, config_path


def read_config(path: Path) -> KaoLRMConfig:
    try:
        return KaoLRMConfig.from_json(path)
    except KaoLRMConfigError as error:
        raise InvalidCheckpointError(f"config {path.name}: {error}", details={"config": str(path)}) from error


def check_config_matches(config: KaoLRMConfig, tensors: dict[str, torch.Tensor], config_name: str) -> None:
    """Name every config field the weights contradict (e.g. transformer_dim 1024 vs 768 in pos_embed)."""
    implied = config_from_weights({k: tuple(v.shape) for k, v in tensors.items()})
    wanted = config.to_dict()
    wanted.setdefault("encoder_depth", config.encoder_config().depth)
    wrong = {
        key: (wanted[key], value) for key, value in implied.items() if key in wanted and wanted[key] != value
    }
    if wrong:
        listed = "; ".join(
            f"{key} is {have} in {config_name}, the weights have {got}" for key, (have, got) in wrong.items()
        )
        raise InvalidCheckpointError(
            f"{config_name} does not match the weights: {listed}",
            details={"config_mismatch": {k: {"config": a, "weights": b} for k, (a, b) in wrong.items()}},
        )


def split_flame_tensors(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(network tensors, FLAME buffers); the FLAME set is empty or complete and correctly shaped."""
    flame = {k: v for k, v in tensors.items() if k in FLAME_BUFFERS}
    network = {k: v for k, v in tensors.items() if k not in FLAME_BUFFERS}
    if flame:
        missing = [k for k in FLAME_BUFFERS if k not in flame]
        if missing:
            raise InvalidCheckpointError(
                f"checkpoint: FLAME tensors are incomplete, missing key {missing[0]!r} "
                f"({len(missing)} of {len(FLAME_BUFFERS)} missing)",
                details={"first_missing": missing[0]},
            )
        for key, (shape, kind) in FLAME_BUFFERS.items():
            tensor = flame[key]
            if tuple(tensor.shape) != shape:
                raise InvalidCheckpointError(
                    f"checkpoint: tensor {key!r} has shape {list(tensor.shape)}, FLAME's is {list(shape)}",
                    details={"first_mismatched": key},
                )
            if (kind == "int") == tensor.is_floating_point():
                raise InvalidCheckpointError(
                    f"checkpoint: tensor {key!r} has dtype {tensor.dtype}, expected {kind}",
                    details={"first_mismatched": key},
                )
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise InvalidCheckpointError(
                    f"checkpoint: tensor {key!r} holds NaN or infinite values",
                    details={"first_nonfinite": key},
                )
        faces = flame["flame_model.faces_tensor"]
        if int(faces.min()) < 0 or int(faces.max()) >= 5023:
            raise InvalidCheckpointError("checkpoint: flame_model.faces_tensor indexes outside 5023 vertices")
    return network, flame


def load_checkpoint(weights: Path, config_path: Path) -> tuple[KaoLRM, dict[str, torch.Tensor], str]:
    """Read, check and load: (model in eval mode, FLAME tensors or {}, checkpoint sha256)."""
    from headforge.models.checkpoints import load_checked, read_tensors

    config = read_config(config_path)
    tensors = read_tensors(weights).tensors
    network, flame = split_flame_tensors(tensors)
    check_config_matches(config, network, config_path.name)
    model = KaoLRM(config)
    load_checked(model, network, what=weights.name)
    return model.eval(), flame, sha256_file(weights)


def flame_arrays(flame: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """KaoLRM's FLAME buffers as the arrays of a headforge FLAME asset (100 shape + 50 expression)."""
    posedirs = flame["flame_model.posedirs"].double().numpy()  # (36, 5023·3), smplx layout
    return {
        "v_template": flame["flame_model.v_template"].float().numpy(),
        "faces": flame["flame_model.faces_tensor"].numpy().astype(np.int32),
        "shapedirs": flame["flame_model.shapedirs"][:, :, :100].float().numpy(),
        "exprdirs": flame["flame_model.shapedirs"][:, :, 100:].float().numpy(),
        "posedirs": posedirs.T.reshape(5023, 3, 36).astype(np.float32),
        "j_regressor": flame["flame_model.J_regressor"].float().numpy(),
        "weights": flame["flame_model.lbs_weights"].float().numpy(),
        "parents": flame["flame_model.parents"].numpy().astype(np.int32),
    }


def export_specs(config: KaoLRMConfig, focal: float) -> tuple[ExportSpec, ExportSpec]:
    """The two graphs' export specs: image → planes, FLAME; planes, points → Gaussians (points
    drawn for parity within the triplane's box at `focal`)."""
    from headforge.export.onnx import ExportSpec, TensorSpec

    reach = PRETRAIN_FOCAL / focal
    plane_shape = (3, config.triplane_dim, config.triplane_high_res, config.triplane_high_res)
    image = ExportSpec(
        inputs=(TensorSpec("image", (3, IMAGE_SIZE, IMAGE_SIZE)),), outputs=("planes", "flame"), max_batch=16
    )
    gaussians = ExportSpec(
        inputs=(
            TensorSpec("planes", plane_shape, value_range=(-1.0, 1.0)),
            TensorSpec("points", (GAUSSIAN_POINTS, 3), value_range=(-reach, reach)),
        ),
        outputs=("gaussians",),
        max_batch=16,
    )
    return image, gaussians


def import_kaolrm(
    path: Path,
    *,
    config: Path | None = None,
    variant: str = "mono",
    root: Path | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> KaoLRMImport:
    """Check a KaoLRM checkpoint and export its two graphs into the model repository."""
    from headforge.export.model import write_entry_files
    from headforge.export.repository import entry_dir, staged_entry

    if variant not in VARIANTS:
        raise InvalidCheckpointError(f"--name must be one of {', '.join(VARIANTS)}, got {variant!r}")
    weights, config_path = resolve_inputs(path, config)
    log(f"reading {weights}")
    model, flame, sha = load_checkpoint(weights, config_path)
    parameters = sum(p.numel() for p in model.parameters())
    focal = SYNTH_FOCAL[variant]
    version = f"ckpt-{sha[:12]}-r{EXPORT_REVISION}"
    source: dict[str, Any] = {
        "checkpoint": weights.name,
        "sha256": sha,
        "config": model.config.to_dict(),
        "config_sha256": sha256_file(config_path),
        "family": FAMILY,
        "variant": variant,
        "license": "KaoLRM weights: CC BY-NC 4.0 (code Apache-2.0)",
        "parameters": parameters,
    }
    image_graph = KaoLRMImageGraph(model).eval()
    gaussian_graph = KaoLRMGaussianGraph(model, focal).eval()
    image_spec, gaussian_spec = export_specs(model.config, focal)
    rng = np.random.default_rng(0)
    images = rng.uniform(0.0, 1.0, size=(2, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    with torch.no_grad():
        planes = image_graph(torch.from_numpy(images))[0].numpy()
    reach = PRETRAIN_FOCAL / focal  # points within the triplane's box
    points = rng.uniform(-reach, reach, size=(2, GAUSSIAN_POINTS, 3)).astype(np.float32)
    extra = {
        "kaolrm": {
            "variant": variant,
            "synth_focal": focal,
            "source_camera": list(SOURCE_CAMERA),
            "flame_in_checkpoint": bool(flame),
        }
    }
    image_name, gaussian_name = image_entry_name(variant), gaussian_entry_name(variant)
    manifests: list[dict[str, Any]] = []
    # Both entries are built in staging folders and swapped in only when both exports and parity
    # checks succeeded; any error leaves the repository as it was.
    with (
        staged_entry(image_name, version, root) as image_dir,
        staged_entry(gaussian_name, version, root) as gauss_dir,
    ):
        log(f"exporting {image_name} (image → planes, FLAME parameters)")
        manifests.append(
            write_entry_files(
                image_graph, image_spec, image_name, version, image_dir,
                source={**source, "graph": "image"}, samples=[images], extra=extra,
            )
        )  # fmt: skip
        log(f"exporting {gaussian_name} (planes, points → Gaussians)")
        manifests.append(
            write_entry_files(
                gaussian_graph, gaussian_spec, gaussian_name, version, gauss_dir,
                source={**source, "graph": "gaussians"}, samples=[planes, points], extra=extra,
            )
        )  # fmt: skip
        if flame:
            with open(image_dir / FLAME_FILE, "wb") as handle:
                np.savez(handle, **flame_arrays(flame))  # type: ignore[arg-type]
    parity = max(float(m["parity"]["max_abs_error"]) for m in manifests)
    final_image, final_gaussians = (
        entry_dir(image_name, version, root),
        entry_dir(gaussian_name, version, root),
    )
    return KaoLRMImport(
        variant=variant,
        version=version,
        parameters=parameters,
        parity_max_abs=parity,
        image_entry=final_image,
        gaussian_entry=final_gaussians,
        flame_in_checkpoint=bool(flame),
        checkpoint_sha256=sha,
    )


def latest_entries(variant: str, root: Path | None = None) -> tuple[Path, Path] | None:
    """The newest complete (image, gaussians) entry pair of `variant`, or None when not imported."""
    from headforge.export.repository import read_entry

    root = root or model_repository()
    folder = root / image_entry_name(variant)
    if not folder.is_dir():
        return None
    candidates = []
    for version_dir in folder.iterdir():
        image = read_entry(image_entry_name(variant), version_dir.name, root)
        gaussians = read_entry(gaussian_entry_name(variant), version_dir.name, root)
        if image is not None and gaussians is not None:
            candidates.append((str(image.manifest.get("created", "")), image.directory, gaussians.directory))
    if not candidates:
        return None
    _, image_dir, gaussian_dir = max(candidates)
    return image_dir, gaussian_dir


def detect_variant(path: Path) -> str | None:
    """`mono` or `multiview` from the release folder's name (KaoLRM ships `releases/mono/` and
    `releases/multiview/`); None when the name says neither. The two checkpoints share one
    architecture, so the weights cannot tell them apart."""
    folder = path if path.is_dir() else path.parent
    name = folder.name.lower()
    return name if name in VARIANTS else None


def import_checkpoint(path: Path, options: ImportOptions) -> ImportReport:
    """The `IMPORTERS["kaolrm"]` entry: `headforge models import kaolrm DIR|FILE [--config] [--name]`."""
    from headforge.errors import InvalidOptionError
    from headforge.models.importers import ImportReport

    variant = options.variant or detect_variant(path)
    if variant is None:
        raise InvalidOptionError(
            "cannot tell a mono from a multiview KaoLRM checkpoint by its weights; pass --name mono|multiview",
            details={"variants": list(VARIANTS)},
        )
    if variant not in VARIANTS:
        raise InvalidOptionError(f"--name must be one of {', '.join(VARIANTS)}, got {variant!r}")
    result = import_kaolrm(path, config=options.config, variant=variant, root=options.root)
    return ImportReport(
        family=FAMILY,
        variant=variant,
        name=image_entry_name(variant),
        version=result.version,
        parameters=result.parameters,
        parity_max_abs=result.parity_max_abs,
        directory=result.image_entry,
        details={
            "gaussian_entry": str(result.gaussian_entry),
            "flame_in_checkpoint": result.flame_in_checkpoint,
        },
    )


def imported_variants(root: Path | None = None) -> list[str]:
    """The variants with a complete imported entry pair, mono first."""
    return [variant for variant in VARIANTS if latest_entries(variant, root) is not None]


def unavailable_reason(root: Path | None = None) -> str | None:
    """Why the `kaolrm` pipeline cannot run here, or None."""
    if not imported_variants(root):
        return (
            "no KaoLRM checkpoint is imported; run `headforge models import kaolrm DIR --name mono|multiview` "
            "(see docs/models.md)"
        )
    return None


def entry_model_path(name: str, root: Path | None = None) -> Path:
    """`model.onnx` of the newest complete import of entry `name` (`kaolrm-<variant>-image` or
    `-gaussians`); `ModelsMissingError` when that variant is not imported."""
    from headforge.errors import ModelsMissingError

    for variant in VARIANTS:
        if name in (image_entry_name(variant), gaussian_entry_name(variant)):
            entries = latest_entries(variant, root)
            if entries is None:
                raise ModelsMissingError(
                    f"no KaoLRM {variant} checkpoint is imported; run `headforge models import kaolrm DIR "
                    f"--name {variant}`",
                    details={"missing": [name]},
                )
            from headforge.export.repository import read_entry

            folder = entries[0] if name == image_entry_name(variant) else entries[1]
            entry = read_entry(name, folder.name, root)
            if entry is None:
                raise ModelsMissingError(f"{name}/{folder.name} is unreadable", details={"missing": [name]})
            return entry.model_path
    raise ModelsMissingError(f"{name!r} is not a KaoLRM entry", details={"missing": [name]})
