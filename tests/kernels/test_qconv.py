"""Triton quantized implicit-GEMM conv vs the pure-torch reference.

Tolerance: see :mod:`kernel_testing` (exact integers; fp32 epilogue in the reference order;
≤ 4 fp32 ulps of the terms' magnitude + 1 ulp of the output dtype).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_testing import (FLOAT_DTYPES, assert_epilogue_close, make_part, random_activation, random_bias,
                            term_magnitude)
from qdcompile.kernels.layout import signed_codes
from qdcompile.kernels.qconv import conv_out_size, launch_qconv2d, qconv2d_reference, qconv2d_triton
from qdcompile.kernels.quantizers import quantize_act

CHANNELS = st.one_of(st.sampled_from([1, 3, 7, 32, 33, 64]), st.integers(1, 70))
OUT_CHANNELS = st.one_of(st.sampled_from([1, 7, 33]), st.integers(1, 40))
SPATIAL = st.integers(1, 9)


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _check(parts, weight_bits, kernel, stride, padding, bias, bias_correction, out):
    ref = qconv2d_reference(parts, weight_bits, kernel, stride, padding, bias, bias_correction)
    singles = [qconv2d_reference([p._replace(x=p.x.float())], weight_bits, kernel, stride, padding) for p in parts]
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_epilogue_close(out, ref, term_magnitude(singles, bias, bias_correction, (1, -1, 1, 1)))


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 2), c=CHANNELS, n=OUT_CHANNELS, h=SPATIAL, w=SPATIAL,
       kernel=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]), pad=st.sampled_from([0, 1, 2]),
       dtype=st.sampled_from(FLOAT_DTYPES), weight_bits=st.sampled_from([4, 8]), act_bits=st.sampled_from([4, 8]),
       has_bias=st.booleans(), has_bc=st.booleans(), channels_last=st.booleans(), sigma=st.floats(0.05, 20.0),
       mean=st.floats(-5.0, 5.0), qmode=st.sampled_from(["fit", "random"]), seed=st.integers(0, 2**31 - 1))
def test_qconv_matches_reference(b, c, n, h, w, kernel, stride, pad, dtype, weight_bits, act_bits, has_bias, has_bc,
                                 channels_last, sigma, mean, qmode, seed):
    h, w = max(h, kernel - 2 * pad), max(w, kernel - 2 * pad)    # non-empty output
    gen = torch.Generator().manual_seed(seed)
    x = _layout(random_activation(gen, (b, c, h, w), dtype, sigma, mean), channels_last)
    part = make_part(gen, x, n, (c, kernel, kernel), weight_bits, act_bits, qmode)
    bias = random_bias(gen, n, has_bias, dtype)
    bc = random_bias(gen, n, has_bc)
    geom = ([kernel, kernel], [stride, stride], [pad, pad])
    out = qconv2d_triton([part], weight_bits, *geom, bias, bc)
    assert out.shape == (b, n, conv_out_size(h, kernel, stride, pad), conv_out_size(w, kernel, stride, pad))
    _check([part], weight_bits, *geom, bias, bc, out)


@settings(max_examples=35, deadline=None)
@given(c1=CHANNELS, c2=CHANNELS, n=OUT_CHANNELS, h=st.integers(3, 8), w=st.integers(3, 8),
       kernel=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]), dtype=st.sampled_from(FLOAT_DTYPES),
       weight_bits=st.sampled_from([4, 8]), act_bits=st.tuples(st.sampled_from([4, 8]), st.sampled_from([4, 8])),
       has_bias=st.booleans(), has_bc=st.booleans(), layouts=st.tuples(st.booleans(), st.booleans()),
       ratio=st.floats(10.0, 50.0), shift=st.floats(-3.0, 3.0), seed=st.integers(0, 2**31 - 1))
def test_qconv_split_bimodal(c1, c2, n, h, w, kernel, stride, dtype, weight_bits, act_bits, has_bias, has_bc, layouts,
                             ratio, shift, seed):
    """Shortcut-split conv: deep feature N(0,1) and a skip feature 10-50× larger and shifted,
    one quantizer and one weight slice each, the two parts in independent layouts."""
    gen = torch.Generator().manual_seed(seed)
    x1 = _layout(random_activation(gen, (2, c1, h, w), dtype), layouts[0])
    x2 = _layout(random_activation(gen, (2, c2, h, w), dtype, sigma=ratio, mean=shift * ratio), layouts[1])
    parts = [make_part(gen, x1, n, (c1, kernel, kernel), weight_bits, act_bits[0], "fit"),
             make_part(gen, x2, n, (c2, kernel, kernel), weight_bits, act_bits[1], "fit")]
    bias = random_bias(gen, n, has_bias, dtype)
    bc = random_bias(gen, n, has_bc)
    geom = ([kernel, kernel], [stride, stride], [kernel // 2, kernel // 2])
    _check(parts, weight_bits, *geom, bias, bc, qconv2d_triton(parts, weight_bits, *geom, bias, bc))


@pytest.mark.parametrize("weight_bits,act_bits", [(4, 8), (8, 4)])
def test_qconv_kernel5_asymmetric_geometry(weight_bits, act_bits):
    """5×5 kernel once, plus non-square kernel/stride/padding (each axis on its own)."""
    gen = torch.Generator().manual_seed(weight_bits * 10 + act_bits)
    x = random_activation(gen, (2, 6, 9, 7), torch.float16, 2.0, 1.0).contiguous(memory_format=torch.channels_last)
    for kernel, stride, pad in (([5, 5], [1, 1], [2, 2]), ([3, 1], [2, 1], [1, 0]), ([1, 5], [1, 2], [0, 2])):
        part = make_part(gen, x, 11, (6, *kernel), weight_bits, act_bits, "fit")
        bias = random_bias(gen, 11, True, torch.float16)
        _check([part], weight_bits, kernel, stride, pad, bias, None,
               qconv2d_triton([part], weight_bits, kernel, stride, pad, bias, None))


@settings(max_examples=20, deadline=None)
@given(c=CHANNELS, n=OUT_CHANNELS, kernel=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]),
       pad=st.sampled_from([0, 1, 2]), weight_bits=st.sampled_from([4, 8]), act_bits=st.sampled_from([4, 8]),
       split=st.booleans(), out_dtype=st.sampled_from(FLOAT_DTYPES), channels_last=st.booleans(),
       tapsum=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_qconv_codes_in(c, n, kernel, stride, pad, weight_bits, act_bits, split, out_dtype, channels_last, tapsum,
                        seed):
    """int8 signed codes in: padding is the code of zero ``Z − 2^(b−1)`` — read as such
    (no per-tap sums) or zero-filled and corrected from the per-tap weight sums; same output
    as quantize-on-load of the float activation (random zero points, so the padding code matters)."""
    gen = torch.Generator().manual_seed(seed)
    parts = [make_part(gen, _layout(random_activation(gen, (2, c + i, 5, 6), out_dtype, 1 + 9 * i, 2.0 * i),
                                    channels_last), n, (c + i, kernel, kernel), weight_bits, act_bits, "random")
             for i in range(2 if split else 1)]
    codes = [p._replace(x=signed_codes(quantize_act(p.x, p.act_scale, p.act_zero_point, p.act_bits), p.act_bits),
                        w_tapsum=p.w_tapsum if tapsum else None) for p in parts]
    geom = ([kernel, kernel], [stride, stride], [pad, pad])
    out = launch_qconv2d(codes, weight_bits, *geom, None, None, out_dtype=out_dtype)
    assert out.dtype == out_dtype
    _check(parts, weight_bits, *geom, None, None, out)
    assert torch.equal(qconv2d_reference(codes, weight_bits, *geom, out_dtype=out_dtype),
                       qconv2d_reference(parts, weight_bits, *geom))


def test_qconv_nchw_output_through_strides():
    """The kernel stores through the output strides: an NCHW output holds the same values."""
    gen = torch.Generator().manual_seed(3)
    x = random_activation(gen, (2, 9, 7, 6), torch.float16, 3.0, 1.0)
    part = make_part(gen, x, 13, (9, 3, 3), 8, 8, "fit")
    geom = ([3, 3], [2, 2], [1, 1])
    out = launch_qconv2d([part], 8, *geom, None, None, memory_format=torch.contiguous_format)
    assert out.is_contiguous()
    assert torch.equal(out, qconv2d_triton([part], 8, *geom, None, None))


# ---------------------------------------------------------------- GPU (compiled kernels)

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cfg", [(320, 320, 64, 3, 1), (640, 640, 32, 3, 1), (1280, 1280, 8, 3, 1),
                                 (320, 320, 64, 3, 2), (960, 320, 64, 1, 1), (321, 77, 17, 3, 2)])
@pytest.mark.parametrize("weight_bits", [4, 8])
@pytest.mark.parametrize("channels_last", [True, False])
def test_qconv_gpu_sd_shapes(cfg, weight_bits, channels_last):
    c, n, hw, kernel, stride = cfg
    gen = torch.Generator().manual_seed(c + n + hw)
    x = _layout(random_activation(gen, (2, c, hw, hw), torch.float16, 2.0, 0.3, device="cuda"), channels_last)
    part = make_part(gen, x, n, (c, kernel, kernel), weight_bits, 8, "fit")
    bias = random_bias(gen, n, True, torch.float16, device="cuda")
    geom = ([kernel, kernel], [stride, stride], [kernel // 2, kernel // 2])
    _check([part], weight_bits, *geom, bias, None, qconv2d_triton([part], weight_bits, *geom, bias, None))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("weight_bits", [4, 8])
def test_qconv_gpu_split(weight_bits):
    gen = torch.Generator().manual_seed(11)
    x1 = _layout(random_activation(gen, (2, 1280, 16, 16), torch.float16, device="cuda"), True)
    x2 = _layout(random_activation(gen, (2, 640, 16, 16), torch.float16, 25.0, 30.0, device="cuda"), True)
    parts = [make_part(gen, x1, 640, (1280, 3, 3), weight_bits, 8, "fit"),
             make_part(gen, x2, 640, (640, 3, 3), weight_bits, 8, "fit")]
    geom = ([3, 3], [1, 1], [1, 1])
    _check(parts, weight_bits, *geom, None, None, qconv2d_triton(parts, weight_bits, *geom, None, None))


@settings(max_examples=10, deadline=None)
@given(c=CHANNELS, n=OUT_CHANNELS, kernel=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]),
       weight_bits=st.sampled_from([4, 8]), split_k=st.sampled_from([2, 3]), codes=st.booleans(),
       tapsum=st.booleans(), has_bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_qconv_split_k(c, n, kernel, stride, weight_bits, split_k, codes, tapsum, has_bias, seed):
    """Split-K conv: the flattened (tap, channel-block) loop split in pieces; the padding
    correction is added once; same output."""
    gen = torch.Generator().manual_seed(seed)
    x = _layout(random_activation(gen, (2, c, 5, 6), torch.float16, 2.0, 1.0), True)
    part = make_part(gen, x, n, (c, kernel, kernel), weight_bits, 8, "random")
    bias = random_bias(gen, n, has_bias, torch.float16)
    run = part._replace(x=signed_codes(quantize_act(x, part.act_scale, part.act_zero_point, 8), 8),
                        w_tapsum=part.w_tapsum if tapsum else None) if codes else part
    geom = ([kernel, kernel], [stride, stride], [kernel // 2, kernel // 2])
    out = launch_qconv2d([run], weight_bits, *geom, bias, None, out_dtype=torch.float16 if codes else None,
                         split_k=split_k)
    _check([part], weight_bits, *geom, bias, None, out)
