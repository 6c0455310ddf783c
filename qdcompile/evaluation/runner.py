"""One evaluation run: every configuration of :class:`EvalOptions` with the same seeds and sample
counts (:func:`run_quality`)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as _dt
import logging
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .. import __version__
from ..calibration import calibrate
from ..classifier import digit_metrics, load_mnist_classifier
from ..devices import default_dtype, resolve_device
from ..io import jsonable
from ..metrics import psnr_db, snr_db
from ..models import load_model, prompt_embeds_kwargs
from ..pipeline import Corrections, QuantizedUNet
from ..recipe import QuantRecipe
from ..sampling import model_sample_shape, sample, unwrap
from ..trajectory import Trajectory, TrajectoryRecorder
from .configs import CONFIGS, DEFAULT_CONFIGS, EvalConfig, NotAvailable, correlated_snr_check, quantized_model
from .fid import CIFAR_NOTE, FID_NOTE, FeatureSpace, INCEPTION_NOTE, real_cifar10_images, real_mnist_images
from .metrics import colour_shift
from .trajectory import step_snr, summarize_snr

logger = logging.getLogger(__name__)


@dataclass
class EvalOptions:
    model: str = "mnist"
    configs: tuple[str, ...] = DEFAULT_CONFIGS
    num_samples: int = 64
    steps: int = 50
    calib_samples: int = 64
    calib_steps: Optional[int] = None
    batch_size: Optional[int] = None
    snr_samples: int = 32
    real_samples: int = 10000
    backend: str = "qdiff"
    fid: bool = True
    fid_backend: str = "torch-fidelity"
    inception_weights: Optional[str] = None
    kid_subsets: int = 100
    recipe_overrides: tuple[tuple[str, Any], ...] = ()
    prompt_embeds: Optional[str] = None
    grid_images: int = 16
    device: str = "cpu"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = [c for c in self.configs if c not in CONFIGS]
        if unknown:
            raise ValueError(f"unknown configuration(s) {unknown}; available: {', '.join(CONFIGS)}")
        if not self.configs:
            raise ValueError("no configuration to evaluate")
        for name in ("num_samples", "steps", "calib_samples", "snr_samples", "kid_subsets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_samples < 2 and self.fid:
            raise ValueError("FID/KID need at least 2 generated samples (--num-samples), or --no-fid")
        if self.backend not in ("qdiff", "simulate"):
            raise ValueError(f"backend must be 'qdiff' or 'simulate', got {self.backend!r}")
        if self.fid_backend not in ("torch-fidelity", "builtin"):
            raise ValueError(f"fid_backend must be 'torch-fidelity' or 'builtin', got {self.fid_backend!r}")
        if self.recipe_overrides:
            known = {f.name for f in dataclasses.fields(QuantRecipe)}
            bad = [k for k, _ in self.recipe_overrides if k not in known or k in ("name", "version")]
            if bad:
                raise ValueError(f"--recipe-set: {bad} are not QuantRecipe fields this qdcompile can override "
                                 f"(fields: {', '.join(sorted(known - {'name', 'version'}))})")


def _fid_plan(opts: EvalOptions, image_shape: tuple[int, int, int], pixel_space: bool) -> tuple[Optional[str], str]:
    """Which feature extractor FID/KID use for these images, or None and why not."""
    if not opts.fid:
        return None, "FID/KID off (--no-fid)"
    if not pixel_space:
        return None, "FID/KID skipped: the model samples latents, not images"
    if opts.inception_weights:
        if image_shape[0] not in (1, 3):
            return None, f"FID/KID skipped: images have {image_shape[0]} channels"
        return "inception", INCEPTION_NOTE
    if image_shape == (3, 32, 32):
        return "cifar10", CIFAR_NOTE
    if image_shape != (1, 28, 28):
        return None, (f"FID/KID skipped: images are {'x'.join(map(str, image_shape))}; the offline features fit "
                      "1x28x28 (MNIST classifier) and 3x32x32 (CIFAR-10 ResNet-56) images (pass --inception-weights "
                      "for others)")
    return "mnist", FID_NOTE


def run_quality(opts: EvalOptions, unet=None, scheduler=None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate every configuration of ``opts``; return the results (what the JSON file holds,
    plus the sample tensors under ``"_samples"`` and SNR curves under ``"_snr"``).

    ``unet``/``scheduler`` default to ``load_model(opts.model)``. Configurations whose recipe
    this qdcompile cannot build are reported as not available; a configuration that fails
    while running is reported as failed with the error, and the others still run.
    """
    device = resolve_device(opts.device)
    dtype = default_dtype(device)
    if unet is None:
        unet, scheduler = load_model(opts.model, device=device, dtype=dtype)
    elif scheduler is None:
        raise ValueError("run_quality: pass the scheduler with the unet")
    base = unwrap(unet).eval()
    device, dtype = str(next(base.parameters()).device), next(base.parameters()).dtype
    pixel_space = type(base).__name__ == "UNet2DModel"
    shape = model_sample_shape(base)
    kwargs = prompt_embeds_kwargs(base, opts.prompt_embeds, device, dtype)

    extractor, fid_note = _fid_plan(opts, shape, pixel_space)
    space = None
    if extractor is not None:
        real = (real_mnist_images(opts.real_samples) if shape == (1, 28, 28) else
                real_cifar10_images() if extractor == "cifar10" else None)
        if real is None:
            extractor, fid_note = None, "FID/KID skipped: no real image set for these images (MNIST and CIFAR-10 ship)"
        else:
            space = FeatureSpace(real, extractor=extractor,
                                 backend="builtin" if extractor == "cifar10" else opts.fid_backend,
                                 inception_weights=opts.inception_weights, device=device,
                                 kid_subsets=opts.kid_subsets, seed=2020)
    log(f"qdcompile eval: {opts.model}, {opts.num_samples} samples x {opts.steps} steps, seed {opts.seed}, "
        f"device {device}, quantized models via {opts.backend}")
    log(f"  {fid_note}")

    results: dict[str, Any] = {
        "qdcompile_version": __version__, "torch_version": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        # calibration results differ (slightly) between CPUs whose kernels round differently
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "command": " ".join(sys.argv), "model": opts.model, "model_class": type(base).__name__,
        "scheduler": type(scheduler).__name__, "image_shape": list(shape),
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(opts).items()},
        "fid": space.describe() if space else {"note": fid_note},
        "snr_definition": "SNR_Q(t) = ||eps||_2 / ||eps_q - eps||_2 over the recorded images of a step, on FP "
                          "trajectory inputs (PTQD eq. 13), dB = 20 log10; SNR_F(t) = abar_t / (1 - abar_t) "
                          "(PTQD eq. 14), dB = 10 log10",
        "configs": [], "_samples": {}, "_snr": {},
    }
    run = _Run(opts, base, scheduler, kwargs, pixel_space, shape, space, results, log)
    try:
        run.sample_fp()
        for key in opts.configs:
            cfg = CONFIGS[key]
            row: dict[str, Any] = {"key": key, "label": cfg.label}
            results["configs"].append(row)
            if cfg.preset is None:
                run.fp_row(row)
                continue
            try:
                recipe = cfg.recipe(dict(opts.recipe_overrides))
            except NotAvailable as e:
                row.update(status="not available", reason=str(e))
                log(f"  {cfg.label}: not available: {e}")
                continue
            row["recipe"] = recipe.to_dict()
            try:
                run.quantized_row(row, cfg, recipe)
            except Exception as e:  # one broken configuration must not lose the others' numbers
                logger.exception("configuration %s failed", key)
                row.update(status="failed", reason=f"{type(e).__name__}: {e}")
                log(f"  {cfg.label}: FAILED: {type(e).__name__}: {e}")
        if space is not None:
            space.fid_deltas(results["configs"], results["_samples"])
        correlated_snr_check(results["configs"])
    finally:
        if space is not None:
            space.close()
    return results


