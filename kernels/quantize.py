"""Activation quantization kernel: float tensor → per-tensor asymmetric unsigned codes.

Standalone form of the quantize-on-load that the GEMM/conv kernels fuse; used where a
consumer cannot quantize on load. Semantics: :func:`.quantizers.quantize_act`,
bit for bit::

    q = clamp(round_half_even(float32(x) / float32(Δ)) + Z, 0, 2^b − 1)

with a true IEEE fp32 division (``tl.math.div_rn``; Triton's plain ``/`` is an
approximate division on NVIDIA GPUs) and round-half-to-even by the fp32 "magic number"
``(v + 1.5·2^23) − 1.5·2^23``, which rounds to an integer, ties to even, for
``|v| < 2^22``. ``v`` is clamped to ``[−256, 256]`` first: outside that interval every
code clamps to ``0`` or ``2^b − 1`` anyway (``0 ≤ Z ≤ 255``), and infinities are tamed.

:func:`quantize_codes` is the shared device function: the GEMM and conv kernels call it
on each activation tile they load.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autotune import interpreting, launch_options
from .quantizers import act_qmax
from .quantizers import quantize_act as quantize_act_reference  # noqa: F401  (the reference)

_ROUND_MAGIC = 12582912.0  # 1.5 · 2^23


# ---------------------------------------------------------------- device function

@triton.jit
def quantize_codes(x, scale, zero_point, LO: tl.constexpr, HI: tl.constexpr):
    """Float tile → fp32 tile of integer codes ``clamp(round(x / scale) + zero_point, LO, HI)``.

    ``LO``/``HI`` let callers shift the code range (signed int8 operands use
    ``zero_point − 2^(b−1)`` and ``[−2^(b−1), 2^b − 1 − 2^(b−1)]``; same dequantized value).
    """
    v = tl.math.div_rn(x.to(tl.float32), scale)
    v = tl.minimum(tl.maximum(v, -256.0), 256.0)
    r = (v + 12582912.0) - 12582912.0
    q = r + zero_point  # int zero point promotes to fp32 (exact: |Z| < 2^24)
    return tl.minimum(tl.maximum(q, LO), HI)


# ---------------------------------------------------------------- configs

def _block_size() -> int:
    return 1024 if interpreting() else 2048


# ---------------------------------------------------------------- kernel

@triton.jit
def _quantize_act_kernel(
    x_ptr, q_ptr,
    numel,
    scale, zero_point,
    QMAX: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    q = quantize_codes(x, scale, zero_point, 0.0, QMAX)
    tl.store(q_ptr + offs, q.to(tl.uint8), mask=mask)


# ---------------------------------------------------------------- launcher

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
    qmax = act_qmax(bits)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"quantize_act: activation must be float16/bfloat16/float32, got {x.dtype}")
    if not (scale > 0 and scale < float("inf")):
        raise ValueError(f"quantize_act: scale must be a positive finite number, got {scale}")
    if not 0 <= zero_point <= qmax:
        raise ValueError(f"quantize_act: zero point {zero_point} outside the {bits}-bit code range [0, {qmax}]")
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"quantize_act: the Triton kernel needs a CUDA tensor or TRITON_INTERPRET=1, "
                           f"got a {x.device.type} tensor")
    out = torch.empty_like(x, dtype=torch.uint8)
    if x.numel() == 0:
        return out
    # Same strides for input and output and no gaps: walk the storage linearly.
    src, dst = (x, out) if _dense_strides(x) and out.stride() == x.stride() else (x.contiguous(), None)
    flat = dst if dst is not None else torch.empty(src.shape, dtype=torch.uint8, device=x.device)
    block = _block_size()
    grid = (triton.cdiv(x.numel(), block),)
    _quantize_act_kernel[grid](src, flat, x.numel(), float(scale), int(zero_point),
                               QMAX=qmax, BLOCK=block, **launch_options())
    if dst is None:
        out.copy_(flat)
    return out
