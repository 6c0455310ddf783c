"""Quantized GEMM (linear layers): ``y = dequant(q(x) · W_qᵀ) + bias [+ bias_correction]``.

One op family: W8A8, W4A8, W4A4 and the two-part split-concat input are variants of one
kernel. The activation is quantized on load (float in, codes never written to memory),
int32 accumulation, fp32 epilogue with zero-point folding (see :mod:`.layout`).

Epilogue order (the reference below defines it; kernels follow it):
``c_p = float32(acc_p − Z_p·rowsum_p) · float32(Δ_p · s_p[n])``, ``y = c_1 [+ c_2] + bias + bias_correction``
in fp32, then cast to the activation dtype.

Kernel design (``_qgemm_kernel``):

* grouped program ordering (``GROUP_M`` row-tiles share the weight tiles in L2);
* per K step: load a float ``[BLOCK_M, BLOCK_K]`` tile of ``x`` through its strides,
  quantize it in registers (:func:`.quantize.quantize_codes`, bit-exact with the reference
  quantizer) to *signed* int8 ``q − 2^(b−1)`` (tensor cores take signed int8; the shift is
  folded into the zero point, ``acc' − (Z − 2^(b−1))·rowsum = acc − Z·rowsum`` exactly);
  load the int8 weight tile, or the packed int4 bytes and unpack them with shifts in
  registers (layout of :mod:`.int4`); ``tl.dot`` int8 × int8 → int32;
* ``SPLIT``: a second K loop over the second part (own activation quantizer, own weight
  slice, own accumulator): the concatenation is never built;
* fp32 epilogue in registers in the reference order above, cast, masked store.

``INPUT_CODES`` (benchmarks and tests only): the activation tensors already hold the uint8
codes; the kernel skips the quantization. It measures what fusing the quantizer costs.

The device functions :func:`act_codes`, :func:`weight_tile` and :func:`dequant_part` are
shared with the implicit-GEMM conv (:mod:`.qconv`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .autotune import AUTOTUNE_PRUNE, interpreting, launch_options, matmul_configs
from .layout import QPart, unpack_weight
from .quantize import act_quant_constants, quantize_codes
from .quantizers import quantize_act

# Largest K per part for which no int32 intermediate can overflow: with shifted codes
# |q − 2^(b−1)| ≤ 128 and |w| ≤ 128, |acc'| ≤ 2^14·K and |(Z − 2^(b−1))·rowsum| ≤ 2^14·K,
# so |acc' − Z'·rowsum| ≤ 2^15·K < 2^31.
MAX_K = (1 << 16) - 1


# ---------------------------------------------------------------- shared device functions

@triton.jit
def act_codes(ptrs, mask, scale, inv_scale, x_lo, x_hi, zero_point, ACT_BITS: tl.constexpr,
              INPUT_CODES: tl.constexpr, MASKED: tl.constexpr):
    """Load an activation tile and return its signed int8 codes ``q − 2^(b−1)``.

    Masked-off elements read as real zero (float input) or as the code ``Z`` (code input),
    i.e. they become the code of zero: what conv padding needs; for K tails the matching
    weights are zero anyway.
    """
    SHIFT: tl.constexpr = 1 << (ACT_BITS - 1)
    if INPUT_CODES:
        if MASKED:
            q = tl.load(ptrs, mask=mask, other=zero_point)
        else:
            q = tl.load(ptrs)
        return (q.to(tl.int32) - SHIFT).to(tl.int8)
    if MASKED:
        x = tl.load(ptrs, mask=mask, other=0.0)
    else:
        x = tl.load(ptrs)
    q = quantize_codes(x, scale, inv_scale, x_lo, x_hi, zero_point - SHIFT - 0x4B400000)
    return q.to(tl.int8)


@triton.jit
def weight_tile(w_rows, k_base, c0, c_lim, W_BITS: tl.constexpr, PAIRED: tl.constexpr, MASKED: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Signed int8 weight codes ``[BLOCK_N, BLOCK_K]`` for code indices ``k_base + c0 + j``.

    ``w_rows``: ``[BLOCK_N, 1]`` pointers to the weight rows. Codes with ``c0 + j ≥ c_lim``
    read as 0 (when ``MASKED``). 4-bit weights: ``PAIRED`` when ``k_base + c0`` is even, so
    a tile is whole bytes (low nibble = even index), unpacked with two shifts and
    interleaved in registers; otherwise each code picks its nibble from byte ``k >> 1``.
    """
    if W_BITS == 8:
        offs = c0 + tl.arange(0, BLOCK_K)
        ptrs = w_rows + (k_base + offs)[None, :]
        if MASKED:
            w = tl.load(ptrs, mask=(offs < c_lim)[None, :], other=0)
        else:
            w = tl.load(ptrs)
        return w
    elif PAIRED:
        j = tl.arange(0, BLOCK_K // 2)
        ptrs = w_rows + ((k_base + c0) // 2 + j)[None, :]
        if MASKED:
            b = tl.load(ptrs, mask=(c0 + 2 * j < c_lim)[None, :], other=0)
        else:
            b = tl.load(ptrs)
        v = b.to(tl.int8, bitcast=True).to(tl.int32)   # sign-extended byte
        lo = ((v << 28) >> 28).to(tl.int8)              # even index: low nibble
        hi = (v >> 4).to(tl.int8)                       # odd index: high nibble
        return tl.reshape(tl.join(lo, hi), (lo.shape[0], BLOCK_K))   # [n, j, 2] → [n, 2j + {0, 1}]
    else:
        offs = c0 + tl.arange(0, BLOCK_K)
        k = k_base + offs
        ptrs = w_rows + (k >> 1)[None, :]
        if MASKED:
            b = tl.load(ptrs, mask=(offs < c_lim)[None, :], other=0)
        else:
            b = tl.load(ptrs)
        v = b.to(tl.int8, bitcast=True).to(tl.int32)
        w = (v << (28 - 4 * (k & 1))[None, :]) >> 28
        return w.to(tl.int8)


@triton.jit
def dequant_part(acc, rowsum_ptr, w_scale_ptr, offs_n, act_scale, zero_point, ACT_BITS: tl.constexpr):
    """``float32(acc − Z·rowsum) · float32(Δ·s[n])`` for shifted-code accumulators."""
    SHIFT: tl.constexpr = 1 << (ACT_BITS - 1)
    rowsum = tl.load(rowsum_ptr + offs_n)
    w_scale = tl.load(w_scale_ptr + offs_n)
    centered = (acc - (zero_point - SHIFT) * rowsum[None, :]).to(tl.float32)
    return centered * (act_scale * w_scale)[None, :]


@triton.jit
def add_bias_terms(y, bias_ptr, bias_correction_ptr, offs_n, HAS_BIAS: tl.constexpr, HAS_BC: tl.constexpr):
    """``y + bias [+ bias_correction]`` in fp32, in the reference order."""
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
    if HAS_BC:
        y = y + tl.load(bias_correction_ptr + offs_n).to(tl.float32)[None, :]
    return y


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id → (tile row, tile column) in grouped order (Triton matmul tutorial)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


# ---------------------------------------------------------------- kernel

@triton.jit
def _gemm_part(acc, x_ptr, w_ptr, offs_m, offs_n, K, stride_xm, stride_xk, stride_wn,
               act_scale, inv_scale, x_lo, x_hi, zero_point,
               ACT_BITS: tl.constexpr, W_BITS: tl.constexpr, INPUT_CODES: tl.constexpr, EVEN_K: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """K loop of one input part: ``acc += (q(x) − 2^(b−1)) · W_qᵀ`` (int32)."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_rows = w_ptr + offs_n[:, None] * stride_wn
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k < K)[None, :]
        a = act_codes(x_ptrs, k_ok, act_scale, inv_scale, x_lo, x_hi, zero_point, ACT_BITS, INPUT_CODES, not EVEN_K)
        w = weight_tile(w_rows, 0, k0, K, W_BITS, True, not EVEN_K, BLOCK_K)
        acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)   # explicit: Triton < 3.8 asserts otherwise
        x_ptrs += BLOCK_K * stride_xk
    return acc


def _heuristics():
    return {
        "EVEN_K1": lambda a: a["K1"] % a["BLOCK_K"] == 0,
        "EVEN_K2": lambda a: a["K2"] % a["BLOCK_K"] == 0,
    }


@triton.autotune(configs=matmul_configs(), key=["M", "N", "K1", "K2", "ACT_BITS1", "ACT_BITS2", "W_BITS", "SPLIT",
                                                  "INPUT_CODES"],
                 prune_configs_by=AUTOTUNE_PRUNE)
@triton.heuristics(_heuristics())
@triton.jit
def _qgemm_kernel(
    # pointers
    x1_ptr, w1_ptr, rowsum1_ptr, w_scale1_ptr,
    x2_ptr, w2_ptr, rowsum2_ptr, w_scale2_ptr,
    bias_ptr, bias_correction_ptr, y_ptr,
    # sizes
    M, N, K1, K2,
    # strides
    stride_x1m, stride_x1k, stride_x2m, stride_x2k, stride_w1n, stride_w2n, stride_ym, stride_yn,
    # per-part activation quantizers: Δ, RN(1/Δ), x clamp range, Z
    act_scale1, inv_scale1, x_lo1, x_hi1, zero_point1,
    act_scale2, inv_scale2, x_lo2, x_hi2, zero_point2,
    # meta-parameters
    ACT_BITS1: tl.constexpr, ACT_BITS2: tl.constexpr, W_BITS: tl.constexpr, SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BC: tl.constexpr, INPUT_CODES: tl.constexpr,
    EVEN_K1: tl.constexpr, EVEN_K2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # -- program id → tile (grouped ordering)
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # wrapped indices: every load is in bounds along M/N, only the store is masked
    offs_m = rm % M
    offs_n = rn % N

    # -- K loops into int32 accumulators, epilogue per part while still in registers
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc = _gemm_part(acc, x1_ptr, w1_ptr, offs_m, offs_n, K1, stride_x1m, stride_x1k, stride_w1n,
                     act_scale1, inv_scale1, x_lo1, x_hi1, zero_point1, ACT_BITS1, W_BITS, INPUT_CODES, EVEN_K1,
                     BLOCK_K)
    y = dequant_part(acc, rowsum1_ptr, w_scale1_ptr, offs_n, act_scale1, zero_point1, ACT_BITS1)
    if SPLIT:
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        acc2 = _gemm_part(acc2, x2_ptr, w2_ptr, offs_m, offs_n, K2, stride_x2m, stride_x2k, stride_w2n,
                          act_scale2, inv_scale2, x_lo2, x_hi2, zero_point2, ACT_BITS2, W_BITS, INPUT_CODES,
                          EVEN_K2, BLOCK_K)
        y = y + dequant_part(acc2, rowsum2_ptr, w_scale2_ptr, offs_n, act_scale2, zero_point2, ACT_BITS2)
    y = add_bias_terms(y, bias_ptr, bias_correction_ptr, offs_n, HAS_BIAS, HAS_BC)

    # -- masked store in the activation dtype
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


# ---------------------------------------------------------------- launcher

_INT32_SPAN = 1 << 31


def _unwrapped(kernel):
    return kernel


def check_device(op: str, tensors: Sequence[torch.Tensor]) -> None:
    """The Triton kernels run on CUDA tensors, or anywhere under the interpreter."""
    dev = tensors[0].device
    if dev.type != "cuda" and not interpreting():
        raise RuntimeError(f"{op}: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU "
                           f"interpreter), got {dev.type} tensors")
    for t in tensors:
        if t is not None and t.device != dev:
            raise ValueError(f"{op}: all tensors must be on {dev}, got one on {t.device}")


def check_span(op: str, name: str, t: torch.Tensor) -> None:
    """Kernels index with int32 offsets: the addressed span must stay below 2^31 elements."""
    span = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)
    if span >= _INT32_SPAN:
        raise ValueError(f"{op}: {name} spans {span} elements; the kernel's int32 offsets need < 2^31")


def launch_qgemm(parts: Sequence[QPart], weight_bits: int, bias: torch.Tensor | None,
                 bias_correction: torch.Tensor | None, input_codes: bool = False,
                 out_dtype: torch.dtype | None = None, kernel_wrapper=None) -> torch.Tensor:
    """Launch the GEMM kernel.

    ``input_codes``: ``parts[i].x`` already holds the uint8 codes of the activation
    (benchmark/test path); the output dtype is then ``out_dtype`` (default float16).
    ``kernel_wrapper``: applied to the jitted kernel before the launch — the ``qdiff`` ops pass
    ``torch.library.wrap_triton`` so that Inductor sees (and launches) the kernel itself. Host
    work here reads only shapes, strides and Python scalars, so it can be traced.
    """
    op = "qlinear_split" if len(parts) == 2 else "qlinear"
    check_device(op, [t for p in parts for t in (p.x, p.w, p.w_rowsum, p.w_scale)]
                 + [t for t in (bias, bias_correction) if t is not None])
    out_dtype = (out_dtype or torch.float16) if input_codes else parts[0].x.dtype
    if input_codes and any(p.x.dtype != torch.uint8 for p in parts):
        raise TypeError(f"{op}: input_codes=True needs uint8 activation codes")
    lead = parts[0].x.shape[:-1]
    xs = [p.x.reshape(-1, p.x.shape[-1]) for p in parts]   # a view whenever the strides allow
    ws = [p.w.contiguous() for p in parts]
    m, n = xs[0].shape[0], parts[0].w.shape[0]
    ks = [x.shape[1] for x in xs]
    for i, k in enumerate(ks):
        if k > MAX_K:
            raise ValueError(f"{op}: part {i} has K={k} > {MAX_K}: the int32 accumulator could overflow")
        check_span(op, f"part {i} activation", xs[i])
    y = torch.empty((m, n), dtype=out_dtype, device=xs[0].device)
    check_span(op, "output", y)
    if m == 0 or n == 0:
        return y.reshape(*lead, n)
    p1, p2 = parts[0], parts[-1]
    x2, w2 = xs[-1], ws[-1]
    split = len(parts) == 2
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    (kernel_wrapper or _unwrapped)(_qgemm_kernel)[grid](
        xs[0], ws[0], p1.w_rowsum, p1.w_scale,
        x2, w2, p2.w_rowsum, p2.w_scale,
        bias if bias is not None else p1.w_scale, bias_correction if bias_correction is not None else p1.w_scale, y,
        m, n, ks[0], ks[1] if split else 0,
        xs[0].stride(0), xs[0].stride(1), x2.stride(0), x2.stride(1), ws[0].stride(0), w2.stride(0),
        y.stride(0), y.stride(1),
        *act_quant_constants(op, p1.act_scale, p1.act_zero_point, p1.act_bits), int(p1.act_zero_point),
        *act_quant_constants(op, p2.act_scale, p2.act_zero_point, p2.act_bits), int(p2.act_zero_point),
        ACT_BITS1=int(p1.act_bits), ACT_BITS2=int(p2.act_bits), W_BITS=int(weight_bits), SPLIT=split,
        HAS_BIAS=bias is not None, HAS_BC=bias_correction is not None, INPUT_CODES=bool(input_codes),
        **launch_options(),
    )
    return y.reshape(*lead, n)


def qgemm_triton(parts: Sequence[QPart], weight_bits: int, bias: torch.Tensor | None,
                 bias_correction: torch.Tensor | None) -> torch.Tensor:
    """Triton quantized GEMM (inputs validated by :func:`.ops.run_qgemm`). ``x_p``: ``[..., K_p]`` → ``[..., N]``."""
    return launch_qgemm(parts, weight_bits, bias, bias_correction)


# ---------------------------------------------------------------- reference

def _epilogue(out: torch.Tensor | None, centered: torch.Tensor, p: QPart, view: tuple[int, ...]) -> torch.Tensor:
    scale = torch.tensor(p.act_scale, dtype=torch.float32, device=p.w_scale.device) * p.w_scale
    contrib = centered.to(torch.float32) * scale.view(view)
    return contrib if out is None else out + contrib


def add_bias(out: torch.Tensor, bias: torch.Tensor | None, bias_correction: torch.Tensor | None,
             view: tuple[int, ...]) -> torch.Tensor:
    if bias is not None:
        out = out + bias.to(torch.float32).view(view)
    if bias_correction is not None:
        out = out + bias_correction.to(torch.float32).view(view)
    return out


def act_codes_reference(p: QPart) -> torch.Tensor:
    """Unsigned activation codes of a part: quantized from a float ``x``, or ``x`` itself when it
    already holds codes (uint8 unsigned, or int8 signed ``q − 2^(b−1)`` written by a producer)."""
    if p.x.dtype == torch.int8:
        return (p.x.to(torch.int16) + (1 << (p.act_bits - 1))).to(torch.uint8)
    if p.x.dtype == torch.uint8:
        return p.x
    return quantize_act(p.x, p.act_scale, p.act_zero_point, p.act_bits)


def qgemm_reference(parts: Sequence[QPart], weight_bits: int, bias: torch.Tensor | None = None,
                    bias_correction: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pure-torch definition of the quantized GEMM. ``x_p``: ``[..., K_p]`` → ``[..., N]``.

    Integer products are exact (float64 holds every int32 accumulator exactly).
    """
    lead = parts[0].x.shape[:-1]
    out = None
    for p in parts:
        k = p.x.shape[-1]
        q = act_codes_reference(p).reshape(-1, k).to(torch.float64)
        wq = unpack_weight(p.w, k, weight_bits).to(torch.float64)
        acc = q @ wq.T
        centered = acc - p.act_zero_point * p.w_rowsum.to(torch.float64)
        out = _epilogue(out, centered, p, (1, -1))
    out = add_bias(out, bias, bias_correction, (1, -1))
    return out.to(out_dtype or parts[0].x.dtype).reshape(*lead, out.shape[-1])
