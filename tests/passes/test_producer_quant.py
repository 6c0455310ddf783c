"""Producer-side quantization and Inductor-launched kernels (Fast path 1).

* the quantizer the backend writes into the graph gives the reference quantizer's codes, bit
  for bit, after Inductor compiles it (ties included);
* Inductor fuses it into the kernel that produces the activation (read from the generated
  code), one quantization per (tensor, quantizer), split parts quantized separately with no
  concatenation left;
* the report says where each layer's input was quantized;
* on CUDA the ops decompose into Inductor-visible Triton launches (traced on fake CUDA tensors).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

from qdcompile.calibration import quantize_layer
from qdcompile.kernels.quantizers import act_qparams
from qdcompile.passes import registry
from qdcompile.passes.quantize_layers import rewrite_quantized_layers

pytestmark = pytest.mark.inductor   # what Inductor makes of the quantizer ops is the subject here

HERE = Path(__file__).resolve().parent


def _bind(model: torch.nn.Module, specs: dict[str, tuple[str, tuple[float, float]]], act_bits: int = 8):
    """Quantization records for the named layers (``name → (op, activation range)``); returns the decisions."""
    decisions: dict = {}
    for name, (op, rng) in specs.items():
        mod = model.get_submodule(name)
        rec = quantize_layer(mod, op, 8, act_bits, rng)
        registry.bind(mod.weight, registry.Binding(name, rec, decisions))
    return decisions


def _compiled(model, *inputs, **options):
    fast = torch.compile(model, backend="qdiff", fullgraph=True, options=options or None)
    with torch.no_grad():
        return run_and_get_code(fast, *inputs)


class _AddThenConv(torch.nn.Module):
    """An exactly-rounded producer (one IEEE add) feeding a quantized conv, so that eager and
    Inductor compute bit-identical activations and only the quantizer can differ."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(6, 5, 3, padding=1)

    def forward(self, a, b):
        return self.conv(a + b)


@pytest.mark.parametrize("act_bits", [8, 4])
def test_fused_quantizer_codes_equal_the_reference(act_bits):
    gen = torch.Generator().manual_seed(100 + act_bits)
    model = _AddThenConv().eval()
    with torch.no_grad():
        model.conv.weight.copy_(torch.randn(model.conv.weight.shape, generator=gen) * 0.2)
    a = torch.randn(2, 6, 7, 7, generator=gen) * 2
    b = torch.randn(2, 6, 7, 7, generator=gen) * 0.5
    scale, zp = act_qparams(float((a + b).min()) * 0.8, float((a + b).max()) * 0.8, act_bits)
    # a quarter of the activations exactly on rounding ties (k + 1/2)·Δ, some one ulp either side
    k = torch.randint(-zp, (1 << act_bits) - zp, a.shape, generator=gen).float()
    tie = (k + 0.5) * torch.tensor(scale, dtype=torch.float32)
    nudge = torch.randint(-1, 2, a.shape, generator=gen).float()
    tie = torch.where(nudge == 0, tie, torch.nextafter(tie, tie + nudge))
    pick = torch.rand(a.shape, generator=gen) < 0.25
    a = torch.where(pick, tie, a)
    b = torch.where(pick, torch.zeros_like(b), b)
    decisions = _bind(model, {"conv": ("conv2d", (0.0, 1.0))}, act_bits)
    rec = registry.lookup(model.conv.weight).record
    rec.act_scale, rec.act_zero_point = scale, zp     # the quantizer under test
    fused, _ = _compiled(model, a, b)
    assert decisions["conv"].reason == "input quantized in its producer (add)"
    on_load, _ = _compiled(model, a, b, producer_quant=False)
    # the reference op quantizes the same float input with the reference quantizer (codes → exact
    # float64 integer contraction → the same fp32 epilogue): equal outputs mean equal codes
    assert torch.equal(fused, on_load)
    from qdcompile.kernels import prepare_weight, qconv2d

    pw = prepare_weight(rec.weight_q, 8)
    want = qconv2d(a + b, pw, rec.weight_scale, scale, zp, act_bits, 3, 1, 1, bias=model.conv.bias.detach())
    assert torch.equal(fused, want)


