"""Import the operator's FLAME files into one checked `.npz` asset, and load that asset.

FLAME's pickles were written by Python 2 with chumpy objects and scipy sparse matrices inside.
They are read here, and only here, by `RestrictedUnpickler`: it maps the few classes a FLAME
file needs (numpy arrays and dtypes, `chumpy.ch.Ch`, scipy CSC/CSR matrices) to plain arrays
and refuses every other global, so a malicious pickle cannot run code. Serving only ever loads
the `.npz` written by `import_flame` (with `allow_pickle=False`).

Accepted inputs (see docs/flame.md):
- model: FLAME 2020 `generic_model.pkl`, FLAME 2023 `flame2023.pkl` / `flame2023_no_jaw.pkl`,
  FLAME 2023 Open (`.pkl`), or an `.npz` holding the same keys;
- landmarks: MediaPipe format (`lmk_face_idx`, `lmk_b_coords`, `landmark_indices`) or the
  68-point format (`static_lmk_faces_idx`, `static_lmk_bary_coords`, optional `dynamic_*`/`full_*`),
  as `.npz`, `.npy` (a pickled dict, read with the restricted unpickler) or `.pkl`;
- UVs: `head_template.obj` (5023 v, 5118 vt, 9976 f).
"""

from __future__ import annotations

import io
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray

from headforge.config import asset_dir
from headforge.errors import AssetError, PipelineUnavailableError
from headforge.files import atomic_writer, sha256_file

NUM_VERTICES = 5023
NUM_FACES = 9976
NUM_UVS = 5118
NUM_JOINTS = 5
NUM_POSE_FEATURES = 9 * (NUM_JOINTS - 1)
NUM_SHAPE_TOTAL = 300
NUM_EXPRESSION_TOTAL = 100
JOINT_NAMES = ("global", "neck", "jaw", "left_eye", "right_eye")
ASSET_FORMAT_VERSION = 1
ASSET_FILE_NAME = "flame.npz"
ASSET_FILE_MODE = 0o600  # readable by the importing user only (see docs/flame.md)
MAX_INPUT_BYTES = 1 << 30
DOCS_HINT = "see docs/flame.md for where to get FLAME and how to import it with `headforge flame import`"


# --------------------------------------------------------------------------------------------
# Restricted unpickling


