"""Build reference artifacts for `facemesh` and `flame`, and compare two such builds.

    python scripts/artifact_parity.py build OUT_DIR     # runs `headforge reconstruct` on the test photos
    python scripts/artifact_parity.py compare REF_DIR NEW_DIR

`build` reconstructs a fixed set of photos (the astronaut, a group photo, a portrait) with the
`facemesh` pipeline and with the `flame` pipeline on the synthetic FLAME files of
`tests/flame_synthetic.py`. `compare` checks that both builds wrote the same file names, GLB vertex
positions, OBJ numbers and splat properties agree within 1e-5, and every result.json field of the reference is present with the same
value (timings and version excepted; GLBs by vertex positions, not bytes); new fields and new files are allowed (listed). Exit status 1 on any difference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PHOTOS = [
    REPO / "examples" / "astronaut.jpg",
    REPO.parent / "shared" / "data" / "voc-faces" / "2007_007763.jpg",
    REPO.parent / "shared" / "data" / "subjects" / "obama" / "obama.jpg",
]
OPTIONS = ["--texture-size", "512", "--splats", "2000", "--seed", "3"]
IGNORED = {"timings_ms", "headforge_version"}
NUMERIC = (".glb", ".obj", "_splats.ply")  # files compared by value (within TOLERANCE), not by bytes
TOLERANCE = 1e-5


def build(out: Path) -> None:
    """Reconstruct the photos with both pipelines into `out/facemesh` and `out/flame`."""
    photos = [str(photo) for photo in PHOTOS if photo.exists()]
    subprocess.run(["headforge", "reconstruct", *photos, "-o", str(out / "facemesh"), *OPTIONS], check=True)
    sys.path.insert(0, str(REPO / "tests"))
    from flame_synthetic import imported_synthetic_flame

    scratch = Path(tempfile.mkdtemp(prefix="parity-flame-"))
    _, asset = imported_synthetic_flame(scratch)
    environment = {**os.environ, "HEADFORGE_FLAME_ASSET": str(asset)}
    subprocess.run(
        ["headforge", "reconstruct", *photos, "-o", str(out / "flame"), "--pipeline", "flame", *OPTIONS],
        check=True,
        env=environment,
    )


def _glb_vertices(path: Path) -> np.ndarray:
    import trimesh

    scene = trimesh.load(path, force="scene", process=False)
    return np.concatenate([np.asarray(g.vertices) for g in scene.geometry.values()])


def _numbers(path: Path) -> np.ndarray:
    """GLB vertex positions, OBJ numbers (v, vt, vn, f lines) or every splat property, as floats."""
    if path.suffix == ".glb":
        return _glb_vertices(path)
    if path.suffix == ".obj":
        values = [
            float(token.split("/")[0])
            for line in path.read_text().splitlines()
            if line[:2] in ("v ", "vt", "vn", "f ")
            for token in line.split()[1:]
        ]
        return np.asarray(values)
    from plyfile import PlyData

    vertex = PlyData.read(str(path))["vertex"].data
    return np.stack([np.asarray(vertex[name], np.float64) for name in vertex.dtype.names], axis=1)


def _diff(reference: Any, new: Any, where: str, problems: list[str], top: bool = False) -> None:
    if isinstance(reference, dict):
        if not isinstance(new, dict):
            problems.append(f"{where}: not an object any more")
            return
        for key, value in reference.items():
            if top and key in IGNORED:
                continue
            if key not in new:
                problems.append(f"{where}.{key}: missing")
            else:
                _diff(value, new[key], f"{where}.{key}", problems)
    elif isinstance(reference, list) and where.endswith(".artifacts") and isinstance(new, list):
        by_name = {item.get("name"): item for item in new if isinstance(item, dict)}
        for item in reference:
            if item.get("name") not in by_name:
                problems.append(f"{where}: {item.get('name')} missing")
            else:
                if str(item["name"]).endswith(NUMERIC):  # compared by their numbers instead
                    item = {k: v for k, v in item.items() if k not in {"bytes", "sha256"}}
                _diff(item, by_name[item["name"]], f"{where}[{item['name']}]", problems)
    elif isinstance(reference, list):
        if not isinstance(new, list) or len(new) != len(reference):
            problems.append(f"{where}: list differs in length")
            return
        for index, (a, b) in enumerate(zip(reference, new, strict=True)):
            _diff(a, b, f"{where}[{index}]", problems)
    elif isinstance(reference, float) and isinstance(new, int | float):
        if abs(reference - new) > TOLERANCE * max(1.0, abs(reference)):
            problems.append(f"{where}: {reference} != {new}")
    elif reference != new:
        problems.append(f"{where}: {reference!r} != {new!r}")


def compare(reference: Path, new: Path) -> list[str]:
    """Differences between two builds (empty when they match)."""
    problems: list[str] = []
    for ref_file in sorted(reference.rglob("*")):
        if ref_file.is_dir():
            continue
        relative = ref_file.relative_to(reference)
        new_file = new / relative
        if not new_file.exists():
            problems.append(f"{relative}: missing")
            continue
        if ref_file.name == "result.json":
            _diff(
                json.loads(ref_file.read_text()),
                json.loads(new_file.read_text()),
                str(relative),
                problems,
                top=True,
            )
        elif ref_file.name.endswith(NUMERIC):
            a, b = _numbers(ref_file), _numbers(new_file)
            if a.shape != b.shape or (a.size and float(np.abs(a - b).max()) > TOLERANCE):
                problems.append(f"{relative}: values differ")
    return problems


def new_files(reference: Path, new: Path) -> list[str]:
    """Files the new build wrote that the reference lacks (new artifact kinds are allowed)."""
    return sorted(
        str(p.relative_to(new))
        for p in new.rglob("*")
        if p.is_file() and not (reference / p.relative_to(new)).exists()
    )


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "build":
        build(Path(sys.argv[2]))
        return 0
    if len(sys.argv) == 4 and sys.argv[1] == "compare":
        problems = compare(Path(sys.argv[2]), Path(sys.argv[3]))
        extra = new_files(Path(sys.argv[2]), Path(sys.argv[3]))
        if extra:
            print(
                f"{len(extra)} new files (allowed): {', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}"
            )
        print("\n".join(problems) if problems else "artifacts match")
        return 1 if problems else 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
