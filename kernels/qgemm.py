"""Quantized GEMM (linear layers): ``y = dequant(q(x) · W_qᵀ) + bias [+ bias_correction]``.

One op family: W8A8, W4A8, W4A4, the two-part split-concat input and split-K are variants
of one kernel. Two input paths, picked from the activation dtype:

* **int8 codes in** (the main path): the producer of the activation already wrote the
  *signed* codes ``q − 2^(b−1)`` (tensor cores take signed int8; the shift is folded into
  the zero point, ``acc' − (Z − 2^(b−1))·rowsum = acc − Z·rowsum`` exactly). The loaded tile
  goes to ``tl.dot`` untouched, so both operands reach shared memory by cp.async and the
  wgmma reads them there (71 SASS instructions per thread per K step at 128×128×64, 8 warps);
* **float in** (eager API): the float tile is quantized on load in registers
  (:func:`.quantize.quantize_codes`, bit-exact with the reference quantizer).

Epilogue order (the reference below defines it; kernels follow it):
``c_p = float32(acc_p − Z_p·rowsum_p) · float32(Δ_p · s_p[n])``, ``y = c_1 [+ c_2] + bias + bias_correction``
in fp32, then cast to the output dtype.

Kernel design (``_qgemm_kernel``):

* grouped program ordering (``GROUP_M`` row-tiles share the weight tiles in L2); operand rows
  clamped (a min, not an integer modulo), only the store masked;
* per K step: the activation tile (codes, or quantized on load), the int8 weight tile or the
  packed int4 bytes unpacked with shifts in registers (layout of :mod:`.int4`); ``tl.dot``
  int8 × int8 → int32. Triton 3.6–3.9 wait for every int32-accumulator wgmma before the next
  step (``wgmma.wait_group 0``: their software pipeliner only keeps fp32-accumulator MMAs in
  flight); two CTAs per SM hide most of that where the registers allow;
* ``SPLIT``: a second K loop over the second part (own activation quantizer, own weight
  slice, own accumulator): the concatenation is never built;
* ``SPLIT_K``: program ``(tile, s)`` walks the ``s``-th share of K and stores its int32
  partial sums; :func:`_splitk_epilogue_kernel` adds them (exact) and runs the epilogue —
  for shapes whose tiles cannot fill the SMs (:func:`.autotune.split_k_for`);
* fp32 epilogue in registers in the reference order above (per-column vectors loaded once
  per tile, masked), cast, masked store.

The device functions :func:`act_codes`, :func:`weight_tile`, :func:`dequant_part`,
:func:`split_range` and :func:`store_partial` are shared with the implicit-GEMM conv (:mod:`.qconv`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .autotune import AUTOTUNE_PRUNE, MAX_SPLIT_K, interpreting, launch_options, matmul_configs, split_k_for
from .layout import QPart, part_codes, unpack_weight
from .quantize import act_quant_constants, quantize_codes

# Largest K per part for which no int32 intermediate can overflow: with shifted codes
# |q − 2^(b−1)| ≤ 128 and |w| ≤ 128, |acc'| ≤ 2^14·K and |(Z − 2^(b−1))·rowsum| ≤ 2^14·K,
# so |acc' − Z'·rowsum| ≤ 2^15·K < 2^31.
MAX_K = (1 << 16) - 1


# ---------------------------------------------------------------- shared device functions

@triton.jit
def act_codes(ptrs, mask, scale, inv_scale, x_lo, x_hi, zero_point, pad_code, ACT_BITS: tl.constexpr,
              CODES_IN: tl.constexpr, MASKED: tl.constexpr):
    """Load an activation tile and return its signed int8 codes ``q − 2^(b−1)``.

    ``CODES_IN``: the tensor already holds the signed codes; the loaded tile is returned
    untouched, so Triton copies it to shared memory asynchronously and the MMA reads it
    there (no register pass, the MMA stays in flight across K steps). Masked-off elements
    read as ``pad_code``. Float input: masked-off elements read as real zero, which
    quantizes to the code of zero.
    """
    SHIFT: tl.constexpr = 1 << (ACT_BITS - 1)
    if CODES_IN:
        if MASKED:
            return tl.load(ptrs, mask=mask, other=pad_code)
        return tl.load(ptrs)
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
def dequant_part(acc, rowsum_ptr, w_scale_ptr, rn, N, act_scale, zero_point, ACT_BITS: tl.constexpr):
    """``float32(acc − Z·rowsum) · float32(Δ·s[n])`` for shifted-code accumulators.

    Per-column vectors are loaded once per tile (masked, contiguous: vector loads)."""
    SHIFT: tl.constexpr = 1 << (ACT_BITS - 1)
    n_ok = rn < N
    rowsum = tl.load(rowsum_ptr + rn, mask=n_ok, other=0)
    w_scale = tl.load(w_scale_ptr + rn, mask=n_ok, other=0.0)
    centered = (acc - (zero_point - SHIFT) * rowsum[None, :]).to(tl.float32)
    return centered * (act_scale * w_scale)[None, :]


@triton.jit
def add_bias_terms(y, bias_ptr, bias_correction_ptr, rn, N, HAS_BIAS: tl.constexpr, HAS_BC: tl.constexpr):
    """``y + bias [+ bias_correction]`` in fp32, in the reference order."""
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BC:
        y = y + tl.load(bias_correction_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
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
def split_range(n_steps, SPLIT_K: tl.constexpr):
    """``[lo, hi)`` of the K steps program ``program_id(1)`` owns when K is split ``SPLIT_K`` ways."""
    if SPLIT_K == 1:
        return 0, n_steps
    per = tl.cdiv(n_steps, SPLIT_K)
    lo = tl.program_id(1) * per
    return lo, tl.minimum(lo + per, n_steps)


@triton.jit
def store_partial(partial_ptr, acc, rm, rn, M, N):
    """Split-K: this program's int32 partial sums into slice ``program_id(1)`` of ``[SPLIT_K, M, N]``."""
    ptrs = partial_ptr + tl.program_id(1) * M * N + rm[:, None] * N + rn[None, :]
    tl.store(ptrs, acc, mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _gemm_part(acc, x_ptr, w_ptr, offs_m, offs_n, K, stride_xm, stride_xk, stride_wn,
               act_scale, inv_scale, x_lo, x_hi, zero_point,
               ACT_BITS: tl.constexpr, W_BITS: tl.constexpr, CODES_IN: tl.constexpr, EVEN_K: tl.constexpr,
               BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """K loop of one input part: ``acc += (q(x) − 2^(b−1)) · W_qᵀ`` (int32), over this
    program's share of K (:func:`split_range`)."""
    step_lo, step_hi = split_range(tl.cdiv(K, BLOCK_K), SPLIT_K)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (step_lo * BLOCK_K + offs_k)[None, :] * stride_xk
    w_rows = w_ptr + offs_n[:, None] * stride_wn
    for k0 in range(step_lo * BLOCK_K, step_hi * BLOCK_K, BLOCK_K):
        k_ok = (k0 + offs_k < K)[None, :]
        a = act_codes(x_ptrs, k_ok, act_scale, inv_scale, x_lo, x_hi, zero_point, 0, ACT_BITS, CODES_IN, not EVEN_K)
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
                                                  "CODES_IN", "SPLIT_K"],
                 prune_configs_by=AUTOTUNE_PRUNE)
