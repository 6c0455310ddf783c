"""The quantized sampler: per-step precision and PTQD corrections, for loops and diffusers pipelines.

:class:`QuantizedUNet` stands in for a diffusers U-Net. Each call reads the time step, picks
the activation precision of the metadata's plan (step-aware mixed precision), runs that
precision's compiled variant of the model (``torch.compile(unet, backend="qdiff")``: the
variants share the prepared weights and are compiled once each, so sampling never
recompiles after warm-up) and applies the PTQD correction of that precision and step —
inside the last conv's epilogue when the model is compiled, as an elementwise map otherwise.

:class:`CorrectedScheduler` wraps a diffusers scheduler and applies variance schedule
calibration in its ``step`` (DDPM; DDIM with ``eta > 0``). When the statistics describe the ε
the scheduler uses after clipping its x0 prediction (``meta.noise_space == "sampler"``, the
default for ``clip_sample`` schedulers), the k and bias corrections also run there, after the
clipping, instead of in the U-Net: sample through :meth:`QuantizedUNet.sample`,
:meth:`QuantizedUNet.wrap_scheduler` or :func:`quantize_pipeline`, not the bare U-Net.

:func:`quantize_pipeline` puts both into a ``DDPMPipeline`` / ``DDIMPipeline`` /
``StableDiffusionPipeline`` (any pipeline with ``unet`` and ``scheduler``), after which
``pipe(...)`` samples quantized.
"""

from __future__ import annotations

import copy
import functools
import logging
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .api import attach, attached_metadata, fused_correction
from .metadata import MetadataError, QuantMetadata, validate_variants
from .noise import VSCUnsupported, calibrated_sigma, clips_x0, effective_eps, eps_channels, scheduler_kind
from .passes import registry
from .sampling import batch_kwargs, call_unet, model_sample_shape, sample, unwrap
from .simulate import simulate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Corrections:
    """Which PTQD corrections the sampler applies (all need noise statistics in the metadata)."""

    correlated: bool = True   # divide by 1 + k
    bias: bool = True         # subtract the channel-wise mean of the residual noise
    variance: bool = True     # variance schedule calibration (stochastic DDPM/DDIM steps)

    @classmethod
    def none(cls) -> "Corrections":
        return cls(False, False, False)

    @classmethod
    def default_for(cls, meta: QuantMetadata) -> "Corrections":
        """What a sampler for ``meta`` applies unless told otherwise: none without noise
        statistics; else those the calibration's correction check kept (all, for metadata
        calibrated without the check)."""
        if not meta.noise:
            return cls.none()
        return cls(**meta.corrections) if meta.corrections is not None else cls()

    @property
    def any(self) -> bool:
        return self.correlated or self.bias or self.variance

    def label(self) -> str:
        on = [n for n, v in (("k", self.correlated), ("bias", self.bias), ("VSC", self.variance)) if v]
        return "+".join(on) if on else "none"


