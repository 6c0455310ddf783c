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


def weight_qrange(bits: int) -> tuple[int, int]:
    """(min, max) signed weight code for ``bits``."""
    check_bits(bits)
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def act_qparams(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """Scale Δ and zero point Z for an activation range ``[lo, hi]`` (widened to hold 0).

    Computed in float32 like the kernels' epilogue, returned as Python numbers.
    """
    qmax = act_qmax(bits)
    lo_t = torch.tensor(min(float(lo), 0.0), dtype=torch.float32)
    hi_t = torch.tensor(max(float(hi), 0.0), dtype=torch.float32)
    if not (torch.isfinite(lo_t) and torch.isfinite(hi_t)):
        raise ValueError(f"activation range must be finite, got [{lo}, {hi}]")
    scale = (hi_t - lo_t) / qmax
    if scale <= 0:  # an all-zero tensor: any positive scale represents it exactly
        scale = torch.tensor(1.0 / qmax, dtype=torch.float32)
    scale = scale.clamp(MIN_ACT_SCALE, MAX_ACT_SCALE)
    zero_point = int(torch.clamp(-torch.round(lo_t / scale), 0, qmax))
    return float(scale), zero_point


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


def quantize_weight(weight: torch.Tensor, scale: torch.Tensor, bits: int,
                    rounding_offset: torch.Tensor | None = None) -> torch.Tensor:
    """Signed integer weight codes (int8 storage for 4 and 8 bit), same shape as ``weight``.

    ``rounding_offset`` (AdaRound) replaces round-to-nearest by ``floor(W/s) + offset``
    with offset ∈ {0, 1}.
    """
    qmin, qmax = weight_qrange(bits)
    if scale.dim() != 1 or scale.shape[0] != weight.shape[0]:
        raise ValueError(f"weight scale must have shape [{weight.shape[0]}], got {list(scale.shape)}")
    s = scale.float().reshape(-1, *([1] * (weight.dim() - 1)))
    w = weight.detach().float() / s
    q = torch.round(w) if rounding_offset is None else torch.floor(w) + rounding_offset
    return q.clamp_(qmin, qmax).to(torch.int8)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Ŵ = s · q (float32)."""
    return q.float() * scale.float().reshape(-1, *([1] * (q.dim() - 1)))
