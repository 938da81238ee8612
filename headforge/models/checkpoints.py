"""Safe reading of user-supplied checkpoints, shared by every `headforge models import FAMILY`.

`read_tensors(path)` returns a flat `{name: tensor}` mapping from one of:

- `.safetensors`: parsed by the `safetensors` library (a JSON header plus raw buffers; no code);
- `.pth` / `.pt` / `.bin` / `.ckpt` state dicts: `torch.load(weights_only=True)`, whose unpickler
  only builds tensors, primitive containers and a short allow-list of torch types and refuses every
  other global. A dict that wraps the weights (`{"state_dict": {...}}`, `{"model": {...}}`,
  `{"ema": ...}`) is unwrapped by looking for the nested dict of tensors;
- TorchScript archives (`.trcd`, `.jit`, `.torchscript`, or a `.pt` that turns out to be one):
  `torch.jit.load(map_location="cpu")`, then the module's `named_parameters()` and
  `named_buffers()` by name. What `torch.jit.load` runs: the archive's `code/` folder holds
  TorchScript source, which the TorchScript compiler (not the Python interpreter) compiles; its
  `data.pkl` is read by TorchScript's own C++ unpickler, which can only build TorchScript
  classes defined in that source, tensors and primitive containers, and cannot resolve Python
  globals, so no Python object of the file's choosing is constructed. TorchScript classes in the
  archive may define `__setstate__`, which the loader calls; TorchScript itself has no file,
  process or network access beyond registered tensor operators. headforge never calls the loaded
  module's `forward`: it only copies tensors out of it.

Anything else (not a checkpoint, a truncated file, an archive of the wrong kind) raises
`InvalidCheckpointError`. `strip_prefix` removes a wrapper prefix (`module.`, `model.`), and
`match_state_dict` compares a mapping against a module's state dict strictly, naming the first
missing or unexpected key or the first tensor whose shape differs, before loading it.
"""

from __future__ import annotations

import io
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from headforge.errors import InvalidCheckpointError

STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
TORCHSCRIPT_SUFFIXES = (".trcd", ".jit", ".torchscript")
SAFETENSORS_SUFFIXES = (".safetensors",)
CHECKPOINT_SUFFIXES = STATE_DICT_SUFFIXES + TORCHSCRIPT_SUFFIXES + SAFETENSORS_SUFFIXES
# Keys a training script commonly wraps the weights in, tried in this order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "ema", "module", "weights")

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Checkpoint:
    """What `read_tensors` found: the tensors, the format it read, and where they came from."""

    path: Path
    format: str  # "safetensors" | "state_dict" | "torchscript"
    tensors: Tensors


def read_tensors(path: Path) -> Checkpoint:
    """Read every tensor of a checkpoint file by name (see the module docstring for formats)."""
    if not path.is_file():
        raise InvalidCheckpointError(f"{path}: no such file", details={"path": str(path)})
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return Checkpoint(path, "safetensors", _read_safetensors(path))
    if suffix in TORCHSCRIPT_SUFFIXES or _is_torchscript(path):
        return Checkpoint(path, "torchscript", _read_torchscript(path))
    if suffix in STATE_DICT_SUFFIXES:
        return Checkpoint(path, "state_dict", _read_state_dict(path))
    raise InvalidCheckpointError(
        f"{path.name}: unsupported checkpoint type {suffix or '(no suffix)'!r}; "
        f"expected one of {', '.join(CHECKPOINT_SUFFIXES)}",
        details={"path": str(path)},
    )


def _invalid(path: Path, what: str, error: BaseException | None = None) -> InvalidCheckpointError:
    reason = f": {type(error).__name__}: {error}" if error is not None else ""
    message = f"{path.name} is not a readable {what}{reason}"
    return InvalidCheckpointError(message[:2000], details={"path": str(path), "format": what})


def _read_safetensors(path: Path) -> Tensors:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise _invalid(path, "safetensors file", error) from error
    if not tensors:
        raise _invalid(path, "safetensors file (it holds no tensors)")
    return dict(tensors)