@triton.heuristics(_heuristics())
@triton.jit
def _qgemm_kernel(
    # pointers
    x1_ptr, w1_ptr, rowsum1_ptr, w_scale1_ptr,
    x2_ptr, w2_ptr, rowsum2_ptr, w_scale2_ptr,
    bias_ptr, bias_correction_ptr, y_ptr, partial_ptr,
    # sizes
    M, N, K1, K2,
    # strides
    stride_x1m, stride_x1k, stride_x2m, stride_x2k, stride_w1n, stride_w2n, stride_ym, stride_yn,
    # per-part activation quantizers: Δ, RN(1/Δ), x clamp range, Z
    act_scale1, inv_scale1, x_lo1, x_hi1, zero_point1,
    act_scale2, inv_scale2, x_lo2, x_hi2, zero_point2,
    # meta-parameters
    ACT_BITS1: tl.constexpr, ACT_BITS2: tl.constexpr, W_BITS: tl.constexpr, SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BC: tl.constexpr, CODES_IN: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_K1: tl.constexpr, EVEN_K2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # -- program id → tile (grouped ordering)
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # clamped indices: every operand load is in bounds along M/N, only the store is masked
    # (a min per row/column, not an integer modulo)
    offs_m = tl.minimum(rm, M - 1)
    offs_n = tl.minimum(rn, N - 1)

    # -- K loops into int32 accumulators, epilogue per part while still in registers
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc = _gemm_part(acc, x1_ptr, w1_ptr, offs_m, offs_n, K1, stride_x1m, stride_x1k, stride_w1n,
                     act_scale1, inv_scale1, x_lo1, x_hi1, zero_point1, ACT_BITS1, W_BITS, CODES_IN, EVEN_K1,
                     BLOCK_K, SPLIT_K)
    if SPLIT_K > 1:          # one input part only; the epilogue runs in _splitk_epilogue_kernel
        store_partial(partial_ptr, acc, rm, rn, M, N)
        return
    y = dequant_part(acc, rowsum1_ptr, w_scale1_ptr, rn, N, act_scale1, zero_point1, ACT_BITS1)
    if SPLIT:
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        acc2 = _gemm_part(acc2, x2_ptr, w2_ptr, offs_m, offs_n, K2, stride_x2m, stride_x2k, stride_w2n,
                          act_scale2, inv_scale2, x_lo2, x_hi2, zero_point2, ACT_BITS2, W_BITS, CODES_IN,
                          EVEN_K2, BLOCK_K, 1)
        y = y + dequant_part(acc2, rowsum2_ptr, w_scale2_ptr, rn, N, act_scale2, zero_point2, ACT_BITS2)
    y = add_bias_terms(y, bias_ptr, bias_correction_ptr, rn, N, HAS_BIAS, HAS_BC)

    # -- masked store in the activation dtype
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _splitk_epilogue_kernel(
    partial_ptr, rowsum_ptr, w_scale_ptr, bias_ptr, bias_correction_ptr, y_ptr,
    M, N, stride_ym, stride_yn, act_scale, zero_point,
    ACT_BITS: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Split-K: sum the int32 partials (exact) and run the one-part epilogue of ``_qgemm_kernel``."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    ptrs = partial_ptr + rm[:, None] * N + rn[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for i in range(SPLIT_K):
        acc += tl.load(ptrs + i * M * N, mask=mask, other=0)
    y = dequant_part(acc, rowsum_ptr, w_scale_ptr, rn, N, act_scale, zero_point, ACT_BITS)
    y = add_bias_terms(y, bias_ptr, bias_correction_ptr, rn, N, HAS_BIAS, HAS_BC)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, y.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- launcher

_INT32_SPAN = 1 << 31


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


def _identity(kernel):
    return kernel


def codes_in(op: str, parts: Sequence[QPart], out_dtype: torch.dtype | None) -> tuple[bool, torch.dtype]:
    """Which input path a launch takes, and its output dtype.

    ``x.dtype == torch.int8``: signed codes ``q − 2^(b−1)`` (producer-quantized), output in
    ``out_dtype`` (required: the dtype of the float activation the layer had). Otherwise a
    float activation quantized on load; the output has its dtype.
    """
    codes = parts[0].x.dtype == torch.int8
    if any((p.x.dtype == torch.int8) != codes for p in parts):
        raise TypeError(f"{op}: parts must all be int8 codes or all float, got {[str(p.x.dtype) for p in parts]}")
    if codes:
        if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{op}: int8 codes input needs out_dtype float16/bfloat16/float32 (the dtype of the "
                            f"float activation), got {out_dtype}")
        return True, out_dtype
    if not parts[0].x.is_floating_point():
        raise TypeError(f"{op}: activation must be float16/bfloat16/float32 or int8 signed codes, "
                        f"got {parts[0].x.dtype}")
    if out_dtype is not None and out_dtype != parts[0].x.dtype:
        raise TypeError(f"{op}: float input {parts[0].x.dtype} gives an output of that dtype, got out_dtype={out_dtype}")
    return False, parts[0].x.dtype


def weight_rows(op: str, parts: Sequence[QPart]) -> list[torch.Tensor]:
    """Prepared weights as passed to the kernels (rows with unit stride along K)."""
    for i, p in enumerate(parts):
        if p.w.dim() != 2 or (p.w.shape[1] > 1 and p.w.stride(1) != 1):
            raise ValueError(f"{op}: part {i} prepared weight must be 2-D with unit stride along K, "
                             f"got shape {list(p.w.shape)} strides {list(p.w.stride())}")
    return [p.w for p in parts]


def check_split_k(op: str, split_k: int, n_parts: int) -> int:
    split_k = int(split_k)
    if not 1 <= split_k <= MAX_SPLIT_K or (n_parts == 2 and split_k != 1):
        raise ValueError(f"{op}: split_k must be in [1, {MAX_SPLIT_K}] (1 for a split-concat input), got {split_k}")
    return split_k


def splitk_epilogue(wrap, partial: torch.Tensor, p: QPart, bias, bias_correction, y: torch.Tensor, m: int, n: int,
                    stride_ym: int, stride_yn: int) -> None:
    """Second launch of a split-K GEMM/conv: reduce ``partial`` ``[S, M, N]`` and store ``y``."""
    block_m, block_n = (32, 32) if interpreting() else (64, 128)
    wrap(_splitk_epilogue_kernel)[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        partial, p.w_rowsum, p.w_scale,
        bias if bias is not None else p.w_scale, bias_correction if bias_correction is not None else p.w_scale, y,
        m, n, stride_ym, stride_yn, act_quant_constants("split-K epilogue", p.act_scale, p.act_zero_point,
                                                        p.act_bits)[0], int(p.act_zero_point),
        ACT_BITS=int(p.act_bits), SPLIT_K=partial.shape[0], HAS_BIAS=bias is not None,
        HAS_BC=bias_correction is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
        **launch_options())


def launch_qgemm(parts: Sequence[QPart], weight_bits: int, bias: torch.Tensor | None,
                 bias_correction: torch.Tensor | None, out_dtype: torch.dtype | None = None,
                 kernel_wrapper=None, split_k: int | None = None) -> torch.Tensor:
    """Launch the GEMM kernel.

    ``parts[i].x``: float activations (quantized on load) or int8 signed codes
    ``q − 2^(b−1)`` (then ``out_dtype`` is required, see :func:`codes_in`).
    ``kernel_wrapper``: applied to the kernel before the launch (``torch.library.wrap_triton``
    when the launcher runs inside a ``triton_op``). ``split_k``: K pieces (default
    :func:`.autotune.split_k_for`, a function of the shape; > 1 only for one input part): the
    pieces' int32 partial sums go to a ``torch.empty`` workspace and a second kernel reduces
    them (exact) and runs the epilogue. Host work: shape/stride arithmetic on Python scalars,
    ``torch.empty``; no tensor value is read.
    """
    op = "qlinear_split" if len(parts) == 2 else "qlinear"
    check_device(op, [t for p in parts for t in (p.x, p.w, p.w_rowsum, p.w_scale)]
                 + [t for t in (bias, bias_correction) if t is not None])
    codes, out_dtype = codes_in(op, parts, out_dtype)
    lead = parts[0].x.shape[:-1]
    xs = [p.x.reshape(-1, p.x.shape[-1]) for p in parts]   # a view whenever the strides allow
    ws = weight_rows(op, parts)
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
    split_k = check_split_k(op, split_k_for(m, n, ks[0]) if split_k is None and not split else (split_k or 1),
                            len(parts))
    partial = torch.empty((split_k, m, n), dtype=torch.int32, device=y.device) if split_k > 1 else p1.w_rowsum
    wrap = kernel_wrapper or _identity
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split_k)  # noqa: E731
    wrap(_qgemm_kernel)[grid](
        xs[0], ws[0], p1.w_rowsum, p1.w_scale,
        x2, w2, p2.w_rowsum, p2.w_scale,
        bias if bias is not None else p1.w_scale, bias_correction if bias_correction is not None else p1.w_scale, y,
        partial,
        m, n, ks[0], ks[1] if split else 0,
        xs[0].stride(0), xs[0].stride(1), x2.stride(0), x2.stride(1), ws[0].stride(0), w2.stride(0),
        y.stride(0), y.stride(1),
        *act_quant_constants(op, p1.act_scale, p1.act_zero_point, p1.act_bits), int(p1.act_zero_point),
        *act_quant_constants(op, p2.act_scale, p2.act_zero_point, p2.act_bits), int(p2.act_zero_point),
        ACT_BITS1=int(p1.act_bits), ACT_BITS2=int(p2.act_bits), W_BITS=int(weight_bits), SPLIT=split,
        HAS_BIAS=bias is not None, HAS_BC=bias_correction is not None, CODES_IN=codes, SPLIT_K=split_k,
        **launch_options(),
    )
    if split_k > 1:
        splitk_epilogue(wrap, partial, p1, bias, bias_correction, y, m, n, y.stride(0), y.stride(1))
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


def qgemm_reference(parts: Sequence[QPart], weight_bits: int, bias: torch.Tensor | None = None,
                    bias_correction: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pure-torch definition of the quantized GEMM. ``x_p``: ``[..., K_p]`` → ``[..., N]``.

    Integer products are exact (float64 holds every int32 accumulator exactly). Parts may
    hold int8 signed codes (then ``out_dtype`` gives the output dtype, see :func:`codes_in`).
    """
    _, out_dtype = codes_in("qgemm_reference", parts, out_dtype)
    lead = parts[0].x.shape[:-1]
    out = None
    for p in parts:
        k = p.x.shape[-1]
        q = part_codes(p).reshape(-1, k).to(torch.float64)
        wq = unpack_weight(p.w, k, weight_bits).to(torch.float64)
        acc = q @ wq.T
        centered = acc - p.act_zero_point * p.w_rowsum.to(torch.float64)
        out = _epilogue(out, centered, p, (1, -1))
    out = add_bias(out, bias, bias_correction, (1, -1))
    return out.to(out_dtype).reshape(*lead, out.shape[-1])
