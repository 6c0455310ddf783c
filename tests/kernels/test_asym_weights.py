"""Asymmetric 4-bit weights (Q-Diffusion's grid: unsigned codes, a zero point per output channel)
through the integer kernels: ``prepare_weight(q, 4, device_bits=8, zero_point=z)`` subtracts the
zero point once, at compile time, so the kernels run int8 codes ``q − z`` in ``[−15, 15]``.

Checked against the reference quantizer (``kernels/quantizers.py``):

* the prepared codes, row sums and tap sums are exactly ``q − z`` and its sums (integers);
* the Triton GEMM/conv output equals the pure-torch reference of the same parts within the
  derived epilogue tolerance of :mod:`kernel_testing` (bit-identical in fp32 under the interpreter);
* and equals the contraction of the reference dequantizers, ``Σ Δ·(q_x − Z) · s·(q_w − z)``,
  computed as ``Δ·s · Σ (q_x − Z)(q_w − z)`` in float64 (zero padding contributes ``q_x = Z``),
  within the same bound: the integer sum is exact on both sides (int32 in the kernel; float64
  integers below 2^53 in the reference), ``Δ·s`` has one rounding in float64, and the kernel's fp32
  epilogue at most four relative to the terms' magnitude ``T`` (``4 · 2^-23 · T``), plus one ulp
  of the output dtype for its final cast. (Summing the dequantized products in float64 instead
  would not be exact: 28-bit × 28-bit products, and a zero output comes out as ±2^-52.)
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_testing import (FLOAT_DTYPES, act_quantizer, assert_epilogue_close, random_activation, random_bias,
                            term_magnitude, ulp)
from qdcompile.kernels import QPart, prepare_weight
from qdcompile.kernels.layout import device_weight_bits, unpack_weight
from qdcompile.kernels.qconv import conv_out_size, qconv2d_reference, qconv2d_triton
from qdcompile.kernels.qgemm import qgemm_reference, qgemm_triton
from qdcompile.kernels.quantizers import dequantize_weight, quantize_act, quantize_weight, weight_qparams

M_SIZES = st.one_of(st.sampled_from([1, 7, 32, 33]), st.integers(1, 80))
K_SIZES = st.one_of(st.sampled_from([1, 7, 32, 33, 64]), st.integers(1, 100))
N_SIZES = st.one_of(st.sampled_from([1, 7, 33]), st.integers(1, 48))


def _asym_weight(gen: torch.Generator, n: int, in_shape: tuple[int, ...], skew: float):
    """A random float weight with per-channel offsets (skewed ranges) on its asymmetric 4-bit grid,
    randomly clipped so that some codes saturate at 0 or 15: ``(w, q, s, z)``."""
    tail = [1] * len(in_shape)
    w = torch.randn((n, *in_shape), generator=gen) * (0.05 + torch.rand(n, *tail, generator=gen))
    w = w + skew * torch.randn(n, *tail, generator=gen) * w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True)
    ratio = 0.6 + 0.4 * torch.rand((), generator=gen)
    s, z = weight_qparams(w * ratio, 4)
    return w, quantize_weight(w, s, 4, zero_point=z), s, z


def _asym_part(gen, x, n, in_shape, act_bits, qmode, skew):
    w, q, s, z = _asym_weight(gen, n, in_shape, skew)
    pw = prepare_weight(q, 4, device_bits=8, zero_point=z)
    act_scale, act_zp = act_quantizer(gen, x, act_bits, qmode)
    tapsum = pw.tapsum.to(x.device) if pw.tapsum is not None else None
    part = QPart(x, pw.w.to(x.device), pw.rowsum.to(x.device), s.to(x.device), act_scale, act_zp, act_bits, tapsum)
    return part, (q, s, z)


def _centered(codes: torch.Tensor, zero_point) -> torch.Tensor:
    """``codes − zero_point`` as float64 integers (per output channel for weights)."""
    if isinstance(zero_point, torch.Tensor):
        return codes.double() - zero_point.double().reshape(-1, *[1] * (codes.dim() - 1))
    return codes.double() - zero_point


def _assert_dequantized_close(out: torch.Tensor, ref64: torch.Tensor, term_mag: torch.Tensor) -> None:
    """``out`` vs the float64 contraction of the dequantized operands (module docstring bound)."""
    o = out.to(torch.float64)
    tol = 4 * 2.0 ** -23 * term_mag + ulp(torch.maximum(o.abs(), ref64.abs()), out.dtype)
    err = (o - ref64).abs()
    assert bool((err <= tol).all()), f"max err {err.max().item():.3g}, tolerance there {tol.flatten()[err.argmax()]:.3g}"


@settings(max_examples=40, deadline=None)
@given(n=N_SIZES, shape=st.sampled_from([(1,), (7,), (33,), (5, 1, 1), (3, 3, 3), (16, 3, 3)]),
       skew=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_prepared_codes_are_codes_minus_zero_point(n, shape, skew, seed):
    gen = torch.Generator().manual_seed(seed)
    w, q, s, z = _asym_weight(gen, n, shape, skew)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    pw = prepare_weight(q, 4, device_bits=8, zero_point=z)
    assert pw.bits == 8 and pw.w.dtype == torch.int8
    centered = q.to(torch.int32) - z.reshape(-1, *[1] * len(shape))
    flat = centered.permute(0, 2, 3, 1).reshape(n, -1) if len(shape) == 3 else centered
    assert torch.equal(unpack_weight(pw.w, flat.shape[1], 8).to(torch.int32), flat)
    assert torch.equal(pw.rowsum, flat.sum(1, dtype=torch.int32))
    if len(shape) == 3:
        c, kh, kw = shape
        assert torch.equal(pw.tapsum, flat.view(n, kh * kw, c).sum(2, dtype=torch.int32).t())
    # the device codes dequantize with the scales alone to the reference quantizer's weight
    deq = pw.w.float() * s[:, None]
    ref = dequantize_weight(q, s, z)
    ref = ref.permute(0, 2, 3, 1).reshape(n, -1) if len(shape) == 3 else ref
    assert torch.equal(deq, ref)


def test_prepare_weight_rejects_bad_asymmetric_input():
    g = torch.Generator().manual_seed(0)
    w, q, s, z = _asym_weight(g, 6, (10,), 0.5)
    with pytest.raises(ValueError, match=r"need device_bits=8, got 4"):
        prepare_weight(q, 4, zero_point=z)
    with pytest.raises(ValueError, match="needs 4-bit codes"):
        prepare_weight(q, 8, zero_point=z)
    with pytest.raises(ValueError, match=r"zero points must lie in the 4-bit code range \[0, 15\]"):
        prepare_weight(q, 4, device_bits=8, zero_point=z + 16)
    with pytest.raises(ValueError, match=r"zero point must be an integer tensor of shape \[6\]"):
        prepare_weight(q, 4, device_bits=8, zero_point=z.float())
    with pytest.raises(ValueError, match=r"exceed the 4-bit asymmetric range \[0, 15\]"):
        prepare_weight(q - 1, 4, device_bits=8, zero_point=z) if int(q.min()) == 0 else \
            prepare_weight(q.clone().fill_(-1), 4, device_bits=8, zero_point=z)
    assert device_weight_bits("linear", 64, 64, 2, 4, asymmetric=True) == 8
    assert device_weight_bits("linear", 64, 64, 2, 4) == 4


@settings(max_examples=30, deadline=None)
@given(m=M_SIZES, k=K_SIZES, n=N_SIZES, dtype=st.sampled_from(FLOAT_DTYPES), act_bits=st.sampled_from([4, 8]),
       has_bias=st.booleans(), has_bc=st.booleans(), sigma=st.floats(0.05, 20.0), mean=st.floats(-5.0, 5.0),
       qmode=st.sampled_from(["fit", "random"]), skew=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_qgemm_asymmetric_weights(m, k, n, dtype, act_bits, has_bias, has_bc, sigma, mean, qmode, skew, seed):
    gen = torch.Generator().manual_seed(seed)
    x = random_activation(gen, (m, k), dtype, sigma, mean)
    part, (q, s, z) = _asym_part(gen, x, n, (k,), act_bits, qmode, skew)
    bias = random_bias(gen, n, has_bias, dtype)
    bc = random_bias(gen, n, has_bc)
    out = qgemm_triton([part], 8, bias, bc)
    ref = qgemm_reference([part], 8, bias, bc)
    terms = term_magnitude([qgemm_reference([part._replace(x=x.float())], 8)], bias, bc, (1, -1))
    assert_epilogue_close(out, ref, terms)
    # against the reference quantizers' dequantized operands, contracted in float64
    xc = _centered(quantize_act(x, part.act_scale, part.act_zero_point, act_bits), part.act_zero_point)
    ref64 = (xc @ _centered(q, z).t()) * (part.act_scale * s.double())
    for b in (bias, bc):
        if b is not None:
            ref64 = ref64 + b.double()
    _assert_dequantized_close(out, ref64, terms)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), c=st.one_of(st.sampled_from([1, 3, 32, 33]), st.integers(1, 40)),
       n=st.integers(1, 24), h=st.integers(1, 7), w=st.integers(1, 7), kernel=st.sampled_from([1, 3]),
       stride=st.sampled_from([1, 2]), pad=st.sampled_from([0, 1]), dtype=st.sampled_from(FLOAT_DTYPES),
       act_bits=st.sampled_from([4, 8]), has_bias=st.booleans(), channels_last=st.booleans(),
       split=st.booleans(), skew=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_qconv_asymmetric_weights(b, c, n, h, w, kernel, stride, pad, dtype, act_bits, has_bias, channels_last, split,
                                  skew, seed):
    """Conv (zero padding with the code of 0, tap sums of ``q − z``), optionally shortcut-split
    with each part's own zero points."""
    h, w = max(h, kernel - 2 * pad), max(w, kernel - 2 * pad)
    gen = torch.Generator().manual_seed(seed)
    xs = [random_activation(gen, (b, c + 3 * i, h, w), dtype, 1.0 + 9 * i, 2.0 * i) for i in range(2 if split else 1)]
    if channels_last:
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    made = [_asym_part(gen, x, n, (x.shape[1], kernel, kernel), act_bits, "fit", skew) for x in xs]
    parts = [p for p, _ in made]
    bias = random_bias(gen, n, has_bias, dtype)
    geom = ([kernel, kernel], [stride, stride], [pad, pad])
    out = qconv2d_triton(parts, 8, *geom, bias, None)
    assert out.shape == (b, n, conv_out_size(h, kernel, stride, pad), conv_out_size(w, kernel, stride, pad))
    singles = [qconv2d_reference([p._replace(x=p.x.float())], 8, *geom) for p in parts]
    terms = term_magnitude(singles, bias, None, (1, -1, 1, 1))
    assert_epilogue_close(out, qconv2d_reference(parts, 8, *geom, bias, None), terms)
    ref64 = 0
    for p, (q, s, z) in made:
        xc = _centered(quantize_act(p.x, p.act_scale, p.act_zero_point, act_bits), p.act_zero_point)
        acc = torch.nn.functional.conv2d(xc, _centered(q, z), stride=stride, padding=pad)   # exact integers
        ref64 = ref64 + acc * (p.act_scale * s.double()).view(1, -1, 1, 1)
    if bias is not None:
        ref64 = ref64 + bias.double().view(1, -1, 1, 1)
    _assert_dequantized_close(out, ref64, terms)
