"""Image-level quality metrics: Fréchet distance of Gaussian fits, colour moments and colour shift.

Signal metrics (SNR / PSNR in dB) are :mod:`qdcompile.metrics`, the one definition everything uses.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` floats in [0, 1] → uint8 codes 0–255 (the convention of torch-fidelity)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """FID formula on two feature sets ``[N, D]``:
    ``‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½`` (unbiased covariances, float64).

    The last trace equals ``tr (Σ₁Σ₂)^½``; the symmetric form is computed with ``eigh``.
    """
    f1, f2 = f1.double(), f2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    w, v = torch.linalg.eigh(s1)
    root1 = (v * w.clamp_min(0).sqrt()) @ v.T
    inner = root1 @ s2 @ root1
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * tr_covmean)


def colour_moments(images: torch.Tensor) -> torch.Tensor:
    """Per image and channel, the mean and standard deviation of the pixels in 8-bit levels:
    ``[N, 2C]`` float64 (means first). ``images``: uint8 or floats in [0, 1], ``[N, C, H, W]``."""
    x = (images if images.dtype == torch.uint8 else to_uint8(images)).double()
    return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def colour_shift(ref: torch.Tensor, test: torch.Tensor) -> list[float]:
    """Per channel, the mean of ``test`` minus the mean of ``ref`` in 8-bit levels (images in
    [0, 1], ``[N, C, H, W]``): a colour cast or brightness change of the whole sample set."""
    return (255.0 * (test.float().mean(dim=(0, 2, 3)) - ref.float().mean(dim=(0, 2, 3)))).tolist()


def format_colour_shift(levels: Sequence[float]) -> str:
    return "/".join(f"{v:+.1f}" for v in levels)


def colour_w2(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """Wasserstein-2 distance, in 8-bit levels, between Gaussians fitted to two sets of
    :func:`colour_moments`: the square root of their Fréchet distance. Zero for equal sets; a
    uniform brightness shift of ``d`` levels on one channel gives ``d`` (without clipping). It
    moves with colour casts, which the classifier features behind our FID barely register
    (``bench/fid_sensitivity.py``)."""
    return math.sqrt(max(frechet_distance(f1, f2), 0.0))
