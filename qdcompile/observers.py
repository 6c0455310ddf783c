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

from .kernels.quantizers import act_qparams, fake_quantize_act
from .recipe import QuantRecipe, layer_bits
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


SEARCH_SAMPLES_PER_BATCH = 4096   # activation values kept per batch and quantizer for the range search
# Q-Diffusion's range search, for weights (calibration.search_weight_grid) and activations
# (search_act_range): clipping ratios 1.00, 0.99, … 0.21 of min and max, scored by mean |error|^2.4
QDIFF_RATIOS = tuple(1.0 - i * 0.01 for i in range(80))
QDIFF_NORM = 2.4


def search_act_range(x: torch.Tensor, bits: int, ratios=QDIFF_RATIOS,
                     norm: float = QDIFF_NORM) -> tuple[float, float]:
    """Q-Diffusion's activation range search: of the ranges ``(r·min, r·max)`` for the clipping
    ``ratios`` (in order), the one whose asymmetric ``bits``-bit fake-quantization of ``x``
    (METHODS §1, :func:`act_qparams`) has the least mean ``|error|^norm``. Ties keep the wider range."""
    x = x.detach().float().reshape(-1)
    if x.numel() == 0:
        raise ValueError("search_act_range needs at least one activation value")
    lo, hi = float(x.min()), float(x.max())
    best, best_err = (lo, hi), float("inf")
    for r in ratios:
        scale, zp = act_qparams(lo * r, hi * r, bits)
        err = float((fake_quantize_act(x, scale, zp, bits) - x).abs().pow(norm).mean())
        if err < best_err:
            best, best_err = (lo * r, hi * r), err
    return best


class _RangeObserver:
    """Observes the input range of one layer: running min/max, mean per-batch percentiles, or
    (``"search"``) min/max plus a fixed-size random subsample per batch for :func:`search_act_range`."""

    def __init__(self, mode: str, percentile: float, generator: Optional[torch.Generator] = None):
        self.mode, self.q = mode, percentile / 100.0
        self.lo: list[float] = []
        self.hi: list[float] = []
        self.kept: list[torch.Tensor] = []
        self.gen = generator

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.mode in ("minmax", "search"):
            self.lo.append(float(x.min()))
            self.hi.append(float(x.max()))
            if self.mode == "search":
                flat = x.reshape(-1)
                if flat.numel() > SEARCH_SAMPLES_PER_BATCH:
                    idx = torch.randint(flat.numel(), (SEARCH_SAMPLES_PER_BATCH,), generator=self.gen)
                    flat = flat[idx.to(flat.device)]
                self.kept.append(flat.cpu())
        else:
            flat = x.reshape(-1)
            if flat.numel() > 1 << 20:  # torch.quantile limit; a strided subsample keeps it cheap
                flat = flat[:: math.ceil(flat.numel() / (1 << 20))]
            qs = torch.quantile(flat, torch.tensor([1 - self.q, self.q], device=flat.device))
            self.lo.append(float(qs[0]))
            self.hi.append(float(qs[1]))

    def range(self, bits: Optional[int] = None) -> tuple[float, float]:
        if not self.lo:
            raise RuntimeError("observer saw no input")
        if self.mode == "search":
            if bits is None:
                raise ValueError("the 'search' activation observer needs the layer's activation bit width")
            # the subsample misses the extremes; the search starts from the true min/max
            x = torch.cat(self.kept + [torch.tensor([min(self.lo), max(self.hi)])])
            return search_act_range(x, bits)
        if self.mode == "minmax":
            return min(self.lo), max(self.hi)
        return sum(self.lo) / len(self.lo), sum(self.hi) / len(self.hi)


@torch.no_grad()
def observe_ranges(unet, calib: CalibrationSet, names: list[str], recipe: QuantRecipe, progress: bool = True,
                   splits: Optional[dict[str, tuple[int, ...]]] = None,
                   act_bits: Optional[int] = None, seed: int = 0) -> dict[str, Any]:
    """Input range of each named layer over the calibration set: ``(lo, hi)``, or for a layer
    in ``splits`` (name → part channel counts along dim 1) a list with one range per part.
    The ``"search"`` observer searches each range for the layer's activation bit width:
    ``act_bits`` if given, else the recipe's for that layer (:func:`layer_bits`); its
    subsample is drawn with ``seed``."""
    base = unwrap(unet)
    modules = dict(base.named_modules())
    splits = splits or {}
    gen = torch.Generator().manual_seed(seed)
    observers = {n: [_RangeObserver(recipe.act_observer, recipe.act_percentile, gen) for _ in splits.get(n, (0,))]
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
    bits = {n: (act_bits if act_bits is not None else layer_bits(n, recipe)[1]) for n in observers}
    return {n: ([o.range(bits[n]) for o in obs] if n in splits else obs[0].range(bits[n]))
            for n, obs in observers.items() if obs[0].lo}
