#!/usr/bin/env python
"""Driving speed: frames per second for deforming a FLAME head and its bound splats on the CPU,
against the unoptimised paths in the same run (headforge/benchmarks/animation.py says what each
key measures). The same section runs as `headforge bench --animation`.

Usage: OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 python bench/animation_speed.py [--splats 8192]
       [--batch 32] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headforge.benchmarks.animation import run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--splats", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = run(args.quick, splats=args.splats, batch=args.batch)
    if args.json:
        print(json.dumps(report))
        return
    for key, value in report.items():
        print(f"{key:40s} {value}")


if __name__ == "__main__":
    main()
