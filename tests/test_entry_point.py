"""`torch.compile(model, backend="qdiff")` in a fresh interpreter that never imports qdcompile:
the backend is found through the torch_dynamo_backends entry point, and importing the
package does no heavy work."""

import json
import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "QDCOMPILE_KERNELS": "reference"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_backend_found_without_import():
    out = _run("""
        import sys, torch
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 1)).eval()
        x = torch.randn(2, 3, 8, 8)
        assert "qdcompile" not in sys.modules
        with torch.no_grad():
            y = torch.compile(m, backend="qdiff", fullgraph=True)(x)
        assert torch.allclose(y, m(x), atol=1e-5)   # no metadata: float
        print("qdcompile" in sys.modules)
    """)
    assert out.strip().endswith("True")


def test_import_is_cheap():
    out = _run("""
        import sys, json
        import qdcompile
        heavy = [m for m in ("torch", "diffusers", "triton", "safetensors") if m in sys.modules]
        print(json.dumps(heavy))
    """)
    assert json.loads(out.strip().splitlines()[-1]) == []
