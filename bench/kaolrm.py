"""KaoLRM eager PyTorch vs ONNX Runtime CPU, ms per head at batch 1 and 4; prints one JSON line.

Usage: python bench/kaolrm.py [--quick]   (the same as `headforge bench --kaolrm [--quick]`)
"""

from __future__ import annotations

import json
import sys

from headforge.benchmarks import kaolrm

if __name__ == "__main__":
    print(json.dumps(kaolrm.run(quick="--quick" in sys.argv[1:])))
