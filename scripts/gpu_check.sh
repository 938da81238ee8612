#!/usr/bin/env bash
# Every GPU check and timing in one command (≤ 8 minutes), printing one JSON line:
# - VGGHeads-L (seeded random weights, fused) imported through `models import`, its TensorRT fp16
#   engine built by `build_entry_engine` (ONNX Runtime's TensorRT provider + engine cache, the path
#   GPU workers load), then images per second at batch 1, 8 and 32 for PyTorch eager (CUDA, fp32)
#   and TensorRT fp16, and the fp16 engine's max relative error against eager (top-level fields);
# - KaoLRM at the released size (288 M parameters, seeded random weights): ms per head at batch 1
#   and 4 for its image graph and its Gaussian graph (8,000 points), CUDA eager fp32 against CUDA
#   eager fp16, and fp16's max relative error on the planes, FLAME parameters and Gaussians
#   (the `kaolrm` object; a failure there is recorded as kaolrm.error and does not lose the rest).
# Without a GPU, CUDA PyTorch or ONNX Runtime's TensorRT provider it prints {"error": ...} and exits 0.
# Needs: torch with CUDA, onnxruntime-gpu with TensorRT (pip install -e .[gpu]). Run from the repo root.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && PY="${PYTHON:-.venv/bin/python}"
timeout 480 "$PY" - <<'PYTHON' || echo '{"check": "gpu", "error": "timed out or crashed (see stderr)"}'
import json, os, sys, tempfile, time
from pathlib import Path

def done(**fields):
    print(json.dumps({"check": "gpu", **fields}, sort_keys=True))
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

def kaolrm_fp16():
    """KaoLRM's two graphs at full size on CUDA: eager fp32 vs eager fp16, ms per head."""
    from headforge.models.kaolrm import IMAGE_SIZE, PRETRAIN_FOCAL, SYNTH_FOCAL, KaoLRM, KaoLRMConfig
    from headforge.models.kaolrm import KaoLRMGaussianGraph, KaoLRMImageGraph

    torch.manual_seed(0)
    model = KaoLRM(KaoLRMConfig()).eval()
    focal = SYNTH_FOCAL["mono"]
    graphs = {}
    for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        copy = model if precision == "fp16" else KaoLRM(KaoLRMConfig()).eval()
        if precision == "fp32":
            copy.load_state_dict(model.state_dict())
        copy = copy.to("cuda", dtype)
        graphs[precision] = (KaoLRMImageGraph(copy).eval(), KaoLRMGaussianGraph(copy, focal).eval(), dtype)
    out = {"parameters": sum(p.numel() for p in model.parameters()), "points": 8000}
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    reach = PRETRAIN_FOCAL / focal
    points = (torch.rand(4, 8000, 3, generator=generator) * 2 - 1) * reach

    def ms(run, repeats=10):
        run(); torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        torch.cuda.synchronize()
        return 1000.0 * (time.perf_counter() - start) / repeats

    reference = {}
    for precision, (image_graph, gaussian_graph, dtype) in graphs.items():
        with torch.no_grad():
            planes, flame = image_graph(images.to("cuda", dtype))
            gaussians = gaussian_graph(planes, points.to("cuda", dtype))
            outputs = [t.float().cpu() for t in (planes, flame, gaussians)]
            if precision == "fp32":
                reference = outputs
            else:
                out["fp16_max_rel_error"] = max(
                    float((a - b).abs().max() / b.abs().max()) for a, b in zip(outputs, reference))
            for heads in (1, 4):
                x = images[:heads].to("cuda", dtype)
                p, q = planes[:heads].contiguous(), points[:heads].to("cuda", dtype)
                image_ms = ms(lambda: image_graph(x)) / heads
                gauss_ms = ms(lambda: gaussian_graph(p, q)) / heads
                out[f"{precision}_b{heads}_image_ms_per_head"] = round(image_ms, 2)
                out[f"{precision}_b{heads}_gaussians_ms_per_head"] = round(gauss_ms, 2)
                out[f"{precision}_b{heads}_ms_per_head"] = round(image_ms + gauss_ms, 2)
    for heads in (1, 4):
        out[f"speedup_fp16_b{heads}"] = round(out[f"fp32_b{heads}_ms_per_head"] / out[f"fp16_b{heads}_ms_per_head"], 2)
    return out

kaolrm_started = time.perf_counter()
try:
    result["kaolrm"] = kaolrm_fp16()
except Exception as error:  # recorded, so the VGGHeads figures above still print
    result["kaolrm"] = {"error": f"{type(error).__name__}: {error}"}
result["kaolrm"]["wall_s"] = round(time.perf_counter() - kaolrm_started, 1)
result["wall_s"] = round(time.perf_counter() - started, 1)
done(**result)
PYTHON
