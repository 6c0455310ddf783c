"""The quantizers of METHODS §1 — the one definition the kernels, the calibration stage
and the tests share.

Activations: per-tensor, asymmetric, unsigned codes::

    Δ = (max − min) / (2^b − 1),  Z = −round(min / Δ)
    q = clamp(round(x / Δ) + Z, 0, 2^b − 1),  x̂ = Δ · (q − Z)

The range handed to :func:`act_qparams` is first widened to contain 0, so that real zero
has an exact code (``Z`` lies in ``[0, 2^b − 1]``): convolution zero padding is padding
with the code ``Z``.

Weights: per-output-channel, symmetric, signed::

    s_n = max|W[n, :]| / (2^(b−1) − 1),  q = clamp(round(W / s), −2^(b−1), 2^(b−1) − 1)

or per-output-channel *asymmetric* (Q-Diffusion's grid), unsigned codes with an integer zero
point per channel (the range widened to hold 0, as for activations)::

    s_n = (hi_n − lo_n) / (2^b − 1),  z_n = −round(lo_n / s_n)
    q = clamp(round(W / s) + z, 0, 2^b − 1),  Ŵ = s · (q − z)

``round`` is round-half-to-even (``torch.round``) everywhere.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (4, 8)
# Activation scales the kernels take (their exact fp32 quotient trick needs Δ in this range).
MIN_ACT_SCALE, MAX_ACT_SCALE = 2.0 ** -100, 2.0 ** 100


def check_bits(bits: int, what: str = "bits") -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{what}={bits!r} is not supported; expected one of {SUPPORTED_BITS}")
    return int(bits)


def check_act_scale(scale: float, what: str = "activation scale") -> float:
    if not MIN_ACT_SCALE <= scale <= MAX_ACT_SCALE:
        raise ValueError(f"{what} {scale!r} outside the supported [2^-100, 2^100]")
    return scale


def act_qmax(bits: int) -> int:
    """Largest unsigned activation code for ``bits``."""
    return (1 << check_bits(bits)) - 1


def weight_qrange(bits: int, asymmetric: bool = False) -> tuple[int, int]:
    """(min, max) weight code for ``bits``: signed, or unsigned ``(0, 2^b − 1)`` on the
    asymmetric grid."""
    check_bits(bits)
    if asymmetric:
        return 0, (1 << bits) - 1
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def affine_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points of asymmetric ranges ``[lo, hi]`` (elementwise, float32 tensors),
    each widened to hold 0: ``Δ = (hi − lo) / (2^b − 1)`` clamped to [2^-100, 2^100] (an all-zero
    range gets ``1 / (2^b − 1)``), ``Z = clamp(−round(lo / Δ), 0, 2^b − 1)`` (int32). The one
    implementation behind :func:`act_qparams` and :func:`weight_qparams`."""
    qmax = act_qmax(bits)
    lo = torch.clamp(lo.detach().float(), max=0.0)
    hi = torch.clamp(hi.detach().float(), min=0.0)
    if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError("quantization range must be finite")
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 1.0 / qmax)).clamp(MIN_ACT_SCALE, MAX_ACT_SCALE)
    zero_point = torch.clamp(-torch.round(lo / scale), 0, qmax).to(torch.int32)
    return scale, zero_point


