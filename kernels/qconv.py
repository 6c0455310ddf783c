"""Quantized 2-D convolution as implicit GEMM over NHWC activations.

``y = dequant(conv(q(x), W_q)) + bias [+ bias_correction]`` with the contraction over
``k = (kh, kw, c)``; zero padding pads with the code of real zero ``Z`` (METHODS §1).
Variants (int8/int4 weights, A8/A4, the two-part split-concat input) are switches of one
kernel. The input may have any strides (channels-last is the fast layout); the output is
``[B, N, OH, OW]`` in channels-last memory format, in the activation dtype. Epilogue as in
:mod:`.qgemm`.

Kernel design (``_qconv2d_kernel``): one program computes a ``[BLOCK_M, BLOCK_N]`` tile of
the ``[M = B·OH·OW, N]`` output. The per-row geometry (batch, top-left input pixel, its
offset) is computed once per tile. K is walked as ``(kh, kw)`` outer × channel blocks
inner, so each activation load is ``BLOCK_K`` consecutive channels of one pixel
(contiguous in NHWC) and each weight load is ``BLOCK_K`` consecutive codes of the
``(kh, kw, c)``-ordered row. The two levels are one flattened loop (``it → (kh, kw, c0)``
by scalar arithmetic) so Triton software-pipelines across the ``(kh, kw)`` boundaries
instead of draining its pipeline ``KH·KW`` times per tile; the padding mask is a
``[BLOCK_M]`` row vector, recomputed from the hoisted geometry with four compares per
step, never per element. Out-of-image pixels load as real zero, which quantizes to ``Z``:
padding with the code of zero, exactly as the reference pads the codes.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .autotune import AUTOTUNE_PRUNE, launch_options, matmul_configs
from .layout import QPart, unpack_weight
from .qgemm import (MAX_K, _epilogue, _unwrapped, act_codes, act_codes_reference, add_bias, add_bias_terms,
                    check_device, check_span,
                    dequant_part, grouped_tile, weight_tile)
from .quantize import act_quant_constants


def conv_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


# ---------------------------------------------------------------- kernel

@triton.jit
def _conv_part(acc, x_ptr, w_ptr, offs_b, ih0, iw0, offs_n, H, W, C,
               stride_xb, stride_xc, stride_xh, stride_xw, stride_wn,
               act_scale, inv_scale, x_lo, x_hi, zero_point,
               KH: tl.constexpr, KW: tl.constexpr, ACT_BITS: tl.constexpr, W_BITS: tl.constexpr,
               INPUT_CODES: tl.constexpr, EVEN_C: tl.constexpr, PAIRED: tl.constexpr, BLOCK_K: tl.constexpr):
    """Implicit-GEMM K loop of one input part: ``acc += (q(x) − 2^(b−1)) ⊛ W_q`` (int32)."""
    offs_c = tl.arange(0, BLOCK_K)
    pix = offs_b * stride_xb + ih0 * stride_xh + iw0 * stride_xw     # [BLOCK_M] top-left tap offsets
    chan = offs_c[None, :] * stride_xc                                 # [1, BLOCK_K]
    w_rows = w_ptr + offs_n[:, None] * stride_wn
    n_cblk = tl.cdiv(C, BLOCK_K)
    for it in range(0, KH * KW * n_cblk):
        r = it // n_cblk                     # tap index kh·KW + kw
        c0 = (it - r * n_cblk) * BLOCK_K     # first channel of the block
        kh = r // KW
        kw = r - kh * KW
        ih = ih0 + kh
        iw = iw0 + kw
        row_ok = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        ptrs = x_ptr + (pix + (kh * stride_xh + kw * stride_xw))[:, None] + (c0 * stride_xc + chan)
        if EVEN_C:
            mask = row_ok[:, None]
        else:
            mask = row_ok[:, None] & (c0 + offs_c < C)[None, :]
        a = act_codes(ptrs, mask, act_scale, inv_scale, x_lo, x_hi, zero_point, ACT_BITS, INPUT_CODES, True)
        w = weight_tile(w_rows, r * C, c0, C, W_BITS, PAIRED, not EVEN_C, BLOCK_K)
        acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)   # explicit: Triton < 3.8 asserts otherwise
    return acc


def _heuristics():
    return {
        "EVEN_C1": lambda a: a["C1"] % a["BLOCK_K"] == 0,
        "EVEN_C2": lambda a: a["C2"] % a["BLOCK_K"] == 0,
        # int4 tiles are whole bytes when every tap's segment starts at an even code
        "PAIRED1": lambda a: a["C1"] % 2 == 0,
        "PAIRED2": lambda a: a["C2"] % 2 == 0,
    }


@triton.autotune(configs=matmul_configs(), key=["M", "N", "C1", "C2", "KH", "KW", "ACT_BITS1", "ACT_BITS2", "W_BITS",
                                                  "SPLIT", "INPUT_CODES"],
                 prune_configs_by=AUTOTUNE_PRUNE)
@triton.heuristics(_heuristics())
@triton.jit
def _qconv2d_kernel(
    # pointers
    x1_ptr, w1_ptr, rowsum1_ptr, w_scale1_ptr,
    x2_ptr, w2_ptr, rowsum2_ptr, w_scale2_ptr,
    bias_ptr, bias_correction_ptr, y_ptr,
    # sizes
    M, N, C1, C2, H, W, OH, OW,
    # strides (activations [B, C, H, W] and output [B, N, OH, OW] in element units)
    stride_x1b, stride_x1c, stride_x1h, stride_x1w,
    stride_x2b, stride_x2c, stride_x2h, stride_x2w,
    stride_w1n, stride_w2n,
    stride_yb, stride_yn, stride_yh, stride_yw,
    # geometry
    stride_h, stride_w, pad_h, pad_w,
    # per-part activation quantizers: Δ, RN(1/Δ), x clamp range, Z
    act_scale1, inv_scale1, x_lo1, x_hi1, zero_point1,
    act_scale2, inv_scale2, x_lo2, x_hi2, zero_point2,
    # meta-parameters
    KH: tl.constexpr, KW: tl.constexpr,
    ACT_BITS1: tl.constexpr, ACT_BITS2: tl.constexpr, W_BITS: tl.constexpr, SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BC: tl.constexpr, INPUT_CODES: tl.constexpr,
    EVEN_C1: tl.constexpr, EVEN_C2: tl.constexpr, PAIRED1: tl.constexpr, PAIRED2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # -- program id → tile (grouped ordering)
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = rm % M          # wrapped: loads stay in bounds, only the store is masked
    offs_n = rn % N

    # -- per-row output pixel → batch and top-left input pixel (hoisted out of the K loop)
    ohw = OH * OW
    offs_b = offs_m // ohw
    rem = offs_m - offs_b * ohw
    oh = rem // OW
    ow = rem - oh * OW
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w

    # -- K loops into int32 accumulators, epilogue per part while still in registers
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc = _conv_part(acc, x1_ptr, w1_ptr, offs_b, ih0, iw0, offs_n, H, W, C1,
                     stride_x1b, stride_x1c, stride_x1h, stride_x1w, stride_w1n,
                     act_scale1, inv_scale1, x_lo1, x_hi1, zero_point1,
                     KH, KW, ACT_BITS1, W_BITS, INPUT_CODES, EVEN_C1, PAIRED1, BLOCK_K)
    y = dequant_part(acc, rowsum1_ptr, w_scale1_ptr, offs_n, act_scale1, zero_point1, ACT_BITS1)
    if SPLIT:
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        acc2 = _conv_part(acc2, x2_ptr, w2_ptr, offs_b, ih0, iw0, offs_n, H, W, C2,
                          stride_x2b, stride_x2c, stride_x2h, stride_x2w, stride_w2n,
                          act_scale2, inv_scale2, x_lo2, x_hi2, zero_point2,
                          KH, KW, ACT_BITS2, W_BITS, INPUT_CODES, EVEN_C2, PAIRED2, BLOCK_K)
        y = y + dequant_part(acc2, rowsum2_ptr, w_scale2_ptr, offs_n, act_scale2, zero_point2, ACT_BITS2)
    y = add_bias_terms(y, bias_ptr, bias_correction_ptr, offs_n, HAS_BIAS, HAS_BC)

    # -- masked store through the output strides (channels-last: row-major [M, N])
    out_rows = offs_b * stride_yb + oh * stride_yh + ow * stride_yw
    y_ptrs = y_ptr + out_rows[:, None] + rn[None, :] * stride_yn
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


# ---------------------------------------------------------------- launcher

def launch_qconv2d(parts: Sequence[QPart], weight_bits: int, kernel_size: Sequence[int], stride: Sequence[int],
                   padding: Sequence[int], bias: torch.Tensor | None, bias_correction: torch.Tensor | None,
                   input_codes: bool = False, out_dtype: torch.dtype | None = None,
                   memory_format: torch.memory_format = torch.channels_last, kernel_wrapper=None) -> torch.Tensor:
    """Launch the conv kernel.

    ``input_codes``: ``parts[i].x`` already holds uint8 codes (benchmark/test path; output
    dtype ``out_dtype``, default float16). ``memory_format``: layout of the output, which
    the kernel writes through its strides (channels-last by default, the fast layout).
    """
    op = "qconv2d_split" if len(parts) == 2 else "qconv2d"
    check_device(op, [t for p in parts for t in (p.x, p.w, p.w_rowsum, p.w_scale)]
                 + [t for t in (bias, bias_correction) if t is not None])
    if input_codes and any(p.x.dtype != torch.uint8 for p in parts):
        raise TypeError(f"{op}: input_codes=True needs uint8 activation codes")
    out_dtype = (out_dtype or torch.float16) if input_codes else parts[0].x.dtype
    kh, kw = (int(v) for v in kernel_size)
    sh, sw = (int(v) for v in stride)
    ph, pw = (int(v) for v in padding)
    x1 = parts[0].x
    b, _, h, w = x1.shape
    oh, ow = conv_out_size(h, kh, sh, ph), conv_out_size(w, kw, sw, pw)
    n = parts[0].w.shape[0]
    ws = [p.w.contiguous() for p in parts]
    for i, p in enumerate(parts):
        if kh * kw * p.x.shape[1] > MAX_K:
            raise ValueError(f"{op}: part {i} has K={kh * kw * p.x.shape[1]} > {MAX_K}: "
                             "the int32 accumulator could overflow")
        check_span(op, f"part {i} activation", p.x)
    y = torch.empty((b, n, oh, ow), dtype=out_dtype, device=x1.device, memory_format=memory_format)
    check_span(op, "output", y)
    m = b * oh * ow
    if m == 0 or n == 0:
        return y
    p1, p2 = parts[0], parts[-1]
    split = len(parts) == 2
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    (kernel_wrapper or _unwrapped)(_qconv2d_kernel)[grid](
        p1.x, ws[0], p1.w_rowsum, p1.w_scale,
        p2.x, ws[-1], p2.w_rowsum, p2.w_scale,
        bias if bias is not None else p1.w_scale, bias_correction if bias_correction is not None else p1.w_scale, y,
        m, n, p1.x.shape[1], p2.x.shape[1] if split else 0, h, w, oh, ow,
        *p1.x.stride(), *p2.x.stride(),
        ws[0].stride(0), ws[-1].stride(0),
        *y.stride(),
        sh, sw, ph, pw,
        *act_quant_constants(op, p1.act_scale, p1.act_zero_point, p1.act_bits), int(p1.act_zero_point),
        *act_quant_constants(op, p2.act_scale, p2.act_zero_point, p2.act_bits), int(p2.act_zero_point),
        KH=kh, KW=kw, ACT_BITS1=int(p1.act_bits), ACT_BITS2=int(p2.act_bits), W_BITS=int(weight_bits), SPLIT=split,
        HAS_BIAS=bias is not None, HAS_BC=bias_correction is not None, INPUT_CODES=bool(input_codes),
        **launch_options(),
    )
    return y


def qconv2d_triton(parts: Sequence[QPart], weight_bits: int, kernel_size: Sequence[int], stride: Sequence[int],
                   padding: Sequence[int], bias: torch.Tensor | None,
                   bias_correction: torch.Tensor | None,
                   memory_format: torch.memory_format = torch.channels_last) -> torch.Tensor:
    """Triton quantized conv (inputs validated by :func:`.ops.run_qconv2d`), output in ``memory_format``."""
    return launch_qconv2d(parts, weight_bits, kernel_size, stride, padding, bias, bias_correction,
                          memory_format=memory_format)


# ---------------------------------------------------------------- reference

def qconv2d_reference(parts: Sequence[QPart], weight_bits: int, kernel_size: Sequence[int], stride: Sequence[int],
                      padding: Sequence[int], bias: torch.Tensor | None = None,
                      bias_correction: torch.Tensor | None = None,
                      memory_format: torch.memory_format = torch.channels_last,
                      out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pure-torch definition of the quantized conv (exact integer contraction in float64)."""
    kh, kw = kernel_size
    ph, pw = padding
    out = None
    for p in parts:
        c = p.x.shape[1]
        n = p.w.shape[0]
        q = act_codes_reference(p).to(torch.float64)
        q = F.pad(q, (pw, pw, ph, ph), value=float(p.act_zero_point))
        wq = unpack_weight(p.w, kh * kw * c, weight_bits).reshape(n, kh, kw, c).permute(0, 3, 1, 2)
        acc = F.conv2d(q, wq.to(torch.float64), stride=tuple(stride))
        centered = acc - p.act_zero_point * p.w_rowsum.to(torch.float64).view(1, -1, 1, 1)
        out = _epilogue(out, centered, p, (1, -1, 1, 1))
    out = add_bias(out, bias, bias_correction, (1, -1, 1, 1))
    return out.to(out_dtype or parts[0].x.dtype).contiguous(memory_format=memory_format)
