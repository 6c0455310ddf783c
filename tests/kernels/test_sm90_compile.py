"""The kernels compile for Hopper (sm_90) on a CPU-only machine (Triton's bundled ptxas),
use int8 warpgroup MMAs, pipeline their loads with cp.async, and quantize without any
division instruction. Catches GPU-only compile errors that the interpreter cannot."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _have_nvidia_backend() -> bool:
    try:
        import triton
    except ImportError:
        return False
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return ptxas.exists() or shutil.which("ptxas") is not None


@pytest.mark.skipif(not _have_nvidia_backend(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    variants = ["quantize", "gemm:8", "gemm:4:split", "conv:4"]
    proc = subprocess.run([sys.executable, str(HERE / "sm90_compile.py"), *variants], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    facts = {f["variant"]: f for f in json.loads(proc.stdout.strip().splitlines()[-1])}
    for name, f in facts.items():
        assert f["div"] == 0, f"{name}: the quantizer must not use division instructions: {f}"
        assert f["fma"] > 0, f
        if name != "quantize":
            assert f["int8_wgmma"] > 0, f"{name}: no int8 wgmma in the PTX: {f}"
            assert f["cp_async"] > 0, f"{name}: loads are not pipelined through cp.async: {f}"
