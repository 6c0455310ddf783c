"""Time-step-aware, data-free calibration (Q-Diffusion §"calibration set"; METHODS §2).

1. Run the full-precision sampler from Gaussian noise and keep the U-Net inputs ``x_t``
   (with ``t`` and the conditioning) at time steps spread uniformly over the whole
   trajectory, the same number of samples at each step: the calibration set.
2. Feed the calibration set through the float model with observers on the input of
   every quantizable conv/linear (min-max or percentile).
3. Quantize weights per output channel (symmetric) and derive per-tensor asymmetric
   activation quantizers from the observed ranges (METHODS §1).
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from .kernels.quantizers import act_qparams, quantize_weight, weight_scales
from .layers import conv_linear_layers, unsupported_reason
from .metadata import LayerQuant, QuantMetadata, model_identity, weight_digest
from .recipe import QuantRecipe
from .sampling import batch_kwargs, call_unet, sample, unwrap

logger = logging.getLogger(__name__)


@dataclass
class CalibrationSet:
    """U-Net inputs collected along FP sampling trajectories (kept on the CPU)."""

    x: list[torch.Tensor] = field(default_factory=list)        # each [B, C, H, W]
    t: list[torch.Tensor] = field(default_factory=list)        # each scalar timestep
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    step_indices: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(x.shape[0] for x in self.x)

    def batches(self, device: torch.device, dtype: torch.dtype):
        for x, t, kw in zip(self.x, self.t, self.kwargs):
            yield (x.to(device, dtype), t.to(device),
                   {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})


def calibration_steps(num_inference_steps: int, num_calib_steps: Optional[int]) -> list[int]:
    """Indices of the sampling steps kept: ``num_calib_steps`` spread uniformly over all steps."""
    n = num_inference_steps if num_calib_steps is None else min(num_calib_steps, num_inference_steps)
    if n < 1:
        raise ValueError(f"num_calib_steps must be >= 1, got {num_calib_steps}")
    return sorted({round(i * (num_inference_steps - 1) / max(n - 1, 1)) for i in range(n)})


def collect_calibration_set(unet, scheduler, *, num_samples: int = 64, num_inference_steps: int = 50,
                            num_calib_steps: Optional[int] = None, batch_size: Optional[int] = None,
                            sample_kwargs: Optional[dict[str, Any]] = None, seed: int = 0,
                            progress: bool = True) -> CalibrationSet:
    """Sample with the float model and keep its inputs at uniformly spread steps."""
    keep = set(calibration_steps(num_inference_steps, num_calib_steps))
    calib = CalibrationSet()

    def record(i: int, t: torch.Tensor, x: torch.Tensor, kwargs: dict[str, Any]) -> None:
        if i in keep:
            calib.x.append(x.detach().cpu())
            calib.t.append(t.detach().cpu())
            calib.kwargs.append({k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})
            calib.step_indices.append(i)

    generator = torch.Generator().manual_seed(seed)
    sample(unet, scheduler, num_images=num_samples, num_inference_steps=num_inference_steps, generator=generator,
           batch_size=batch_size, sample_kwargs=sample_kwargs, progress=progress, callback=record, to_image=False)
    return calib


class _RangeObserver:
    """Observes the input range of one layer: running min/max, or mean per-batch percentiles."""

    def __init__(self, mode: str, percentile: float):
        self.mode, self.q = mode, percentile / 100.0
        self.lo: list[float] = []
        self.hi: list[float] = []

    def __call__(self, module, args) -> None:
        x = args[0].detach().float()
        if self.mode == "minmax":
            self.lo.append(float(x.min()))
            self.hi.append(float(x.max()))
        else:
            flat = x.reshape(-1)
            if flat.numel() > 1 << 20:  # torch.quantile limit; a strided subsample keeps it cheap
                flat = flat[:: math.ceil(flat.numel() / (1 << 20))]
            qs = torch.quantile(flat, torch.tensor([1 - self.q, self.q]))
            self.lo.append(float(qs[0]))
            self.hi.append(float(qs[1]))

    def range(self) -> tuple[float, float]:
        if not self.lo:
            raise RuntimeError("observer saw no input")
        if self.mode == "minmax":
            return min(self.lo), max(self.hi)
        return sum(self.lo) / len(self.lo), sum(self.hi) / len(self.hi)


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@torch.no_grad()
def observe_ranges(unet, calib: CalibrationSet, names: list[str], recipe: QuantRecipe,
                   progress: bool = True) -> dict[str, tuple[float, float]]:
    """Input range of each named layer over the calibration set."""
    base = unwrap(unet)
    modules = dict(base.named_modules())
    observers = {n: _RangeObserver(recipe.act_observer, recipe.act_percentile) for n in names}
    handles = [modules[n].register_forward_pre_hook(observers[n]) for n in names]
    param = next(base.parameters())
    try:
        for x, t, kw in tqdm(calib.batches(param.device, param.dtype), total=len(calib.x),
                             desc="observing activations", disable=not progress):
            call_unet(base, x, t, kw)
    finally:
        for h in handles:
            h.remove()
    unseen = [n for n, o in observers.items() if not o.lo]
    if unseen:
        logger.warning("layers never executed during calibration (kept in float): %s", unseen)
    return {n: o.range() for n, o in observers.items() if o.lo}


def layer_bits(name: str, recipe: QuantRecipe) -> tuple[int, int | None]:
    if _matches(name, recipe.keep_8bit):
        return 8, (8 if recipe.act_bits is not None else None)
    return recipe.weight_bits, recipe.act_bits


def quantize_layer(module: torch.nn.Module, op: str, weight_bits: int, act_bits: int | None,
                   act_range: tuple[float, float] | None) -> LayerQuant:
    """Round-to-nearest record of one layer from its weight and observed input range."""
    w = module.weight.detach()
    scale = weight_scales(w, weight_bits)
    act_scale = act_zp = None
    if act_bits is not None:
        act_scale, act_zp = act_qparams(act_range[0], act_range[1], act_bits)
    return LayerQuant(op=op, weight_bits=weight_bits, act_bits=act_bits,
                      weight_q=quantize_weight(w, scale, weight_bits).cpu(), weight_scale=scale.cpu(),
                      act_scale=act_scale, act_zero_point=act_zp, act_range=act_range,
                      weight_digest=weight_digest(w))


def calibrate(unet, scheduler, recipe: QuantRecipe | None = None, *, num_samples: int = 64,
              num_inference_steps: int = 50, num_calib_steps: Optional[int] = None,
              batch_size: Optional[int] = None, sample_kwargs: Optional[dict[str, Any]] = None,
              seed: int = 0, progress: bool = True, attach: bool = True) -> QuantMetadata:
    """Calibrate ``unet`` for ``recipe`` (default W8A8); return (and by default attach) the metadata.

    ``sample_kwargs`` are extra U-Net arguments used while sampling the calibration
    trajectory (e.g. ``encoder_hidden_states``); a batch of 1 is broadcast.
    """
    from .api import attach as attach_metadata

    recipe = recipe or QuantRecipe.w8a8()
    base = unwrap(unet)
    if not hasattr(base, "config") or not hasattr(base.config, "in_channels"):
        raise TypeError(f"calibrate expects a diffusers UNet2DModel/UNet2DConditionModel, got {type(base).__name__}")
    layers = conv_linear_layers(base)
    fallbacks: dict[str, str] = {}
    names = []
    for name, (module, op) in layers.items():
        reason = unsupported_reason(module, op)
        if reason is None and _matches(name, recipe.skip):
            reason = "skipped by the recipe"
        if reason is not None:
            fallbacks[name] = reason
        else:
            names.append(name)
    if not names:
        raise ValueError(f"{type(base).__name__} has no conv2d/linear layer the kernels can run")

    was_training = base.training
    base.eval()
    try:
        calib = collect_calibration_set(base, scheduler, num_samples=num_samples,
                                        num_inference_steps=num_inference_steps, num_calib_steps=num_calib_steps,
                                        batch_size=batch_size, sample_kwargs=sample_kwargs, seed=seed,
                                        progress=progress)
        ranges = observe_ranges(base, calib, names, recipe, progress=progress) if recipe.act_bits is not None else {}
    finally:
        base.train(was_training)

    records: dict[str, LayerQuant] = {}
    for name in tqdm(names, desc="quantizing weights", disable=not progress):
        module, op = layers[name]
        wbits, abits = layer_bits(name, recipe)
        if abits is not None and name not in ranges:
            fallbacks[name] = "never executed during calibration"
            continue
        records[name] = quantize_layer(module, op, wbits, abits, ranges.get(name))
    meta = QuantMetadata(
        recipe=recipe, model=model_identity(base), layers=records, fallbacks=fallbacks,
        calibration={"num_samples": num_samples, "num_inference_steps": num_inference_steps,
                     "calib_step_indices": sorted(set(calib.step_indices)), "seed": seed,
                     "scheduler": type(scheduler).__name__, "sample_kwargs": sorted((sample_kwargs or {}).keys())})
    logger.info("calibrated %d layers (%d left in float)", len(records), len(fallbacks))
    if attach:
        attach_metadata(base, meta)
    return meta
