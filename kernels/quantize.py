"""Activation quantization kernel: float tensor → per-tensor asymmetric unsigned codes.

Standalone form of the quantize-on-load that the GEMM/conv kernels fuse; used where a
consumer cannot quantize on load. Semantics: :func:`.quantizers.quantize_act`, bit for
bit::

    q = clamp(round_half_even(RN(float32(x) / float32(Δ))) + Z, 0, 2^b − 1)

How :func:`quantize_codes` computes it without a division instruction per element
(``div.rn.f32`` is a ~10-instruction sequence with a slow-path branch per element; in a
GEMM's K loop that dominates the tile's MMA time):

1. **Clamp x first** to ``[x_lo, x_hi] = [RN(−Z·Δ), RN((2^b − 1 − Z)·Δ)]`` (host-computed).
   The code is a monotone function of ``x`` and ``x_lo``/``x_hi`` have exactly the codes
   ``0`` and ``2^b − 1``, so clamping ``x`` is the same as clamping the code; it also
   bounds the quotient (``|x/Δ| ≤ 255``) and tames infinities.
2. **Correctly rounded quotient** ``RN(x/Δ)``: ``y = RN(1/Δ)`` is computed once on the host;
   ``q = RN(x·y)`` and two refinements ``q ← fma(fma(−q, Δ, x), y, q)``. The residual
   ``x − q·Δ`` of a faithful ``q`` is exact in an FMA, and by Markstein's theorem
   (y within ½ ulp of 1/Δ, q within 1 ulp of x/Δ) the refinement of a faithful ``q``
   is ``RN(x/Δ)``; the first refinement makes ``q`` faithful. This is the fast path of
   ``div.rn.f32`` with a correctly rounded reciprocal; its slow path (denormal or huge
   operands) cannot be reached because scales are restricted to ``[2^-100, 2^100]``.
   (Checked exhaustively for 50 scales over every fp32 x with x/Δ ∈ [0.25, 300], and
   around every rounding boundary for 30 000 random scales: no difference — a single
   refinement already sufficed in all of them.)
3. **Round half to even** with the fp32 magic number ``1.5·2^23``: ``t = q + 1.5·2^23``
   rounds ``q`` to an integer (ties to even) and holds it in its low mantissa bits, so the
   code is an *integer* subtraction on the bit pattern, ``bits(t) − 0x4B400000 + Z`` — no
   float→int conversion instruction (those run at 1/8 of the FMA rate on Hopper).

All steps are exact IEEE fp32 operations, identical under the Triton interpreter.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .autotune import interpreting, launch_options
from .quantizers import act_qmax, check_act_scale
from .quantizers import quantize_act as quantize_act_reference  # noqa: F401  (the reference)


# ---------------------------------------------------------------- configs

def _block_size() -> int:
    return 1024 if interpreting() else 2048


# ---------------------------------------------------------------- device function

@triton.jit
def quantize_codes(x, scale, inv_scale, x_lo, x_hi, code_offset):
    """Float tile → int32 codes ``clamp(round(x / scale) + Z, 0, 2^b − 1) + c``.

    ``inv_scale = RN(1/scale)``, ``[x_lo, x_hi]`` from :func:`act_quant_constants`;
    ``code_offset = Z + c − 0x4B400000`` (``c``: an optional shift of the code range, e.g.
    ``−2^(b−1)`` for signed int8 MMA operands).
    """
    xf = tl.minimum(tl.maximum(x.to(tl.float32), x_lo), x_hi)
    q = xf * inv_scale
    q = tl.fma(tl.fma(-q, scale, xf), inv_scale, q)
    q = tl.fma(tl.fma(-q, scale, xf), inv_scale, q)      # q = RN(x / scale)
    t = q + 12582912.0                                    # 1.5·2^23: round half to even
    return t.to(tl.int32, bitcast=True) + code_offset


# ---------------------------------------------------------------- kernel

@triton.jit
def _quantize_act_kernel(
    x_ptr, q_ptr,
    numel,
    scale, inv_scale, x_lo, x_hi, zero_point,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    q = quantize_codes(x, scale, inv_scale, x_lo, x_hi, zero_point - 0x4B400000)
    tl.store(q_ptr + offs, q.to(tl.uint8), mask=mask)


# ---------------------------------------------------------------- launcher

def act_quant_constants(op: str, scale: float, zero_point: int, bits: int) -> tuple[float, float, float, float]:
    """fp32 ``(Δ, RN(1/Δ), x_lo, x_hi)`` of an activation quantizer, for :func:`quantize_codes`."""
    qmax = act_qmax(bits)
    check_act_scale(scale, f"{op}: activation scale")
    if not 0 <= zero_point <= qmax:
        raise ValueError(f"{op}: zero point {zero_point} outside the {bits}-bit code range [0, {qmax}]")
    s = np.float32(scale)                    # numpy fp32 scalars: IEEE ops, cheap on the launch path
    inv = np.float32(1.0) / s                # IEEE division: the correctly rounded reciprocal
    x_lo, x_hi = np.float32(-zero_point) * s, np.float32(qmax - zero_point) * s
    return float(s), float(inv), float(x_lo), float(x_hi)


def _dense_strides(t: torch.Tensor) -> bool:
    """True when ``t`` covers its storage span exactly once (any dim order, no gaps/overlap)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def quantize_act_triton(x: torch.Tensor, scale: float, zero_point: int, bits: int) -> torch.Tensor:
    """Triton :func:`.quantizers.quantize_act`: same shape and strides as ``x`` (uint8)."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"quantize_act: activation must be float16/bfloat16/float32, got {x.dtype}")
    consts = act_quant_constants("quantize_act", scale, zero_point, bits)
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"quantize_act: the Triton kernel needs a CUDA tensor or TRITON_INTERPRET=1, "
                           f"got a {x.device.type} tensor")
    out = torch.empty_like(x, dtype=torch.uint8)
    if x.numel() == 0:
        return out
    if _dense_strides(x) and out.stride() == x.stride():
        src, dst = x, out                        # same dense layout: walk the storage linearly
    else:
        src = x.contiguous()
        dst = out if out.is_contiguous() else torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    block = _block_size()
    grid = (triton.cdiv(x.numel(), block),)
    _quantize_act_kernel[grid](src, dst, x.numel(), *consts, int(zero_point), BLOCK=block, **launch_options())
    if dst is not out:
        out.copy_(dst)
    return out