class QuantizedUNet(nn.Module):
    """A drop-in U-Net running ``meta`` quantized, with per-step precision and PTQD corrections.

    * ``backend="qdiff"``: the integer kernels via ``torch.compile(unet, backend="qdiff")``
      (``unet`` may already be compiled that way); ``"simulate"``: the fake-quant model.
    * ``mixed``: follow the metadata's precision plan (default: when it has one); otherwise
      every step runs the records' own precision.
    * ``corrections``: PTQD corrections to apply (default :meth:`Corrections.default_for`: those
      the calibration's correction check kept; :meth:`Corrections.none` for the uncorrected model).
    """

    def __init__(self, unet: nn.Module, meta: QuantMetadata, *, backend: str = "qdiff",
                 corrections: Optional[Corrections] = None, mixed: Optional[bool] = None):
        super().__init__()

        if backend not in ("qdiff", "simulate"):
            raise ValueError(f"backend must be 'qdiff' or 'simulate', got {backend!r}")
        base = unwrap(unet)
        meta.check_model(base)
        validate_variants(meta)   # PTQD statistics and plan (in-memory metadata is not checked by a load)
        self.meta, self.backend = meta, backend
        self.mixed = bool(meta.precision_plan) if mixed is None else mixed
        if self.mixed and not meta.precision_plan:
            raise MetadataError("mixed=True, but this metadata has no precision plan (calibrate with "
                                "QuantRecipe.mixed())")
        corrections = Corrections.default_for(meta) if corrections is None else corrections
        if corrections.any and not meta.noise:
            raise MetadataError(f"corrections {corrections.label()} need PTQD noise statistics; this metadata has none "
                                "(calibrate with QuantRecipe.ptqd() / .mixed(), or noise_correction=True)")
        self.corrections = corrections
        self.channels = eps_channels(base)
        self.__dict__["_base"] = base     # not a submodule: the compiled wrapper below owns it
        if backend == "qdiff":
            if attached_metadata(base) is not meta:
                attach(base, meta)
            self.model = unet if unet is not base else torch.compile(base, backend="qdiff")
            self._fused = fused_correction(base)
        else:
            self.model = base
            self._fused = None
        self.trace: list[tuple[int, Optional[int]]] = []   # (timestep, act bits) of each call
        self._schedule: Optional[list[int]] = None          # host copy of the sampler's time steps
        self._cursor = 0                                     # index of the step being sampled
        self._mismatch: Optional[torch.Tensor] = None        # device flag: a call's t was not the schedule's
        self._warned_sync = False

    # ------------------------------------------------------------------ U-Net look-alike
    @property
    def _orig_mod(self) -> nn.Module:
        """The float U-Net (what ``qdcompile.sampling.unwrap`` returns)."""
        return self._base

    @property
    def config(self):
        return self._base.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self._base.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self._base.parameters()).device

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_base")
            if base is None:
                raise
            return getattr(base, name)

    # ------------------------------------------------------------------ the time step on the host
    def follow_schedule(self, timesteps) -> None:
        """Called by :class:`CorrectedScheduler` after ``set_timesteps``: keep a host copy of the
        time steps (one transfer per sampling run), so that no step reads ``t`` from the GPU."""
        self.check_schedule()
        self._schedule = [int(t) for t in torch.as_tensor(timesteps).detach().cpu().reshape(-1).tolist()]
        self._cursor = 0

    def advance_schedule(self) -> None:
        """Called by :class:`CorrectedScheduler` after each ``step``."""
        self._cursor += 1

    def check_schedule(self) -> None:
        """Raise if a call since the last check was made with a time step other than the one the
        sampler was at (checked on the device, read here: once per sampling run)."""
        flag, self._mismatch = self._mismatch, None
        if flag is not None and bool(flag):
            raise RuntimeError("QuantizedUNet was called with time steps that are not the scheduler's current ones, "
                               "so per-step precisions/corrections may have been wrong: call the U-Net once per "
                               "scheduler.step, with the scheduler's time steps, or pass the time step as a Python int "
                               "or CPU tensor")

    def host_timestep(self, timestep) -> int:
        """The time step of this call as a Python int, without a device synchronisation: Python
        numbers and CPU tensors are read directly; a CUDA tensor is taken from the host copy of
        the sampler's schedule (and compared with it on the device, see :meth:`check_schedule`)."""
        if not torch.is_tensor(timestep):
            return int(timestep)
        if _host_readable(timestep):
            return int(timestep.reshape(-1)[0])
        if self._schedule is not None and self._cursor < len(self._schedule):
            t = self._schedule[self._cursor]
            wrong = (timestep.reshape(-1) != t).any()
            self._mismatch = wrong if self._mismatch is None else self._mismatch | wrong
            return t
        if not self._warned_sync:
            logger.warning("QuantizedUNet: reading the time step from a %s tensor synchronises the device every step; "
                           "sample through QuantizedUNet.sample / quantize_pipeline (the scheduler tells the model its "
                           "time steps) or pass CPU time steps", timestep.device.type)
            self._warned_sync = True
        return int(timestep.reshape(-1)[0])

    # ------------------------------------------------------------------ per step
    def bits_at(self, timestep: int) -> Optional[int]:
        return self.meta.bits_at(timestep) if self.mixed else self.meta.default_act_bits

    def noise_at(self, timestep: int):
        return self.meta.noise_at(self.bits_at(timestep), timestep)

    @property
    def corrects_in_sampler(self) -> bool:
        """True when k and bias are corrected in the scheduler step, after its x0 clipping."""
        return self.meta.noise_space == "sampler"

    def affine_at(self, timestep: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        c = self.corrections
        if not (c.correlated or c.bias):
            return None
        return self.noise_at(timestep).affine(bias_correction=c.bias, correlated=c.correlated)

    def sampler_eps(self, scheduler, model_output, timestep, sample: torch.Tensor):
        """``model_output`` (this model's output at ``timestep`` for ``sample`` = x_t) as the
        scheduler's step will use it: the ε channels replaced by the ε of the clipped x0
        prediction (:func:`qdcompile.noise.effective_eps`) and, for sampler-space statistics,
        corrected (k, bias) there. Output-space corrections are already in ``model_output``."""
        t = self.host_timestep(timestep)
        sched = unwrap_scheduler(scheduler)
        affine = self.affine_at(t) if self.corrects_in_sampler else None
        return self._apply(model_output, affine,
                           lambda eps: effective_eps(sched, sample.to(eps.device), t, eps))

    def forward(self, sample: torch.Tensor, timestep, *args, **kwargs):
        t = self.host_timestep(timestep)
        bits = self.bits_at(t)
        self.trace.append((t, bits))
        affine = None if self.corrects_in_sampler else self.affine_at(t)
        key = None if bits == self.meta.default_act_bits else bits
        if self.backend == "simulate":
            with simulate(self._base, self.meta.at_precision(key)):
                out = self.model(sample, timestep, *args, **kwargs)
            return self._apply(out, affine)
        if self._fused is not None:
            if affine is None:
                self._fused.reset()
            else:
                self._fused.set(*affine)
            with registry.precision(key):
                return self.model(sample, timestep, *args, **kwargs)
        with registry.precision(key):
            out = self.model(sample, timestep, *args, **kwargs)
        return self._apply(out, affine)

    def _apply(self, out, affine, before=None):
        """The correction as an elementwise map on the ε channels of ``out`` (models without the
        fused epilogue; sampler-space corrections), after ``before(ε)`` when given."""
        if affine is None and before is None:
            return out
        eps = out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, tuple) else out)
        c = self.channels
        head = eps[:, :c] if before is None else before(eps[:, :c])
        if affine is not None:
            a, b = (v.to(eps.device, torch.float32).view(1, -1, *([1] * (eps.dim() - 2))) for v in affine)
            head = (head.float() * a + b).to(eps.dtype)
        fixed = torch.cat([head, eps[:, c:]], dim=1)
        if hasattr(out, "sample"):
            out.sample = fixed
            return out
        if isinstance(out, tuple):
            return (fixed, *out[1:])
        return fixed

    # ------------------------------------------------------------------ sampler conveniences
    def plan(self, scheduler, num_inference_steps: int, eta: float = 0.0) -> list[dict[str, Any]]:
        """Per step of ``scheduler`` with ``num_inference_steps``: time step, precision and the
        corrections that apply (k, bias, σ_t → σ'_t; ``eta`` for DDIM)."""
        sched = copy.deepcopy(unwrap_scheduler(scheduler))
        sched.set_timesteps(num_inference_steps)
        rows = []
        for i, t in enumerate(sched.timesteps):
            t = int(t)
            bits = self.bits_at(t)
            row: dict[str, Any] = {"step": i, "timestep": t, "act_bits": bits}
            if self.meta.noise:
                n = self.meta.noise_at(bits, t)
                row.update(k=n.k, bias_mean=sum(n.mu) / len(n.mu), noise_var=n.var)
                if self.corrections.variance:
                    try:
                        s2, s2c = calibrated_sigma(sched, t, n.k if self.corrections.correlated else 0.0, n.var,
                                                   eta=eta)
                        row.update(sigma2=s2, sigma2_calibrated=s2c)
                    except VSCUnsupported:
                        pass
            rows.append(row)
        return rows

    def format_plan(self, scheduler, num_inference_steps: int, eta: float = 0.0) -> str:
        rows = self.plan(scheduler, num_inference_steps, eta)
        rule = ""
        where = ""
        if self.corrections.correlated or self.corrections.bias:
            if not self.corrects_in_sampler:
                where = " (k, bias: on the U-Net output)"
            elif clips_x0(unwrap_scheduler(scheduler)):
                where = " (k, bias: in the scheduler step, after its x0 clipping)"
            elif not _stats_after_clipping(self.meta):
                g = self.meta.calibration.get("guidance_scale")
                where = " (k, bias: in the scheduler step" + (f", on the guided ε, guidance scale {g:g})"
                                                              if g is not None else ")")
            else:
                where = (f" (k, bias: statistics taken after DDPM's x0 clipping, but {type(unwrap_scheduler(scheduler)).__name__}"
                         " does not clip: applied to the raw output; recalibrate with this scheduler)")
        if self.mixed:
            m = self.meta.recipe.mixed_margin_db
            rule = ", rule SNR_Q > SNR_F" + (f" * 10^({m:g}/20)" if m else " (PTQD)")
        lines = [f"precision plan ({'mixed' if self.mixed else 'fixed'}{rule}, corrections "
                 f"{self.corrections.label()}{where}):"]
        w = self.meta.recipe.weight_bits
        lines.append(f"  W{w}: " + format_plan_runs([(r["step"], r["timestep"], r["act_bits"]) for r in rows]))
        counts = {b: sum(r["act_bits"] == b for r in rows) for b in sorted({r["act_bits"] for r in rows})}
        lines.append("  " + ", ".join(f"A{b}: {n} steps" for b, n in counts.items()))
        if rows and "k" in rows[0]:
            ks = [r["k"] for r in rows]
            lines.append(f"  correlated-noise k: {min(ks):.4f} .. {max(ks):.4f}")
            if "sigma2" in rows[0]:
                shrink = [r["sigma2_calibrated"] / r["sigma2"] for r in rows if r.get("sigma2")]
                if shrink:
                    lines.append(f"  VSC sigma'^2/sigma^2: {min(shrink):.4f} .. {max(shrink):.4f}")
        if self.meta.calibration.get("correction_check"):
            lines.append("  " + format_correction_check(self.meta.calibration["correction_check"]))
        return "\n".join(lines)

    def sample(self, scheduler, **kwargs) -> torch.Tensor:
        """:func:`qdcompile.sample` with this model and ``scheduler`` under VSC."""
        out = sample(self, self.wrap_scheduler(scheduler), **kwargs)
        self.check_schedule()
        return out

    def wrap_scheduler(self, scheduler) -> "CorrectedScheduler":
        if isinstance(scheduler, CorrectedScheduler):
            return scheduler
        return CorrectedScheduler(scheduler, self)

    @torch.no_grad()
    def warmup(self, scheduler, num_inference_steps: int, batch_size: int = 1,
               sample_kwargs: Optional[dict[str, Any]] = None) -> None:
        """Call the model once per precision of the plan, so sampling compiles nothing."""
        seen: dict[Optional[int], int] = {}
        for row in self.plan(scheduler, num_inference_steps):
            seen.setdefault(row["act_bits"], row["timestep"])
        c, h, w = model_sample_shape(self._base)
        x = torch.randn(batch_size, c, h, w, device=self.device, dtype=self.dtype)
        kw = batch_kwargs(sample_kwargs, 0, batch_size, batch_size)
        for t in seen.values():
            call_unet(self, x, torch.tensor(t, device=self.device), kw)
        self.trace.clear()


