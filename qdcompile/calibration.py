"""Time-step-aware, data-free calibration (Q-Diffusion; METHODS §2).

1. Run the full-precision sampler from Gaussian noise and keep the U-Net inputs ``x_t``
   (with ``t`` and each sample's conditioning) at time steps spread uniformly over the whole
   trajectory, the same number of samples at each kept step: the calibration set
   (``num_samples`` trajectories × ``num_calib_steps`` steps, optionally only
   ``samples_per_step`` of the trajectories at each step).
2. With ``recipe.split``, find the layers fed by a skip concatenation (:mod:`.split`).
3. Feed the calibration set through the float model with observers on the input of
   every quantizable conv/linear (min-max or percentile; per part for split layers).
4. Round-to-nearest records: per-output-channel weight grids, symmetric or (``recipe.weight_grid``,
   4-bit) asymmetric with a zero point, min-max or searched (``mse``; ``qdiff-mse``: Q-Diffusion's
   80-ratio |error|^2.4 search), and per-tensor asymmetric activation quantizers (METHODS §1).
5. ``method="qdiffusion"``: block reconstruction (:mod:`.reconstruct`) refines the weight
   rounding (AdaRound), then the activation step sizes (LSQ), block by block.
6. PTQD (``recipe.noise_correction`` / ``recipe.act_bits_mixed``, :mod:`.ptqd`): per-precision
   activation quantizers and the step plan, then the quantization-noise statistics per step.

With ``checkpoint=path`` the calibration set, every finished block and each finished PTQD stage are saved
(atomically); calling again with the same path resumes after the last finished block or stage.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

import torch

from .api import attach as attach_metadata
from .io import atomic_write
from .kernels.quantizers import (act_qparams, affine_qparams, quantize_weight, weight_qparams, weight_qrange,
                                 weight_scales)
from .layers import conv_linear_layers, unsupported_reason
from .metadata import LayerQuant, QuantMetadata, SplitPart, model_identity, weight_digest
from .observers import QDIFF_NORM, QDIFF_RATIOS, CalibrationSet, observe_ranges
from .ptqd import calibrate_noise
from .recipe import QuantRecipe, layer_bits, matches
from .reconstruct import reconstruct
from .sampling import GuidedUNet, require_unet, sample
from .split import find_split_layers, quantize_split_layer

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 2   # 2: PTQD statistics stored per noise space; the check records per-image distances


def calibration_steps(num_inference_steps: int, num_calib_steps: Optional[int]) -> list[int]:
    """Indices of the sampling steps kept: ``num_calib_steps`` spread uniformly over all steps."""
    n = num_inference_steps if num_calib_steps is None else min(num_calib_steps, num_inference_steps)
    if n < 1:
        raise ValueError(f"num_calib_steps must be >= 1, got {num_calib_steps}")
    return sorted({round(i * (num_inference_steps - 1) / max(n - 1, 1)) for i in range(n)})


def _take(kwargs: dict[str, Any], idx: torch.Tensor, batch: int) -> dict[str, Any]:
    return {k: (v[idx] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch else v)
            for k, v in kwargs.items()}


def collect_calibration_set(unet, scheduler, *, num_samples: int = 64, num_inference_steps: int = 50,
                            num_calib_steps: Optional[int] = None, samples_per_step: Optional[int] = None,
                            batch_size: Optional[int] = None, sample_kwargs: Optional[dict[str, Any]] = None,
                            seed: int = 0, progress: bool = True) -> CalibrationSet:
    """Sample ``num_samples`` trajectories with the float model; keep their inputs at
    ``num_calib_steps`` uniformly spread steps. ``samples_per_step`` keeps only that many
    trajectories (a fresh random choice per step), so the set covers more trajectories for
    its size. Per-sample conditioning in ``sample_kwargs`` stays with its sample."""
    keep = calibration_steps(num_inference_steps, num_calib_steps)
    if samples_per_step is not None and not 1 <= samples_per_step <= num_samples:
        raise ValueError(f"samples_per_step must be in [1, num_samples={num_samples}], got {samples_per_step}")
    chooser = torch.Generator().manual_seed(seed + 1)
    chosen = {i: (torch.randperm(num_samples, generator=chooser)[:samples_per_step].sort().values
                  if samples_per_step is not None else None) for i in keep}
    batch_size = batch_size or num_samples
    calib = CalibrationSet()
    batch_start = [-batch_size]

    def record(i: int, t: torch.Tensor, x: torch.Tensor, kwargs: dict[str, Any]) -> None:
        if i == 0:
            batch_start[0] += batch_size
        if i not in chosen:
            return
        kw = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        x = x.detach().cpu()
        if chosen[i] is not None:
            lo = batch_start[0]
            idx = chosen[i][(chosen[i] >= lo) & (chosen[i] < lo + x.shape[0])] - lo
            if idx.numel() == 0:
                return
            kw, x = _take(kw, idx, x.shape[0]), x[idx]
        calib.x.append(x)
        calib.t.append(t.detach().cpu())
        calib.kwargs.append(kw)
        calib.step_indices.append(i)

    generator = torch.Generator().manual_seed(seed)
    sample(unet, scheduler, num_images=num_samples, num_inference_steps=num_inference_steps, generator=generator,
           batch_size=batch_size, sample_kwargs=sample_kwargs, progress=progress, callback=record, to_image=False)
    return calib




def search_weight_grid(weight: torch.Tensor, bits: int, ratios, norm: float = 2.0,
                       asymmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-output-channel clipping search: for each ratio ``r`` (in order) the grid of the range
    ``r · [min, max]`` (asymmetric, :func:`affine_qparams`) or ``r · max|W|`` (symmetric), kept
    per channel where it lowers the channel's sum of ``|Ŵ − W|^norm`` (first best wins).
    Returns scales float32 ``[N]`` and zero points int32 ``[N]`` (None when symmetric)."""
    w = weight.detach().float().reshape(weight.shape[0], -1)
    if asymmetric:
        lo, hi = w.amin(dim=1), w.amax(dim=1)
        best, best_zp = weight_qparams(weight, bits)
    else:
        qmin, qmax = weight_qrange(bits)
        amax = w.abs().amax(dim=1)
        best, best_zp = weight_scales(weight, bits), None
    best_err = torch.full((w.shape[0],), float("inf"), device=w.device)
    for r in ratios:
        if asymmetric:
            s, zp = affine_qparams(lo * r, hi * r, bits)
            q = quantize_weight(w, s, bits, zero_point=zp)
            err_w = (q.float() - zp[:, None]) * s[:, None] - w
        else:
            s = amax * r / qmax
            s = torch.where(s > 0, s, torch.ones_like(s))
            err_w = torch.round(w / s[:, None]).clamp(qmin, qmax) * s[:, None] - w
        err = (err_w ** 2).sum(dim=1) if norm == 2.0 else err_w.abs().pow(norm).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
        if asymmetric:
            best_zp = torch.where(better, zp, best_zp)
    return best, best_zp


