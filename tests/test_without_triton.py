"""Without Triton (macOS, Windows: pyproject installs none there) the pure-torch parts import and
run: the quantizers, the kernels package's Triton-free names, calibration and the simulated model.
Each check runs in a fresh interpreter where ``import triton`` fails (``sys.modules["triton"] = None``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent

_PRELUDE = """
import sys
sys.modules["triton"] = None          # `import triton` now raises ModuleNotFoundError
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
"""


def _run(body: str) -> str:
    code = textwrap.dedent(_PRELUDE.format(tests=str(TESTS))) + textwrap.dedent(body)
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("QDCOMPILE_KERNELS", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env,
                          cwd=TESTS.parent)   # the checkout first on sys.path, whatever pytest's cwd
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_quantizers_and_kernels_package_import_and_run_without_triton():
    out = _run("""
        import qdcompile.kernels as K
        from qdcompile.kernels.quantizers import act_qparams, fake_quantize_act, quantize_act, weight_scales
        g = torch.Generator().manual_seed(1)
        x = torch.randn(4, 37, generator=g) * 3
        scale, zp = act_qparams(float(x.min()), float(x.max()), 8)
        err = (fake_quantize_act(x, scale, zp, 8) - x).abs().max().item()
        assert 0 < err <= scale / 2 * (1 + 1e-6), (err, scale)
        q = quantize_act(x, scale, zp, 8)
        assert q.dtype == torch.uint8 and int(q.max()) == 255 and int(q.min()) == 0
        w = torch.randn(6, 37, generator=g)
        s = weight_scales(w, 4)
        codes = K.quantize_weight(w, s, 4)
        assert codes.abs().amax(1).eq(7).all()                     # every row reaches the 4-bit extreme
        assert (K.dequantize_weight(codes, s) - w).abs().le(s[:, None] / 2 * (1 + 1e-6)).all()
        pw = K.prepare_weight(codes, 4)                              # pure-torch: reorder, pack, row sums
        assert pw.bits == 4 and torch.equal(K.unpack_int4(pw.w, 37), codes)
        assert torch.equal(pw.rowsum, codes.sum(1, dtype=torch.int32))
        assert sys.modules["triton"] is None and "qdcompile.kernels.ops" not in sys.modules
        try:
            K.qlinear                                                # the Triton-backed API says what is missing
        except ModuleNotFoundError as e:
            print("missing:", e.name)
        else:
            raise AssertionError("qdcompile.kernels.qlinear imported without Triton")
    """)
    assert "missing: triton" in out


def test_calibration_and_simulation_run_without_triton():
    _run("""
        from tiny_models import scheduler, tiny_unet2d
        import qdcompile
        from qdcompile.simulate import simulate
        unet = tiny_unet2d(seed=3)
        meta = qdcompile.calibrate(unet, scheduler(), qdcompile.QuantRecipe.w8a8(), num_samples=2,
                                   num_inference_steps=3, progress=False, attach=False)
        assert len(meta.layers) > 10 and all(r.weight_bits == 8 for r in meta.layers.values())
        g = torch.Generator().manual_seed(4)
        x, t = torch.randn(2, 1, 16, 16, generator=g), torch.tensor([500, 20])
        with torch.no_grad():
            fp = unet(x, t).sample
            with simulate(unet, meta):
                fq = unet(x, t).sample
        snr = 10 * torch.log10(fp.pow(2).sum() / (fq - fp).pow(2).sum()).item()
        assert 15 < snr < 80, snr                                 # quantized: close to FP, not equal
        assert sys.modules["triton"] is None and "qdcompile.kernels.ops" not in sys.modules
    """)
