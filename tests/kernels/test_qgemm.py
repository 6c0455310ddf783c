"""Triton quantized GEMM (linear family) vs the pure-torch reference.

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
from qdcompile.kernels.qgemm import launch_qgemm, qgemm_reference, qgemm_triton
from qdcompile.kernels.quantizers import quantize_act

# awkward sizes around the interpreter's 32-wide tiles and the GPU's 64/128-wide ones
M_SIZES = st.one_of(st.sampled_from([1, 7, 32, 33, 129]), st.integers(1, 140))
K_SIZES = st.one_of(st.sampled_from([1, 7, 32, 33, 64, 129]), st.integers(1, 140))
N_SIZES = st.one_of(st.sampled_from([1, 7, 33, 64]), st.integers(1, 70))


def _lead_shape(m: int, nlead: int) -> tuple[int, ...]:
    if nlead == 1 or m % 2:
        return (m,)
    return (2, m // 2) if nlead == 2 else (1, 2, m // 2)


def _layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Same values, other strides: K-major storage, or a strided slice of a wider tensor."""
    if kind == "k_major":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2) if x.dim() >= 2 else x
    if kind == "sliced":
        wide = torch.empty((*x.shape[:-1], 2 * x.shape[-1] + 1), dtype=x.dtype, device=x.device).normal_()
        wide[..., 1::2] = x
        return wide[..., 1::2]
    return x


def _check(parts, weight_bits, bias, bias_correction, out):
    ref = qgemm_reference(parts, weight_bits, bias, bias_correction)
    singles = [qgemm_reference([p._replace(x=p.x.float())], weight_bits) for p in parts]
    assert_epilogue_close(out, ref, term_magnitude(singles, bias, bias_correction, (1, -1)))


@settings(max_examples=80, deadline=None)
@given(m=M_SIZES, k=K_SIZES, n=N_SIZES, nlead=st.sampled_from([1, 2, 3]), dtype=st.sampled_from(FLOAT_DTYPES),
       weight_bits=st.sampled_from([4, 8]), act_bits=st.sampled_from([4, 8]), has_bias=st.booleans(),
       has_bc=st.booleans(), sigma=st.floats(0.05, 20.0), mean=st.floats(-5.0, 5.0),
       qmode=st.sampled_from(["fit", "random"]), layout=st.sampled_from(["contiguous", "k_major", "sliced"]),
       seed=st.integers(0, 2**31 - 1))
def test_qgemm_matches_reference(m, k, n, nlead, dtype, weight_bits, act_bits, has_bias, has_bc, sigma, mean, qmode,
                                 layout, seed):
    gen = torch.Generator().manual_seed(seed)
    x = _layout(random_activation(gen, (*_lead_shape(m, nlead), k), dtype, sigma, mean), layout)
    part = make_part(gen, x, n, (k,), weight_bits, act_bits, qmode)
    bias = random_bias(gen, n, has_bias, dtype)
    bc = random_bias(gen, n, has_bc)
    out = qgemm_triton([part], weight_bits, bias, bc)
    assert out.shape == (*x.shape[:-1], n) and out.is_contiguous()
    _check([part], weight_bits, bias, bc, out)


@settings(max_examples=40, deadline=None)
@given(m=M_SIZES, k1=K_SIZES, k2=K_SIZES, n=N_SIZES, dtype=st.sampled_from(FLOAT_DTYPES),
       weight_bits=st.sampled_from([4, 8]), act_bits=st.tuples(st.sampled_from([4, 8]), st.sampled_from([4, 8])),
       has_bias=st.booleans(), has_bc=st.booleans(), ratio=st.floats(10.0, 50.0), shift=st.floats(-3.0, 3.0),
       seed=st.integers(0, 2**31 - 1))
def test_qgemm_split_bimodal(m, k1, k2, n, dtype, weight_bits, act_bits, has_bias, has_bc, ratio, shift, seed):
    """Two parts with very different ranges (deep feature N(0,1), skip 10-50× larger and
    shifted), each with its own quantizer and weight slice; no concatenation is built."""
    gen = torch.Generator().manual_seed(seed)
    x1 = random_activation(gen, (m, k1), dtype)
    x2 = random_activation(gen, (m, k2), dtype, sigma=ratio, mean=shift * ratio)
    parts = [make_part(gen, x1, n, (k1,), weight_bits, act_bits[0], "fit"),
             make_part(gen, x2, n, (k2,), weight_bits, act_bits[1], "fit")]
    bias = random_bias(gen, n, has_bias, dtype)
    bc = random_bias(gen, n, has_bc)
    out = qgemm_triton(parts, weight_bits, bias, bc)
    _check(parts, weight_bits, bias, bc, out)


