"""Weight layouts the kernels consume, and the descriptor of one quantized input part.

A quantized GEMM/conv input may be a single tensor or the channel concatenation of two
tensors (shortcut-split, Q-Diffusion); each *part* has its own activation quantizer and its
own slice of the weight with its own per-output-channel scales. The output is the sum of
the parts' dequantized contributions (METHODS §1, zero-point folding)::

    y[m, n] = Σ_p Δ_p · s_p[n] · (acc_p[m, n] − Z_p · rowsum_p[n]) + bias[n] + bias_correction[n]

Prepared weight of one part: codes of shape ``[N, K]`` with ``K = KH·KW·C`` for a conv,
ordered ``(kh, kw, c)`` (NHWC implicit GEMM), int8 for 8-bit, or packed int4 (uint8
``[N, ceil(K/2)]``, see :mod:`.int4`) for 4-bit; ``rowsum[n] = Σ_k q[n, k]`` (int32).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .int4 import pack_int4, unpack_int4
from .quantizers import check_act_scale, check_bits, check_weight_zero_point, quantize_act, weight_qrange


class QPart(NamedTuple):
    """One quantized input part of a GEMM/conv (see module docstring)."""

    x: torch.Tensor            # float activation (fp16/bf16/fp32), or int8 signed codes q − 2^(act_bits−1)
    w: torch.Tensor            # prepared weight codes [N, K] int8, or [N, ceil(K/2)] uint8 packed int4
    w_rowsum: torch.Tensor     # int32 [N]
    w_scale: torch.Tensor      # float32 [N]
    act_scale: float
    act_zero_point: int
    act_bits: int
    # conv only, optional: int32 [KH·KW, N] per-tap weight sums (PreparedWeight.tapsum); with int8
    # codes in and padding, lets the kernel zero-fill out-of-image taps (async copies straight to
    # shared memory) and add back ``(Z − 2^(b−1))·Σ_{taps outside} tapsum`` in the epilogue
    w_tapsum: torch.Tensor | None = None


def part_codes(p: QPart) -> torch.Tensor:
    """Unsigned activation codes ``q`` of a part (int16): its float activation quantized by its
    quantizer, or its int8 signed codes shifted back (``q = code + 2^(b−1)``)."""
    if p.x.dtype == torch.int8:
        return p.x.to(torch.int16) + (1 << (p.act_bits - 1))
    return quantize_act(p.x, p.act_scale, p.act_zero_point, p.act_bits).to(torch.int16)


def signed_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit codes → the int8 signed codes ``q − 2^(b−1)`` the kernels take."""
    return (q.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


class PreparedWeight(NamedTuple):
    w: torch.Tensor
    rowsum: torch.Tensor
    bits: int            # bits of the codes *on the device*: 8 (int8 [N, K]) or 4 (packed [N, ⌈K/2⌉])
    tapsum: torch.Tensor | None = None   # conv: int32 [KH·KW, N], Σ_c of each tap's codes (QPart.w_tapsum)


# M (rows of the GEMM, output pixels of a conv, at the expected batch) up to which a 4-bit
# layer keeps packed int4 weights on the device. Hopper has no int4 MMA: unpacking in the K
# loop costs ~180-450 extra SASS instructions per K step (bench/sm90_report.py), which the
# static model finds slower than int8 on every SD 1.5 layer except the M = 2 time-embedding
# GEMVs, where only the weight bytes count.
INT4_ON_DEVICE_MAX_M = 16


def device_weight_bits(op: str, n: int, k: int, m_hint: int, weight_bits: int, asymmetric: bool = False) -> int:
    """Bits a layer's weight codes take on the device (the file keeps ``weight_bits``).

    4-bit layers stay packed only where the weight bytes dominate (``m_hint ≤``
    :data:`INT4_ON_DEVICE_MAX_M`: the time-embedding projections at small batch);
    elsewhere the codes are unpacked once, at compile time, to int8 and run the W8A8 kernel
    (same integers, same result, the int4 unpack off the K loop). ``m_hint``: GEMM rows at
    the expected batch (tokens for a linear, ``B·OH·OW`` for a conv). Pure function of shapes.
    Asymmetric 4-bit codes (``asymmetric``) always go to the device as int8: minus their zero
    points they span [−15, 15], beyond a signed nibble (:func:`prepare_weight`).
    """
    check_bits(weight_bits, f"{op}: weight_bits")
    if asymmetric:
        return 8
    if weight_bits == 4 and m_hint > INT4_ON_DEVICE_MAX_M:
        return 8
    return weight_bits


def prepare_weight(weight_q: torch.Tensor, bits: int, device_bits: int | None = None,
                   zero_point: torch.Tensor | None = None) -> PreparedWeight:
    """Reorder (conv: ``[N, C, KH, KW] → [N, KH·KW·C]``), pack (4-bit) and row-sum weight codes.

    ``device_bits`` (default ``bits``): 8 keeps ``bits``-bit codes as int8 on the device
    (see :func:`device_weight_bits`); the result's ``bits`` is what the kernel must be
    launched with. Done once per layer at compile time, never per call.

    ``zero_point`` (int ``[N]``, 4-bit asymmetric grid): the codes are unsigned ``0 … 15`` and the
    zero point is applied exactly here: the device codes are ``q − z`` in ``[−15, 15]`` as int8
    (``device_bits`` must be 8), so the kernels compute ``s · Σ (q − z)·x`` unchanged.
    """
    check_bits(bits, "weight_bits")
    device_bits = bits if device_bits is None else device_bits
    if device_bits not in (bits, 8):
        raise ValueError(f"prepare_weight: device_bits must be {bits} or 8 for {bits}-bit codes, got {device_bits}")
    if weight_q.dtype != torch.int8:
        raise TypeError(f"weight codes must be int8 (int4 unpacked to int8 values), got {weight_q.dtype}")
    asym = zero_point is not None
    if asym and bits != 4:
        raise ValueError(f"prepare_weight: a weight zero point needs 4-bit codes ({bits}-bit codes minus a zero point "
                         "do not fit int8)")
    if asym and device_bits != 8:
        raise ValueError("prepare_weight: asymmetric 4-bit codes minus their zero points span [-15, 15]; they need "
                         f"device_bits=8, got {device_bits}")
    qmin, qmax = weight_qrange(bits, asymmetric=asym)
    if weight_q.numel() and (int(weight_q.min()) < qmin or int(weight_q.max()) > qmax):
        raise ValueError(f"weight codes exceed the {bits}-bit {'asymmetric' if asym else 'signed'} range "
                         f"[{qmin}, {qmax}]")
    if asym:
        check_weight_zero_point(zero_point, weight_q.shape[0], bits, "prepare_weight")
        z = zero_point.to(weight_q.device, torch.int16).reshape(-1, *([1] * (weight_q.dim() - 1)))
        weight_q = (weight_q.to(torch.int16) - z).to(torch.int8)
    if weight_q.dim() == 4:
        flat = weight_q.permute(0, 2, 3, 1).reshape(weight_q.shape[0], -1)
    elif weight_q.dim() == 2:
        flat = weight_q
    else:
        raise ValueError(f"weight codes must be 2-D (linear) or 4-D (conv), got shape {list(weight_q.shape)}")
    flat = flat.contiguous()
    rowsum = flat.to(torch.int32).sum(dim=1, dtype=torch.int32)
    w = pack_int4(flat) if device_bits == 4 else flat
    tapsum = None
    if weight_q.dim() == 4:
        n, c, kh, kw = weight_q.shape
        tapsum = flat.to(torch.int32).view(n, kh * kw, c).sum(dim=2, dtype=torch.int32).t().contiguous()
    return PreparedWeight(w, rowsum, device_bits, tapsum)


def unpack_weight(w: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """Prepared weight → int8 codes ``[N, K]`` (inverse of the packing in :func:`prepare_weight`)."""
    if bits == 4:
        return unpack_int4(w, k)
    if w.dtype != torch.int8 or w.shape[-1] != k:
        raise ValueError(f"8-bit prepared weight must be int8 [N, {k}], got {w.dtype} {list(w.shape)}")
    return w


def packed_k(k: int, bits: int) -> int:
    """Number of stored columns of a prepared weight with ``k`` codes per row."""
    return (k + 1) // 2 if bits == 4 else k


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_parts(op: str, parts: "list[QPart] | tuple[QPart, ...]", weight_bits: int, k_of,
                bias: torch.Tensor | None, bias_correction: torch.Tensor | None) -> int:
    """Validate the inputs of a quantized GEMM/conv; return N (output features).

    ``k_of(part)`` gives the number of codes per weight row the part's activation implies.
    Raises ``ValueError``/``TypeError`` naming the op, the part and what was expected.
    """
    check_bits(weight_bits, f"{op}: weight_bits")
    if not 1 <= len(parts) <= 2:
        raise ValueError(f"{op}: expected 1 or 2 input parts, got {len(parts)}")
    device = parts[0].x.device
    n = parts[0].w.shape[0] if parts[0].w.dim() == 2 else -1
    for i, p in enumerate(parts):
        where = f"{op}: part {i}" if len(parts) > 1 else op
        if p.x.dtype not in _FLOAT_DTYPES + (torch.int8,):
            raise TypeError(f"{where}: activation must be float16/bfloat16/float32 or int8 signed codes, got {p.x.dtype}")
        if p.x.dtype != parts[0].x.dtype:
            raise TypeError(f"{where}: all parts must share one dtype, got {p.x.dtype} and {parts[0].x.dtype}")
        for name, t in (("x", p.x), ("w", p.w), ("w_rowsum", p.w_rowsum), ("w_scale", p.w_scale)):
            if t.device != device:
                raise ValueError(f"{where}: {name} is on {t.device}, expected {device} like the activation")
        check_bits(p.act_bits, f"{where}: act_bits")
        qmax = (1 << p.act_bits) - 1
        check_act_scale(p.act_scale, f"{where}: act_scale")
        if not 0 <= p.act_zero_point <= qmax:
            raise ValueError(f"{where}: act_zero_point {p.act_zero_point} outside [0, {qmax}] for {p.act_bits}-bit codes")
        k = k_of(p)
        want_dtype = torch.uint8 if weight_bits == 4 else torch.int8
        want_shape = [n, packed_k(k, weight_bits)]
        if p.w.dtype != want_dtype or list(p.w.shape) != want_shape:
            raise ValueError(
                f"{where}: prepared {weight_bits}-bit weight must be {want_dtype} {want_shape} for an input with "
                f"{k} codes per output row, got {p.w.dtype} {list(p.w.shape)}")
        if p.w_rowsum.dtype != torch.int32 or list(p.w_rowsum.shape) != [n]:
            raise ValueError(f"{where}: w_rowsum must be int32 [{n}], got {p.w_rowsum.dtype} {list(p.w_rowsum.shape)}")
        if p.w_scale.dtype != torch.float32 or list(p.w_scale.shape) != [n]:
            raise ValueError(f"{where}: w_scale must be float32 [{n}], got {p.w_scale.dtype} {list(p.w_scale.shape)}")
    for name, t in (("bias", bias), ("bias_correction", bias_correction)):
        if t is not None and (list(t.shape) != [n] or t.device != device or not t.is_floating_point()):
            raise ValueError(f"{op}: {name} must be a float [{n}] tensor on {device}, got {t.dtype} {list(t.shape)} on {t.device}")
    return n