@dataclass
class _Run:
    """State shared by the configurations of one :func:`run_quality` call."""

    opts: EvalOptions
    base: torch.nn.Module
    scheduler: Any
    sample_kwargs: Optional[dict[str, Any]]
    pixel_space: bool
    shape: tuple[int, int, int]
    space: Optional[FeatureSpace]
    results: dict[str, Any]
    log: Callable[[str], None]
    fp: Optional[torch.Tensor] = None
    fp_s: float = 0.0
    calibrated: dict[str, Any] = dataclasses.field(default_factory=dict)   # recipe JSON → (metadata, seconds)
    trajectory: Optional[Trajectory] = None
    classifier: Optional[torch.nn.Module] = None   # digit confidence, loaded once per run

    def sample(self, model, callback=None, scheduler=None) -> torch.Tensor:
        o = self.opts
        return sample(model, scheduler or self.scheduler, num_images=o.num_samples, num_inference_steps=o.steps,
                      generator=torch.Generator().manual_seed(o.seed), batch_size=o.batch_size,
                      sample_kwargs=self.sample_kwargs, progress=o.progress, callback=callback,
                      to_image=self.pixel_space).float().cpu()

    def sample_fp(self) -> None:
        """FP samples, and the FP trajectory of the first ``snr_samples`` of them."""
        recorder = TrajectoryRecorder(min(self.opts.snr_samples, self.opts.num_samples))
        t0 = time.perf_counter()
        self.fp = self.sample(self.base, callback=recorder)
        self.fp_s = time.perf_counter() - t0
        self.trajectory = recorder.finish(self.base)
        self.results["_samples"]["fp"] = self.fp

    def fp_row(self, row: dict[str, Any]) -> None:
        row.update(status="ok", recipe=None, calibration_s=None, sampling_s=self.fp_s)
        self.image_metrics(row, None)
        self.log(f"  {row['label']}: sampled in {self.fp_s:.1f}s")

    def calibrate(self, cfg: EvalConfig, recipe):
        """The metadata of ``recipe`` (calibrated once per run) and the seconds it took."""
        key = recipe.to_json()
        if key in self.calibrated:
            return self.calibrated[key]
        o = self.opts
        kept = f", {o.calib_steps} kept" if o.calib_steps else ""
        self.log(f"  {cfg.label.strip()}: calibrating {recipe.name} ({o.calib_samples} samples x {o.steps} steps{kept}, "
                 f"method {getattr(recipe, 'method', 'rtn')})")
        calib_model = copy.deepcopy(self.base)
        t0 = time.perf_counter()
        meta = calibrate(calib_model, self.scheduler, recipe, num_samples=o.calib_samples,
                         num_inference_steps=o.steps, num_calib_steps=o.calib_steps,
                         sample_kwargs=self.sample_kwargs, seed=o.seed + 1, progress=o.progress, attach=False)
        self.calibrated[key] = (meta, time.perf_counter() - t0)
        return self.calibrated[key]

    def quantized_row(self, row: dict[str, Any], cfg: EvalConfig, recipe) -> None:
        o = self.opts
        meta, row["calibration_s"] = self.calibrate(cfg, recipe)
        row["layers_quantized"], row["layers_float"] = len(meta.layers), len(meta.fallbacks)
        if meta.calibration.get("split_ranges"):
            row["split_ranges"] = meta.calibration["split_ranges"]
        ptqd = cfg.corrections is not None or bool(cfg.mixed)
        with (contextlib.nullcontext(copy.deepcopy(self.base)) if ptqd else
              quantized_model(self.base, meta, o.backend)) as qm:
            scheduler = self.scheduler
            if ptqd:   # the quantized sampler: per-step precision, corrections (it compiles / simulates itself)

                corr = Corrections(*(cfg.corrections or (False,) * 3))
                if cfg.checked:   # as the sampler runs by default: what the correction check kept
                    kept = Corrections.default_for(meta)
                    corr = Corrections(corr.correlated and kept.correlated, corr.bias and kept.bias,
                                       corr.variance and kept.variance)
                    row["correction_check"] = meta.calibration.get("correction_check")
                qm = QuantizedUNet(qm, meta, backend=o.backend, corrections=corr, mixed=bool(cfg.mixed))
                scheduler = qm.wrap_scheduler(self.scheduler)
                plan = qm.plan(self.scheduler, o.steps)
                row["precision_plan"] = [[r["step"], r["timestep"], r["act_bits"]] for r in plan]
                row["ptqd_steps"] = [jsonable(r) for r in plan]   # k, bias, σ_q², σ'²
                row["corrections"] = qm.corrections.label()
                row["noise_space"] = meta.noise_space
            t0 = time.perf_counter()
            snr = step_snr(self.trajectory, qm, self.scheduler)
            row["snr_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            samples = self.sample(qm, scheduler=scheduler)
            row["sampling_s"] = time.perf_counter() - t0
        self.results["_samples"][cfg.key] = samples
        self.results["_snr"][cfg.key] = snr
        row["status"] = "ok"
        row.update(summarize_snr(snr))
        row["snr_steps"] = [s.to_dict() for s in snr]
        self.image_metrics(row, samples)
        self.log(f"  {cfg.label.strip()}: calibrated in {row['calibration_s']:.1f}s, SNR_Q mean "
                 f"{row['mean_snr_q_db']:.1f} dB (min {row['min_snr_q_db']:.1f} dB at step {row['min_snr_q_step']}), "
                 f"sampled in {row['sampling_s']:.1f}s")

    def image_metrics(self, row: dict[str, Any], samples: Optional[torch.Tensor]) -> None:
        """FID/KID (if planned), PSNR against FP (quantized rows) and the digit classifier's confidence."""
        images = self.fp if samples is None else samples
        if samples is not None:
            row["psnr_vs_fp_db" if self.pixel_space else "sample_snr_vs_fp_db"] = (
                psnr_db(self.fp, samples) if self.pixel_space else snr_db(self.fp, samples))
            if self.pixel_space:   # colour cast: per-channel mean of the samples minus FP's, 8-bit levels
                row["colour_shift_vs_fp"] = colour_shift(self.fp, samples)
        if self.space is not None:
            row.update(self.space(images))
        if self.pixel_space and tuple(self.shape) == (1, 28, 28):
            if self.classifier is None:
                with contextlib.suppress(FileNotFoundError):
                    self.classifier = load_mnist_classifier()
            if self.classifier is not None:
                row["confident_digits"] = digit_metrics(images, self.classifier)["confident_fraction"]
