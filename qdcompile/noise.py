"""PTQD's record and the sampler's noise: the contract-level pieces that the metadata file, the
corrected sampler (:mod:`.pipeline`) and the calibration (:mod:`.ptqd`) all use (METHODS §3).

* :class:`StepNoise` — the statistics of one precision at one time step (``k``, ``μ``, ``σ_q²``,
  ``SNR_Q``) as the metadata file stores them, and the per-channel affine correction they give;
  :func:`nearest` looks one up by time step.
* Variance schedule calibration: with ``c_t`` the coefficient of ``ε`` in the sampler's
  ``x_{t−1}`` update, the quantized step adds ``c_t² σ_q² / (1 + k)²`` of variance; the
  sampler draws its noise with ``σ'_t² = max(0, σ_t² − c_t² σ_q² / (1 + k)²)`` so the total
  stays ``σ_t²`` (:func:`calibrated_sigma`). Supported: ``DDPMScheduler`` (fixed variance
  types) and ``DDIMScheduler`` with ``η > 0`` — where ``c_t`` itself depends on ``σ`` and
  the equation is solved by bisection. Deterministic samplers (``σ_t = 0``) get ``k`` and
  the bias only.
* :func:`effective_eps` — the ε a clipping DDPM step effectively uses; :func:`eps_channels` —
  the output channels that predict ε.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass(frozen=True)
class StepNoise:
    """PTQD statistics of one precision at one time step."""

    timestep: int
    k: float                   # correlation coefficient, ≥ 0
    mu: tuple[float, ...]      # channel-wise mean of the residual Δ' (ε channels)
    var: float                 # variance σ_q² of Δ' − μ
    snr_q: float               # ‖ε‖ / ‖ε̂ − ε‖ before correction
    snr_q_corrected: float     # ‖ε‖ / ‖ε_c − ε‖ after k and bias correction (same data)
    samples: int = 0

    def affine(self, bias_correction: bool = True, correlated: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)`` per ε channel with ``ε_c = a·ε̂ + b`` (float64)."""
        k = self.k if correlated else 0.0
        a = torch.full((len(self.mu),), 1.0 / (1.0 + k), dtype=torch.float64)
        mu = torch.tensor(self.mu, dtype=torch.float64) if bias_correction else torch.zeros(len(self.mu), dtype=torch.float64)
        return a, -mu * a

    def to_dict(self) -> dict[str, Any]:
        return {"timestep": self.timestep, "k": self.k, "mu": list(self.mu), "var": self.var,
                "snr_q": _finite(self.snr_q), "snr_q_corrected": _finite(self.snr_q_corrected), "samples": self.samples}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StepNoise":
        return cls(timestep=int(d["timestep"]), k=float(d["k"]), mu=tuple(float(v) for v in d["mu"]),
                   var=float(d["var"]), snr_q=_unfinite(d["snr_q"]), snr_q_corrected=_unfinite(d["snr_q_corrected"]),
                   samples=int(d.get("samples", 0)))


def _finite(v: float):
    return v if math.isfinite(v) else "inf"


def _unfinite(v) -> float:
    return math.inf if v == "inf" else float(v)


def nearest(entries: Sequence[Any], timestep: int, key=lambda e: e.timestep):
    """The entry whose ``timestep`` is closest to ``timestep`` (ties: the later, noisier one)."""
    if not entries:
        raise ValueError("no PTQD statistics to look up")
    return min(entries, key=lambda e: (abs(key(e) - timestep), -key(e)))


# ---------------------------------------------------------------------------- variance schedule calibration
class VSCUnsupported(ValueError):
    """The scheduler/step has no variance the quantization noise could be absorbed into."""


def _alphas(scheduler, timestep: int) -> tuple[float, float]:
    """``(ᾱ_t, ᾱ_prev)`` of a DDPM/DDIM step as the scheduler computes them."""
    ac = scheduler.alphas_cumprod
    t = int(timestep)
    if hasattr(scheduler, "previous_timestep"):
        prev = int(scheduler.previous_timestep(t))
    else:
        prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_t = float(ac[t])
    if prev >= 0:
        a_prev = float(ac[prev])
    else:
        a_prev = float(getattr(scheduler, "final_alpha_cumprod", getattr(scheduler, "one", torch.tensor(1.0))))
    return a_t, a_prev


def scheduler_kind(scheduler) -> str:
    name = type(scheduler).__name__
    if name == "DDPMScheduler":
        return "ddpm"
    if name == "DDIMScheduler":
        return "ddim"
    return "other"


def clips_x0(scheduler) -> bool:
    """Whether ``scheduler``'s step sees the U-Net's ε only through a clipped or thresholded x0
    prediction: a DDPM ε-prediction scheduler with ``clip_sample`` or ``thresholding``. Its update
    is then linear in the ε recomputed from the processed x0 (:func:`effective_eps`), not in the
    U-Net's output. (DDIM clips the x0 term but, unless ``use_clipped_model_output``, keeps the raw
    ε in its direction term: no single ε describes its step, so it counts as not clipping.)"""
    cfg = scheduler.config
    return (scheduler_kind(scheduler) == "ddpm" and getattr(cfg, "prediction_type", "epsilon") == "epsilon"
            and bool(getattr(cfg, "thresholding", False) or getattr(cfg, "clip_sample", False)))


