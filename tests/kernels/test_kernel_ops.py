"""``torch.ops.qdiff.*``: tracing under torch.compile through the fake impls, opcheck,
dispatch, and clear errors on bad inputs."""

from __future__ import annotations

import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import qdcompile.kernels as K
from kernel_testing import DEVICE, make_part, random_activation
from qdcompile.kernels import ops
from qdcompile.kernels.qconv import qconv2d_reference, qconv2d_triton
from qdcompile.kernels.qgemm import MAX_K, launch_qgemm, qgemm_reference, qgemm_triton


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _linear_args(gen, m=5, k=9, n=6, wbits=4, abits=8, dtype=torch.float16):
    p = make_part(gen, random_activation(gen, (2, m, k), dtype), n, (k,), wbits, abits, "fit")
    return p, (p.x, p.w, p.w_rowsum, p.w_scale, p.act_scale, p.act_zero_point, p.act_bits, wbits)


def _conv_args(gen, c=5, n=7, hw=6, wbits=8, abits=8, channels_last=True, dtype=torch.float32):
    x = random_activation(gen, (2, c, hw, hw), dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    p = make_part(gen, x, n, (c, 3, 3), wbits, abits, "fit")
    return p, (p.x, p.w, p.w_rowsum, p.w_scale, p.act_scale, p.act_zero_point, p.act_bits, wbits)


def _split_args(p1, p2, wbits):
    return (p1.x, p2.x, p1.w, p2.w, p1.w_rowsum, p2.w_rowsum, p1.w_scale, p2.w_scale, p1.act_scale, p2.act_scale,
            p1.act_zero_point, p2.act_zero_point, p1.act_bits, p2.act_bits, wbits)


def _all_op_calls(gen):
    """(op, args, kwargs) for every op of the family, small shapes."""
    lp, largs = _linear_args(gen)
    lp2, _ = _linear_args(gen, k=4)
    cp, cargs = _conv_args(gen)
    cp2, _ = _conv_args(gen, c=3, channels_last=False)
    geom = ([3, 3], [2, 2], [1, 1])
    bias = torch.randn(6, generator=gen).to(DEVICE)
    return [
        (torch.ops.qdiff.quantize_act.default, (lp.x, 0.05, 3, 4), {}),
        (torch.ops.qdiff.qlinear.default, largs, {"bias": bias.half()}),
        (torch.ops.qdiff.qlinear_split.default, _split_args(lp, lp2, 4), {"bias_correction": bias}),
        (torch.ops.qdiff.qconv2d.default, (*cargs, *geom), {}),
        (torch.ops.qdiff.qconv2d_split.default, (*_split_args(cp, cp2, 8), *geom), {}),
    ]


# ---------------------------------------------------------------- tracing / fake impls

def test_fake_impls_match_real_outputs():
    calls = _all_op_calls(_gen(1))
    real = [op(*args, **kwargs) for op, args, kwargs in calls]
    with FakeTensorMode() as mode:
        for (op, args, kwargs), want in zip(calls, real):
            conv = lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t  # noqa: E731
            fake = op(*[conv(a) for a in args], **{k: conv(v) for k, v in kwargs.items()})
            assert fake.shape == want.shape and fake.stride() == want.stride() and fake.dtype == want.dtype, op


def test_ops_trace_fullgraph_under_compile():
    gen = _gen(2)
    lp, largs = _linear_args(gen, dtype=torch.float32)
    cp, cargs = _conv_args(gen)
    cp2, _ = _conv_args(gen, c=3, channels_last=True)
    geom = ([3, 3], [1, 1], [1, 1])
    seen = []

    def backend(gm, example_inputs):
        seen.extend(n for n in gm.graph.nodes if n.op == "call_function" and "qdiff" in str(n.target))
        return gm.forward

    def f(x, xc, xc2):
        y = torch.ops.qdiff.qlinear(x.relu(), *largs[1:]) * 2
        q = torch.ops.qdiff.quantize_act(x, 0.1, 8, 8)
        z = torch.ops.qdiff.qconv2d(xc, *cargs[1:], *geom)
        s = torch.ops.qdiff.qconv2d_split(xc, xc2, *_split_args(cp, cp2, 8)[2:], *geom)
        return y, q, z + s

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    got = compiled(lp.x, cp.x, cp2.x)
    want = f(lp.x, cp.x, cp2.x)
    assert len(seen) == 4
    for n, g in zip(seen, (got[0], got[1], got[2], got[2])):
        val = n.meta["example_value"]          # the fake impl's output, as traced
        assert val.shape == g.shape and val.stride() == g.stride() and val.dtype == g.dtype
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.stride() == w.stride() and torch.equal(g, w)


def test_opcheck():
    for op, args, kwargs in _all_op_calls(_gen(3)):
        torch.library.opcheck(op, args, kwargs)


def test_public_api_matches_reference():
    gen = _gen(4)
    lp, _ = _linear_args(gen, wbits=8, abits=8, dtype=torch.float32)
    pw = K.PreparedWeight(lp.w, lp.w_rowsum, 8)
    got = K.qlinear(lp.x, pw, lp.w_scale, lp.act_scale, lp.act_zero_point, 8)
    assert torch.equal(got, qgemm_reference([lp], 8))
    cp, _ = _conv_args(gen, wbits=4)
    cw = K.PreparedWeight(cp.w, cp.w_rowsum, 4)
    got = K.qconv2d(cp.x, cw, cp.w_scale, cp.act_scale, cp.act_zero_point, 8, 3, stride=1, padding=1)
    assert torch.equal(got, qconv2d_reference([cp], 4, [3, 3], [1, 1], [1, 1]))


def test_reference_path_stays_reachable(monkeypatch):
    """With QDCOMPILE_KERNELS=reference the ops run the pure-torch path (same results)."""
    gen = _gen(5)
    _, cargs = _conv_args(gen)
    geom = ([3, 3], [1, 1], [1, 1])
    triton_out = torch.ops.qdiff.qconv2d(*cargs, *geom)
    monkeypatch.setenv("QDCOMPILE_KERNELS", "reference")
    assert ops.kernel_mode(torch.device(DEVICE)) == "reference"
    assert torch.equal(torch.ops.qdiff.qconv2d(*cargs, *geom), triton_out)


# ---------------------------------------------------------------- bad inputs

def test_bad_inputs_raise_clear_errors():
    gen = _gen(6)
    lp, largs = _linear_args(gen)
    cp, cargs = _conv_args(gen)
    geom = ([3, 3], [1, 1], [1, 1])
    qlinear = torch.ops.qdiff.qlinear
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        qlinear(lp.x.to(torch.int32), *largs[1:])
    with pytest.raises(ValueError, match=r"prepared 4-bit weight must be torch.uint8 \[6, 5\]"):
        qlinear(lp.x, lp.w[:, :4].contiguous(), *largs[2:])
    with pytest.raises(ValueError, match="act_zero_point 300 outside"):
        qlinear(*largs[:5], 300, *largs[6:])
    with pytest.raises(ValueError, match="act_bits=3"):
        qlinear(*largs[:6], 3, largs[7])
    with pytest.raises(ValueError, match="weight_bits=2"):
        qlinear(*largs[:7], 2)
    with pytest.raises(ValueError, match=r"act_scale 0.0 outside the supported \[2\^-100, 2\^100\]"):
        qlinear(*largs[:4], 0.0, *largs[5:])
    with pytest.raises(ValueError, match="codes per output row"):      # 3x3 weight used as 1x1
        torch.ops.qdiff.qconv2d(*cargs, [1, 1], [1, 1], [0, 0])
    with pytest.raises(ValueError, match="codes per output row"):      # 3x3 weight used as 3x1
        torch.ops.qdiff.qconv2d(*cargs, [3, 1], [1, 1], [1, 0])
    with pytest.raises(ValueError, match="kernel_size must have 2 entries"):
        torch.ops.qdiff.qconv2d(*cargs, [3], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="zero point 16 outside"):
        torch.ops.qdiff.quantize_act(lp.x, 0.1, 16, 4)
    with pytest.raises(ValueError, match="bits=3"):
        torch.ops.qdiff.quantize_act(lp.x, 0.1, 1, 3)


def test_mismatched_devices():
    gen = _gen(7)
    lp, _ = _linear_args(gen)
    bad = lp._replace(w_scale=lp.w_scale.to("meta"))
    with pytest.raises(ValueError, match="w_scale is on meta"):
        ops.run_qgemm([bad], 4, None, None)
    with pytest.raises(ValueError, match="all tensors must be on"):
        qgemm_triton([bad], 4, None, None)
    cp, _ = _conv_args(gen)
    with pytest.raises(ValueError, match="all tensors must be on"):
        qconv2d_triton([cp._replace(w=cp.w.to("meta"))], 8, [3, 3], [1, 1], [1, 1], None, None)


def test_accumulator_overflow_guard():
    gen = _gen(8)
    k = MAX_K + 1
    x = random_activation(gen, (1, k), torch.float16)
    w = torch.zeros((1, k), dtype=torch.int8) + 1
    part = K.QPart(x, w, torch.tensor([k], dtype=torch.int32), torch.ones(1), 0.1, 0, 8)
    with pytest.raises(ValueError, match="int32 accumulator could overflow"):
        launch_qgemm([part], 8, None, None)


def test_codes_in_needs_out_dtype_and_one_kind_of_part():
    gen = _gen(9)
    lp, _ = _linear_args(gen)
    codes = lp._replace(x=torch.randint(-128, 128, lp.x.shape, generator=gen, dtype=torch.int8))
    with pytest.raises(TypeError, match="int8 codes input needs out_dtype"):
        launch_qgemm([codes], 4, None, None)
    with pytest.raises(TypeError, match="all be int8 codes or all float"):
        launch_qgemm([lp, codes], 4, None, None, out_dtype=torch.float16)
    with pytest.raises(TypeError, match="gives an output of that dtype"):
        launch_qgemm([lp], 4, None, None, out_dtype=torch.int8 if lp.x.dtype != torch.int8 else torch.float16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU dispatch")
def test_triton_on_cpu_without_interpreter(monkeypatch):
    gen = _gen(10)
    lp, largs = _linear_args(gen)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("QDCOMPILE_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        torch.ops.qdiff.qlinear(*largs)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        qgemm_triton([lp], 4, None, None)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        torch.ops.qdiff.quantize_act(lp.x, 0.1, 1, 8)


def test_unknown_kernel_mode(monkeypatch):
    monkeypatch.setenv("QDCOMPILE_KERNELS", "cutlass")
    with pytest.raises(ValueError, match="QDCOMPILE_KERNELS='cutlass'"):
        ops.kernel_mode(torch.device("cpu"))


def test_conftest_routes_ops_to_triton():
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"
    assert ops.kernel_mode(torch.device(DEVICE)) in ("triton", "reference")