class _ChumpyStandIn:
    """Takes the place of `chumpy.ch.Ch`; only its `x` array is kept."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise AssetError("a chumpy object in the pickle has an unexpected state (not a dict)")
        self.state = state


class _SparseStandIn:
    """Takes the place of a scipy CSC/CSR matrix; rebuilt from its arrays after loading."""

    sparse_format = "csc"

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise AssetError("a scipy sparse matrix in the pickle has an unexpected state (not a dict)")
        self.state = state


class _CscStandIn(_SparseStandIn):
    sparse_format = "csc"


class _CsrStandIn(_SparseStandIn):
    sparse_format = "csr"


def _reconstruct_ndarray(cls: Any, shape: Any, dtype: Any) -> NDArray[Any]:
    """numpy's `_reconstruct`, limited to plain ndarrays."""
    if cls is not np.ndarray:
        raise AssetError(f"refusing to rebuild an array of class {cls!r}")
    if tuple(shape) != (0,):  # numpy pickles an empty array here, then fills it from the state
        raise AssetError(f"refusing an array reconstruction with shape {shape!r}")
    return np.ndarray.__new__(np.ndarray, (0,), dtype)


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """numpy's `scalar`, limited to non-object dtypes."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes | str):
        raise AssetError("refusing to rebuild a numpy object scalar")
    raw = data.encode("latin1") if isinstance(data, str) else data
    return np.frombuffer(raw, dtype=dtype, count=1)[0]


def _latin1_encode(text: Any, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes: latin-1 only."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise AssetError("refusing a codec call other than latin-1 encoding in the pickle")
    return text.encode("latin1")


def _plain_bytes(*args: Any) -> bytes:
    """`bytes()` as pickles use it: empty, or from a byte string; never from a size."""
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], bytes | bytearray | list):
        return bytes(args[0])
    raise AssetError("refusing a bytes() call with unexpected arguments in the pickle")


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """`copyreg._reconstructor` (protocol 0/1 objects), limited to the stand-in classes."""
    if base is not object or state is not None or cls not in (_ChumpyStandIn, _CscStandIn, _CsrStandIn):
        raise AssetError(f"refusing to reconstruct {cls!r} from the pickle")
    return object.__new__(cls)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_ndarray,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_ndarray,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "bytes"): _plain_bytes,
    ("builtins", "set"): set,
    ("builtins", "object"): object,
    ("copyreg", "_reconstructor"): _reconstructor,
    # Python 2 names (find_class is overridden, so pickle's own renaming does not apply)
    ("__builtin__", "bytes"): _plain_bytes,
    ("__builtin__", "set"): set,
    ("__builtin__", "object"): object,
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("chumpy.ch", "Ch"): _ChumpyStandIn,
    ("scipy.sparse.csc", "csc_matrix"): _CscStandIn,
    ("scipy.sparse._csc", "csc_matrix"): _CscStandIn,
    ("scipy.sparse._csc", "csc_array"): _CscStandIn,
    ("scipy.sparse.csr", "csr_matrix"): _CsrStandIn,
    ("scipy.sparse._csr", "csr_matrix"): _CsrStandIn,
    ("scipy.sparse._csr", "csr_array"): _CsrStandIn,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles FLAME files: only the classes in `_ALLOWED_GLOBALS`, everything else refused."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise AssetError(
                f"refusing to load {module}.{name} from the pickle: a FLAME file only holds numpy arrays, "
                "chumpy arrays and scipy sparse matrices",
                details={"class": f"{module}.{name}"},
            )
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise AssetError("refusing a pickle with persistent ids")


def _plain(value: Any, depth: int = 0, budget: list[int] | None = None) -> Any:
    """Turn stand-ins into plain numpy arrays / scipy matrices, recursively (FLAME files are flat:
    a dict of arrays, chumpy objects and sparse matrices)."""
    budget = [10_000] if budget is None else budget
    budget[0] -= 1
    if depth > 4 or budget[0] < 0:
        raise AssetError("the pickle nests or shares objects far more than a FLAME file does")
    if isinstance(value, _ChumpyStandIn):
        if "x" not in value.state:
            raise AssetError(
                "a chumpy object in the pickle has no `x` array (only plain Ch objects are supported)"
            )
        return _plain(value.state["x"], depth + 1, budget)
    if isinstance(value, _SparseStandIn):
        return _sparse_from_state(value)
    if isinstance(value, dict):
        return {str(key): _plain(item, depth + 1, budget) for key, item in value.items()}
    if isinstance(value, np.ndarray) and value.dtype.hasobject:
        raise AssetError("the pickle holds an array of Python objects, which a FLAME file never does")
    return value


def _sparse_from_state(matrix: _SparseStandIn) -> sp.csr_matrix:
    state = matrix.state
    raw_shape = state.get("_shape", state.get("shape"))
    if raw_shape is None:
        raise AssetError("a scipy sparse matrix in the pickle has no shape")
    try:
        shape = tuple(int(n) for n in raw_shape)
        parts = (np.asarray(state["data"]), np.asarray(state["indices"]), np.asarray(state["indptr"]))
    except (KeyError, TypeError) as error:
        raise AssetError(f"a scipy sparse matrix in the pickle is missing its arrays ({error})") from error
    if any(part.dtype.hasobject for part in parts):
        raise AssetError("a scipy sparse matrix in the pickle holds Python objects")
    build = sp.csc_matrix if matrix.sparse_format == "csc" else sp.csr_matrix
    try:
        return sp.csr_matrix(build(parts, shape=shape))
    except ValueError as error:
        raise AssetError(f"a scipy sparse matrix in the pickle is inconsistent: {error}") from error


def _unpickle(data: bytes) -> Any:
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except AssetError:
        raise
    except Exception as error:
        raise AssetError(f"could not read the pickle: {type(error).__name__}: {error}") from error


def restricted_load(data: bytes) -> Any:
    """Unpickle `data` (Python 2 or 3 pickles) with only the FLAME classes allowed."""
    return _plain(_unpickle(data))


def _read_bytes(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise AssetError(f"{what} not found: {path}")
    if path.stat().st_size > MAX_INPUT_BYTES:
        raise AssetError(f"{what} {path} is larger than 1 GiB, which no FLAME file is")
    return path.read_bytes()


def _load_mapping(path: Path, what: str) -> dict[str, Any]:
    """Read a dict of arrays from `.npz` (no pickle), `.npy` (pickled dict) or `.pkl`."""
    data = _read_bytes(path, what)
    if data[:4] == b"PK\x03\x04":
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                return {key: npz[key] for key in npz.files}
        except ValueError as error:
            raise AssetError(
                f"{what} {path}: the .npz holds pickled objects, which are not accepted"
            ) from error
    loaded = _load_npy(data, what, path) if data[:6] == b"\x93NUMPY" else restricted_load(data)
    if not isinstance(loaded, dict):
        raise AssetError(f"{what} {path} holds a {type(loaded).__name__}, expected a dict of arrays")
    return loaded


def _load_npy(data: bytes, what: str, path: Path) -> Any:
    """A `.npy` file; object arrays (a pickled dict, as FLAME's landmark files are) go through
    the restricted unpickler instead of `np.load(allow_pickle=True)`."""
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    if not dtype.hasobject:
        raise AssetError(f"{what} {path} is a plain array, expected a dict of arrays")
    # The array's items were themselves unpickled through the restricted unpickler.
    array = _unpickle(stream.read())
    if isinstance(array, np.ndarray) and array.shape == () and shape == ():
        return _plain(array.item())
    raise AssetError(f"{what} {path} is an object array of shape {shape}, expected a pickled dict")


# --------------------------------------------------------------------------------------------
# Validation


def _require(model: dict[str, Any], key: str, shape: tuple[int, ...], source: str) -> NDArray[Any]:
    if key not in model:
        raise AssetError(
            f"{source}: missing key `{key}` (expected shape {shape}); keys present: {sorted(model)}"
        )
    value = model[key]
    if sp.issparse(value):
        value = value.toarray()
    array = np.asarray(value)
    if array.dtype.hasobject or not np.issubdtype(array.dtype, np.number):
        raise AssetError(f"{source}: `{key}` is not a numeric array (dtype {array.dtype})")
    if array.shape != shape:
        raise AssetError(f"{source}: `{key}` has shape {array.shape}, expected {shape}")
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise AssetError(f"{source}: `{key}` holds NaN or infinite values")
    return array


def _parents_from_kintree(kintree: NDArray[Any], source: str) -> NDArray[np.int32]:
    parents = kintree[0].astype(np.int64)
    children = kintree[1].astype(np.int64)
    if not np.array_equal(children, np.arange(NUM_JOINTS)):
        raise AssetError(f"{source}: `kintree_table` row 1 should list joints 0..4, got {children.tolist()}")
    parents[0] = -1  # FLAME stores the root's parent as 2**32 - 1
    for joint in range(1, NUM_JOINTS):
        if not 0 <= parents[joint] < joint:
            raise AssetError(
                f"{source}: `kintree_table` gives joint {joint} the invalid parent {parents[joint]}"
            )
    return parents.astype(np.int32)


def validate_model(model: dict[str, Any], source: str) -> dict[str, NDArray[Any]]:
    """Check a FLAME model dict and return its arrays as float32/int32 in the asset layout."""
    v_template = _require(model, "v_template", (NUM_VERTICES, 3), source)
    faces = _require(model, "f", (NUM_FACES, 3), source)
    shapedirs = _require(
        model, "shapedirs", (NUM_VERTICES, 3, NUM_SHAPE_TOTAL + NUM_EXPRESSION_TOTAL), source
    )
    posedirs = _require(model, "posedirs", (NUM_VERTICES, 3, NUM_POSE_FEATURES), source)
    j_regressor = _require(model, "J_regressor", (NUM_JOINTS, NUM_VERTICES), source)
    weights = _require(model, "weights", (NUM_VERTICES, NUM_JOINTS), source)
    kintree = _require(model, "kintree_table", (2, NUM_JOINTS), source)
    if not np.issubdtype(faces.dtype, np.integer) or faces.min() < 0 or faces.max() >= NUM_VERTICES:
        raise AssetError(f"{source}: `f` must hold vertex indices in [0, {NUM_VERTICES})")
    if np.abs(weights.sum(axis=1) - 1.0).max() > 1e-3 or weights.min() < -1e-6:
        raise AssetError(f"{source}: `weights` rows must be non-negative and sum to 1")
    if np.abs(j_regressor.sum(axis=1) - 1.0).max() > 1e-2:  # each joint is a weighted mean of vertices
        raise AssetError(f"{source}: `J_regressor` rows must sum to 1")
    return {
        "v_template": v_template.astype(np.float32),
        "faces": faces.astype(np.int32),
        "shapedirs": shapedirs[:, :, :NUM_SHAPE_TOTAL].astype(np.float32),
        "exprdirs": shapedirs[:, :, NUM_SHAPE_TOTAL:].astype(np.float32),
        "posedirs": posedirs.astype(np.float32),
        "j_regressor": j_regressor.astype(np.float32),
        "weights": weights.astype(np.float32),
        "parents": _parents_from_kintree(kintree, source),
    }


def _check_embedding(face_idx: NDArray[Any], bary: NDArray[Any], key: str, source: str) -> None:
    if not np.issubdtype(face_idx.dtype, np.integer) or face_idx.min() < 0 or face_idx.max() >= NUM_FACES:
        raise AssetError(f"{source}: `{key}` face indices must lie in [0, {NUM_FACES})")
    if bary.shape != (*face_idx.shape, 3) or not np.all(np.isfinite(bary)):
        raise AssetError(
            f"{source}: barycentric coordinates for `{key}` must have shape {(*face_idx.shape, 3)}"
        )
    if np.abs(bary.sum(axis=-1) - 1.0).max() > 1e-3:
        raise AssetError(f"{source}: barycentric coordinates for `{key}` must sum to 1")


def validate_landmarks(embedding: dict[str, Any], source: str) -> dict[str, NDArray[Any]]:
    """Check a landmark embedding (MediaPipe or 68-point format) and return it in the asset layout."""
    out: dict[str, NDArray[Any]] = {}
    if "lmk_face_idx" in embedding and "landmark_indices" in embedding:
        face_idx = np.asarray(embedding["lmk_face_idx"]).reshape(-1)
        bary = np.asarray(embedding.get("lmk_b_coords", np.zeros(0)), dtype=np.float64)
        indices = np.asarray(embedding["landmark_indices"]).reshape(-1)
        _check_embedding(face_idx, bary, "lmk_face_idx", source)
        if indices.shape != face_idx.shape or not np.issubdtype(indices.dtype, np.integer):
            raise AssetError(f"{source}: `landmark_indices` must list one MediaPipe index per embedded point")
        if indices.min() < 0 or indices.max() >= 478 or len(np.unique(indices)) != len(indices):
            raise AssetError(f"{source}: `landmark_indices` must be distinct MediaPipe indices in [0, 478)")
        out["mp_face_idx"] = face_idx.astype(np.int32)
        out["mp_bary"] = bary.astype(np.float32)
        out["mp_landmark_indices"] = indices.astype(np.int32)
    elif "static_lmk_faces_idx" in embedding:
        for prefix in ("static", "dynamic", "full"):
            face_key, bary_key = f"{prefix}_lmk_faces_idx", f"{prefix}_lmk_bary_coords"
            if face_key not in embedding:
                continue
            face_idx = np.asarray(embedding[face_key])
            bary = np.asarray(embedding.get(bary_key, np.zeros(0)), dtype=np.float64)
            _check_embedding(face_idx, bary, face_key, source)
            out[f"ibug_{prefix}_face_idx"] = face_idx.astype(np.int32)
            out[f"ibug_{prefix}_bary"] = bary.astype(np.float32)
    else:
        raise AssetError(
            f"{source}: not a landmark embedding: expected `lmk_face_idx`, `lmk_b_coords` and `landmark_indices` "
            f"(MediaPipe format) or `static_lmk_faces_idx` and `static_lmk_bary_coords` (68-point format); "
            f"keys present: {sorted(embedding)}"
        )
    return out


def read_head_template_uvs(path: Path) -> tuple[NDArray[np.float32], NDArray[np.int32], NDArray[np.int32]]:
    """Parse FLAME's `head_template.obj`: returns (uvs (5118, 2), uv_faces (9976, 3), faces (9976, 3)).

    Hand-parsed because mesh loaders merge or split vertices at UV seams, losing the separate
    vertex and texture indices that FLAME's layout needs.
    """
    text = _read_bytes(path, "UV template").decode("utf-8", errors="replace")
    uvs: list[tuple[float, float]] = []
    faces: list[list[int]] = []
    uv_faces: list[list[int]] = []
    vertex_count = 0
    for line_number, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            if parts[0] == "v":
                vertex_count += 1
            elif parts[0] == "vt":
                uvs.append((float(parts[1]), float(parts[2])))
            elif parts[0] == "f":
                corners = [corner.split("/") for corner in parts[1:]]
                if len(corners) != 3 or any(len(corner) < 2 or not corner[1] for corner in corners):
                    raise AssetError(
                        f"{path}:{line_number}: faces must be triangles with texture indices (v/vt)"
                    )
                faces.append([int(corner[0]) - 1 for corner in corners])
                uv_faces.append([int(corner[1]) - 1 for corner in corners])
        except (ValueError, IndexError) as error:
            raise AssetError(f"{path}:{line_number}: malformed OBJ line: {line.strip()!r}") from error
    if vertex_count != NUM_VERTICES or len(uvs) != NUM_UVS or len(faces) != NUM_FACES:
        raise AssetError(
            f"{path}: expected {NUM_VERTICES} v, {NUM_UVS} vt and {NUM_FACES} f (FLAME's head_template.obj), "
            f"got {vertex_count} v, {len(uvs)} vt, {len(faces)} f"
        )
    uv_array = np.asarray(uvs, dtype=np.float32)
    uv_face_array = np.asarray(uv_faces, dtype=np.int32)
    if uv_face_array.min() < 0 or uv_face_array.max() >= NUM_UVS or not np.all(np.isfinite(uv_array)):
        raise AssetError(f"{path}: texture indices out of range or non-finite UVs")
    return uv_array, uv_face_array, np.asarray(faces, dtype=np.int32)


# --------------------------------------------------------------------------------------------
# Import and load


def flame_asset_path() -> Path:
    """Where the imported FLAME asset lives: `HEADFORGE_FLAME_ASSET` when set (e.g. a read-only
    volume shared by workers), otherwise `<HEADFORGE_HOME>/assets/flame.npz`."""
    override = os.environ.get("HEADFORGE_FLAME_ASSET")
    return Path(override).expanduser() if override else asset_dir() / ASSET_FILE_NAME


def import_flame(
    model_path: Path,
    landmarks_paths: list[Path] | Path | None = None,
    uv_path: Path | None = None,
    destination: Path | None = None,
) -> Path:
    """Read, check and convert the operator's FLAME files into one `.npz`, written atomically and
    readable by its owner only (mode 0600); returns its path.

    `landmarks_paths` may name one embedding of each format (MediaPipe and 68-point)."""
    model = _load_mapping(model_path, "FLAME model")
    arrays = validate_model(model, str(model_path))
    sources: dict[str, Any] = {"model": {"file": model_path.name, "sha256": sha256_file(model_path)}}
    if isinstance(landmarks_paths, Path):
        landmarks_paths = [landmarks_paths]
    for landmarks_path in landmarks_paths or []:
        embedding = validate_landmarks(
            _load_mapping(landmarks_path, "landmark embedding"), str(landmarks_path)
        )
        if set(embedding) & set(arrays):
            raise AssetError(f"{landmarks_path}: a landmark embedding of this format was already given")
        arrays.update(embedding)
        kind = "mediapipe" if "mp_face_idx" in embedding else "ibug68"
        sources[f"landmarks_{kind}"] = {
            "file": landmarks_path.name,
            "sha256": sha256_file(landmarks_path),
        }
    if uv_path is not None:
        uvs, uv_faces, obj_faces = read_head_template_uvs(uv_path)
        if not np.array_equal(obj_faces, arrays["faces"]):
            raise AssetError(
                f"{uv_path}: its faces differ from the model's `f`; it is not this model's template"
            )
        arrays["uvs"] = uvs
        arrays["uv_faces"] = uv_faces
        sources["uv"] = {"file": uv_path.name, "sha256": sha256_file(uv_path)}
    metadata = {"format_version": ASSET_FORMAT_VERSION, "sources": sources}
    arrays["metadata_json"] = np.array(json.dumps(metadata, sort_keys=True))
    destination = destination or flame_asset_path()
    # Owner-only: FLAME's licence forbids redistributing the model, and the asset holds all of it.
    # The temporary file is created 0600 and keeps that mode when it is renamed into place.
    with atomic_writer(destination, mode=ASSET_FILE_MODE) as stream:
        np.savez(stream, **arrays)  # type: ignore[arg-type]
        stream.flush()
        load_flame_asset(Path(stream.name))  # the file we publish must load
    return destination


@dataclass(frozen=True)
class FlameAsset:
    """An imported FLAME model, as plain arrays (float32 / int32)."""

    v_template: NDArray[np.float32]  # (5023, 3) meters, +Y up, face toward +Z
    faces: NDArray[np.int32]  # (9976, 3)
    shapedirs: NDArray[np.float32]  # (5023, 3, 300)
    exprdirs: NDArray[np.float32]  # (5023, 3, 100)
    posedirs: NDArray[np.float32]  # (5023, 3, 36)
    j_regressor: NDArray[np.float32]  # (5, 5023)
    weights: NDArray[np.float32]  # (5023, 5)
    parents: NDArray[np.int32]  # (5,), root = -1
    metadata: dict[str, Any]
    uvs: NDArray[np.float32] | None = None  # (5118, 2)
    uv_faces: NDArray[np.int32] | None = None  # (9976, 3)
    mp_face_idx: NDArray[np.int32] | None = None  # (K,) FLAME face per MediaPipe landmark
    mp_bary: NDArray[np.float32] | None = None  # (K, 3)
    mp_landmark_indices: NDArray[np.int32] | None = None  # (K,) which of MediaPipe's 468/478 points
    ibug: dict[str, NDArray[Any]] | None = None  # 68-point embedding arrays, when imported

    @property
    def has_mediapipe_embedding(self) -> bool:
        return self.mp_face_idx is not None


def load_flame_asset(path: Path | None = None) -> FlameAsset:
    """Load and re-check the imported asset; raises `PipelineUnavailableError` when there is none."""
    path = path or flame_asset_path()
    if not path.is_file():
        raise PipelineUnavailableError(f"no FLAME model is imported ({path} is missing); {DOCS_HINT}")
    if not os.access(path, os.R_OK):
        raise PipelineUnavailableError(_not_readable(path))
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as error:
        raise AssetError(
            f"the FLAME asset {path} is unreadable ({error}); re-import it ({DOCS_HINT})"
        ) from error
    metadata = json.loads(str(data.pop("metadata_json", "{}")))
    if metadata.get("format_version") != ASSET_FORMAT_VERSION:
        raise AssetError(f"the FLAME asset {path} has an unknown format version; re-import it ({DOCS_HINT})")
    model = {
        "v_template": data["v_template"],
        "f": data["faces"],
        "shapedirs": np.concatenate([data["shapedirs"], data["exprdirs"]], axis=2),
        "posedirs": data["posedirs"],
        "J_regressor": data["j_regressor"],
        "weights": data["weights"],
        "kintree_table": np.stack([np.maximum(data["parents"], 0), np.arange(NUM_JOINTS)]),
    }
    checked = validate_model(model, str(path))
    optional: dict[str, Any] = {}
    if "mp_face_idx" in data:
        embedding = {
            "lmk_face_idx": data["mp_face_idx"],
            "lmk_b_coords": data["mp_bary"],
            "landmark_indices": data["mp_landmark_indices"],
        }
        optional.update(validate_landmarks(embedding, str(path)))
    ibug = {key: value for key, value in data.items() if key.startswith("ibug_")}
    if "uvs" in data:
        if data["uvs"].shape != (NUM_UVS, 2) or data["uv_faces"].shape != (NUM_FACES, 3):
            raise AssetError(f"the FLAME asset {path} has malformed UVs; re-import it")
        optional["uvs"] = data["uvs"].astype(np.float32)
        optional["uv_faces"] = data["uv_faces"].astype(np.int32)
    return FlameAsset(**checked, metadata=metadata, ibug=ibug or None, **optional)


def _not_readable(path: Path) -> str:
    return (
        f"the FLAME asset {path} is not readable by this process's user: the import writes it readable "
        f"by its owner only (0600), so give this user read access ({DOCS_HINT})"
    )


def flame_unavailable_reason(path: Path | None = None) -> str | None:
    """Why the `flame` pipeline cannot run here, or None when it can. Cheap: no arrays are loaded."""
    path = path or flame_asset_path()
    if not path.is_file():
        return f"no FLAME model is imported; {DOCS_HINT}"
    if not os.access(path, os.R_OK):
        return _not_readable(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = set(npz.files)
    except (OSError, ValueError):
        return f"the FLAME asset {path} is unreadable; re-import it ({DOCS_HINT})"
    if "uvs" not in names:
        return f"the imported FLAME asset has no UVs; re-import with `--uv head_template.obj` ({DOCS_HINT})"
    if "mp_face_idx" not in names:
        return (
            "the imported FLAME asset has no MediaPipe landmark embedding; re-import with "
            f"`--landmarks mediapipe_landmark_embedding.npz` ({DOCS_HINT})"
        )
    return None


def flame_available(path: Path | None = None) -> bool:
    """True when an imported FLAME asset with UVs and a MediaPipe landmark embedding is present."""
    return flame_unavailable_reason(path) is None
