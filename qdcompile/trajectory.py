"""Sampling trajectories: :class:`TrajectoryRecorder` records the inputs of every sampling step (a
``callback`` of :func:`qdcompile.sample`), then the FP model's predictions on them (:meth:`finish`).
PTQD's statistics and the evaluation's per-step SNR are computed on these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .sampling import call_unet, unwrap

EpsModel = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


@dataclass
class TrajectoryStep:
    step: int                    # index in the sampling loop (0 = first, noisiest)
    timestep: torch.Tensor       # scalar
    x: torch.Tensor              # U-Net input (already scaled), on the CPU
    kwargs: dict[str, Any]
    eps: Optional[torch.Tensor] = None  # FP prediction, filled by TrajectoryRecorder.finish


@dataclass
class Trajectory:
    """U-Net inputs along FP sampling trajectories, with the FP predictions on them."""

    steps: list[TrajectoryStep]

    @property
    def num_images(self) -> int:
        return sum(s.x.shape[0] for s in self.steps if s.step == 0)


class TrajectoryRecorder:
    """A :func:`qdcompile.sample` callback keeping the U-Net inputs of the first ``limit`` images.

    Pass it as ``callback=`` to the FP sampling run, then call :meth:`finish` with the FP model
    to get a :class:`Trajectory` (the FP predictions are computed then, once).
    """

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"TrajectoryRecorder needs limit >= 1, got {limit}")
        self.limit = limit
        self.count = 0
        self._take = 0
        self.steps: list[TrajectoryStep] = []

    def __call__(self, i: int, t: torch.Tensor, x: torch.Tensor, kwargs: dict[str, Any]) -> None:
        if i == 0:  # a new batch starts
            self._take = min(x.shape[0], self.limit - self.count)
            self.count += self._take
        if self._take <= 0:
            return
        n, take = x.shape[0], self._take
        kept = {k: (v[:take].detach().cpu() if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n
                    else v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                for k, v in kwargs.items()}
        self.steps.append(TrajectoryStep(i, t.detach().cpu(), x[:take].detach().cpu(), kept))

    @torch.no_grad()
    def finish(self, fp_model: torch.nn.Module | EpsModel) -> Trajectory:
        if not self.steps:
            raise RuntimeError("TrajectoryRecorder saw no sampling step (was it passed as callback=?)")
        fn = _eps_fn(fp_model)
        for s in self.steps:
            s.eps = fn(s.x, s.timestep, s.kwargs).detach().float().cpu()
        return Trajectory(self.steps)


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(unwrap(model).parameters())
    return p.device, p.dtype


def _eps_fn(model: torch.nn.Module | EpsModel) -> EpsModel:
    """``(x, t, kwargs) -> ε`` for a U-Net (compiled or not), moving inputs to its device."""
    if not isinstance(model, torch.nn.Module):
        return model
    device, dtype = _model_device_dtype(model)

    def fn(x, t, kwargs):
        kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        return call_unet(model, x.to(device, dtype), t.to(device), kw)

    return fn