def act_qparams(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """Scale Δ and zero point Z for an activation range ``[lo, hi]`` (widened to hold 0).

    Computed in float32 like the kernels' epilogue, returned as Python numbers.
    """
    lo_t = torch.tensor(float(lo), dtype=torch.float32)
    hi_t = torch.tensor(float(hi), dtype=torch.float32)
    if not (torch.isfinite(lo_t) and torch.isfinite(hi_t)):
        raise ValueError(f"activation range must be finite, got [{lo}, {hi}]")
    scale, zero_point = affine_qparams(lo_t, hi_t, bits)
    return float(scale), int(zero_point)


def weight_qparams(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel asymmetric min-max grid of ``weight``: scales float32 ``[N]`` and zero
    points int32 ``[N]`` (:func:`affine_qparams` of each channel's ``[min, max]``)."""
    w = weight.detach().float().reshape(weight.shape[0], -1)
    return affine_qparams(w.amin(dim=1), w.amax(dim=1), bits)


def quantize_act(x: torch.Tensor, scale: float, zero_point: int, bits: int) -> torch.Tensor:
    """Reference activation quantizer: float tensor → unsigned codes (uint8), same shape."""
    qmax = act_qmax(bits)
    check_act_scale(scale)
    if not 0 <= zero_point <= qmax:
        raise ValueError(f"zero point {zero_point} outside the {bits}-bit code range [0, {qmax}]")
    q = torch.round(x.float() / torch.tensor(scale, dtype=torch.float32)) + zero_point
    return q.clamp_(0, qmax).to(torch.uint8)


def dequantize_act(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """x̂ = Δ · (q − Z) in float32."""
    return (q.to(torch.float32) - zero_point) * torch.tensor(scale, dtype=torch.float32)


def fake_quantize_act(x: torch.Tensor, scale: float, zero_point: int, bits: int) -> torch.Tensor:
    """Quantize then dequantize (float32 result) — the simulated activation quantizer."""
    return dequantize_act(quantize_act(x, scale, zero_point, bits), scale, zero_point)


def weight_scales(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric min-max scale s_n = max|W[n]| / (2^(b−1) − 1), float32 [N]."""
    _, qmax = weight_qrange(bits)
    amax = weight.detach().float().reshape(weight.shape[0], -1).abs().amax(dim=1)
    scale = amax / qmax
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def check_weight_zero_point(zero_point: torch.Tensor, n: int, bits: int, where: str = "weight") -> torch.Tensor:
    """A per-output-channel weight zero point: integer ``[n]`` in ``[0, 2^b − 1]``."""
    if not isinstance(zero_point, torch.Tensor) or zero_point.is_floating_point() or zero_point.dtype == torch.bool \
            or tuple(zero_point.shape) != (n,):
        raise ValueError(f"{where}: zero point must be an integer tensor of shape [{n}] (one per output channel), "
                         f"got {getattr(zero_point, 'dtype', type(zero_point).__name__)} "
                         f"{list(getattr(zero_point, 'shape', []))}")
    qmax = act_qmax(bits)
    if zero_point.numel() and (int(zero_point.min()) < 0 or int(zero_point.max()) > qmax):
        raise ValueError(f"{where}: zero points must lie in the {bits}-bit code range [0, {qmax}], got "
                         f"[{int(zero_point.min())}, {int(zero_point.max())}]")
    return zero_point


def _per_channel(t: torch.Tensor, dims: int) -> torch.Tensor:
    return t.reshape(-1, *([1] * (dims - 1)))


def quantize_weight(weight: torch.Tensor, scale: torch.Tensor, bits: int,
                    rounding_offset: torch.Tensor | None = None,
                    zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """Integer weight codes (int8 storage for 4 and 8 bit), same shape as ``weight``: signed,
    or with ``zero_point`` (int ``[N]``) unsigned ``clamp(round(W/s) + z, 0, 2^b − 1)``.

    ``rounding_offset`` (AdaRound) replaces round-to-nearest by ``floor(W/s) + offset``
    with offset ∈ {0, 1}.
    """
    qmin, qmax = weight_qrange(bits, asymmetric=zero_point is not None)
    if scale.dim() != 1 or scale.shape[0] != weight.shape[0]:
        raise ValueError(f"weight scale must have shape [{weight.shape[0]}], got {list(scale.shape)}")
    s = _per_channel(scale.float(), weight.dim())
    w = weight.detach().float() / s
    q = torch.round(w) if rounding_offset is None else torch.floor(w) + rounding_offset
    if zero_point is not None:
        check_weight_zero_point(zero_point, weight.shape[0], bits)
        q = q + _per_channel(zero_point.to(q.device, torch.float32), weight.dim())
    return q.clamp_(qmin, qmax).to(torch.int8)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """Ŵ = s · q, or s · (q − z) on the asymmetric grid (float32)."""
    s = _per_channel(scale.float(), q.dim())
    if zero_point is None:
        return q.float() * s
    return (q.float() - _per_channel(zero_point.to(q.device, torch.float32), q.dim())) * s
