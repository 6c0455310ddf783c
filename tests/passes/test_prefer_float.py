"""The backend's float-vs-integer choice (option ``prefer_float``): on sm_90 (capability patched: the
CPU has no GPU) a layer the static model predicts faster in FP16 keeps its float op and says so in the
report; a layer with a PTQD output correction never does; off sm_90 every layer is integer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qdcompile
from equivalence import rel
from qdcompile import QuantRecipe
from qdcompile.api import report
from qdcompile.calibration import quantize_layer
from qdcompile.kernels import sm90_choice
from qdcompile.metadata import QuantMetadata, model_identity
from qdcompile.passes import registry
from qdcompile.passes.backend import last_rewrite_stats
from qdcompile.simulate import dequantized_weight, fake_quant_input

FLOAT_REASON = "float faster on sm_90 (static model)"


class _Tokens(torch.nn.Module):
    """``body``: 640 → 2560 on 128 tokens × batch 2 (M = 256: integer on sm_90 by the model);
    ``head``: 2560 → 8 on the pooled tokens (M = 2, the time-embedding case: float on sm_90)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(640, 2560)
        self.head = torch.nn.Linear(2560, 8)

    def forward(self, x):
        return self.head(F.silu(self.body(x)).mean(dim=1))


def _model(seed=0):
    torch.manual_seed(seed)
    m = _Tokens().eval()
    layers = {"body": quantize_layer(m.body, "linear", 8, 8, (-3.0, 3.0)),
              "head": quantize_layer(m.head, "linear", 8, 8, (-0.3, 1.0))}
    meta = QuantMetadata(QuantRecipe.w8a8(), model_identity(m), layers)
    qdcompile.attach(m, meta)
    return m, meta


def _reference(m, meta, x, head_float: bool):
    """The float model with ``body`` fake-quantized and ``head`` float or fake-quantized."""
    rb, rh = meta.layers["body"], meta.layers["head"]
    h = F.silu(F.linear(fake_quant_input(rb, x), dequantized_weight(rb), m.body.bias)).mean(dim=1)
    if head_float:
        return F.linear(h, m.head.weight, m.head.bias)
    return F.linear(fake_quant_input(rh, h), dequantized_weight(rh), m.head.bias)


@pytest.fixture
def sm90(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(sm90_choice, "device_capability", lambda device: (9, 0))
    yield
    torch._dynamo.reset()


def _run(m, x, **options):
    with torch.no_grad():
        return torch.compile(m, backend="qdiff", options=options or None)(x)


def _x(seed=1):
    return torch.randn(2, 128, 640, generator=torch.Generator().manual_seed(seed))


def test_tiny_m_layer_stays_float_on_sm90_and_the_report_says_so(sm90):
    m, meta = _model()
    x = _x()
    out = _run(m, x)
    stats = last_rewrite_stats()
    assert (stats.linear, stats.float_faster) == (1, 1)
    rows = {r.name: r for r in report(m).rows}
    assert rows["head"].kernel == "float" and rows["head"].reason.startswith(FLOAT_REASON)
    assert "at M=2" in rows["head"].reason
    assert rows["body"].kernel == "qdiff.qlinear [reference]"
    assert "integer faster on sm_90 (static model)" in rows["body"].reason and "at M=256" in rows["body"].reason
    assert report(m).counts["quantized"] == 1 and report(m).counts["float"] == 1
    with torch.no_grad():
        ref = _reference(m, meta, x, head_float=True)
        all_int = _reference(m, meta, x, head_float=False)
    assert rel(ref, out) < 1e-4
    assert rel(all_int, out) > 1e-3        # the head really ran in float (its quantization is visible)


def test_prefer_float_off_runs_every_layer_integer(sm90):
    m, meta = _model(seed=2)
    x = _x(seed=3)
    out = _run(m, x, prefer_float=False)
    stats = last_rewrite_stats()
    assert (stats.linear, stats.float_faster, stats.fallback) == (2, 0, {})
    rep = report(m)
    assert rep.counts["quantized"] == 2
    assert all(FLOAT_REASON not in r.reason and "static model" not in r.reason for r in rep.rows)
    with torch.no_grad():
        assert rel(_reference(m, meta, x, head_float=False), out) < 1e-4


def test_layer_with_ptqd_correction_stays_integer(sm90):
    m, meta = _model(seed=4)
    binding = registry.lookup(m.head.weight)
    binding.correction = registry.OutputCorrection(meta.layers["head"].weight_scale, m.head.bias, 8)
    g = torch.Generator().manual_seed(5)
    a, b = 1 + 0.1 * torch.randn(8, generator=g), 0.1 * torch.randn(8, generator=g)
    binding.correction.set(a, b)
    x = _x(seed=6)
    out = _run(m, x)
    assert last_rewrite_stats().float_faster == 0 and last_rewrite_stats().linear == 2
    row = {r.name: r for r in report(m).rows}["head"]
    assert row.kernel == "qdiff.qlinear [reference]"
    assert "float faster on sm_90" in row.reason and "kept integer: PTQD output correction" in row.reason
    with torch.no_grad():
        ref = _reference(m, meta, x, head_float=False).double() * a.double() + b.double()
    assert rel(ref.float(), out) < 1e-4


def test_off_sm90_every_layer_integer_and_the_report_says_why(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(sm90_choice, "device_capability", lambda device: (8, 0))
    m, meta = _model(seed=7)
    x = _x(seed=8)
    out = _run(m, x)
    assert last_rewrite_stats().linear == 2
    rep = report(m)
    assert rep.counts["quantized"] == 2
    assert all("no static speed model for sm_80 (sm_90 only): integer kernel" in r.reason for r in rep.rows)
    with torch.no_grad():
        assert rel(_reference(m, meta, x, head_float=False), out) < 1e-4
    torch._dynamo.reset()


def test_prefer_float_option_must_be_a_bool():
    m, _ = _model(seed=9)
    with pytest.raises(Exception, match=r"options\['prefer_float'\] must be True or False"):
        _run(m, _x(), prefer_float="yes")
    torch._dynamo.reset()


@pytest.mark.parametrize("asymmetric,bits", [(False, 4), (True, 8)])
def test_asymmetric_w4_layers_are_timed_as_the_int8_kernel_they_run(monkeypatch, asymmetric, bits):
    """Asymmetric 4-bit codes go to the device as int8 (codes minus zero points): the static model
    must time the int8 kernel, not the packed int4 one."""
    from types import SimpleNamespace

    from qdcompile.passes.quantize_layers import _float_choice

    seen = []
    monkeypatch.setattr(sm90_choice, "decide", lambda op, shape, m, b, cap, **kw: seen.append(b) or
                        sm90_choice.Choice("int", "recorded"))
    rec = SimpleNamespace(weight_bits=4, asymmetric=asymmetric, split=None)
    _float_choice(None, "linear", None, torch.randn(8, 16), rec, True, (8, 0))
    assert seen == [bits]
