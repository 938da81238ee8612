#!/usr/bin/env bash
# Every VGGHeads GPU check and timing in one command (≤ 8 minutes), printing one JSON line:
# VGGHeads-L (seeded random weights, fused) imported through `models import`, its TensorRT fp16
# engine built by `build_entry_engine` (ONNX Runtime's TensorRT provider + engine cache, the path
# GPU workers load), then images per second at batch 1, 8 and 32 for PyTorch eager (CUDA, fp32)
# and TensorRT fp16, and the fp16 engine's max relative error against eager.
# Without a GPU, CUDA PyTorch or ONNX Runtime's TensorRT provider it prints {"error": ...} and exits 0.
# Needs: torch with CUDA, onnxruntime-gpu with TensorRT (pip install -e .[gpu]). Run from the repo root.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && PY="${PYTHON:-.venv/bin/python}"
timeout 480 "$PY" - <<'PYTHON' || echo '{"check": "vggheads_gpu", "error": "timed out or crashed (see stderr)"}'
import json, os, sys, tempfile, time
from pathlib import Path

def done(**fields):
    print(json.dumps({"check": "vggheads_gpu", **fields}, sort_keys=True))
    sys.exit(0)

try:
    import torch
    import onnxruntime as ort
except ImportError as error:
    done(error=f"missing package: {error}")
if not torch.cuda.is_available():
    done(error="no CUDA GPU visible to PyTorch")
if "TensorrtExecutionProvider" not in ort.get_available_providers():
    done(error="ONNX Runtime has no TensorrtExecutionProvider (install onnxruntime-gpu and TensorRT)",
         providers=ort.get_available_providers())

home = Path(tempfile.mkdtemp(prefix="headforge-gpu-"))
os.environ["HEADFORGE_HOME"] = str(home)
from headforge.export.tensorrt import build_entry_engine
from headforge.models import vggheads as vh
from headforge.models.importers import ImportOptions
from headforge.models.runtime import OrtNetwork
from headforge.models.vggheads_import import DenseVGGHeads, import_vggheads

started = time.perf_counter()
model = vh.seeded_random("l", seed=0)
torch.save(model.state_dict(), home / "l.pth")
report = import_vggheads(home / "l.pth", ImportOptions(root=home / "models"))
engine = build_entry_engine(report.directory, fp16=True)
network = OrtNetwork(report.directory / "model.onnx", "vggheads", 8, ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
eager = DenseVGGHeads(model.fuse().eval().cuda())

def rate(run, batch, seconds=4.0):
    run(); run()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run(); count += 1
    return round(count * batch / (time.perf_counter() - start), 1)

result = {"variant": "l", "parameters": report.parameters, "cpu_parity_max_abs": report.parity_max_abs,
          "providers": network.providers, "engine": engine, "gpu": torch.cuda.get_device_name(0)}
x = torch.rand(1, 3, 640, 640)
for batch in (1, 8, 32):
    xb = x.repeat(batch, 1, 1, 1)
    xc, xn = xb.cuda(), xb.numpy()
    def run_eager():
        with torch.no_grad():
            eager(xc)
        torch.cuda.synchronize()
    result[f"eager_img_per_s_b{batch}"] = rate(run_eager, batch)
    result[f"trt_fp16_img_per_s_b{batch}"] = rate(lambda: network.run(xn), batch)
    result[f"speedup_b{batch}"] = round(result[f"trt_fp16_img_per_s_b{batch}"] / result[f"eager_img_per_s_b{batch}"], 2)
with torch.no_grad():
    reference = [t.cpu().numpy() for t in eager(x.cuda())]
ours = network.run(x.numpy())
import numpy as np
result["trt_fp16_max_rel_error"] = max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(ours, reference))
result["wall_s"] = round(time.perf_counter() - started, 1)
done(**result)
PYTHON
