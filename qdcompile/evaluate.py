"""Quality of quantized diffusion U-Nets: FID/KID, per-step SNR_Q against SNR_F (PTQD), sample PSNR.

For every configuration of one run (FP, W8A8 RTN, W4A8 RTN, W4A8 Q-Diffusion with and without
shortcut split), with the same seeds and sample counts:

* **FID and KID** of generated samples against real images (a fixed subset of the MNIST test
  set). Features come from an *offline* extractor registered with torch-fidelity: the
  project's MNIST classifier (128-d penultimate layer, :meth:`MnistClassifier.features`), or
  Inception-v3 (``inception-v3-compat``) when the user has its weights locally. With the
  classifier the numbers are **not comparable to published (Inception) FIDs**; they compare
  configurations with each other.
* **SNR_Q(t) = ‖ε‖₂ / ‖ε̂ − ε‖₂** (PTQD eq. 13, METHODS §3) of the quantized noise prediction
  ``ε̂`` against the FP one ``ε`` on the same inputs ``x_t``, taken along FP sampling
  trajectories, and **SNR_F(t) = ᾱ_t / (1 − ᾱ_t)** (PTQD eq. 14) for reference. PTQD's rule
  compares the two ratios as they are (``SNR_Q > SNR_F``). In dB, SNR_Q is ``20·log10`` of the
  norm ratio (= ``10·log10`` of the energy ratio, like :func:`snr_db`); SNR_F, a power ratio,
  is ``10·log10``.
* **PSNR** of quantized samples against FP samples from the same seeds (images in [0, 1]).

Quantized predictions come from a ``torch.compile(unet, backend="qdiff")`` model (the integer
kernels) or the fake-quant simulation of the same metadata (:mod:`qdcompile.simulate`); any
callable ``(x, t, kwargs) -> ε`` works for :func:`step_snr`.

FID/KID backends: ``"torch-fidelity"`` (``pip install -e ".[eval]"``; imported lazily) or
``"builtin"``: the same formulas (Fréchet distance of Gaussian fits of the features; unbiased
MMD² with the cubic polynomial kernel over random subsets, drawn as torch-fidelity draws them)
implemented here for machines where torch-fidelity cannot be imported (it needs a
torchvision that matches the installed torch; PyPI has none for CPU-only torch builds).

The command line is ``qdcompile eval`` (:func:`add_eval_parser`, :func:`cmd_eval`) and
``python bench/quality.py``: they print a table and write ``quality-<model>-<stamp>.json``,
``.md``, ``-samples.png`` (FP and each configuration, same seeds) and ``-snr.png``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as _dt
import io
import json
import logging
import math
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from .devices import default_dtype, resolve_device
from .io import atomic_write, json_text, jsonable
from .metrics import norm_ratio, psnr_db, snr_db, snr_q, to_db

logger = logging.getLogger(__name__)

__all__ = [
    "snr_db", "psnr_db", "snr_q", "snr_f",
    "TrajectoryRecorder", "Trajectory", "StepSNR", "step_snr", "summarize_snr",
    "MNIST_FEATURES", "FidelityUnavailable", "register_mnist_feature_extractor", "fid_kid",
    "frechet_distance", "kernel_distance", "paired_fid_delta", "colour_moments", "colour_w2", "colour_shift",
    "real_mnist_images", "to_uint8",
    "EvalConfig", "CONFIGS", "NotAvailable", "quantized_model",
    "EvalOptions", "run_quality", "format_table", "write_outputs",
    "add_eval_arguments", "add_eval_parser", "cmd_eval", "FID_NOTE",
]

#: Name under which the MNIST-classifier feature extractor is registered with torch-fidelity.
MNIST_FEATURES = "qdcompile-mnist-classifier"
INCEPTION_FEATURES = "inception-v3-compat"

FID_NOTE = ("FID/KID here use the features of the project's MNIST classifier (128-d), not Inception-v3: "
            "they rank the configurations against each other and are NOT comparable to published FIDs.")
INCEPTION_NOTE = "FID/KID use Inception-v3 (inception-v3-compat) features from the weights given."
CIFAR_FEATURES = "cifar10-resnet56"
CIFAR_NOTE = ("FID/KID here use the 64-d pooled features of the shared CIFAR-10 ResNet-56 classifier, not "
              "Inception-v3, against 1017 held-out CIFAR-10 test images: they rank the configurations against "
              "each other and are NOT comparable to published FIDs.")

# The real-image subset is drawn with its own fixed seed, so that runs with different --seed
# values compare against the same real images.
REAL_SUBSET_SEED = 0


# ============================================================================ signal metrics
def snr_f(scheduler, timestep) -> Optional[float]:
    """PTQD's ``SNR_F(t) = ᾱ_t / (1 − ᾱ_t)`` from ``scheduler.alphas_cumprod``; None without one."""
    from .ptqd import snr_f as forward_snr

    return forward_snr(scheduler, timestep) if getattr(scheduler, "alphas_cumprod", None) is not None else None


# ============================================================================ SNR along trajectories
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
    from .sampling import unwrap

    p = next(unwrap(model).parameters())
    return p.device, p.dtype


def _eps_fn(model: torch.nn.Module | EpsModel) -> EpsModel:
    """``(x, t, kwargs) -> ε`` for a U-Net (compiled or not), moving inputs to its device."""
    if not isinstance(model, torch.nn.Module):
        return model
    from .sampling import call_unet

    device, dtype = _model_device_dtype(model)

    def fn(x, t, kwargs):
        kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        return call_unet(model, x.to(device, dtype), t.to(device), kw)

    return fn


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
    from .pipeline import unwrap_scheduler
    from .ptqd import effective_eps

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


# ============================================================================ FID / KID
class FidelityUnavailable(RuntimeError):
    """torch-fidelity cannot be imported; the message says why and what to do."""


def _import_torch_fidelity():
    try:
        import torch_fidelity
    except ModuleNotFoundError as e:
        if e.name == "torch_fidelity":
            cpu_note = ("; note that the extra needs the CUDA build of torch: with this CPU-only torch "
                        f"{torch.__version__} PyPI's torchvision cannot load and `import diffusers` breaks"
                        if torch.version.cuda is None else "")
            raise FidelityUnavailable(
                f"FID/KID need torch-fidelity, which is not installed: pip install -e \".[eval]\"{cpu_note}. "
                "Or pass --fid-backend builtin (qdcompile's own implementation of the same FID/KID formulas, "
                "MNIST-classifier features only), or --no-fid.") from e
        raise FidelityUnavailable(_torchvision_message(e)) from e
    except (ImportError, RuntimeError, OSError) as e:
        raise FidelityUnavailable(_torchvision_message(e)) from e
    return torch_fidelity


