"""SNR along sampling trajectories: per step PTQD's ``SNR_Q`` of a quantized model against the FP
predictions recorded by :class:`qdcompile.trajectory.TrajectoryRecorder`, and ``SNR_F`` (METHODS §3)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..io import jsonable
from ..metrics import norm_ratio, to_db
from ..pipeline import unwrap_scheduler
from ..noise import effective_eps
from ..ptqd import snr_f as forward_snr
from ..trajectory import EpsModel, Trajectory, _eps_fn


def snr_f(scheduler, timestep) -> Optional[float]:
    """PTQD's ``SNR_F(t) = ᾱ_t / (1 − ᾱ_t)`` from ``scheduler.alphas_cumprod``; None without one."""
    return forward_snr(scheduler, timestep) if getattr(scheduler, "alphas_cumprod", None) is not None else None


@dataclass(frozen=True)
class StepSNR:
    """SNR of the quantized ε against FP at one sampling step (over all recorded images)."""

    step: int
    timestep: int
    snr_q: float                 # ‖ε‖ / ‖ε̂ − ε‖
    snr_q_db: float              # 20·log10(snr_q)
    snr_f: Optional[float]       # ᾱ/(1−ᾱ)
    snr_f_db: Optional[float]    # 10·log10(snr_f)
    # the same for the ε the scheduler step uses (after its x0 clipping and the model's corrections)
    snr_q_sampler_db: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))


@torch.no_grad()
def step_snr(trajectory: Trajectory, quant_model: torch.nn.Module | EpsModel, scheduler) -> list[StepSNR]:
    """Per sampling step: SNR_Q of ``quant_model`` against the recorded FP predictions, and SNR_F.

    ``quant_model`` is a U-Net (e.g. ``torch.compile(unet, backend="qdiff")`` or a model inside
    :func:`qdcompile.simulate.simulate`) or any callable ``(x, t, kwargs) -> ε̂``. Energies are
    summed over the recorded images of a step before the ratio is taken. ``snr_q_db`` compares the
    U-Net outputs; ``snr_q_sampler_db`` the ε the scheduler's step uses (after a DDPM x0
    clipping, and after a :class:`~qdcompile.pipeline.QuantizedUNet`'s sampler-space corrections).
    """
    scheduler = unwrap_scheduler(scheduler)
    fn = _eps_fn(quant_model)
    used = getattr(quant_model, "sampler_eps", None)
    acc: dict[int, list] = {}
    for s in trajectory.steps:
        if s.eps is None:
            raise ValueError("trajectory has no FP predictions: build it with TrajectoryRecorder.finish(fp_model)")
        out_q = fn(s.x, s.timestep, s.kwargs).detach()
        eps_q, e = out_q.double().cpu(), s.eps.double()
        c = s.x.shape[1]
        x = s.x.double()
        e_used = effective_eps(scheduler, x, s.timestep, e[:, :c])
        q_used = (used(scheduler, out_q, s.timestep, s.x.to(out_q.device)).detach().double().cpu()[:, :c]
                  if used is not None else effective_eps(scheduler, x, s.timestep, eps_q[:, :c]))
        entry = acc.setdefault(s.step, [int(s.timestep), 0.0, 0.0, 0.0, 0.0])
        entry[1] += float(e.pow(2).sum())
        entry[2] += float((eps_q - e).pow(2).sum())
        entry[3] += float(e_used.pow(2).sum())
        entry[4] += float((q_used - e_used).pow(2).sum())
    out = []
    for step in sorted(acc):
        t, signal, noise, signal_used, noise_used = acc[step]
        ratio, ratio_used = norm_ratio(signal, noise), norm_ratio(signal_used, noise_used)
        f = snr_f(scheduler, t)
        out.append(StepSNR(step, t, ratio, to_db(ratio, power=False), f, to_db(f, power=True),
                           to_db(ratio_used, power=False)))
    return out


def summarize_snr(steps: Sequence[StepSNR]) -> dict[str, Any]:
    """Mean and min SNR_Q in dB over steps, and the steps where PTQD's ``SNR_Q > SNR_F`` fails."""
    def mean(values: list) -> Optional[float]:
        finite = [v for v in values if v is not None and math.isfinite(v)]
        return sum(finite) / len(finite) if finite else (math.inf if values else None)

    below = [s.step for s in steps if s.snr_f is not None and not s.snr_q > s.snr_f]
    return {
        "mean_snr_q_db": mean([s.snr_q_db for s in steps]),
        "mean_snr_q_sampler_db": mean([s.snr_q_sampler_db for s in steps if s.snr_q_sampler_db is not None]),
        "min_snr_q_db": min((s.snr_q_db for s in steps), default=None),
        "min_snr_q_step": min(steps, key=lambda s: s.snr_q_db).step if steps else None,
        "steps_snr_q_below_snr_f": below,
    }
