"""The compiled graph runs the Triton kernels (here under the interpreter) when asked:
QDCOMPILE_KERNELS=triton, and gives what the reference integer path gives."""

import os

import pytest
import torch
import torch.nn.functional as F

from qdcompile.calibration import quantize_layer
from qdcompile.kernels.quantizers import weight_qparams
from qdcompile.passes import registry
from qdcompile.passes.backend import last_rewrite_stats


class _Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.proj = torch.nn.Linear(8, 5)

    def forward(self, x):
        h = F.silu(self.conv(x))                      # [B, 8, 4, 4]
        return self.proj(h.flatten(2).transpose(1, 2))  # [B, 16, 5]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter route")
@pytest.mark.parametrize("weight_bits,asymmetric", [(8, False), (4, False), (4, True)], ids=["w8", "w4", "w4-asym"])
def test_compiled_graph_runs_triton_kernels(monkeypatch, weight_bits, asymmetric):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter must be enabled before triton is imported (tests/conftest.py does)")
    torch.manual_seed(weight_bits)
    m = _Small().eval()
    decisions = {}
    for name, mod, rng in (("conv", m.conv, (-3.0, 3.0)), ("proj", m.proj, (-0.3, 2.5))):
        grid = weight_qparams(mod.weight.detach(), weight_bits) if asymmetric else (None, None)
        rec = quantize_layer(mod, "conv2d" if name == "conv" else "linear", weight_bits, 8, rng, *grid)
        assert rec.asymmetric == asymmetric
        registry.bind(mod.weight, registry.Binding(name, rec, decisions))
    x = torch.randn(2, 3, 8, 8)
    monkeypatch.setenv("QDCOMPILE_KERNELS", "triton")
    with torch.no_grad():
        out = torch.compile(m, backend="qdiff", fullgraph=True)(x)
    assert last_rewrite_stats().rewritten == 2
    assert decisions["conv"].kernel == "qdiff.qconv2d [triton]" and decisions["proj"].kernel == "qdiff.qlinear [triton]"
    assert ("zero points held as int8" in decisions["conv"].reason) == asymmetric
    monkeypatch.setenv("QDCOMPILE_KERNELS", "reference")
    torch._dynamo.reset()
    with torch.no_grad():
        ref = torch.compile(m, backend="qdiff", fullgraph=True)(x)
    # same integer math, same fp32 epilogue order: equal up to a few fp32 ulps of the outputs
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max())), (out - ref).abs().max()