def _is_torchscript(path: Path) -> bool:
    """A zip archive with TorchScript's `code/` folder (what `torch.jit.save` writes)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return any("/code/" in name or name.startswith("code/") for name in names) and any(
        name.endswith("constants.pkl") for name in names
    )


def _read_torchscript(path: Path) -> Tensors:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # the C++ loader raises RuntimeError and friends for any damage
        raise _invalid(path, "TorchScript archive", error) from error
    tensors: Tensors = {name: p.detach() for name, p in module.named_parameters()}
    tensors.update({name: b.detach() for name, b in module.named_buffers()})
    if not tensors:
        raise _invalid(path, "TorchScript archive (it holds no parameters or buffers)")
    return tensors


def _read_state_dict(path: Path) -> Tensors:
    data = path.read_bytes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # notices about pickle protocols the loader refuses anyway
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError (bad zip), EOFError (truncated) ...
        raise _invalid(path, "PyTorch state dict", error) from error
    tensors = _find_tensor_dict(loaded)
    if tensors is None:
        raise _invalid(path, "PyTorch state dict (no mapping of names to tensors inside)")
    return tensors


def _find_tensor_dict(loaded: object, depth: int = 0) -> Tensors | None:
    """The dict of tensors itself, or the one nested under a wrapper key (two levels at most)."""
    if not isinstance(loaded, Mapping) or depth > 2:
        return None
    tensors = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if tensors and len(tensors) >= len(loaded) // 2:
        return tensors
    for key in WRAPPER_KEYS:
        found = _find_tensor_dict(loaded.get(key), depth + 1)
        if found is not None:
            return found
    return None


def strip_prefix(tensors: Mapping[str, torch.Tensor], prefixes: Iterable[str]) -> Tensors:
    """Remove the first of `prefixes` (e.g. `module.`, `model.`) that every key starts with,
    repeatedly, so `module.model.x` becomes `x`. Keys are returned unchanged when none applies."""
    current = dict(tensors)
    options = tuple(prefixes)
    changed = True
    while changed and current:
        changed = False
        for prefix in options:
            if all(key.startswith(prefix) for key in current):
                current = {key[len(prefix) :]: value for key, value in current.items()}
                changed = True
                break
    return current


def select_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> Tensors:
    """The tensors under `prefix` with the prefix removed (e.g. `model.` inside a traced wrapper
    that also holds `post_process.*`); the mapping unchanged when no key has the prefix."""
    chosen = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    return chosen or dict(tensors)


def expected_tensors(module: nn.Module) -> Tensors:
    """The module's state dict (persistent parameters and buffers), detached."""
    return {k: v.detach() for k, v in module.state_dict().items()}


def check_state_dict(
    module: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    *,
    ignore: Callable[[str], bool] = lambda key: False,
    what: str = "checkpoint",
) -> None:
    """Raise `InvalidCheckpointError` unless `tensors` has exactly the module's state-dict keys,
    each with the same shape. Keys for which `ignore(key)` is true are dropped from `tensors`
    first (e.g. non-persistent buffers a TorchScript archive stores). The error names the first
    missing key (in the module's order), else the first unexpected key, else the first tensor
    whose shape differs, and counts all three in `details`."""
    expected = expected_tensors(module)
    given = {k: v for k, v in tensors.items() if not ignore(k)}
    missing = [k for k in expected if k not in given]
    unexpected = sorted(k for k in given if k not in expected)
    mismatched = [k for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or mismatched):
        return
    details: dict[str, object] = {
        "missing": len(missing),
        "unexpected": len(unexpected),
        "mismatched": len(mismatched),
        "expected_keys": len(expected),
        "given_keys": len(given),
    }
    if missing:
        key = missing[0]
        message = f"{what}: missing key {key!r} {list(expected[key].shape)}"
        details["first_missing"] = key
    elif unexpected:
        key = unexpected[0]
        message = f"{what}: unexpected key {key!r} {list(given[key].shape)}"
        details["first_unexpected"] = key
    else:
        key = mismatched[0]
        message = (
            f"{what}: tensor {key!r} has shape {list(given[key].shape)}, "
            f"the model expects {list(expected[key].shape)}"
        )
        details["first_mismatched"] = key
    counts = f" ({len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} mismatched)"
    raise InvalidCheckpointError(message + counts, details=details)


def load_checked(
    module: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    *,
    ignore: Callable[[str], bool] = lambda key: False,
    what: str = "checkpoint",
) -> nn.Module:
    """`check_state_dict`, then `load_state_dict(strict=True)` with dtypes cast to the module's
    (float checkpoints saved as fp16/bf16 load as fp32). Non-finite floating tensors are refused."""
    check_state_dict(module, tensors, ignore=ignore, what=what)
    expected = expected_tensors(module)
    ready: Tensors = {}
    for key, target in expected.items():
        value = tensors[key]
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise InvalidCheckpointError(
                f"{what}: tensor {key!r} holds NaN or infinite values", details={"first_nonfinite": key}
            )
        ready[key] = value.to(dtype=target.dtype)
    module.load_state_dict(ready, strict=True)
    return module