def _host_readable(t: torch.Tensor) -> bool:
    """Reading ``t`` costs no device synchronisation."""
    return t.device.type == "cpu"


def format_correction_check(check: dict[str, Any]) -> str:
    """One line on the calibration's correction check (:func:`qdcompile.ptqd.check_corrections`)."""
    kept = Corrections(**check["kept"])
    mse = ", ".join(f"{k} {v:.4g}" for k, v in check["mse_vs_fp"])
    dropped = [f"{c['correction']} (+{c['delta']:.2g} ± {c['se']:.2g}: moved samples away from FP)"
               for c in check.get("changes", []) if not c["kept"]]
    line = (f"correction check ({check['samples']} samples, mean squared difference to FP's): {mse} -> default "
            f"corrections {kept.label()}" + (f"; dropped {', '.join(dropped)}" if dropped else ""))
    choice = check.get("space_choice")
    if choice:
        line += (f"; statistics of the {'ε the scheduler step uses' if choice['chosen'] == 'sampler' else 'U-Net output'}"
                 " chosen (" + ", ".join(f"{sp} space {choice['corrections'][sp]} {m:.4g}"
                                         for sp, m in choice["mse_vs_fp"].items()) + ")")
    return line


def format_plan_runs(plan: Sequence[Sequence[int]]) -> str:
    """``[[step, timestep, bits], ...]`` as runs: ``steps 0-34 (t 980-300) A4; steps 35-49 (t 280-0) A8``."""
    runs: list[list] = []
    for step, t, bits in plan:
        if runs and runs[-1][4] == bits:
            runs[-1][1], runs[-1][3] = step, t
        else:
            runs.append([step, step, t, t, bits])
    return "; ".join(f"steps {a}-{b} (t {ta}-{tb}) A{bits}" for a, b, ta, tb, bits in runs)


