"""Signal metrics: the one definition of SNR / PSNR in dB that every part of qdcompile uses
(evaluation, benchmarks, the CLI, the tests).

* :func:`snr_db` — ``10·log10(Σ ref² / Σ (test − ref)²)``: the energy ratio of the whole
  tensors (a ratio of sums, the same as PTQD's ``SNR_Q = ‖ε‖ / ‖ε̂ − ε‖`` in dB, METHODS §3).
* :func:`psnr_db` — ``10·log10(peak² / mean (test − ref)²)`` for images in ``[0, peak]``.
* :func:`snr_q` — PTQD's norm ratio ``‖ε‖ / ‖ε̂ − ε‖`` itself (not in dB).
* :func:`to_db` — a ratio in dB: ``20·log10`` of a norm (amplitude) ratio, ``10·log10`` of a power ratio.

Edge cases, the same for all: computed in float64; ``inf`` when ``test == ref`` (no noise); ``nan``
when either tensor holds a non-finite value (a diverged model has no meaningful SNR, and a NaN
is not mistaken for a number in tables and JSON, where it becomes ``null``); ``-inf`` when the
reference is all zeros and the test is not. Nothing is clamped.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["snr_db", "psnr_db", "snr_q", "norm_ratio", "to_db"]


def _noise(ref: torch.Tensor, test: torch.Tensor) -> Optional[torch.Tensor]:
    """Float64 ``(ref, test − ref)``, or None when either holds a non-finite value."""
    ref, test = ref.detach().double(), test.detach().double()
    if not (torch.isfinite(ref).all() and torch.isfinite(test).all()):
        return None
    return test - ref


def snr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """``10·log10(Σ ref² / Σ (test − ref)²)`` in dB (see the module docstring for inf / nan)."""
    diff = _noise(ref, test)
    if diff is None:
        return math.nan
    noise = diff.pow(2).sum()
    if noise == 0:
        return math.inf
    return float(10 * torch.log10(ref.detach().double().pow(2).sum() / noise))


def psnr_db(ref: torch.Tensor, test: torch.Tensor, peak: float = 1.0) -> float:
    """PSNR of images with values in ``[0, peak]``: ``10·log10(peak² / MSE)``; ``inf`` if equal."""
    diff = _noise(ref, test)
    if diff is None:
        return math.nan
    mse = diff.pow(2).mean()
    if mse == 0:
        return math.inf
    return float(10 * torch.log10(peak ** 2 / mse))


def snr_q(eps: torch.Tensor, eps_q: torch.Tensor) -> float:
    """PTQD's ``SNR_Q = ‖ε‖₂ / ‖ε̂ − ε‖₂`` (a norm ratio, not in dB); ``inf`` when ``ε̂ == ε``."""
    diff = _noise(eps, eps_q)
    if diff is None:
        return math.nan
    noise = diff.norm()
    if noise == 0:
        return math.inf
    return float(eps.detach().double().norm() / noise)


def norm_ratio(signal_energy: float, noise_energy: float) -> float:
    """``sqrt(signal / noise)`` from energies (sums of squares, e.g. accumulated over batches):
    :func:`snr_q` of the whole; ``inf`` without noise, ``nan`` when an energy is not finite."""
    if not (math.isfinite(signal_energy) and math.isfinite(noise_energy)):
        return math.nan
    return math.inf if noise_energy == 0 else math.sqrt(signal_energy / noise_energy)


def to_db(ratio: Optional[float], power: bool) -> Optional[float]:
    """``ratio`` in dB: ``10·log10`` for a power ratio, ``20·log10`` for a norm ratio; None stays None."""
    if ratio is None:
        return None
    if math.isnan(ratio):
        return math.nan
    if ratio == 0:
        return -math.inf
    if math.isinf(ratio):
        return math.inf
    return (10.0 if power else 20.0) * math.log10(ratio)
