"""PTQD noise correction and step-aware mixed precision (METHODS §3, seed 001).

Quantized noise prediction ``ε̂ = ε + Δε`` with ``Δε = k·ε + Δ'`` per denoising step:

* :func:`estimate_noise` — from FP/quantized prediction pairs on the same inputs: ``k`` by
  least squares (clamped ≥ 0), the channel-wise mean ``μ`` of the residual ``Δ'``, its
  variance ``σ_q²`` (after removing ``μ``), and ``SNR_Q`` before and after correction.
* Correction of one step: ``ε_c = (ε̂ − μ) / (1 + k)`` — a per-channel affine map of the
  U-Net output, ``ε_c = a ⊙ ε̂ + b`` (:meth:`qdcompile.noise.StepNoise.affine`), which the compiled model
  folds into the epilogue of its last conv (per-channel weight scale ``s·a``, bias
  correction ``(a − 1)·bias + b``).
* Variance schedule calibration: with ``c_t`` the coefficient of ``ε`` in the sampler's
  ``x_{t−1}`` update, the quantized step adds ``c_t² σ_q² / (1 + k)²`` of variance; the
  sampler draws its noise with ``σ'_t² = max(0, σ_t² − c_t² σ_q² / (1 + k)²)`` so the total
  stays ``σ_t²`` (:func:`qdcompile.noise.calibrated_sigma`). Supported: ``DDPMScheduler`` (fixed variance
  types) and ``DDIMScheduler`` with ``η > 0`` — where ``c_t`` itself depends on ``σ`` and
  the equation is solved by bisection. Deterministic samplers (``σ_t = 0``) get ``k`` and
  the bias only.
* Correction check (:func:`check_corrections`): at the end of calibration, k and the bias
  are each dropped from the sampler's default when they clearly move a few validation
  samples away from the float model's samples from the same seeds.
* Step-aware mixed precision (:func:`choose_bits`): per step the smallest activation bit
  width with ``SNR_Q > SNR_F = ᾱ_t / (1 − ᾱ_t)``, else the largest; ``recipe.mixed_margin_db``
  raises the bar to ``SNR_Q > SNR_F · 10^(margin/20)``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Optional, Sequence

import torch

from .kernels.quantizers import act_qparams
from .metadata import ActQuant, NOISE_SPACES
from .metrics import norm_ratio
from .noise import StepNoise, clips_x0, effective_eps, eps_channels, nearest
from .observers import CalibrationSet, observe_ranges
from .pipeline import Corrections, QuantizedUNet
from .recipe import matches
from .reconstruct import reconstruct
from .sampling import GuidedUNet, call_unet, sample, unwrap
from .simulate import simulate
from .trajectory import TrajectoryRecorder

logger = logging.getLogger(__name__)


# ============================================================================ statistics
def estimate_noise(eps: torch.Tensor, eps_q: torch.Tensor, timestep: int = 0) -> StepNoise:
    """PTQD statistics of ``eps_q`` against ``eps`` (``[B, C, ...]``, the ε channels only).

    ``k = ⟨Δε, ε⟩ / ⟨ε, ε⟩`` clamped to ≥ 0; ``Δ' = Δε − k·ε``; ``μ_c`` = mean of ``Δ'`` over
    all but the channel dimension; ``σ_q²`` = mean of ``(Δ' − μ)²``.
    """
    if eps.shape != eps_q.shape or eps.dim() < 2:
        raise ValueError(f"estimate_noise needs two predictions of one shape [B, C, ...], got {list(eps.shape)} "
                         f"and {list(eps_q.shape)}")
    e, q = eps.double(), eps_q.double()
    d = q - e
    ee = float((e * e).sum())
    k = max(0.0, float((d * e).sum()) / ee) if ee > 0 else 0.0
    resid = d - k * e
    dims = [i for i in range(resid.dim()) if i != 1]
    mu = resid.mean(dim=dims)
    shape = [1, -1] + [1] * (resid.dim() - 2)
    centred = resid - mu.view(shape)
    var = float(centred.pow(2).mean())
    corrected = (q - mu.view(shape)) / (1 + k)
    return StepNoise(int(timestep), k, tuple(float(v) for v in mu), var, norm_ratio(ee, float(d.pow(2).sum())),
                     norm_ratio(ee, float((corrected - e).pow(2).sum())), int(e.shape[0]))


# ============================================================================ mixed precision
def snr_f(scheduler, timestep: int) -> float:
    """``SNR_F(t) = ᾱ_t / (1 − ᾱ_t)`` (PTQD eq. 14)."""
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod: SNR_F (and the mixed-precision plan) "
                         "needs a DDPM-family (variance-preserving) scheduler")
    a = float(alphas[int(timestep)])
    return math.inf if a >= 1.0 else a / (1.0 - a)


def choose_bits(snr_by_bits: dict[int, float], snr_forward: float, margin_db: float = 0.0) -> int:
    """The smallest bit width whose ``SNR_Q`` exceeds ``SNR_F · 10^(margin_db/20)``, else the
    largest (``margin_db = 0``: PTQD's rule ``SNR_Q > SNR_F``)."""
    threshold = snr_forward * 10.0 ** (margin_db / 20.0)
    for bits in sorted(snr_by_bits):
        if snr_by_bits[bits] > threshold:
            return bits
    return max(snr_by_bits)


def plan_precisions(stats: dict[int, list[StepNoise]], scheduler, margin_db: float = 0.0) -> list[tuple[int, int]]:
    """``(timestep, act bits)`` per step of ``stats`` (width → per-step statistics, all widths
    measured on the same steps): :func:`choose_bits` with each width's ``SNR_Q`` there."""
    widths = sorted(stats)
    if not widths:
        raise ValueError("no SNR_Q statistics to plan precisions from")
    timesteps = [s.timestep for s in stats[widths[-1]]]
    return [(t, choose_bits({b: nearest(stats[b], t).snr_q for b in widths}, snr_f(scheduler, t), margin_db))
            for t in timesteps]


# ============================================================================ calibration (called by qdcompile.calibrate)
def _subset(calib, keep) -> Any:
    """The entries of a calibration set whose time step satisfies ``keep(t)``."""
    out = CalibrationSet()
    for x, t, kw, i in zip(calib.x, calib.t, calib.kwargs, calib.step_indices):
        if keep(int(t)):
            out.x.append(x)
            out.t.append(t)
            out.kwargs.append(kw)
            out.step_indices.append(i)
    return out


def calibrate_activations(unet, calib, records: dict[str, Any], bits: int, recipe, *, seed: int = 0,
                          progress: bool = True) -> dict[str, list[Any]]:
    """Activation quantizers at ``bits`` for the layers of ``records`` not kept at 8 bit, with
    the records' weights fixed: observed ranges on ``calib``, then (``qdiffusion``) LSQ step
    sizes block by block. Returns layer → quantizer per input part."""
    import dataclasses

    names = [n for n, r in records.items() if not matches(n, recipe.keep_8bit) and r.act_quants()]
    splits = {n: tuple(p.channels for p in records[n].split) for n in names if records[n].split}
    ranges = observe_ranges(unet, calib, names, recipe, progress=progress, splits=splits, act_bits=bits, seed=seed)

    def quantizer(lo_hi) -> ActQuant:
        scale, zp = act_qparams(lo_hi[0], lo_hi[1], bits)
        return ActQuant(bits, scale, zp, (float(lo_hi[0]), float(lo_hi[1])))

    new = dict(records)
    for n in names:
        if n in ranges:
            rng = ranges[n] if n in splits else [ranges[n]]
            new[n] = records[n].with_act([quantizer(r) for r in rng])
    if recipe.method == "qdiffusion" and recipe.act_lsq_iters > 0:
        new, _ = reconstruct(unet, calib, new, dataclasses.replace(recipe, recon_iters=0), seed=seed, progress=progress)
    return {n: new[n].act_quants() for n in names if n in ranges}


@torch.no_grad()
def noise_statistics(unet, meta, trajectory, channels: int, precisions: Sequence[Optional[int]],
                     progress: bool = True, scheduler=None,
                     spaces: Sequence[str] = ("output",)) -> dict[str, dict[int, list[StepNoise]]]:
    """Per noise space, per precision, per time step of ``trajectory`` (inputs with FP
    predictions): PTQD stats of the fake-quantized model against FP, over all images of the
    step. Spaces: ``"output"``, the U-Net's ε; ``"sampler"``, the ε ``scheduler``'s step uses
    (:func:`effective_eps`: after its x0 clipping; the trajectory inputs are then x_t, which
    DDPM/DDIM do not scale). Every space comes from the same U-Net evaluations."""
    from tqdm.auto import tqdm

    unknown = set(spaces) - set(NOISE_SPACES)
    if unknown or not spaces:
        raise ValueError(f"noise spaces must be some of {NOISE_SPACES}, got {list(spaces)}")
    if "sampler" in spaces and scheduler is None:
        raise ValueError("sampler-space statistics need the scheduler whose step uses the ε")

    def used(space, x, t, e):
        return e if space == "output" else effective_eps(scheduler, x, t, e)

    p = next(unwrap(unet).parameters())
    out: dict[str, dict[int, list[StepNoise]]] = {sp: {} for sp in spaces}
    for bits in precisions:
        view = meta.at_precision(bits)
        by_t: dict[int, dict[str, tuple[list, list]]] = {}
        with simulate(unet, view):
            for s in tqdm(trajectory.steps, desc=f"PTQD statistics A{bits}", disable=not progress, leave=False):
                kw = {k: (v.to(p.device) if torch.is_tensor(v) else v) for k, v in s.kwargs.items()}
                eps_q = call_unet(unet, s.x.to(p.device, p.dtype), s.timestep.to(p.device), kw).float().cpu()
                x, eps = s.x.float(), s.eps[:, :channels].float()
                for sp in spaces:
                    e, q = by_t.setdefault(int(s.timestep), {}).setdefault(sp, ([], []))
                    e.append(used(sp, x, s.timestep, eps))
                    q.append(used(sp, x, s.timestep, eps_q[:, :channels]))
        key = meta.default_act_bits if bits is None else bits
        for sp in spaces:
            out[sp][key] = [estimate_noise(torch.cat(by[sp][0]), torch.cat(by[sp][1]), t)
                            for t, by in sorted(by_t.items(), reverse=True)]
    return out


class _Stages:
    """PTQD stage results kept in the calibration checkpoint (when there is one): each stage
    is computed once, saved, and read back when an interrupted calibration resumes."""

    def __init__(self, ckpt):
        self.ckpt = ckpt
        self.done: dict[str, Any] = dict(ckpt.state.get("ptqd", {})) if ckpt is not None else {}

    def run(self, key: str, compute, to_state, from_state):
        if key in self.done:
            return from_state(self.done[key])
        value = compute()
        if self.ckpt is not None:
            self.done[key] = to_state(value)
            self.ckpt.save(ptqd=dict(self.done))
        return value


def _acts_state(acts: dict[str, list[Any]]) -> dict[str, list[dict[str, Any]]]:
    return {n: [a.to_dict() for a in parts] for n, parts in acts.items()}


def _acts_from(state: dict[str, list[dict[str, Any]]]) -> dict[str, list[Any]]:
    return {n: [ActQuant.from_dict(a) for a in parts] for n, parts in state.items()}


def _stats_state(stats: dict[int, list[StepNoise]]) -> dict[int, list[dict[str, Any]]]:
    return {b: [s.to_dict() for s in v] for b, v in stats.items()}


def _stats_from(state: dict[int, list[dict[str, Any]]]) -> dict[int, list[StepNoise]]:
    return {int(b): [StepNoise.from_dict(s) for s in v] for b, v in state.items()}


def _spaces_state(stats: dict[str, dict[int, list[StepNoise]]]) -> dict[str, Any]:
    return {sp: _stats_state(v) for sp, v in stats.items()}


def _spaces_from(state: dict[str, Any]) -> dict[str, dict[int, list[StepNoise]]]:
    return {sp: _stats_from(v) for sp, v in state.items()}


CHECK_SEED_OFFSET = 104729   # validation seeds of the correction check: apart from calibration's and the statistics'
CHECK_Z = 2.0                # a correction is dropped when it adds MSE to FP more than 2 standard errors above 0


def paired_change(after: torch.Tensor, before: torch.Tensor) -> tuple[float, float]:
    """Mean of the per-image change ``after - before`` (same seeds) and its standard error."""
    diff = (after - before).double()
    n = diff.numel()
    return float(diff.mean()), float(diff.std() / math.sqrt(n)) if n > 1 else 0.0


def change_verdict(delta: float, se: float) -> str:
    """"hurts" / "helps" when a paired change is more than :data:`CHECK_Z` standard errors above /
    below 0 (the correction check's rule), else "within noise"."""
    if delta > 0 and delta > CHECK_Z * se:
        return "hurts"
    if delta < 0 and delta < -CHECK_Z * se:
        return "helps"
    return "within noise"


@torch.no_grad()
def check_corrections(unet, scheduler, meta, *, num_inference_steps: int, samples: int, seed: int,
                      batch_size=None, sample_kwargs=None, progress: bool = True) -> dict[str, Any]:
    """Which PTQD corrections do not move the quantized sampler's results away from the float model's.

    ``samples`` images from the seed ``seed`` are drawn with the float model and with the
    (simulated) quantized sampler of ``meta`` — following its precision plan, if any — without
    corrections, then adding k (skipped when ``k = 0`` at every step: it is the identity), then
    the bias. Per image, the mean squared difference of the final sample (the sampler's output
    space: pixels or latents) to FP's; a correction is dropped when it raises that difference by
    more than :data:`CHECK_Z` standard errors of the paired per-image change (a clear harm, not a
    noise-level one), else kept. VSC is not judged this way: changing the injected noise moves
    every sample whatever it does to the distribution; it is kept. Returns the record stored in
    ``meta.calibration["correction_check"]``; its ``"kept"`` is the metadata's default corrections."""
    mixed = bool(meta.precision_plan)

    def run(model, sched):
        return sample(model, sched, num_images=samples, num_inference_steps=num_inference_steps,
                      generator=torch.Generator().manual_seed(seed), batch_size=batch_size,
                      sample_kwargs=sample_kwargs, progress=progress, to_image=False).float()

    fp = run(unet, scheduler)

    def per_image(corr: Corrections) -> torch.Tensor:
        q = QuantizedUNet(unet, meta, backend="simulate", corrections=corr, mixed=mixed)
        return (run(_guided_like(unet, q), q.wrap_scheduler(scheduler)) - fp).pow(2).flatten(1).mean(1).double()

    kept = Corrections.none()
    plan = QuantizedUNet(unet, meta, backend="simulate", corrections=Corrections(), mixed=mixed).plan(
        scheduler, num_inference_steps)
    best = per_image(kept)
    mse = [["none", float(best.mean())]]   # in the order tried
    changes = []
    for name, flag in (("k", "correlated"), ("bias", "bias")):
        cand = dataclasses.replace(kept, **{flag: True})
        if flag == "correlated" and all(r["k"] == 0 for r in plan):
            kept = cand   # dividing by 1 + 0 changes nothing
            continue
        d = per_image(cand)
        mse.append([cand.label(), float(d.mean())])
        delta, se = paired_change(d, best)
        harmful = change_verdict(delta, se) == "hurts"
        changes.append({"correction": name, "delta": delta, "se": se, "kept": not harmful})
        if harmful:
            logger.warning("PTQD correction check: %s moved %d validation samples further from the float model's "
                           "(mean squared difference %.4g -> %.4g, +%.2g ± %.2g); the sampler will not apply it by "
                           "default", "the correlated-noise correction (k)" if name == "k" else "the bias correction",
                           samples, float(best.mean()), float(d.mean()), delta, se)
        else:
            kept, best = cand, d
    kept = dataclasses.replace(kept, variance=True)
    return {"samples": samples, "seed": seed, "steps": num_inference_steps, "z": CHECK_Z, "mse_vs_fp": mse,
            "changes": changes, "kept": {"correlated": kept.correlated, "bias": kept.bias, "variance": kept.variance},
            "kept_per_image": [float(v) for v in best]}


def _guided_like(model, quantized):
    """``quantized`` under the classifier-free guidance of ``model`` (a :class:`GuidedUNet`), if any."""
    return model.rewrap(quantized) if isinstance(model, GuidedUNet) else quantized


def choose_space(checks: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The noise space whose checked corrections leave the validation samples closest to FP's
    (lowest mean of the per-image squared difference; a tie keeps ``"sampler"``), with the
    record of the comparison: each space's mean, kept corrections, and the paired change
    output − sampler ± its standard error."""
    per = {sp: torch.tensor(c["kept_per_image"], dtype=torch.float64) for sp, c in checks.items()}
    means = {sp: float(v.mean()) for sp, v in per.items()}
    chosen = min(sorted(means, key=lambda sp: sp != "sampler"), key=means.get)
    record: dict[str, Any] = {"mse_vs_fp": means, "corrections": {sp: Corrections(**c["kept"]).label()
                                                                   for sp, c in checks.items()}, "chosen": chosen}
    if set(per) == {"sampler", "output"}:
        record["delta"], record["se"] = paired_change(per["output"], per["sampler"])
    return chosen, record


def calibrate_noise(unet, scheduler, meta, calib, *, num_inference_steps: int, batch_size=None, sample_kwargs=None,
                    seed: int = 0, progress: bool = True, checkpoint=None) -> None:
    """PTQD stage of :func:`qdcompile.calibrate`, filling ``meta`` in place: for a mixed recipe
    the per-precision activation quantizers and the plan; the noise statistics per precision
    and step; and the correction layer. Trajectories are fresh FP samples (``seed + 7919``),
    every step of the ``num_inference_steps`` schedule. ``checkpoint`` (a
    ``CalibrationCheckpoint``): each finished stage is saved there and skipped on resume."""
    recipe = meta.recipe
    stages = _Stages(checkpoint)

    def record(model):
        """Inputs of ``model``'s sampling trajectories (``model(x_t)`` drives them), with FP's ε̂ on each."""
        recorder = TrajectoryRecorder(recipe.noise_samples)
        sample(model, scheduler, num_images=recipe.noise_samples, num_inference_steps=num_inference_steps,
               generator=torch.Generator().manual_seed(seed + 7919), batch_size=batch_size,
               sample_kwargs=sample_kwargs, progress=progress, callback=recorder, to_image=False)
        return recorder.finish(unet)

    trajectory = record(unet)
    channels = eps_channels(unet)
    meta.noise_layer = "conv_out" if "conv_out" in meta.layers else list(meta.layers)[-1]
    if recipe.act_bits_mixed:
        others = [b for b in recipe.act_bits_mixed if b != recipe.act_bits]
        # 1. every candidate width calibrated on all steps → SNR_Q per step → the plan
        for b in others:
            meta.act_variants[b] = stages.run(
                f"acts_all_A{b}", lambda b=b: calibrate_activations(unet, calib, meta.layers, b, recipe, seed=seed,
                                                                    progress=progress), _acts_state, _acts_from)
        stats = stages.run("plan_stats", lambda: noise_statistics(unet, meta, trajectory, channels, [None, *others],
                                                                  progress)["output"], _stats_state, _stats_from)
        meta.precision_plan = plan_precisions(stats, scheduler, recipe.mixed_margin_db)
        # 2. each width's activation quantizers re-calibrated on its own steps (weights shared)
        plan = dict(meta.precision_plan)
        for b in recipe.act_bits_mixed:
            own = _subset(calib, lambda t, b=b: nearest(list(plan.items()), t, key=lambda e: e[0])[1] == b)
            if not own.x:
                continue   # never chosen: keep its all-steps calibration
            acts = stages.run(f"acts_own_A{b}", lambda own=own, b=b: calibrate_activations(
                unet, own, meta.layers, b, recipe, seed=seed, progress=progress), _acts_state, _acts_from)
            if b == recipe.act_bits:
                meta.layers.update({n: meta.layers[n].with_act(a) for n, a in acts.items()})
            else:
                meta.act_variants[b] = acts
        meta.calibration["precision_plan_counts"] = {f"A{b}": sum(v == b for v in plan.values())
                                                     for b in recipe.act_bits_mixed}
    if recipe.noise_inputs == "quantized":   # the uncorrected quantized sampler's own trajectories

        trajectory = record(_guided_like(unet, QuantizedUNet(unet, meta, backend="simulate",
                                                             corrections=Corrections.none(),
                                                             mixed=bool(meta.precision_plan))))
    # which ε the statistics describe: "auto" estimates both from the same U-Net evaluations and
    # lets the correction check pick; without x0 clipping the two are the same ε
    guided = getattr(unet, "guidance_scale", None) is not None
    if guided and not clips_x0(scheduler):
        spaces = ["sampler"]   # the guided ε, corrected where the scheduler's step receives it
    elif not clips_x0(scheduler) or recipe.noise_space == "output":
        spaces = ["output"]
    elif recipe.noise_space == "sampler" or not recipe.check_samples:
        spaces = ["sampler"]   # "auto" without a check: the ε the step uses
    else:
        spaces = ["sampler", "output"]
    stats = stages.run("noise_" + "+".join(spaces), lambda: noise_statistics(
        unet, meta, trajectory, channels, [None, *sorted(meta.act_variants)], progress, scheduler=scheduler,
        spaces=spaces), _spaces_state, _spaces_from)
    meta.corrections = None
    checks: dict[str, dict[str, Any]] = {}
    for sp in spaces if recipe.check_samples else ():
        meta.noise, meta.noise_space = stats[sp], sp
        checks[sp] = stages.run(f"check_{sp}", lambda: check_corrections(
            unet, scheduler, meta, num_inference_steps=num_inference_steps, samples=recipe.check_samples,
            seed=seed + CHECK_SEED_OFFSET, batch_size=batch_size, sample_kwargs=sample_kwargs, progress=progress),
            dict, dict)
    space = spaces[0]
    if len(checks) > 1:
        space, choice = choose_space(checks)
        checks[space] = {**checks[space], "space_choice": choice}
    meta.noise, meta.noise_space = stats[space], space
    meta.calibration["noise"] = {"samples": recipe.noise_samples, "seed": seed + 7919, "steps": num_inference_steps,
                                 "inputs": recipe.noise_inputs, "space": space, "spaces_estimated": spaces,
                                 "scheduler": type(scheduler).__name__, "eps_channels": channels,
                                 "clipped": clips_x0(scheduler)}
    if checks:
        meta.corrections = dict(checks[space]["kept"])
        meta.calibration["correction_check"] = checks[space]
