"""The calibration set and the activation-range observers: what every calibration stage
(:mod:`.calibration`, :mod:`.ptqd`) feeds the float model and reads its layer inputs with."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from .recipe import QuantRecipe
from .sampling import call_unet, unwrap

logger = logging.getLogger(__name__)


@dataclass
class CalibrationSet:
    """U-Net inputs collected along FP sampling trajectories (kept on the CPU).

    Entry ``i`` is one batch at one step: ``x[i]`` ``[B, C, H, W]``, the scalar timestep
    ``t[i]`` and ``kwargs[i]``, the conditioning of those ``B`` samples (tensors batch-first).
    """

    x: list[torch.Tensor] = field(default_factory=list)
    t: list[torch.Tensor] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    step_indices: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(x.shape[0] for x in self.x)

    def batches(self, device: torch.device, dtype: torch.dtype):
        for x, t, kw in zip(self.x, self.t, self.kwargs):
            yield (x.to(device, dtype), t.to(device),
                   {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})

    def state(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _RangeObserver:
    """Observes the input range of one layer: running min/max, or mean per-batch percentiles."""

    def __init__(self, mode: str, percentile: float):
        self.mode, self.q = mode, percentile / 100.0
        self.lo: list[float] = []
        self.hi: list[float] = []

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.mode == "minmax":
            self.lo.append(float(x.min()))
            self.hi.append(float(x.max()))
        else:
            flat = x.reshape(-1)
            if flat.numel() > 1 << 20:  # torch.quantile limit; a strided subsample keeps it cheap
                flat = flat[:: math.ceil(flat.numel() / (1 << 20))]
            qs = torch.quantile(flat, torch.tensor([1 - self.q, self.q], device=flat.device))
            self.lo.append(float(qs[0]))
            self.hi.append(float(qs[1]))

    def range(self) -> tuple[float, float]:
        if not self.lo:
            raise RuntimeError("observer saw no input")
        if self.mode == "minmax":
            return min(self.lo), max(self.hi)
        return sum(self.lo) / len(self.lo), sum(self.hi) / len(self.hi)


@torch.no_grad()
def observe_ranges(unet, calib: CalibrationSet, names: list[str], recipe: QuantRecipe, progress: bool = True,
                   splits: Optional[dict[str, tuple[int, ...]]] = None) -> dict[str, Any]:
    """Input range of each named layer over the calibration set: ``(lo, hi)``, or for a layer
    in ``splits`` (name → part channel counts along dim 1) a list with one range per part."""
    base = unwrap(unet)
    modules = dict(base.named_modules())
    splits = splits or {}
    observers = {n: [_RangeObserver(recipe.act_observer, recipe.act_percentile) for _ in splits.get(n, (0,))]
                 for n in names}

    def hook(name):
        def observe(module, args):
            chunks = torch.split(args[0], list(splits[name]), dim=1) if name in splits else (args[0],)
            for obs, chunk in zip(observers[name], chunks):
                obs.observe(chunk)
        return observe

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    param = next(base.parameters())
    try:
        for x, t, kw in tqdm(calib.batches(param.device, param.dtype), total=len(calib.x),
                             desc="observing activations", disable=not progress):
            call_unet(base, x, t, kw)
    finally:
        for h in handles:
            h.remove()
    unseen = [n for n, o in observers.items() if not o[0].lo]
    if unseen:
        logger.warning("layers never executed during calibration (kept in float): %s", unseen)
    return {n: ([o.range() for o in obs] if n in splits else obs[0].range())
            for n, obs in observers.items() if obs[0].lo}
