"""Detection + landmarks benchmark, headforge vs LiteRT; prints one JSON line.

Usage: python bench/landmarks.py [--quick]
"""

from __future__ import annotations

import json
import sys

from headforge.benchmarks import landmarks

if __name__ == "__main__":
    print(json.dumps(landmarks.run(quick="--quick" in sys.argv[1:])))