def effective_eps(scheduler, sample: torch.Tensor, timestep, eps: torch.Tensor) -> torch.Tensor:
    """The ε a clipping DDPM step effectively uses for ``eps`` (the ε channels) at ``sample`` = x_t:
    ``(x_t − √ᾱ_t·x̂0') / √(1 − ᾱ_t)`` with ``x̂0'`` the scheduler's clipped / thresholded x0
    prediction (the step's posterior mean is linear in it). ``eps`` unchanged when the scheduler
    does not clip (:func:`clips_x0`)."""
    if not clips_x0(scheduler):
        return eps
    cfg = scheduler.config
    a_t = float(scheduler.alphas_cumprod[int(timestep)])
    sa, sb = math.sqrt(a_t), math.sqrt(1.0 - a_t)
    x, e = sample.float(), eps.float()
    x0 = (x - sb * e) / sa
    if cfg.thresholding:
        x0 = scheduler._threshold_sample(x0)
    else:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    return ((x - sa * x0) / sb).to(eps.dtype)


def _check_epsilon(scheduler) -> None:
    pred = getattr(scheduler.config, "prediction_type", "epsilon")
    if pred != "epsilon":
        raise VSCUnsupported(f"variance schedule calibration is derived for ε-prediction; this scheduler predicts "
                             f"{pred!r} (k and bias corrections still apply)")


def ddpm_sigma2(scheduler, timestep: int) -> float:
    """The DDPM step's noise variance ``σ_t²`` (``fixed_small`` / ``fixed_small_log`` / ``fixed_large``)."""
    vt = scheduler.config.variance_type
    a_t, a_prev = _alphas(scheduler, timestep)
    beta = 1.0 - a_t / a_prev
    if int(timestep) <= 0:
        return 0.0
    if vt in ("fixed_small", "fixed_small_log"):
        return max((1.0 - a_prev) / (1.0 - a_t) * beta, 1e-20)
    if vt == "fixed_large":
        return beta
    raise VSCUnsupported(f"DDPMScheduler variance_type={vt!r}: variance schedule calibration supports fixed_small, "
                         "fixed_small_log and fixed_large (k and bias corrections still apply)")


def ddpm_c(scheduler, timestep: int) -> float:
    """Coefficient of ε in DDPM's ``x_{t−1}``: ``−β_t / (√α_t · √(1 − ᾱ_t))`` (METHODS §3),
    with ``α_t = ᾱ_t / ᾱ_prev`` for the scheduler's (possibly strided) step."""
    a_t, a_prev = _alphas(scheduler, timestep)
    alpha = a_t / a_prev
    return -(1.0 - alpha) / (math.sqrt(alpha) * math.sqrt(1.0 - a_t))


def ddim_sigma2(scheduler, timestep: int, eta: float) -> float:
    a_t, a_prev = _alphas(scheduler, timestep)
    return eta ** 2 * (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)


def ddim_c(scheduler, timestep: int, sigma2: float) -> float:
    """Coefficient of ε in DDIM's ``x_{t−1}`` when its noise has variance ``sigma2``:
    ``√(1 − ᾱ_prev − σ²) − √ᾱ_prev · √(1 − ᾱ_t) / √ᾱ_t``."""
    a_t, a_prev = _alphas(scheduler, timestep)
    return math.sqrt(max(1.0 - a_prev - sigma2, 0.0)) - math.sqrt(a_prev) * math.sqrt(1.0 - a_t) / math.sqrt(a_t)


def calibrated_sigma(scheduler, timestep: int, k: float, var: float, eta: float = 0.0) -> tuple[float, float]:
    """``(σ_t², σ'_t²)`` for one step: the scheduled variance and the calibrated one whose sum
    with the (corrected) quantization noise's contribution ``c_t² σ_q² / (1 + k)²`` is ``σ_t²``
    (``σ'² = 0`` when it cannot all be absorbed). Raises :class:`VSCUnsupported` otherwise."""
    kind = scheduler_kind(scheduler)
    if kind == "other":
        raise VSCUnsupported(f"variance schedule calibration supports DDPMScheduler and DDIMScheduler (eta > 0), "
                             f"not {type(scheduler).__name__} (k and bias corrections still apply)")
    _check_epsilon(scheduler)
    extra = var / (1.0 + k) ** 2
    if kind == "ddpm":
        s2 = ddpm_sigma2(scheduler, timestep)
        return s2, max(0.0, s2 - ddpm_c(scheduler, timestep) ** 2 * extra)
    s2 = ddim_sigma2(scheduler, timestep, eta)
    if s2 <= 0.0:
        return 0.0, 0.0

    def total(u: float) -> float:   # variance of the step when its noise has variance u
        return u + ddim_c(scheduler, timestep, u) ** 2 * extra

    if total(0.0) >= s2:
        return s2, 0.0
    lo, hi = 0.0, s2   # total(lo) < s2 <= total(hi)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if total(mid) < s2:
            lo = mid
        else:
            hi = mid
    return s2, 0.5 * (lo + hi)


def eps_channels(unet) -> int:
    """Output channels that predict ε (the first half when the U-Net also predicts a variance)."""
    cfg = unet.config
    out = getattr(cfg, "out_channels", None) or cfg.in_channels
    return cfg.in_channels if out == 2 * cfg.in_channels else out