class _NormSiluConv(torch.nn.Module):
    """GroupNorm + SiLU feeding two quantized layers with the same quantizer (a conv and a 1×1
    conv), and a linear on another branch."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.GroupNorm(2, 8)
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.shortcut = torch.nn.Conv2d(8, 8, 1)
        self.proj = torch.nn.Linear(8, 4)

    def forward(self, x):
        h = F.silu(self.norm(x))
        y = self.conv(h) + self.shortcut(h)
        return self.proj(y.mean(dim=(2, 3)))


def _kernels_of(code: str) -> list[str]:
    """Names of the generated kernels the wrapper calls (Inductor names them after fused ops)."""
    import re

    return sorted(set(re.findall(r"\b(cpp_fused_\w+|triton_\w+_fused_\w+)\(", code)))


def test_quantizer_is_fused_into_the_producer_once_per_tensor():
    gen = torch.Generator().manual_seed(7)
    model = _NormSiluConv().eval()
    x = torch.randn(2, 8, 6, 6, generator=gen)
    decisions = _bind(model, {"conv": ("conv2d", (-0.3, 3.0)), "shortcut": ("conv2d", (-0.3, 3.0)),
                              "proj": ("linear", (-2.0, 2.0))})
    out, codes = _compiled(model, x)
    code = "\n".join(codes)
    kernels = _kernels_of(code)
    quantizing = [k for k in kernels if "round" in k]
    # the GroupNorm+SiLU kernel writes the codes; the 2 convs share them (1 quantization); the
    # linear's input (a mean: a reduction kernel) is quantized in its producer too
    assert any("silu" in k for k in quantizing), kernels
    assert len(quantizing) == 2, kernels
    assert code.count("torch.ops.qdiff.qconv2d.default(") == 2 and code.count("torch.ops.qdiff.qlinear.default(") == 1
    assert "input quantized in its producer (silu" in decisions["conv"].reason
    assert "input quantized in its producer (silu" in decisions["shortcut"].reason
    assert "input quantized in its producer (mean" in decisions["proj"].reason
    # same result as quantizing on load inside the kernels
    on_load, _ = _compiled(model, x, producer_quant=False)
    assert decisions["conv"].reason == "input quantized on load, in the kernel"
    assert torch.allclose(out, on_load, rtol=1e-5, atol=1e-6)


class _Split(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(10, 6, 1)

    def forward(self, deep, skip):
        return self.conv(torch.cat([F.silu(deep), skip * 2], dim=1))


def test_split_parts_are_quantized_where_produced_and_never_concatenated():
    from qdcompile.kernels.quantizers import weight_scales
    from qdcompile.split import quantize_split_layer

    gen = torch.Generator().manual_seed(3)
    model = _Split().eval()
    deep, skip = torch.randn(2, 4, 5, 5, generator=gen), torch.randn(2, 6, 5, 5, generator=gen) * 4
    decisions: dict = {}
    rec = quantize_split_layer(model.conv, "conv2d", 8, 8, (4, 6), [(-0.3, 2.0), (-8.0, 8.0)], weight_scales)
    registry.bind(model.conv.weight, registry.Binding("conv", rec, decisions))
    graphs = []

    def spy(gm, example_inputs):
        rewrite_quantized_layers(gm, example_inputs)
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=spy, fullgraph=True)(deep, skip)
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.cat not in targets
    assert targets.count(torch.ops.aten.round.default) == 2
    assert torch.ops.qdiff.qconv2d_split.default in targets
    out, _ = _compiled(model, deep, skip)
    assert decisions["conv"].reason == "input quantized in its producer (silu); input quantized in its producer (mul)"
    on_load, _ = _compiled(model, deep, skip, producer_quant=False)
    assert torch.equal(out, on_load)


def test_ops_become_inductor_launched_triton_kernels_on_cuda():
    """Traced on fake CUDA tensors (no GPU needed): the GEMM and conv ops decompose into
    ``triton_kernel_wrapper_functional`` calls of our kernels, so Inductor's wrapper launches
    them; no ``qdiff`` custom op (Python dispatch per call) is left."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(HERE / "fake_cuda_trace.py")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    traced = json.loads(proc.stdout.strip().splitlines()[-1])
    for op, kernel in (("qlinear", "_qgemm_kernel"), ("qconv2d", "_qconv2d_kernel")):
        assert traced[op]["kernels"] == [kernel], traced[op]
        # nothing else touches the data: the output allocation, views, and the kernel launch
        allowed = ("aten.view", "aten.empty", "triton_kernel_wrapper_functional", "getitem")
        assert all(t.startswith(allowed) or "getitem" in t for t in traced[op]["targets"]), traced[op]


def test_unknown_backend_mode_and_bad_option_are_clear():
    model = _AddThenConv().eval()
    a = torch.randn(1, 6, 4, 4)
    with pytest.raises(Exception, match="mode='fastest' is not one of"):
        torch.compile(model, backend="qdiff", mode="fastest")(a, a)
    with pytest.raises(Exception, match="producer_quant"):
        torch.compile(model, backend="qdiff", options={"producer_quant": "yes"})(a, a)