@settings(max_examples=20, deadline=None)
@given(m=M_SIZES, k=K_SIZES, n=N_SIZES, weight_bits=st.sampled_from([4, 8]), act_bits=st.sampled_from([4, 8]),
       split=st.booleans(), out_dtype=st.sampled_from(FLOAT_DTYPES), has_bias=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_qgemm_codes_in(m, k, n, weight_bits, act_bits, split, out_dtype, has_bias, seed):
    """int8 signed codes in (the producer-quantized main path): same output as quantize-on-load
    of the float activation with the same quantizers, in the requested dtype; the reference
    takes the codes parts too."""
    gen = torch.Generator().manual_seed(seed)
    parts = [make_part(gen, random_activation(gen, (m, k + i), out_dtype, 1 + 9 * i, 3.0 * i), n, (k + i,),
                       weight_bits, act_bits, "random") for i in range(2 if split else 1)]
    codes = [p._replace(x=signed_codes(quantize_act(p.x, p.act_scale, p.act_zero_point, p.act_bits), p.act_bits))
             for p in parts]
    bias = random_bias(gen, n, has_bias, out_dtype)
    out = launch_qgemm(codes, weight_bits, bias, None, out_dtype=out_dtype)
    assert out.dtype == out_dtype
    _check(parts, weight_bits, bias, None, out)
    assert torch.equal(qgemm_reference(codes, weight_bits, bias, out_dtype=out_dtype),
                       qgemm_reference(parts, weight_bits, bias))


def test_qgemm_empty_rows():
    gen = torch.Generator().manual_seed(0)
    part = make_part(gen, random_activation(gen, (0, 9), torch.float16), 5, (9,), 8, 8, "random")
    assert qgemm_triton([part], 8, None, None).shape == (0, 5)


# ---------------------------------------------------------------- GPU (compiled kernels)

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", [(8192, 320, 320), (2048, 640, 2560), (154, 768, 1280), (4099, 1280, 321)])
@pytest.mark.parametrize("weight_bits", [4, 8])
@pytest.mark.parametrize("act_bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_qgemm_gpu_sd_shapes(shape, weight_bits, act_bits, dtype):
    m, k, n = shape
    gen = torch.Generator().manual_seed(m + k + n)
    x = random_activation(gen, (2, m // 2, k) if m % 2 == 0 else (m, k), dtype, 3.0, 0.5, device="cuda")
    part = make_part(gen, x, n, (k,), weight_bits, act_bits, "fit")
    bias = random_bias(gen, n, True, dtype, device="cuda")
    _check([part], weight_bits, bias, None, qgemm_triton([part], weight_bits, bias, None))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("weight_bits", [4, 8])
def test_qgemm_gpu_split(weight_bits):
    gen = torch.Generator().manual_seed(5)
    x1 = random_activation(gen, (4096, 1280), torch.float16, device="cuda")
    x2 = random_activation(gen, (4096, 640), torch.float16, 30.0, 40.0, device="cuda")
    parts = [make_part(gen, x1, 640, (1280,), weight_bits, 8, "fit"),
             make_part(gen, x2, 640, (640,), weight_bits, 8, "fit")]
    bc = random_bias(gen, 640, True, device="cuda")
    _check(parts, weight_bits, None, bc, qgemm_triton(parts, weight_bits, None, bc))


@settings(max_examples=12, deadline=None)
@given(m=M_SIZES, k=st.integers(33, 200), n=N_SIZES, weight_bits=st.sampled_from([4, 8]),
       act_bits=st.sampled_from([4, 8]), split_k=st.sampled_from([2, 3, 8]), codes=st.booleans(),
       has_bias=st.booleans(), has_bc=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_qgemm_split_k(m, k, n, weight_bits, act_bits, split_k, codes, has_bias, has_bc, seed):
    """Split-K (K pieces into an int32 workspace, reduced by a second kernel): same output,
    including pieces that get no K step at all (split 8 of a short K)."""
    gen = torch.Generator().manual_seed(seed)
    part = make_part(gen, random_activation(gen, (m, k), torch.float16, 2.0, 0.5), n, (k,), weight_bits, act_bits,
                     "random")
    bias = random_bias(gen, n, has_bias, torch.float16)
    bc = random_bias(gen, n, has_bc)
    run = part._replace(x=signed_codes(quantize_act(part.x, part.act_scale, part.act_zero_point, act_bits),
                                       act_bits)) if codes else part
    out = launch_qgemm([run], weight_bits, bias, bc, out_dtype=torch.float16 if codes else None, split_k=split_k)
    _check([part], weight_bits, bias, bc, out)