def _stats_after_clipping(meta: QuantMetadata) -> bool:
    """Whether the sampler-space statistics were taken after a scheduler's x0 clipping (metadata
    written before this was recorded: yes, the only sampler space then)."""
    return bool(meta.calibration.get("noise", {}).get("clipped", True))


def unwrap_scheduler(scheduler):
    return scheduler.inner if isinstance(scheduler, CorrectedScheduler) else scheduler


class CorrectedScheduler:
    """A diffusers scheduler whose ``step`` uses PTQD's calibrated variance ``σ'_t`` and, for
    sampler-space statistics, applies the k and bias corrections after its x0 clipping.

    Everything else is the wrapped scheduler's. DDPM (fixed variance types): the step's noise
    variance becomes ``σ'_t²``; DDIM: ``eta`` is rescaled so its noise has ``σ'_t``. Other
    schedulers, ``eta = 0`` and disabled VSC pass through unchanged.
    """

    def __init__(self, scheduler, unet: QuantizedUNet):
        self.__dict__["inner"] = unwrap_scheduler(scheduler)
        self.__dict__["unet"] = unet
        self.__dict__["last_sigma2"] = None      # (σ_t², σ'_t²) of the last step, for tests/logs
        @functools.wraps(self.inner.step)   # keeps the signature pipelines inspect (eta, generator)
        def step(*args, **kwargs):
            return self._step(*args, **kwargs)

        self.__dict__["step"] = step

    def __getattr__(self, name: str):
        return getattr(self.__dict__["inner"], name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.inner, name, value)

    def __deepcopy__(self, memo) -> "CorrectedScheduler":
        return CorrectedScheduler(copy.deepcopy(self.inner, memo), self.unet)

    def _calibrated(self, timestep: int, eta: float) -> Optional[tuple[float, float]]:
        q = self.unet
        if not (q.corrections.variance and q.meta.noise):
            return None
        n = q.noise_at(timestep)
        try:
            return calibrated_sigma(self.inner, timestep, n.k if q.corrections.correlated else 0.0, n.var, eta=eta)
        except VSCUnsupported as e:
            if not self.__dict__.get("_warned"):
                logger.warning("variance schedule calibration off: %s", e)
                self.__dict__["_warned"] = True
            return None

    def set_timesteps(self, *args, **kwargs):
        out = self.inner.set_timesteps(*args, **kwargs)
        self.unet.follow_schedule(self.inner.timesteps)
        self._check_guidance()
        return out

    def _check_guidance(self) -> None:
        """Warn (once per value) when the pipeline this scheduler serves (:func:`quantize_pipeline`)
        samples with another classifier-free guidance scale than the PTQD statistics were
        calibrated with (none recorded: the unguided U-Net output, i.e. scale 1)."""
        ref = self.__dict__.get("pipeline_ref")
        pipe = ref() if ref is not None else None
        meta = self.unet.meta
        if pipe is None or not meta.noise or not self.unet.corrections.any:
            return
        g = getattr(pipe, "_guidance_scale", None)
        if g is None:
            return
        try:
            cfg = bool(pipe.do_classifier_free_guidance)
        except Exception:   # a pipeline without the property: diffusers' rule
            cfg = float(g) > 1.0
        used = float(g) if cfg else 1.0
        calibrated = meta.calibration.get("guidance_scale")
        cal = 1.0 if calibrated is None else float(calibrated)
        warned = self.__dict__.setdefault("_warned_guidance", set())
        if abs(used - cal) <= 1e-6 * max(1.0, abs(cal)) or used in warned:
            return
        warned.add(used)
        what = (f"the guided ε at guidance scale {cal:g}" if calibrated is not None
                else "the unguided U-Net output (calibrated without guidance_scale)")
        warnings.warn(f"qdcompile: this pipeline samples with guidance_scale={used:g}, but the PTQD corrections were "
                      f"estimated on {what}: they describe a different ε than the one the scheduler step corrects; "
                      f"recalibrate with qdcompile.calibrate(..., guidance_scale={used:g}) (CLI: qdcompile calibrate "
                      f"--guidance-scale {used:g})", UserWarning, stacklevel=3)

    def _step(self, model_output, timestep, sample, *args, **kwargs):
        try:
            return self._corrected_step(model_output, timestep, sample, *args, **kwargs)
        finally:
            self.unet.advance_schedule()

    def _corrected_step(self, model_output, timestep, sample, *args, **kwargs):
        t = self.unet.host_timestep(timestep)
        kind = scheduler_kind(self.inner)
        if self.unet.corrects_in_sampler and self.unet.affine_at(t) is not None:
            if not clips_x0(self.inner) and _stats_after_clipping(self.unet.meta) \
                    and not self.__dict__.get("_warned_space"):
                logger.warning("the PTQD statistics were taken after x0 clipping, but this %s does not clip its x0 "
                               "prediction: corrections applied to the raw output (recalibrate with this scheduler)",
                               type(self.inner).__name__)
                self.__dict__["_warned_space"] = True
            model_output = self.unet.sampler_eps(self.inner, model_output, timestep, sample)
        self.__dict__["last_sigma2"] = None
        if kind == "ddpm":
            sig = self._calibrated(t, 0.0)
            if sig is not None and t > 0:
                self.__dict__["last_sigma2"] = sig
                return self._ddpm_step(sig[1], model_output, timestep, sample, *args, **kwargs)
        elif kind == "ddim":
            eta = kwargs.get("eta", args[0] if args else 0.0)
            sig = self._calibrated(t, float(eta)) if eta else None
            if sig is not None and sig[0] > 0:
                self.__dict__["last_sigma2"] = sig
                kwargs["eta"] = float(eta) * (sig[1] / sig[0]) ** 0.5
                args = args[1:]
        return self.inner.step(model_output, timestep, sample, *args, **kwargs)

    def _ddpm_step(self, sigma2: float, model_output, timestep, sample, *args, **kwargs):
        inner = self.inner
        vt = inner.config.variance_type
        value = sigma2 ** 0.5 if vt == "fixed_small_log" else sigma2   # what DDPM's step turns into a std
        inner.__dict__["_get_variance"] = lambda *a, **k: torch.tensor(value, dtype=torch.float32)
        try:
            return inner.step(model_output, timestep, sample, *args, **kwargs)
        finally:
            del inner.__dict__["_get_variance"]


def quantize_pipeline(pipe, meta: QuantMetadata, *, backend: str = "qdiff", corrections: Optional[Corrections] = None,
                      mixed: Optional[bool] = None):
    """Make a diffusers pipeline sample with ``meta``: its ``unet`` becomes a
    :class:`QuantizedUNet`, its ``scheduler`` a :class:`CorrectedScheduler`. Returns ``pipe``."""
    for attr in ("unet", "scheduler"):
        if getattr(pipe, attr, None) is None:
            raise TypeError(f"quantize_pipeline needs a pipeline with a {attr!r} (got {type(pipe).__name__})")
    unet = pipe.unet if isinstance(pipe.unet, QuantizedUNet) else QuantizedUNet(pipe.unet, meta, backend=backend,
                                                                                corrections=corrections, mixed=mixed)
    pipe.unet = unet
    pipe.scheduler = unet.wrap_scheduler(pipe.scheduler)
    # the scheduler reads the pipeline's guidance scale at each run's set_timesteps (see _check_guidance)
    pipe.scheduler.__dict__["pipeline_ref"] = weakref.ref(pipe)
    return pipe