def _torchvision_message(e: BaseException) -> str:
    return (f"torch-fidelity is installed but cannot be imported ({type(e).__name__}: {e}). It imports "
            f"torchvision, which must be the build matching torch {torch.__version__}; PyPI's Linux torchvision "
            "wheels are CUDA builds, so a CPU-only torch has no matching torchvision on PyPI (and where one is "
            "installed anyway, `import diffusers` fails too: uninstall it). Use a CUDA torch with its torchvision and "
            "pip install -e \".[eval]\", or pass --fid-backend builtin (same FID/KID formulas, MNIST-classifier "
            "features only), or --no-fid.")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` floats in [0, 1] → uint8 codes 0–255 (the convention of torch-fidelity)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def uint8_to_mnist(x: torch.Tensor) -> torch.Tensor:
    """torch-fidelity's uint8 ``[N, 1|3, H, W]`` (0–255) → the classifier's ``[N, 1, 28, 28]`` in [0, 1]."""
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images [N, 1 or 3, H, W] (0-255), got {x.dtype} {tuple(x.shape)}")
    y = x.float().div(255.0).mean(dim=1, keepdim=True)
    if tuple(y.shape[-2:]) != (28, 28):
        y = torch.nn.functional.interpolate(y, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    return y


@torch.no_grad()
def _mnist_features(classifier, x_uint8: torch.Tensor, layers: Sequence[str]) -> tuple[torch.Tensor, ...]:
    param = next(classifier.parameters())
    feats = classifier.features(uint8_to_mnist(x_uint8).to(param))
    out = {"features": feats, "logits": classifier.head(feats)}
    return tuple(out[name].float() for name in layers)


def register_mnist_feature_extractor() -> str:
    """Register the MNIST-classifier features with torch-fidelity (once); return the name.

    Features: ``"features"`` (128-d penultimate layer, used for FID and KID) and ``"logits"``.
    Input: torch-fidelity's uint8 ``[N, 3, H, W]`` in 0–255 (gray images replicated; 1 channel
    also accepted), resized to 28×28 if needed. ``feature_extractor_weights_path`` loads another
    classifier checkpoint (default: the shipped one).
    """
    _import_torch_fidelity()
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if MNIST_FEATURES in FEATURE_EXTRACTORS_REGISTRY:
        return MNIST_FEATURES

    class MnistClassifierFeatures(FeatureExtractorBase):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            from .classifier import load_mnist_classifier

            self.classifier = load_mnist_classifier(feature_extractor_weights_path)

        @staticmethod
        def get_provided_features_list():
            return ("features", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits"}.get(metric, "features")

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 28, 28, dtype=torch.uint8)

        def forward(self, x):
            return _mnist_features(self.classifier, x, self.features_list)

    register_feature_extractor(MNIST_FEATURES, MnistClassifierFeatures)
    return MNIST_FEATURES


class _UInt8Images(torch.utils.data.Dataset):
    """A uint8 ``[N, 3, H, W]`` tensor as the Dataset torch-fidelity reads (one tensor per item)."""

    def __init__(self, images_uint8: torch.Tensor):
        self.images = images_uint8.expand(-1, 3, -1, -1) if images_uint8.shape[1] == 1 else images_uint8

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i].contiguous()


def _sha256(path) -> Optional[str]:
    import hashlib

    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


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


def kernel_distance(f1: torch.Tensor, f2: torch.Tensor, subset_size: int, subsets: int = 100,
                    seed: int = 2020) -> tuple[float, float]:
    """KID: unbiased MMD² with the kernel ``k(x, y) = (x·y / D + 1)³`` over ``subsets`` random
    subsets of ``subset_size`` rows of each set (drawn without replacement, set 1 then set 2, from
    ``numpy.random.RandomState(seed)``, as torch-fidelity draws them); returns (mean, std)."""
    import numpy as np

    n1, n2 = f1.shape[0], f2.shape[0]
    if subset_size > min(n1, n2):
        raise ValueError(f"KID subset size {subset_size} is larger than a feature set ({n1}, {n2})")
    if subset_size < 2:
        raise ValueError(f"KID needs subset_size >= 2, got {subset_size}")
    f1, f2 = f1.double(), f2.double()
    d, m = f1.shape[1], subset_size
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(subsets):
        a = f1[torch.from_numpy(rng.choice(n1, m, replace=False))]
        b = f2[torch.from_numpy(rng.choice(n2, m, replace=False))]
        kaa, kbb, kab = ((a @ a.T) / d + 1) ** 3, ((b @ b.T) / d + 1) ** 3, ((a @ b.T) / d + 1) ** 3
        within = (kaa.sum() - kaa.diagonal().sum() + kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
        values.append(float(within - 2 * kab.sum() / (m * m)))
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False))


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


def paired_fid_delta(f1: torch.Tensor, f2: torch.Tensor, real: torch.Tensor, boots: int = 200,
                     seed: int = 0, distance: Optional[Callable[[torch.Tensor, torch.Tensor], float]] = None
                     ) -> dict[str, Any]:
    """``FID(f1) − FID(f2)`` against ``real`` with a paired bootstrap 95% interval.

    Row ``i`` of both generated sets comes from the same seed (same initial noise), so one
    resampled index set serves both: the interval shows whether a difference between two
    configurations exceeds the noise of drawing ``N`` samples (the real set stays fixed).
    ``distance`` replaces the Fréchet distance (e.g. :func:`colour_w2` on colour moments).
    """
    distance = frechet_distance if distance is None else distance
    if f1.shape != f2.shape:
        raise ValueError(f"paired ΔFID needs sample sets of one shape, got {list(f1.shape)} and {list(f2.shape)}")
    n = f1.shape[0]
    gen = torch.Generator().manual_seed(seed)
    deltas = []
    for _ in range(boots):
        idx = torch.randint(0, n, (n,), generator=gen)
        deltas.append(distance(f1[idx], real) - distance(f2[idx], real))
    d = torch.tensor(deltas, dtype=torch.float64)
    lo, hi = torch.quantile(d, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"delta": distance(f1, real) - distance(f2, real), "ci95": [lo, hi], "boots": boots}


class FeatureSpace:
    """Computes FID/KID of image sets against one real set, with the real features computed once.

    ``extractor``: ``"mnist"`` (the project's classifier) or ``"inception"`` (needs
    ``inception_weights``, a local ``inception-v3-compat`` weights file). ``backend``:
    ``"torch-fidelity"`` or ``"builtin"`` (MNIST classifier only). Images are floats in [0, 1].
    """

    def __init__(self, real: torch.Tensor, *, extractor: str = "mnist", backend: str = "torch-fidelity",
                 inception_weights: Optional[str] = None, classifier_weights: Optional[str] = None,
                 device: str = "cpu", kid_subsets: int = 100, seed: int = 2020, batch_size: int = 256):
        if extractor not in ("mnist", "inception", "cifar10"):
            raise ValueError(f"extractor must be 'mnist', 'cifar10' or 'inception', got {extractor!r}")
        if extractor == "cifar10" and backend != "builtin":
            raise ValueError("the CIFAR-10 ResNet-56 features run with --fid-backend builtin (they are not "
                             "registered with torch-fidelity)")
        if backend not in ("torch-fidelity", "builtin"):
            raise ValueError(f"backend must be 'torch-fidelity' or 'builtin', got {backend!r}")
        if extractor == "inception":
            if inception_weights is None:
                raise ValueError("Inception-v3 features need a local weights file (--inception-weights PATH); "
                                 "nothing is downloaded")
            if not Path(inception_weights).is_file():
                raise FileNotFoundError(f"--inception-weights {inception_weights!r}: no such file")
            if backend == "builtin":
                raise ValueError("--fid-backend builtin has only the MNIST-classifier features; "
                                 "Inception-v3 needs torch-fidelity")
        self.extractor, self.backend, self.device = extractor, backend, device
        self.kid_subsets, self.seed, self.batch_size = kid_subsets, seed, batch_size
        self.inception_weights, self.classifier_weights = inception_weights, classifier_weights
        self.real = to_uint8(real)
        self._real_colour = colour_moments(self.real)
        self._cache_dir: Optional[tempfile.TemporaryDirectory] = None
        if backend == "torch-fidelity":
            _import_torch_fidelity()
            self.name = register_mnist_feature_extractor() if extractor == "mnist" else INCEPTION_FEATURES
            self._cache_dir = tempfile.TemporaryDirectory(prefix="qdcompile-fidelity-")
        elif extractor == "cifar10":
            from .cifar_features import load_resnet56

            self.name = CIFAR_FEATURES
            self._classifier = load_resnet56(classifier_weights, device=device)
            self._real_features = self._builtin_features(self.real)
        else:
            from .classifier import load_mnist_classifier

            self.name = MNIST_FEATURES
            self._classifier = load_mnist_classifier(classifier_weights, device=device)
            self._real_features = self._builtin_features(self.real)

    @property
    def note(self) -> str:
        return {"mnist": FID_NOTE, "cifar10": CIFAR_NOTE}.get(self.extractor, INCEPTION_NOTE)

    def describe(self) -> dict[str, Any]:
        from .classifier import DEFAULT_CLASSIFIER_PATH

        if self.extractor == "cifar10":
            from .cifar_features import default_weights_path

            default = default_weights_path()
        else:
            default = DEFAULT_CLASSIFIER_PATH
        weights = self.inception_weights if self.extractor == "inception" else (self.classifier_weights or default)
        return {"feature_extractor": self.name, "backend": self.backend, "weights": str(weights),
                "weights_sha256": _sha256(weights), "real_images": self.real.shape[0],
                "kid_subsets": self.kid_subsets, "kid_seed": self.seed, "note": self.note}

    def _builtin_features(self, images_uint8: torch.Tensor) -> torch.Tensor:
        def feats(x):
            if self.extractor == "cifar10":
                with torch.no_grad():
                    return self._classifier.features(x.to(self.device).float() / 255.0).double().cpu()
            return _mnist_features(self._classifier, x, ("features",))[0].cpu()

        return torch.cat([feats(images_uint8[i:i + self.batch_size])
                          for i in range(0, images_uint8.shape[0], self.batch_size)])

    def features(self, images: torch.Tensor) -> Optional[torch.Tensor]:
        """Features of ``images`` (floats in [0, 1]) with the builtin backend; None with torch-fidelity."""
        return self._builtin_features(to_uint8(images)) if self.backend == "builtin" else None

    def fid_deltas(self, rows: Sequence[dict[str, Any]], samples: dict[str, torch.Tensor]) -> None:
        """Each quantized row gets paired-bootstrap differences against FP and, for a row with PTQD
        corrections, against the uncorrected row of the same recipe and precision plan:
        ``colour_delta`` (colour W2 vs real; any backend) and, with the builtin backend,
        ``fid_delta`` and ``fid_vs_fp_samples`` (its FID against the FP samples instead of the real
        images)."""
        if "fp" not in samples:
            return
        colour = {k: colour_moments(v) for k, v in samples.items()}
        feats = {k: self.features(v) for k, v in samples.items()} if self.backend == "builtin" else None
        for r in rows:
            if r.get("status") != "ok" or r["key"] == "fp" or r["key"] not in samples:
                continue
            refs = ["fp"] + [k for k in uncorrected_counterparts(r["key"]) if k in samples]
            r["colour_delta"] = [{"vs": ref, **paired_fid_delta(colour[r["key"]], colour[ref], self._real_colour,
                                                                distance=colour_w2)} for ref in refs]
            if feats is None:
                continue
            r["fid_delta"] = [{"vs": ref, **paired_fid_delta(feats[r["key"]], feats[ref], self._real_features)}
                              for ref in refs]
            # distance to what the float model draws (FP's samples as the reference set)
            r["fid_vs_fp_samples"] = frechet_distance(feats[r["key"]], feats["fp"])

    def kid_subset_size(self, num_generated: int) -> int:
        return min(1000, num_generated, self.real.shape[0])

    def __call__(self, generated: torch.Tensor) -> dict[str, float]:
        """``{"fid", "kid_mean", "kid_std", "kid_subset_size", "colour_w2"}`` of ``generated`` against
        the real set."""
        gen = to_uint8(generated)
        m = self.kid_subset_size(gen.shape[0])
        colour = {"colour_w2": colour_w2(colour_moments(gen), self._real_colour)}
        if self.backend == "builtin":
            feats = self._builtin_features(gen)
            fid = frechet_distance(feats, self._real_features)
            kid_mean, kid_std = kernel_distance(feats, self._real_features, m, self.kid_subsets, self.seed)
            return {"fid": fid, "kid_mean": kid_mean, "kid_std": kid_std, "kid_subset_size": m, **colour}
        torch_fidelity = _import_torch_fidelity()
        kwargs: dict[str, Any] = {}
        weights = self.inception_weights if self.extractor == "inception" else self.classifier_weights
        if weights is not None:
            kwargs["feature_extractor_weights_path"] = str(weights)
        metrics = torch_fidelity.calculate_metrics(
            input1=_UInt8Images(gen), input2=_UInt8Images(self.real), fid=True, kid=True,
            feature_extractor=self.name, kid_subset_size=m, kid_subsets=self.kid_subsets, rng_seed=self.seed,
            batch_size=self.batch_size, cuda=str(self.device).startswith("cuda"), save_cpu_ram=True,
            verbose=False, cache=True, cache_root=self._cache_dir.name,
            input2_cache_name=f"real-{self.real.shape[0]}", **kwargs)
        return {"fid": float(metrics["frechet_inception_distance"]),
                "kid_mean": float(metrics["kernel_inception_distance_mean"]),
                "kid_std": float(metrics["kernel_inception_distance_std"]), "kid_subset_size": m, **colour}

    def close(self) -> None:
        if self._cache_dir is not None:
            self._cache_dir.cleanup()
            self._cache_dir = None


def fid_kid(generated: torch.Tensor, real: torch.Tensor, **kwargs) -> dict[str, float]:
    """FID and KID of ``generated`` against ``real`` (both ``[N, C, H, W]`` in [0, 1]); keyword
    arguments as :class:`FeatureSpace`. For several sets against one real set, keep one
    :class:`FeatureSpace` (the real features are computed once)."""
    space = FeatureSpace(real, **kwargs)
    try:
        return space(generated)
    finally:
        space.close()


def real_mnist_images(n: int = 10000, seed: int = REAL_SUBSET_SEED) -> torch.Tensor:
    """A fixed random subset of ``n`` MNIST test images, ``[n, 1, 28, 28]`` floats in [0, 1]."""
    from .data import load_mnist

    images, _ = load_mnist("t10k")
    if not 2 <= n <= images.shape[0]:
        raise ValueError(f"real-image count must be in [2, {images.shape[0]}], got {n}")
    idx = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return images[idx].unsqueeze(1).float().div(255.0)


def real_cifar10_images() -> Optional[torch.Tensor]:
    """The 1017 held-out CIFAR-10 test images (lossless, never trained on) as floats in [0, 1]."""
    from .data import load_cifar10

    try:
        images, _ = load_cifar10("heldout")
    except FileNotFoundError:
        return None
    return images.float().div(255.0)


# ============================================================================ configurations
class NotAvailable(Exception):
    """A configuration this qdcompile cannot build (its recipe raises, or lacks the feature)."""


@dataclass(frozen=True)
class EvalConfig:
    key: str                              # command-line name
    label: str                            # table label
    preset: Optional[str] = None          # QuantRecipe constructor; None = the float model
    overrides: tuple[tuple[str, Any], ...] = ()
    expect_method: Optional[str] = None   # "rtn" or "not rtn" (reconstruction)
    expect_split: Optional[bool] = None
    # PTQD rows: which corrections the sampler applies (k, bias, VSC) and whether it follows
    # the mixed-precision plan; rows with the same recipe share one calibration
    corrections: Optional[tuple[bool, bool, bool]] = None
    mixed: Optional[bool] = None
    # the sampler as users get it: only the corrections the calibration's check kept (of ``corrections``)
    checked: bool = False

    def recipe(self, extra: Optional[dict[str, Any]] = None):
        """Build the recipe; raise :class:`NotAvailable` saying why when this qdcompile cannot."""
        from .recipe import QuantRecipe

        if self.preset is None:
            return None
        known = {f.name for f in dataclasses.fields(QuantRecipe)}
        kwargs = dict(self.overrides)
        for k, v in (extra or {}).items():
            if k in known:
                kwargs[k] = v
        try:
            recipe = getattr(QuantRecipe, self.preset)(**kwargs)
        except (TypeError, ValueError, AttributeError) as e:
            raise NotAvailable(f"QuantRecipe.{self.preset}({_kwargs_repr(kwargs)}) raises {type(e).__name__}: {e}") from e
        method = getattr(recipe, "method", "rtn")
        if self.expect_method == "rtn" and method != "rtn":
            raise NotAvailable(f"QuantRecipe.{self.preset}({_kwargs_repr(kwargs)}) has method {method!r}, not 'rtn'")
        if self.expect_method == "reconstruction" and method == "rtn":
            raise NotAvailable(f"QuantRecipe.{self.preset}() is round-to-nearest here: this qdcompile has no "
                               "Q-Diffusion reconstruction")
        if self.expect_split is not None and bool(getattr(recipe, "split", False)) != self.expect_split:
            raise NotAvailable(f"QuantRecipe.{self.preset}({_kwargs_repr(kwargs)}) has split="
                               f"{getattr(recipe, 'split', 'absent')!r}; this configuration needs "
                               f"split={self.expect_split}")
        return recipe


def _kwargs_repr(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


CONFIGS: dict[str, EvalConfig] = {c.key: c for c in (
    EvalConfig("fp", "FP"),
    EvalConfig("w8a8", "W8A8 (RTN)", "w8a8", (("method", "rtn"),), expect_method="rtn"),
    EvalConfig("w4a8-rtn", "W4A8 (RTN)", "w4a8", (("method", "rtn"), ("split", False)), expect_method="rtn",
               expect_split=False),
    EvalConfig("w4a8-qdiff", "W4A8 (Q-Diffusion)", "w4a8", (("split", False),), expect_method="reconstruction",
               expect_split=False),
    EvalConfig("w4a8-qdiff-split", "W4A8 (Q-Diffusion + split)", "w4a8", (), expect_method="reconstruction",
               expect_split=True),
    EvalConfig("ptqd-raw", "W4A8 Q-Diffusion, PTQD calibration, uncorrected", "ptqd", corrections=(False, False, False)),
    EvalConfig("ptqd-k", "  + correlated-noise correction", "ptqd", corrections=(True, False, False)),
    EvalConfig("ptqd-k-bc", "  + bias correction", "ptqd", corrections=(True, True, False)),
    EvalConfig("ptqd", "  + variance schedule calibration (PTQD)", "ptqd", corrections=(True, True, True),
               checked=True),
    EvalConfig("w4a4-qdiff", "W4A4 (Q-Diffusion, all steps)", "w4a4",
               (("method", "qdiffusion"), ("weight_observer", "mse"), ("split", True)), expect_method="reconstruction"),
    EvalConfig("mixed-raw", "W4A4/A8 mixed precision, uncorrected", "mixed", corrections=(False, False, False),
               mixed=True),
    EvalConfig("mixed", "W4A4/A8 mixed precision + PTQD", "mixed", corrections=(True, True, True), mixed=True,
               checked=True),
)}
DEFAULT_CONFIGS = ("fp", "w8a8", "w4a8-rtn", "w4a8-qdiff", "w4a8-qdiff-split")


def uncorrected_counterparts(key: str) -> list[str]:
    """For a configuration with PTQD corrections, the uncorrected configuration(s) of the same
    recipe and precision plan (what its corrections are measured against); else ``[]``."""
    cfg = CONFIGS[key]
    if not (cfg.corrections and any(cfg.corrections)):
        return []
    return [c.key for c in CONFIGS.values()
            if c.preset == cfg.preset and c.mixed == cfg.mixed and c.corrections == (False, False, False)]


def correlated_snr_check(rows: Sequence[dict[str, Any]]) -> None:
    """PTQD's claim for the correlated-noise correction, checked on the evaluation trajectories:
    at every step where ``k > 0`` a row that divides by ``1 + k`` should have a higher SNR_Q than its
    uncorrected counterpart. Adds ``snr_where_k_positive`` to such rows: the steps with ``k > 0``,
    those where SNR_Q rose, and the mean gain in dB (``steps: []`` when ``k`` is 0 everywhere)."""
    by_key = {r["key"]: r for r in rows if r.get("status") == "ok"}
    for r in by_key.values():
        raw = next((by_key[k] for k in uncorrected_counterparts(r["key"]) if k in by_key), None)
        if raw is None or "k" not in r.get("corrections", "").split("+") or "ptqd_steps" not in r:
            continue
        # the SNR of the ε the sampler uses: sampler-space corrections act after the x0 clipping
        key = "snr_q_sampler_db" if all(s.get("snr_q_sampler_db") is not None
                                        for s in r["snr_steps"] + raw["snr_steps"]) else "snr_q_db"
        corrected = {s["step"]: s[key] for s in r["snr_steps"]}
        before = {s["step"]: s[key] for s in raw["snr_steps"]}
        steps = [s["step"] for s in r["ptqd_steps"] if (s.get("k") or 0.0) > 0 and s["step"] in corrected]
        gains = [corrected[i] - before[i] for i in steps]
        r["snr_where_k_positive"] = {"vs": raw["key"], "steps": steps, "raised": [i for i, g in zip(steps, gains)
                                                                                  if g > 0],
                                     "mean_gain_db": sum(gains) / len(gains) if gains else None}


@contextlib.contextmanager
def quantized_model(unet: torch.nn.Module, meta, backend: str = "qdiff") -> Iterator[torch.nn.Module]:
    """A quantized copy of ``unet`` for ``meta`` (``unet`` itself is untouched).

    ``backend="qdiff"``: ``torch.compile(copy, backend="qdiff")`` — the integer kernels (on CPU
    their pure-torch reference). ``backend="simulate"``: the fake-quant simulation of the same
    metadata (float math, no compilation).
    """
    from .api import attach
    from .sampling import unwrap
    from .simulate import simulate

    if backend not in ("qdiff", "simulate"):
        raise ValueError(f"backend must be 'qdiff' or 'simulate', got {backend!r}")
    q = copy.deepcopy(unwrap(unet))
    if backend == "qdiff":
        attach(q, meta)
        yield torch.compile(q, backend="qdiff")
    else:
        with simulate(q, meta) as m:
            yield m


# ============================================================================ the run
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
            from .recipe import QuantRecipe

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


def _sample_kwargs(unet, path: Optional[str], device, dtype) -> Optional[dict[str, Any]]:
    from .sampling import unwrap

    if path:
        emb = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(emb, torch.Tensor):
            raise ValueError(f"--prompt-embeds {path!r} must hold one tensor [1 or N, tokens, dim]")
        return {"encoder_hidden_states": emb.to(device, dtype)}
    if type(unwrap(unet)).__name__ == "UNet2DConditionModel":
        raise ValueError("this is a UNet2DConditionModel: pass --prompt-embeds FILE.pt (a tensor "
                         "[1, tokens, cross_attention_dim] saved with torch.save)")
    return None


def run_quality(opts: EvalOptions, unet=None, scheduler=None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate every configuration of ``opts``; return the results (what the JSON file holds,
    plus the sample tensors under ``"_samples"`` and SNR curves under ``"_snr"``).

    ``unet``/``scheduler`` default to ``load_model(opts.model)``. Configurations whose recipe
    this qdcompile cannot build are reported as not available; a configuration that fails
    while running is reported as failed with the error, and the others still run.
    """
    from . import __version__
    from .models import load_model
    from .sampling import model_sample_shape, unwrap

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
    kwargs = _sample_kwargs(base, opts.prompt_embeds, device, dtype)

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
        from .sampling import sample

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
        from .calibration import calibrate

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
                from .pipeline import Corrections, QuantizedUNet

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
            from .classifier import digit_metrics, load_mnist_classifier

            if self.classifier is None:
                with contextlib.suppress(FileNotFoundError):
                    self.classifier = load_mnist_classifier()
            if self.classifier is not None:
                row["confident_digits"] = digit_metrics(images, self.classifier)["confident_fraction"]


# ============================================================================ outputs
_COLUMNS = (
    ("configuration", lambda r: r["label"]),
    ("FID", lambda r: _fmt(r.get("fid"), "{:.3f}")),
    ("KID (mean ± std)", lambda r: (f"{r['kid_mean']:.4f} ± {r['kid_std']:.4f}" if r.get("kid_mean") is not None
                                    else "—")),
    ("mean SNR_Q dB", lambda r: _fmt(r.get("mean_snr_q_db"), "{:.1f}")),
    ("mean SNR_Q dB (sampler)", lambda r: _fmt(r.get("mean_snr_q_sampler_db"), "{:.1f}")),
    ("min SNR_Q dB (step)", lambda r: (f"{r['min_snr_q_db']:.1f} ({r['min_snr_q_step']})"
                                       if r.get("min_snr_q_db") is not None else "—")),
    ("colour W2", lambda r: _fmt(r.get("colour_w2"), "{:.2f}")),
    ("PSNR vs FP dB", lambda r: _fmt(r.get("psnr_vs_fp_db", r.get("sample_snr_vs_fp_db")), "{:.2f}")),
    ("colour shift vs FP", lambda r: (format_colour_shift(r["colour_shift_vs_fp"])
                                      if r.get("colour_shift_vs_fp") else "—")),
    ("digits ≥0.9", lambda r: _fmt(r.get("confident_digits"), "{:.0%}")),
    ("calib s", lambda r: _fmt(r.get("calibration_s"), "{:.1f}")),
    ("sample s", lambda r: _fmt(r.get("sampling_s"), "{:.1f}")),
)


def _fmt(v, spec: str) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return spec.format(v)


def _rows(results: dict[str, Any]) -> list[list[str]]:
    out = []
    for r in results["configs"]:
        if r["status"] == "ok":
            out.append([fn(r) for _, fn in _COLUMNS])
        else:
            out.append([r["label"], f"{r['status']}: {r.get('reason', '')}"] + [""] * (len(_COLUMNS) - 2))
    return out


def format_table(results: dict[str, Any]) -> str:
    """The plain-text table printed at the end of a run (with the FID note)."""
    headers = [h for h, _ in _COLUMNS]
    rows = _rows(results)
    ok = [headers] + [r for r in rows if r[2:] != [""] * (len(_COLUMNS) - 2)]
    widths = [max(len(r[i]) for r in ok) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    for r in rows:
        if r[2:] == [""] * (len(_COLUMNS) - 2):
            lines.append(f"{r[0].ljust(widths[0])}  {r[1]}")
        else:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    return "\n".join(lines + ["", _notes(results)])


def _notes(results: dict[str, Any]) -> str:
    o = results["options"]
    fid = results["fid"]
    lines = [f"Note: {fid['note']}"]
    if "feature_extractor" in fid:
        real = ("held-out CIFAR-10 test images" if fid["feature_extractor"] == CIFAR_FEATURES else
                f"MNIST test images (fixed subset, seed {REAL_SUBSET_SEED})")
        lines.append(f"FID/KID: {fid['feature_extractor']} features via {fid['backend']}, against {fid['real_images']} "
                     f"{real}; KID: {fid['kid_subsets']} subsets "
                     f"of min(1000, samples) — with {o['num_samples']} samples FID is biased upwards: compare "
                     "rows, not runs with other sample counts.")
    if results["configs"] and any(r.get("colour_w2") is not None for r in results["configs"]):
        lines.append("Colour W2: Wasserstein-2 distance (8-bit levels) between Gaussians fitted to each image's "
                     "per-channel mean and std, samples vs the same real images; it sees colour casts, which the "
                     "classifier features behind FID barely register. Colour shift vs FP: mean of each "
                     "channel minus FP's, 8-bit levels.")
    lines.append(f"SNR_Q: PTQD eq. 13 on the inputs of {min(o['snr_samples'], o['num_samples'])} FP trajectories, "
                 "in dB (20 log10 of the norm ratio), mean and min over the "
                 f"{o['steps']} steps (step 0 = noisiest), of the U-Net outputs and (sampler) of the ε the scheduler "
                 "step uses: after its x0 clipping (DDPM clip_sample) and any correction applied there. "
                 "PSNR: quantized vs FP samples from the same seeds.")
    return "\n".join(lines)


def _markdown(results: dict[str, Any]) -> str:
    o = results["options"]
    headers = [h for h, _ in _COLUMNS]
    lines = [f"# Quality: {results['model']} ({results['model_class']}, {results['scheduler']})", "",
             f"{results['date']} · qdcompile {results['qdcompile_version']} · torch {results['torch_version']} · "
             f"{results['device']} · quantized models via `{o['backend']}`", "",
             f"`{results['command']}`", "",
             f"{o['num_samples']} samples × {o['steps']} steps (seed {o['seed']}), calibration "
             f"{o['calib_samples']} samples (seed {o['seed'] + 1})"
             + (f", {o['calib_steps']} of the {o['steps']} steps kept" if o["calib_steps"] else "")
             + (f", recipe overrides {dict(o['recipe_overrides'])}" if o["recipe_overrides"] else "") + ".", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in _rows(results):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    lines += ["", _notes(results).replace("\n", "\n\n")]
    plans = [(r["label"].strip(), r["precision_plan"], r.get("corrections")) for r in results["configs"]
             if r.get("precision_plan")]
    if plans:
        lines += ["", "PTQD rows (corrections applied by the quantized sampler; per-step precision):", ""]
        from .pipeline import format_plan_runs

        lines += [f"* {label} — corrections {corr}: {format_plan_runs(plan)}" for label, plan, corr in plans]
        spaces = {r.get("noise_space") for r in results["configs"] if r.get("precision_plan")} - {None}
        if spaces:
            lines += ["", "k and bias corrected " + " / ".join(
                "in the scheduler step, after its x0 clipping (statistics of the ε it uses)" if sp == "sampler" else
                "on the U-Net output (statistics of the output)" for sp in sorted(spaces)) + "."]
        checked = [(r["label"].strip(), r["correction_check"]) for r in results["configs"] if r.get("correction_check")]
        if checked:
            from .pipeline import format_correction_check

            lines += ["", "Rows marked PTQD run the corrections the calibration's check kept:", ""]
            lines += [f"* {label}: {format_correction_check(c)}" for label, c in checked]
    colour = [(r["label"].strip(), d) for r in results["configs"] for d in r.get("colour_delta", [])]
    if colour:
        lines += ["", "Δ colour W2 (paired bootstrap, 95% interval):", ""]
        lines += [f"* {label} − {d['vs']}: {d['delta']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"
                  for label, d in colour]
    checks = [(r["label"].strip(), r["snr_where_k_positive"]) for r in results["configs"]
              if r.get("snr_where_k_positive")]
    if checks:
        lines += ["", "Correlated-noise correction, SNR_Q (sampler) at the steps where k > 0 (vs the uncorrected "
                  "row, same FP trajectories):", ""]
        for label, c in checks:
            lines.append(f"* {label}: k = 0 at every step" if not c["steps"] else
                         f"* {label}: k > 0 at {len(c['steps'])} step(s) {c['steps']}; SNR_Q raised at "
                         f"{len(c['raised'])} of them, mean {c['mean_gain_db']:+.3f} dB")
    deltas = [(r["label"].strip(), d) for r in results["configs"] for d in r.get("fid_delta", [])]
    if deltas:
        lines += ["", "ΔFID (paired bootstrap over the same-seed samples, 95% interval; an interval containing 0 "
                  "means the difference is within the noise of this sample count):", ""]
        lines += [f"* {label} − {d['vs']}: {d['delta']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"
                  for label, d in deltas]
        lines += ["", "FID against the FP samples (same features; how far each row is from what the float model "
                  "draws): " + ", ".join(f"{r['label'].strip()} {r['fid_vs_fp_samples']:.2f}"
                                         for r in results["configs"] if r.get("fid_vs_fp_samples") is not None)]
    split = next((r for r in results["configs"] if r.get("split_ranges")), None)
    if split:
        lines += ["", f"Shortcut-split layers ({split['label'].strip()}): observed input range of each concat part "
                  "(upsampled path | skip connection); one quantizer for the concat would span both:", ""]
        for name, parts in split["split_ranges"].items():
            (a_lo, a_hi), (b_lo, b_hi) = parts[0], parts[-1]
            lo, hi = min(a_lo, b_lo), max(a_hi, b_hi)
            share = [(p_hi - p_lo) / (hi - lo) if hi > lo else 1.0 for p_lo, p_hi in parts]
            lines.append(f"* `{name}`: [{a_lo:.2f}, {a_hi:.2f}] | [{b_lo:.2f}, {b_hi:.2f}] — each part spans "
                         + " and ".join(f"{v:.0%}" for v in share) + f" of the concat's [{lo:.2f}, {hi:.2f}]")
    recipes = [(r["label"], r["recipe"]) for r in results["configs"] if r.get("recipe")]
    if recipes:
        lines += ["", "Recipes:", ""] + [f"* {label}: `{json.dumps(rec, sort_keys=True)}`" for label, rec in recipes]
    return "\n".join(lines) + "\n"


def _model_tag(model: str) -> str:
    name = Path(model).name if os.sep in model or Path(model).exists() else model
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "model"


def write_outputs(results: dict[str, Any], out_dir: str | os.PathLike, stamp: Optional[str] = None) -> dict[str, Path]:
    """Write ``quality-<model>-<stamp>.json`` / ``.md`` / ``-samples.png`` / ``-snr.png`` into ``out_dir``."""
    from .images import save_comparison_grid

    out_dir = Path(out_dir)
    stamp = stamp or _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    prefix = f"quality-{_model_tag(results['model'])}-{stamp}"
    paths: dict[str, Path] = {}
    samples = results["_samples"]
    n = min(results["options"]["grid_images"], next(iter(samples.values())).shape[0]) if samples else 0
    labels = {r["key"]: r["label"] for r in results["configs"]}
    if n and results["model_class"] == "UNet2DModel" and results["image_shape"][0] in (1, 3):
        rows = [("FP (same seeds)" if k == "fp" else labels.get(k, k), v[:n]) for k, v in samples.items()]
        paths["samples"] = save_comparison_grid(rows, out_dir / f"{prefix}-samples.png", nrow=min(n, 16))
    if results["_snr"]:
        paths["snr_plot"] = save_snr_plot({labels[k]: v for k, v in results["_snr"].items()},
                                          out_dir / f"{prefix}-snr.png")
    public = {k: v for k, v in results.items() if not k.startswith("_")}
    public["files"] = {k: p.name for k, p in paths.items()}
    paths["json"] = atomic_write(out_dir / f"{prefix}.json",
                                  json_text(public).encode())
    paths["markdown"] = atomic_write(out_dir / f"{prefix}.md", _markdown(results).encode())
    return paths


_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (23, 190, 207)]


def save_snr_plot(curves: dict[str, Sequence[StepSNR]], path: str | os.PathLike, size=(900, 520)) -> Path:
    """Line plot (PIL, log-scale y) of SNR_Q per step for each configuration, with SNR_F dashed.

    The y axis shows the ratios themselves, as PTQD compares them (``SNR_Q > SNR_F``); it spans
    the SNR_Q values with up to two decades of margin, and SNR_F is clipped to that range.
    """
    from PIL import Image, ImageDraw, ImageFont

    w, h = size
    left, right, top, bottom = 60, 20, 40, 60
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    first = next(iter(curves.values()), [])
    q_logs = [math.log10(s.snr_q) for c in curves.values() for s in c if 0 < s.snr_q < math.inf] or [0.0, 1.0]
    f_logs = [math.log10(s.snr_f) for s in first if s.snr_f is not None and 0 < s.snr_f < math.inf]
    y_lo = max(math.floor(min(q_logs + f_logs + [0.0])), math.floor(min(q_logs)) - 2)
    y_hi = min(math.ceil(max(q_logs + f_logs)), math.ceil(max(q_logs)) + 2)
    y_hi = max(y_hi, y_lo + 1)
    x_max = max(max((s.step for c in curves.values() for s in c), default=1), 1)

    def px(step: float) -> float:
        return left + (w - left - right) * step / x_max

    def py(value: float) -> float:
        v = min(max(math.log10(value), y_lo), y_hi) if value > 0 else y_lo
        return top + (h - top - bottom) * (y_hi - v) / (y_hi - y_lo)

    draw.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for decade in range(y_lo, y_hi + 1):
        y = py(10.0 ** decade)
        draw.line([left, y, w - right, y], fill=(225, 225, 225))
        draw.text((8, y - 6), f"1e{decade}", fill="black", font=font)
    stride = max(1, x_max // 8)
    ticks = list(range(0, x_max + 1, stride))
    if x_max - ticks[-1] >= stride / 2:
        ticks.append(x_max)
    for step in ticks:
        x = px(step)
        draw.line([x, h - bottom, x, h - bottom + 4], fill="black")
        draw.text((x - 8, h - bottom + 6), str(step), fill="black", font=font)
        t = next((s.timestep for s in first if s.step == step), None)
        if t is not None:
            draw.text((x - 12, h - bottom + 20), f"t={t}", fill=(90, 90, 90), font=font)
    draw.text((left, h - 18), "sampling step (t from T down to 0); y: ratio, log scale (SNR_Q in dB = 20 log10)",
              fill="black", font=font)
    draw.text((left, 10), "SNR_Q(t) = ||eps|| / ||eps_q - eps|| per configuration (solid), "
              "SNR_F(t) = abar / (1 - abar) (dashed grey, clipped)", fill="black", font=font)
    f_pts = [(px(s.step), py(s.snr_f)) for s in first if s.snr_f is not None]
    for (x0, y0), (x1, y1) in zip(f_pts, f_pts[1:]):
        n = max(1, int(math.hypot(x1 - x0, y1 - y0) // 6))
        for k in range(0, n, 2):  # 6-px dashes
            a, b = k / n, min(k + 1, n) / n
            draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))],
                      fill=(120, 120, 120), width=2)
    for i, (label, curve) in enumerate(curves.items()):
        color = _PALETTE[i % len(_PALETTE)]
        pts = [(px(s.step), py(s.snr_q)) for s in curve if s.snr_q < math.inf]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        elif pts:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=color)
        ly = top + 8 + 16 * i
        draw.line([w - right - 230, ly + 6, w - right - 205, ly + 6], fill=color, width=3)
        draw.text((w - right - 200, ly), label, fill="black", font=font)
    path = Path(path)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write(path, buf.getvalue())


# ============================================================================ command line
def add_eval_arguments(p, default_out: str) -> None:
    """The options shared by ``qdcompile eval`` and ``bench/quality.py``."""
    p.add_argument("--model", default="mnist", help="shipped reference model name (mnist) or a diffusers folder")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated, from: {', '.join(CONFIGS)} (default: all)")
    p.add_argument("--num-samples", type=int, default=64, help="generated samples per configuration")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (also of the calibration trajectory)")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration trajectories")
    p.add_argument("--calib-steps", type=int, default=None, help="calibration time steps kept (uniform); default all")
    p.add_argument("--batch-size", type=int, default=None, help="sampling batch (default: all samples at once)")
    p.add_argument("--snr-samples", type=int, default=32,
                   help="FP trajectories on which SNR_Q is measured (the first ones of the FP run)")
    p.add_argument("--real-samples", type=int, default=10000,
                   help="real MNIST test images for FID/KID (a fixed subset; with Inception on a CPU, use fewer)")
    p.add_argument("--backend", default="qdiff", choices=["qdiff", "simulate"],
                   help="quantized model: torch.compile(backend='qdiff') (integer kernels) or fake-quant simulation")
    p.add_argument("--fid-backend", default="torch-fidelity", choices=["torch-fidelity", "builtin"],
                   help="torch-fidelity (pip install -e \".[eval]\") or qdcompile's own implementation of the "
                        "same FID/KID formulas (MNIST-classifier features only)")
    p.add_argument("--no-fid", action="store_true", help="skip FID/KID")
    p.add_argument("--inception-weights", default=None,
                   help="local Inception-v3 (inception-v3-compat) weights file: FID/KID on Inception features")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--recipe-set", default="", metavar="FIELD=VALUE,...",
                   help="override QuantRecipe fields in every configuration whose recipe has them, e.g. "
                        "recon_iters=200,act_lsq_iters=50 (values parsed as JSON, else kept as strings)")
    p.add_argument("--prompt-embeds", default=None, help="conditional U-Nets: torch.save'd encoder_hidden_states")
    p.add_argument("--grid-images", type=int, default=16, help="samples per configuration in the PNG grid")
    p.add_argument("--out", default=default_out, help="output folder (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_eval_parser(subparsers):
    """Add ``qdcompile eval`` to the CLI's subparsers."""
    p = subparsers.add_parser("eval", help="quality of FP vs quantized configurations: FID/KID, per-step SNR_Q, "
                                           "PSNR; table, JSON, markdown, PNGs")
    add_eval_arguments(p, default_out="qdcompile-eval")
    p.set_defaults(func=cmd_eval)
    return p


def options_from_args(args) -> EvalOptions:
    configs = tuple(c.strip() for c in args.configs.split(",") if c.strip())
    return EvalOptions(model=args.model, configs=configs, num_samples=args.num_samples, steps=args.steps,
                       calib_samples=args.calib_samples, calib_steps=args.calib_steps, batch_size=args.batch_size,
                       snr_samples=args.snr_samples, real_samples=args.real_samples, backend=args.backend,
                       fid=not args.no_fid, fid_backend=args.fid_backend, inception_weights=args.inception_weights,
                       kid_subsets=args.kid_subsets, recipe_overrides=parse_recipe_set(args.recipe_set),
                       prompt_embeds=args.prompt_embeds,
                       grid_images=args.grid_images, device=args.device, seed=args.seed, progress=not args.quiet)


def parse_recipe_set(text: str) -> tuple[tuple[str, Any], ...]:
    """``"recon_iters=200,act_lsq_iters=50"`` → ``(("recon_iters", 200), ("act_lsq_iters", 50))``."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--recipe-set expects FIELD=VALUE items, got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.append((key.strip(), parsed))
    return tuple(out)


def cmd_eval(args) -> int:
    """Run the configurations, print the table, write the files. 1 if a configuration failed."""
    opts = options_from_args(args)
    try:
        results = run_quality(opts)
    except FidelityUnavailable as e:
        raise SystemExit(f"qdcompile eval: {e}") from e
    print()
    print(format_table(results))
    paths = write_outputs(results, args.out)
    for kind, p in paths.items():
        print(f"  {kind}: {p}")
    return 1 if any(r["status"] == "failed" for r in results["configs"]) else 0
