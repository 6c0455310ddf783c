"""quantize_act kernel vs the reference quantizer: integer codes must match exactly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_testing import DEVICE, FLOAT_DTYPES, act_quantizer, random_activation
from qdcompile.kernels import quantize_act
from qdcompile.kernels.quantize import quantize_act_triton
from qdcompile.kernels.quantizers import quantize_act as quantize_act_reference

SHAPES = st.lists(st.sampled_from([1, 2, 3, 7, 16, 33, 129]), min_size=1, max_size=3)


def _layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "transposed" and x.dim() >= 2:
        return x.transpose(0, -1)
    if kind == "sliced" and x.shape[-1] >= 2:
        return x[..., ::2]
    if kind == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


@settings(max_examples=100, deadline=None)
@given(shape=SHAPES, dtype=st.sampled_from(FLOAT_DTYPES), bits=st.sampled_from([4, 8]),
       sigma=st.floats(0.01, 50.0), mean=st.floats(-20.0, 20.0), qmode=st.sampled_from(["fit", "random"]),
       layout=st.sampled_from(["contiguous", "transposed", "sliced"]), seed=st.integers(0, 2**31 - 1))
def test_codes_match_reference(shape, dtype, bits, sigma, mean, qmode, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    x = _layout(random_activation(gen, shape, dtype, sigma, mean), layout)
    scale, zp = act_quantizer(gen, x, bits, qmode)
    got = quantize_act_triton(x, scale, zp, bits)
    want = quantize_act_reference(x, scale, zp, bits)
    assert got.dtype == torch.uint8 and got.shape == x.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_ties_and_extremes(dtype, bits):
    """Exact half-integers (round half to even), values a hair around them (a reciprocal
    multiply instead of the true division flips some), clamping and infinities."""
    gen = torch.Generator().manual_seed(bits)
    scale, zp = 0.125, (1 << (bits - 1)) - 3                     # power of two: (k + ½)·Δ is exact
    k = torch.arange(-40, 40, dtype=torch.float32)
    ties = (k + 0.5) * scale
    # a non-power-of-two scale and fp32 neighbours of (k + ½)·Δ
    s2 = 0.0371
    mids = (k + 0.5) * s2
    near = torch.cat([mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
    extremes = torch.tensor([0.0, -0.0, 1e30, -1e30, float("inf"), float("-inf"), 3e4, -3e4])
    noise = torch.randn(257, generator=gen) * 40
    for x, s in ((ties, scale), (near, s2), (extremes, scale), (noise, s2)):
        x = x.to(device=DEVICE, dtype=dtype)
        assert torch.equal(quantize_act_triton(x, s, zp, bits), quantize_act_reference(x, s, zp, bits))


def test_division_not_reciprocal():
    """Inputs where round(x · (1/Δ)) differs from round(x / Δ): the kernel must divide."""
    gen = torch.Generator().manual_seed(0)
    scale = torch.tensor(0.0371, dtype=torch.float32)
    x = ((torch.randint(-100, 100, (200000,), generator=gen) + 0.5) * scale).float()
    x = torch.cat([x, torch.nextafter(x, x + 1), torch.nextafter(x, x - 1)])
    by_div = torch.round(x / scale)
    by_mul = torch.round(x * (1.0 / scale))
    x = x[by_div != by_mul][:512]
    assert x.numel() > 0, "the search for division/reciprocal disagreements found none"
    got = quantize_act_triton(x.to(DEVICE), float(scale), 128, 8)
    assert torch.equal(got, quantize_act_reference(x.to(DEVICE), float(scale), 128, 8))


@pytest.mark.parametrize("scale", [0.0371, 1.0, 2.0 ** -20 * 1.9999999, 1.0000001, 3.1e-5, 1 / 3, 7.77e4, 2.0 ** -100])
def test_every_value_near_rounding_boundaries(scale):
    """All fp32 x within ±64 ulps of RN((k + ½)·Δ) for k ∈ [−256, 256]: the only places where
    the division's last bit decides the code. The kernel divides without a division
    instruction (reciprocal + two FMA refinements): it must agree everywhere here."""
    s = torch.tensor(scale, dtype=torch.float32)
    mids = (torch.arange(-256, 257, dtype=torch.float64) + 0.5).float() * s
    bits = mids.view(torch.int32).to(torch.int64)[:, None] + torch.arange(-64, 65)[None, :]
    x = bits.to(torch.int32).view(torch.float32).flatten()
    x = x[torch.isfinite(x)].to(DEVICE)
    for zp, bits_ in ((128, 8), (0, 8), (255, 8), (8, 4)):
        assert torch.equal(quantize_act_triton(x, float(s), zp, bits_), quantize_act_reference(x, float(s), zp, bits_))


def test_scale_range_is_checked():
    x = torch.randn(4, device=DEVICE)
    for bad in (2.0 ** -101, 2.0 ** 101, 0.0, float("inf")):
        with pytest.raises(ValueError, match="activation scale"):
            quantize_act_triton(x, bad, 0, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_public_op_keeps_layout(dtype):
    gen = torch.Generator().manual_seed(1)
    x = random_activation(gen, (2, 6, 5, 3), dtype).contiguous(memory_format=torch.channels_last)
    got = quantize_act(x, 0.05, 7, 4)
    assert got.stride() == x.stride()
    assert torch.equal(got, quantize_act_reference(x, 0.05, 7, 4))


def test_empty():
    x = torch.empty(0, 5, device=DEVICE)
    assert quantize_act_triton(x, 0.1, 3, 8).shape == (0, 5)
