"""bench/gpu_check.py (and through it bench/kernels.py) runs end to end in its --smoke mode
(CPU interpreter when there is no GPU) and writes its JSON and Markdown results."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_smoke(tmp_path):
    """bench/gpu_check.py --smoke on the CPU: the kernel benchmark stage (bench/kernels.py, one
    GEMM and one conv shape under the interpreter, each checked against the reference), the
    U-Net stage (tiny config, eager), the static-model stage; JSON + Markdown written."""
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--max-shapes", "1", "--contenders",
           "fp16_eager", "--stages", "env", "kernels", "unet", "prediction", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    if not torch.cuda.is_available():
        assert "timings below mean NOTHING" in proc.stdout
    (result,) = tmp_path.glob("kernels-*.json")
    data = json.loads(result.read_text())
    assert data["smoke"] and len(data["rows"]) == 2 and {"device", "torch", "triton", "command"} <= set(data)
    assert not any(r["error"] for r in data["rows"]), [r["error"] for r in data["rows"]]
    assert {"fp16", "w8a8", "w4a8", "w8a8_codes_in", "w4a8_codes_in", "w8a8_unfused"} <= set(data["rows"][0]["ms"])
    assert result.with_suffix(".md").exists()
    (check,) = tmp_path.glob("gpu-check-smoke-*.json")
    stages = json.loads(check.read_text())["stages"]
    assert stages["env"]["torch"] == torch.__version__
    assert stages["kernels"]["ok"] and stages["kernels"]["rows"] == 2, stages["kernels"]
    assert stages["unet"]["contenders"]["fp16_eager"]["status"] == "ok", stages["unet"]
    assert stages["unet"]["contenders"]["fp16_eager"]["median_ms"] > 0
    assert "status" in stages["prediction"]
    assert check.with_suffix(".md").read_text().startswith("# GPU check")


def test_sd_shapes_cover_methods_section5():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "kernels.py")
    bench_kernels = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench_kernels   # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(bench_kernels)   # imports nothing heavy at module level
    gemms, convs = bench_kernels.sd_shapes("sd15")
    assert {(g.m, g.k, g.n) for g in gemms} >= {(8192, 320, 320), (8192, 320, 2560), (8192, 1280, 320),
                                                (154, 768, 320), (154, 768, 640), (154, 768, 1280)}
    up = {(c.c, c.n) for c in convs if c.kernel == 3 and "up conv1" in c.name}
    assert up == {(2560, 1280), (1920, 1280), (1920, 640), (1280, 640), (960, 640), (960, 320), (640, 320)}
    assert {c.split for c in convs if c.split} >= {(1280, 1280), (1280, 640), (640, 320), (320, 320)}
    gemms_xl, convs_xl = bench_kernels.sd_shapes("sdxl")
    assert (8192, 640, 5120) in {(g.m, g.k, g.n) for g in gemms_xl}
    assert any(c.hw == 128 and c.c == 320 for c in convs_xl)
