"""Shared helpers of the kernel tests: random quantized operands and the output comparison.

Tolerance of a GEMM/conv output against its pure-torch reference (:func:`assert_epilogue_close`)
---------------------------------------------------------------------------------------
The integer part is exact on both sides: the kernel accumulates in int32 (no overflow
below ``MAX_K``, checked by the launcher), the reference in float64, which holds every such
integer exactly; ``acc − Z·rowsum`` is the same integer. From there both run the same fp32
operations in the same order (``c_p = f32(acc_p − Z_p·rowsum_p) · f32(Δ_p·s_p[n])``,
``y = c_1 [+ c_2] + bias + bias_correction``) with round-to-nearest-even, and the kernels
are compiled without FMA contraction, so the fp32 value is expected to be *identical*.

The stated tolerance nevertheless allows, per element,

* ``4 · 2^-23 · T`` with ``T = Σ_p |c_p| + |bias| + |bias_correction|``: the epilogue has at
  most four fp32 roundings whose order matters (two products, up to three sums); should a
  backend contract one ``a·b + c`` into an FMA, the product's rounding (≤ ½ ulp of a term)
  disappears, which shifts the result by at most ½ ulp of ``T`` per contraction. Bounded by
  the magnitude of the terms, not of the result, because the terms may cancel.
* plus 1 ulp of the output dtype at the result: the cast of an fp32 value to fp16/bf16
  rounds once (½ ulp on a GPU, RTNE); the Triton *interpreter* converts fp32 → bf16 by
  truncation, up to 1 ulp; and an fp32 difference allowed above can move the cast across
  a rounding boundary, at most one step.

Anything larger is a real bug: a wrong code changes the result by at least
``Δ·s_n·|w| ≈ 2^-7`` relative to a term, orders of magnitude above these bounds.
Under the interpreter with fp32 activations the results are asserted bit-identical.
"""

from __future__ import annotations

import math
import os

import torch

from qdcompile.kernels import QPart, act_qparams, prepare_weight, quantize_weight, weight_scales
from qdcompile.kernels.quantizers import act_qmax

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def random_activation(gen: torch.Generator, shape, dtype, sigma: float = 1.0, mean: float = 0.0,
                      device: str = DEVICE) -> torch.Tensor:
    """N(mean, sigma²) data in ``dtype``; never all zeros."""
    x = torch.randn(shape, generator=gen, dtype=torch.float32) * sigma + mean
    return x.to(device=device, dtype=dtype)


def act_quantizer(gen: torch.Generator, x: torch.Tensor, bits: int, mode: str) -> tuple[float, int]:
    """Scale and zero point for ``x``.

    ``fit``: the quantizer of a range around the data's, randomly narrowed or widened (some
    values clamp); ``random``: a random zero point anywhere in the code range and a random
    scale of the data's order of magnitude.
    """
    xf = x.float()
    lo, hi = (float(xf.min()), float(xf.max())) if xf.numel() else (-1.0, 1.0)
    r = torch.rand(3, generator=gen).tolist()
    if mode == "fit":
        return act_qparams(lo * (0.6 + 0.6 * r[0]), hi * (0.6 + 0.6 * r[1]), bits)
    qmax = act_qmax(bits)
    span = max(hi - lo, 1e-3)
    scale = span / qmax * math.exp(r[0] - 0.5)
    return float(torch.tensor(scale, dtype=torch.float32)), int(r[1] * (qmax + 1)) % (qmax + 1)


def quantized_weight(gen: torch.Generator, n: int, in_shape: tuple[int, ...], bits: int, device: str = DEVICE):
    """Random float weight → (prepared codes, per-channel scales float32)."""
    w = torch.randn((n, *in_shape), generator=gen) * (0.05 + torch.rand(n, *([1] * len(in_shape)), generator=gen))
    scale = weight_scales(w, bits)
    q = quantize_weight(w, scale, bits)
    prepared = prepare_weight(q, bits)
    return prepared, scale


def make_part(gen: torch.Generator, x: torch.Tensor, n: int, w_in_shape: tuple[int, ...], weight_bits: int,
              act_bits: int, qmode: str) -> QPart:
    prepared, w_scale = quantized_weight(gen, n, w_in_shape, weight_bits, device=str(x.device))
    act_scale, zero_point = act_quantizer(gen, x, act_bits, qmode)
    tapsum = prepared.tapsum.to(x.device) if prepared.tapsum is not None else None
    return QPart(x, prepared.w.to(x.device), prepared.rowsum.to(x.device), w_scale.to(x.device),
                 act_scale, zero_point, act_bits, tapsum)


def random_bias(gen: torch.Generator, n: int, on: bool, dtype=torch.float32, device: str = DEVICE):
    if not on:
        return None
    return (torch.randn(n, generator=gen) * 0.5).to(device=device, dtype=dtype)


def ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at the magnitudes ``|v|`` (float64 tensor)."""
    fi = torch.finfo(dtype)
    a = v.abs().to(torch.float64).clamp_min(fi.smallest_normal)
    return torch.exp2(torch.floor(torch.log2(a))) * fi.eps


def assert_epilogue_close(out: torch.Tensor, ref: torch.Tensor, term_mag: torch.Tensor) -> None:
    """``out`` vs ``ref`` within the tolerance justified in the module docstring."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert out.dtype == ref.dtype, (out.dtype, ref.dtype)
    o, r = out.to(torch.float64), ref.to(torch.float64)
    assert torch.isfinite(o).all() == torch.isfinite(r).all()
    tol = 4 * 2.0 ** -23 * term_mag.to(torch.float64) + ulp(torch.maximum(o.abs(), r.abs()), out.dtype)
    err = (o - r).abs()
    bad = err > tol
    if bad.any():
        i = int(torch.nonzero(bad.flatten())[0])
        raise AssertionError(
            f"{int(bad.sum())} of {bad.numel()} elements beyond tolerance; first at flat index {i}: "
            f"out={o.flatten()[i].item()!r} ref={r.flatten()[i].item()!r} tol={tol.flatten()[i].item():.3g} "
            f"(max err {err.max().item():.3g})")
    if INTERPRETING and out.dtype == torch.float32:
        assert torch.equal(out, ref), f"fp32 results differ under the interpreter: max err {err.max().item():.3g}"


def term_magnitude(part_outputs: list[torch.Tensor], bias, bias_correction, view) -> torch.Tensor:
    """``T = Σ_p |c_p| + |bias| + |bias_correction|`` from fp32 single-part reference outputs."""
    t = sum(p.abs().to(torch.float64) for p in part_outputs)
    for b in (bias, bias_correction):
        if b is not None:
            t = t + b.abs().to(torch.float64).view(view)
    return t