def mse_weight_scales(weight: torch.Tensor, bits: int, ratios: int = 36, lowest: float = 0.3) -> torch.Tensor:
    """Per-output-channel symmetric scales with the clipping ratio (``lowest`` … 1 of max |W|)
    that minimises each channel's squared rounding error; float32 ``[N]``."""
    return search_weight_grid(weight, bits, torch.linspace(1.0, lowest, ratios).tolist())[0]


def weight_grid_fn(recipe: QuantRecipe):
    """``fn(weight, bits) → (scales [N], zero points [N] or None)``: the recipe's weight observer on
    the grid ``recipe.weight_grid`` gives ``bits``-bit weights."""
    def grid(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        asym = recipe.asymmetric_weights(bits)
        if recipe.weight_observer == "minmax":
            return weight_qparams(weight, bits) if asym else (weight_scales(weight, bits), None)
        if recipe.weight_observer == "mse":
            return search_weight_grid(weight, bits, torch.linspace(1.0, 0.3, 36).tolist(), asymmetric=asym)
        return search_weight_grid(weight, bits, QDIFF_RATIOS, QDIFF_NORM, asymmetric=asym)
    return grid


def quantize_layer(module: torch.nn.Module, op: str, weight_bits: int, act_bits: int | None,
                   act_range: tuple[float, float] | None, scale: Optional[torch.Tensor] = None,
                   zero_point: Optional[torch.Tensor] = None) -> LayerQuant:
    """Round-to-nearest record of one layer from its weight and observed input range
    (``scale``: per-output-channel weight scales, default symmetric min-max; ``zero_point``:
    int ``[N]`` for the asymmetric grid, with ``scale``)."""
    w = module.weight.detach()
    if zero_point is not None and scale is None:
        raise ValueError("quantize_layer: an asymmetric zero_point needs its scale")
    scale = (weight_scales(w, weight_bits) if scale is None else scale).float().cpu()
    zp = None if zero_point is None else zero_point.to(torch.int32).cpu()
    act_scale = act_zp = None
    if act_bits is not None:
        act_scale, act_zp = act_qparams(act_range[0], act_range[1], act_bits)
    return LayerQuant(op=op, weight_bits=weight_bits, act_bits=act_bits,
                      weight_q=quantize_weight(w, scale.to(w.device), weight_bits,
                                               zero_point=None if zp is None else zp.to(w.device)).cpu(),
                      weight_scale=scale, act_scale=act_scale, act_zero_point=act_zp, act_range=act_range,
                      weight_digest=weight_digest(w), weight_zero_point=zp)


# ---------------------------------------------------------------------------- checkpoint
def _record_state(rec: LayerQuant) -> dict[str, Any]:
    return dataclasses.asdict(rec)


def _record_from(state: dict[str, Any]) -> LayerQuant:
    split = [SplitPart(**p) for p in state["split"]] if state.get("split") else None
    rng = tuple(state["act_range"]) if state.get("act_range") is not None else None
    return LayerQuant(**{**state, "split": split, "act_range": rng})


class CalibrationCheckpoint:
    """Resumable calibration state in one file, replaced atomically after every change:
    the run's fingerprint, calibration set, split layers, observed ranges, and the records
    and statistics of the reconstruction blocks finished so far."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict[str, Any]):
        self.path, self.fingerprint = Path(path), fingerprint
        self.state: dict[str, Any] = {}

    def load(self) -> bool:
        """Read the file if there is one; raise if it belongs to another run."""
        if not self.path.is_file():
            return False
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"calibration checkpoint {str(self.path)!r} has version {state.get('version')!r}; "
                             f"this qdcompile writes version {CHECKPOINT_VERSION} (delete the file to start over)")
        if state.get("fingerprint") != self.fingerprint:
            old = state.get("fingerprint") or {}
            diff = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
            raise ValueError(f"calibration checkpoint {str(self.path)!r} was written by a different run (differs in "
                             f"{diff}); use another checkpoint path or delete the file to start over")
        self.state = state
        logger.info("resuming calibration from %s (%d blocks done)", self.path, state.get("next_unit", 0))
        return True

    def save(self, **updates: Any) -> None:
        self.state.update(updates, version=CHECKPOINT_VERSION, fingerprint=self.fingerprint)
        atomic_write(self.path, lambda tmp: torch.save(self.state, tmp))

    def calibration_set(self) -> CalibrationSet:
        return CalibrationSet(**self.state["calib"])

    def records(self) -> dict[str, LayerQuant]:
        return {n: _record_from(r) for n, r in self.state.get("records", {}).items()}


# ---------------------------------------------------------------------------- calibrate
def _initial_records(layers, names, recipe: QuantRecipe, ranges, splits, fallbacks) -> dict[str, LayerQuant]:
    """Round-to-nearest records (the result for ``rtn``, the start for ``qdiffusion``)."""
    grid_fn = weight_grid_fn(recipe)
    records: dict[str, LayerQuant] = {}
    for name in names:
        module, op = layers[name]
        wbits, abits = layer_bits(name, recipe)
        if abits is not None and name not in ranges:
            fallbacks[name] = "never executed during calibration"
            continue
        if name in splits:
            records[name] = quantize_split_layer(module, op, wbits, abits, splits[name], ranges[name], grid_fn)
        else:
            scale, zp = grid_fn(module.weight.detach(), wbits)
            records[name] = quantize_layer(module, op, wbits, abits, ranges.get(name), scale=scale, zero_point=zp)
    return records


def calibrate(unet, scheduler, recipe: QuantRecipe | None = None, *, num_samples: int = 64,
              num_inference_steps: int = 50, num_calib_steps: Optional[int] = None,
              samples_per_step: Optional[int] = None, batch_size: Optional[int] = None,
              sample_kwargs: Optional[dict[str, Any]] = None, seed: int = 0, progress: bool = True,
              attach: bool = True, checkpoint: str | os.PathLike | None = None,
              guidance_scale: Optional[float] = None,
              uncond_kwargs: Optional[dict[str, Any]] = None) -> QuantMetadata:
    """Calibrate ``unet`` for ``recipe`` (default W8A8); return (and by default attach) the metadata.

    ``sample_kwargs`` are extra U-Net arguments used while sampling the calibration
    trajectory (e.g. ``encoder_hidden_states``); a batch of 1 is broadcast, a batch of
    ``num_samples`` gives each trajectory its own conditioning. ``checkpoint``: file to save
    the progress to and resume from (see the module docstring).

    ``guidance_scale`` (conditional U-Nets sampled with classifier-free guidance): the
    trajectories follow the guided ε ``ε_u + g·(ε_c − ε_u)`` (``uncond_kwargs``: the unconditional
    arguments, e.g. the empty prompt's ``encoder_hidden_states``), the calibration set holds the
    U-Net's inputs of both halves, and the PTQD statistics and the mixed-precision plan's SNR are
    taken on the guided ε — the quantity the sampler's step uses, where the corrections then
    apply. ``g`` is stored in ``meta.calibration["guidance_scale"]``.
    """
    recipe = recipe or QuantRecipe.w8a8()
    base = require_unet(unet, "calibrate")
    sampler_model = base
    if guidance_scale is not None:
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
                or not math.isfinite(guidance_scale):
            raise ValueError(f"calibrate: guidance_scale must be a finite number, got {guidance_scale!r}")
        if not sample_kwargs or not uncond_kwargs:
            raise ValueError("calibrate(guidance_scale=...) is for conditional U-Nets: pass the conditioning "
                             "(sample_kwargs) and the unconditional arguments (uncond_kwargs, e.g. "
                             "{'encoder_hidden_states': <the empty prompt's embeddings>})")
        sampler_model = GuidedUNet(base, float(guidance_scale), uncond_kwargs)
    elif uncond_kwargs:
        raise ValueError("calibrate: uncond_kwargs is used only with guidance_scale")
    layers = conv_linear_layers(base)
    fallbacks: dict[str, str] = {}
    names = []
    for name, (module, op) in layers.items():
        reason = unsupported_reason(module, op)
        if reason is None and matches(name, recipe.skip):
            reason = "skipped by the recipe"
        if reason is not None:
            fallbacks[name] = reason
        else:
            names.append(name)
    if not names:
        raise ValueError(f"{type(base).__name__} has no conv2d/linear layer the kernels can run")

    facts = {"num_samples": num_samples, "num_inference_steps": num_inference_steps,
             "num_calib_steps": num_calib_steps, "samples_per_step": samples_per_step, "batch_size": batch_size,
             "seed": seed, "scheduler": type(scheduler).__name__, "sample_kwargs": sorted((sample_kwargs or {}).keys())}
    if guidance_scale is not None:   # the sampler's ε the statistics describe (absent: the unguided U-Net output)
        facts["guidance_scale"] = float(guidance_scale)
    ckpt = None
    if checkpoint is not None:
        ckpt = CalibrationCheckpoint(checkpoint, {
            "recipe": recipe.to_dict(), "model": model_identity(base)["config_hash"], "layers": names,
            "weights": torch.stack([weight_digest(layers[n][0].weight) for n in names]).tolist(), **facts})
    was_training = base.training
    base.eval()
    try:
        if ckpt is not None and ckpt.load():
            calib, splits, ranges = ckpt.calibration_set(), ckpt.state["splits"], ckpt.state["ranges"]
        else:
            calib = collect_calibration_set(sampler_model, scheduler, num_samples=num_samples,
                                            num_inference_steps=num_inference_steps, num_calib_steps=num_calib_steps,
                                            samples_per_step=samples_per_step, batch_size=batch_size,
                                            sample_kwargs=sample_kwargs, seed=seed, progress=progress)
            if guidance_scale is not None:
                calib = _with_uncond(calib, uncond_kwargs)
            splits = {}
            if recipe.split:
                x, t, kw = next(calib.batches(*_device_dtype(base)))
                found = find_split_layers(base, x[:1], t, _take(kw, torch.tensor([0]), x.shape[0]))
                splits = {n: c for n, c in found.items() if n in names}
            ranges = observe_ranges(base, calib, names, recipe, progress=progress,
                                    splits=splits, seed=seed) if recipe.act_bits is not None else {}
            if ckpt is not None:
                ckpt.save(calib=calib.state(), splits=splits, ranges=ranges, records={}, next_unit=0, stats=[])
        records = _initial_records(layers, names, recipe, ranges, splits, fallbacks)
        recon_stats: list[dict[str, Any]] = []
        if recipe.method == "qdiffusion":
            start = 0
            if ckpt is not None:
                records.update(ckpt.records())
                start, recon_stats = ckpt.state["next_unit"], list(ckpt.state["stats"])

            def save(next_unit: int, recs: dict[str, LayerQuant], stats: list[dict[str, Any]]) -> None:
                if ckpt is not None:
                    ckpt.save(records={n: _record_state(r) for n, r in recs.items()}, next_unit=next_unit,
                              stats=list(stats))

            records, recon_stats = reconstruct(base, calib, records, recipe, start=start, stats=recon_stats,
                                               on_unit_done=save, seed=seed, progress=progress)
    finally:
        base.train(was_training)

    meta = QuantMetadata(
        recipe=recipe, model=model_identity(base), layers=records, fallbacks=fallbacks,
        calibration={**facts, "num_train_timesteps": _schedule_length(scheduler), "calib_step_indices": sorted(set(calib.step_indices)), "calib_set_size": len(calib),
                     "split_layers": {n: list(c) for n, c in splits.items()},
                     # observed input range per part of each split layer (the concat's range spans them all)
                     "split_ranges": {n: [list(r) for r in ranges[n]] for n in splits if n in ranges},
                     **({"reconstruction": recon_stats} if recipe.method == "qdiffusion" else {})})
    if recipe.noise_correction or recipe.act_bits_mixed:
        base.eval()
        try:
            calibrate_noise(sampler_model, scheduler, meta, calib, num_inference_steps=num_inference_steps,
                            batch_size=batch_size, sample_kwargs=sample_kwargs, seed=seed, progress=progress,
                            checkpoint=ckpt)
        finally:
            base.train(was_training)
    logger.info("calibrated %d layers (%d split, %d left in float)", len(records), len(splits), len(fallbacks))
    if attach:
        attach_metadata(base, meta)
    return meta


def _with_uncond(calib: CalibrationSet, uncond_kwargs: dict[str, Any]) -> CalibrationSet:
    """The guided sampler's U-Net inputs: each entry once with its conditioning and once with the
    unconditional arguments (both halves of the batched classifier-free-guidance call)."""
    out = CalibrationSet()
    for x, t, kw, i in zip(calib.x, calib.t, calib.kwargs, calib.step_indices):
        n = x.shape[0]
        un = {k: (v.detach().cpu().expand(n, *v.shape[1:]) if torch.is_tensor(v) and v.shape[0] == 1 else
                  v.detach().cpu() if torch.is_tensor(v) else v) for k, v in uncond_kwargs.items()}
        for k_ in (kw, un):
            out.x.append(x)
            out.t.append(t)
            out.kwargs.append(dict(k_))
            out.step_indices.append(i)
    return out


def _schedule_length(scheduler) -> Optional[int]:
    """The scheduler's number of training time steps (the range every time step lies in), if it says."""
    n = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
    return int(n) if isinstance(n, int) else None


def _device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype
