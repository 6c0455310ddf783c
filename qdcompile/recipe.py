"""Quantization recipes: one frozen, versioned config type; presets are named constructors."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
from dataclasses import dataclass, field
from typing import Any

RECIPE_VERSION = 2
# Fields each recipe version added, with the value that reproduces the behaviour of the versions
# before it: a recipe of an older version (a dict or a metadata header) lacks them and loads with
# these values, then reads as the current version.
# ---- issue 20 ----
#   2: weight_grid (before: every weight symmetric), act_lsq_schedule (before: constant LSQ lr);
#      act_observer "search" is new in 2 as a value (version-1 recipes never have it)
RECIPE_FIELDS_ADDED: dict[int, dict[str, Any]] = {
    2: {"weight_grid": "symmetric", "act_lsq_schedule": "constant"},
}
READABLE_RECIPE_VERSIONS = (1, 2)

_OBSERVERS = ("minmax", "percentile", "search")
_LSQ_SCHEDULES = ("constant", "cosine")
_WEIGHT_OBSERVERS = ("minmax", "mse", "qdiff-mse")
_WEIGHT_GRIDS = ("auto", "symmetric", "asymmetric")
_METHODS = ("rtn", "qdiffusion")
_RECON_UNITS = ("ResnetBlock2D", "BasicTransformerBlock", "Attention")


@dataclass(frozen=True)
class QuantRecipe:
    """What to quantize and how.

    * ``weight_bits`` / ``act_bits``: 4 or 8; ``act_bits=None`` keeps layer inputs in float
      (weight-only quantization).
    * ``method``: ``"rtn"`` — round-to-nearest weights, observed activation ranges;
      ``"qdiffusion"`` — block reconstruction (BRECQ): AdaRound weight rounding, then
      LSQ-style activation step sizes, block by block against the float model.
    * ``weight_observer``: per-channel weight range: ``"minmax"`` (max |W|, or [min, max] on the
      asymmetric grid), ``"mse"`` (clipping ratio 1.0 … 0.3 in 36 steps searched per channel for the
      least squared rounding error) or ``"qdiff-mse"`` (Q-Diffusion's search: 80 ratios 1.00 … 0.21
      shrinking min and max together, scored by the mean |error|^2.4).
    * ``weight_grid`` (recipe version 2): ``"symmetric"`` (signed codes, METHODS §1),
      ``"asymmetric"`` (Q-Diffusion's grid: unsigned codes and an integer zero point per output
      channel) for the 4-bit layers, or ``"auto"``: asymmetric at 4 bits, symmetric at 8. 8-bit
      layers (``keep_8bit``, W8 recipes) are always symmetric: their codes minus a zero point would
      not fit the int8 kernels. The kernels subtract the zero point at compile time, so an
      asymmetric 4-bit layer runs int8 codes in [−15, 15] on the device (the file stays 4-bit).
    * ``split``: shortcut-split quantization of layers fed by a channel concatenation
      (up-block ResNet ``conv_shortcut``): per-part activation quantizers and weight scales.
    * ``recon_*`` / ``adaround_*`` / ``act_lsq_*`` (``qdiffusion`` only): ``recon_iters``
      AdaRound steps per block (batch ``recon_batch_size``, Adam lr ``recon_lr``), rounding
      regularizer ``adaround_reg_weight · Σ 1 − |2h(V) − 1|^β`` off for the first
      ``recon_warmup`` fraction, then β annealed linearly from ``adaround_beta[0]`` to
      ``adaround_beta[1]``; ``act_lsq_iters`` steps of Adam (lr ``act_lsq_lr``, on log Δ) for
      the activation step sizes. ``recon_units``: module class names reconstructed as one
      block; conv/linear layers outside them are reconstructed one by one. The defaults
      are sized for minutes on a small model (the papers run 20k AdaRound steps at lr 1e-3
      per block); raise ``recon_iters`` for large models on a GPU.
    * ``act_observer``: ``"minmax"`` (running min/max over the calibration set),
      ``"percentile"`` (mean over calibration batches of the ``act_percentile`` /
      ``100 − act_percentile`` quantiles, clipping rare outliers) or ``"search"`` (Q-Diffusion's
      start: min and max shrunk together by the clipping ratio, 1.00 down to 0.21 in 80 steps, that
      minimises the mean |error|^2.4 of the fake-quantized input at the layer's activation bit width,
      scored on a fixed random subsample of the calibration inputs; recipe version 2).
    * ``act_lsq_schedule`` (recipe version 2): learning-rate schedule of the LSQ steps:
      ``"constant"`` (``act_lsq_lr`` throughout) or ``"cosine"`` (annealed from ``act_lsq_lr`` to 0
      over ``act_lsq_iters``, as Q-Diffusion).
    * ``keep_8bit``: layer-name patterns (``fnmatch``) kept at 8-bit weights and activations
      whatever the bit widths (the papers keep the first and last layers at 8 bit).
    * ``skip``: layer-name patterns left in float (reported as float fallback).
    * ``noise_correction`` (PTQD): collect per-step statistics of the quantization noise
      (``k``, channel-wise bias, variance, SNR_Q) on ``noise_samples`` fresh FP trajectories,
      so the sampler can apply correlated-noise correction, bias correction and variance
      schedule calibration.
    * ``act_bits_mixed`` (PTQD step-aware mixed precision): candidate activation bit widths,
      e.g. ``(4, 8)``; weights keep ``weight_bits`` for all steps; per step the smallest width
      with ``SNR_Q > SNR_F`` runs, each width's activation quantizers calibrated on its own
      steps. ``act_bits`` must be the largest candidate (weights are reconstructed with it).
    * ``mixed_margin_db``: safety margin of the mixed-precision rule: a width runs a step only
      if ``SNR_Q > SNR_F · 10^(margin/20)`` (0 = PTQD's rule). Larger margins keep fewer,
      noisier steps at the low width (on the MNIST model 20 dB moves the switch from step 37
      of 50 to about step 24; see ``bench/results/mixed-margin-*``).
    * ``noise_inputs``: where the inputs of the noise statistics come from. ``"fp"`` (PTQD): FP
      sampling trajectories. ``"quantized"``: the uncorrected quantized sampler's own trajectories
      (at the plan's precisions); FP and quantized models still see the same inputs. For plans
      whose sampler leaves the FP trajectories (many A4 steps) the FP-trajectory statistics stop
      describing its error; measured on the MNIST margin-0 plan (output-space statistics) it did
      not make the corrections help (``bench/results/ptqd-corrections-colour-20261122.md``).
    * ``noise_space``: which ε the statistics describe and the corrections act on. ``"sampler"``:
      the ε the scheduler's step actually uses — for a DDPM scheduler that clips or thresholds its
      x0 prediction (``clip_sample``), the ε recomputed from the clipped x0; the k and bias
      corrections then run inside the scheduler step, after the clipping. ``"output"``: the
      U-Net's output (PTQD as published), corrected in the last conv's epilogue. With schedulers
      that do not clip (DDIM, whose direction term keeps the raw ε; Stable Diffusion's) the two
      are the same ε. Clipping rectifies quantization noise (errors that push x0 past ±1 vanish,
      the others stay), so the output's mean error can have the opposite sign of the error the
      sampler sees: on the MNIST mixed plan ``"output"`` made samples brighter and worse (+7.9
      FID), ``"sampler"`` removed the brightening (−5.0 FID, colour W2 −8 levels;
      ``bench/results/ptqd-sampler-space-20261122.md``); on the CIFAR-10 W4A8 model the output's
      statistics bring samples closer to FP's. ``"auto"`` (default): with a clipping scheduler both
      are estimated from the same U-Net evaluations, the correction check below runs on each, and
      the space whose kept corrections leave its validation samples closer to FP's (lower mean
      squared difference) is stored; without a check (``check_samples=0``) it is ``"sampler"``.
      The mixed-precision plan is chosen on the U-Net output's SNR_Q either way (PTQD's rule).
    * ``check_samples``: the correction check at the end of calibration: ``check_samples`` fresh
      seeds are sampled with the float model and with the (simulated) quantized sampler without
      corrections, with k, then with k and bias; a correction is dropped from the sampler's default
      when it moves the final samples away from FP's (per-image mean squared difference up by more
      than 2 standard errors of the paired change), else kept. Statistics that do not
      describe the sampler's error are caught here (the output-space statistics on the MNIST mixed
      plan moved samples away from FP). VSC is not checked this way (it changes the injected noise,
      so it moves every sample by construction; it targets the variance, not the sample) and stays on.
      0 skips the check (all corrections are the default). Costs ``check_samples`` sampling runs of
      the float model and of two or three quantized samplers per space checked.
    """

    name: str = "custom"
    weight_bits: int = 8
    act_bits: int | None = 8
    method: str = "rtn"
    weight_observer: str = "minmax"
    act_observer: str = "minmax"
    act_percentile: float = 99.99
    split: bool = False
    keep_8bit: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    recon_iters: int = 1000
    recon_lr: float = 1e-2
    recon_batch_size: int = 32
    recon_warmup: float = 0.2
    adaround_reg_weight: float = 0.01
    adaround_beta: tuple[float, float] = (20.0, 2.0)
    act_lsq_iters: int = 300
    act_lsq_lr: float = 5e-3
    recon_units: tuple[str, ...] = _RECON_UNITS
    noise_correction: bool = False
    noise_samples: int = 32
    act_bits_mixed: tuple[int, ...] = ()
    mixed_margin_db: float = 0.0
    noise_inputs: str = "fp"
    noise_space: str = "auto"
    check_samples: int = 8
    # ---- weight grid (recipe version 2; issue 20, item 1) ----
    weight_grid: str = "symmetric"
    # ---- activation range search and LSQ schedule (recipe version 2; issue 20, item 2) ----
    act_lsq_schedule: str = "constant"
    version: int = field(default=RECIPE_VERSION)

    def __post_init__(self) -> None:
        if self.weight_bits not in (4, 8):
            raise ValueError(f"QuantRecipe.weight_bits must be 4 or 8, got {self.weight_bits!r}")
        if self.act_bits not in (4, 8, None):
            raise ValueError(f"QuantRecipe.act_bits must be 4, 8 or None, got {self.act_bits!r}")
        if self.method not in _METHODS:
            raise ValueError(f"QuantRecipe.method must be one of {_METHODS}, got {self.method!r}")
        if self.weight_observer not in _WEIGHT_OBSERVERS:
            raise ValueError(f"QuantRecipe.weight_observer must be one of {_WEIGHT_OBSERVERS}, "
                             f"got {self.weight_observer!r}")
        if self.act_observer not in _OBSERVERS:
            raise ValueError(f"QuantRecipe.act_observer must be one of {_OBSERVERS}, got {self.act_observer!r}")
        if not 50.0 < self.act_percentile <= 100.0:
            raise ValueError(f"QuantRecipe.act_percentile must be in (50, 100], got {self.act_percentile}")
        if not isinstance(self.split, bool):
            raise ValueError(f"QuantRecipe.split must be True or False, got {self.split!r}")
        if self.split and self.act_bits is None:
            raise ValueError("QuantRecipe.split=True needs act_bits: each part of a split layer carries its own "
                             "activation quantizer (use split=False for weight-only recipes)")
        for knob in ("recon_iters", "recon_batch_size", "act_lsq_iters"):
            v = getattr(self, knob)
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if knob == "recon_batch_size" else 0):
                raise ValueError(f"QuantRecipe.{knob} must be an integer >= {1 if knob == 'recon_batch_size' else 0}, "
                                 f"got {v!r}")
        for knob in ("recon_lr", "act_lsq_lr"):
            if not getattr(self, knob) > 0:
                raise ValueError(f"QuantRecipe.{knob} must be > 0, got {getattr(self, knob)!r}")
        if not 0.0 <= self.recon_warmup < 1.0:
            raise ValueError(f"QuantRecipe.recon_warmup must be in [0, 1), got {self.recon_warmup!r}")
        if not self.adaround_reg_weight >= 0:
            raise ValueError(f"QuantRecipe.adaround_reg_weight must be >= 0, got {self.adaround_reg_weight!r}")
        try:
            beta = tuple(float(b) for b in self.adaround_beta)
        except (TypeError, ValueError):
            beta = ()
        if len(beta) != 2 or not beta[0] >= beta[1] > 0:
            raise ValueError(f"QuantRecipe.adaround_beta must be (start, end) with start >= end > 0, "
                             f"got {self.adaround_beta!r}")
        if isinstance(self.recon_units, str) or not isinstance(self.recon_units, (tuple, list)) \
                or not all(isinstance(u, str) and u for u in self.recon_units):
            raise ValueError(f"QuantRecipe.recon_units must be a sequence of module class names, got {self.recon_units!r}")
        if not isinstance(self.noise_correction, bool):
            raise ValueError(f"QuantRecipe.noise_correction must be True or False, got {self.noise_correction!r}")
        if not isinstance(self.noise_samples, int) or isinstance(self.noise_samples, bool) or self.noise_samples < 1:
            raise ValueError(f"QuantRecipe.noise_samples must be an integer >= 1, got {self.noise_samples!r}")
        mixed = tuple(self.act_bits_mixed)
        if mixed:
            if len(mixed) < 2 or len(set(mixed)) != len(mixed) or any(b not in (4, 8) for b in mixed):
                raise ValueError(f"QuantRecipe.act_bits_mixed must list 2 distinct widths from (4, 8), got {mixed!r}")
            if self.act_bits != max(mixed):
                raise ValueError(f"QuantRecipe.act_bits_mixed={mixed!r} needs act_bits={max(mixed)} (the largest "
                                 f"candidate), got {self.act_bits!r}")
        object.__setattr__(self, "act_bits_mixed", tuple(sorted(mixed)))
        if isinstance(self.mixed_margin_db, bool) or not isinstance(self.mixed_margin_db, (int, float)) \
                or not math.isfinite(self.mixed_margin_db):
            raise ValueError(f"QuantRecipe.mixed_margin_db must be a finite number of dB, got {self.mixed_margin_db!r}")
        object.__setattr__(self, "mixed_margin_db", float(self.mixed_margin_db))
        if self.noise_inputs not in ("fp", "quantized"):
            raise ValueError(f"QuantRecipe.noise_inputs must be 'fp' or 'quantized', got {self.noise_inputs!r}")
        if self.noise_space not in ("auto", "sampler", "output"):
            raise ValueError(f"QuantRecipe.noise_space must be 'auto', 'sampler' or 'output', got {self.noise_space!r}")
        if not isinstance(self.check_samples, int) or isinstance(self.check_samples, bool) or self.check_samples < 0:
            raise ValueError(f"QuantRecipe.check_samples must be an integer >= 0, got {self.check_samples!r}")
        if self.weight_grid not in _WEIGHT_GRIDS:
            raise ValueError(f"QuantRecipe.weight_grid must be one of {_WEIGHT_GRIDS}, got {self.weight_grid!r}")
        if self.weight_grid == "asymmetric" and self.weight_bits == 8:
            raise ValueError("QuantRecipe.weight_grid='asymmetric' applies to 4-bit weights; this recipe has "
                             "weight_bits=8 (8-bit weights stay symmetric: the int8 kernels have no exact route for "
                             "8-bit codes minus a zero point)")
        if self.version != RECIPE_VERSION:
            raise ValueError(f"QuantRecipe version {self.version} is not supported (this qdcompile reads {RECIPE_VERSION})")
        if self.act_lsq_schedule not in _LSQ_SCHEDULES:
            raise ValueError(f"QuantRecipe.act_lsq_schedule must be one of {_LSQ_SCHEDULES}, "
                             f"got {self.act_lsq_schedule!r}")
        object.__setattr__(self, "keep_8bit", tuple(self.keep_8bit))
        object.__setattr__(self, "skip", tuple(self.skip))
        object.__setattr__(self, "adaround_beta", beta)
        object.__setattr__(self, "recon_units", tuple(self.recon_units))

    def asymmetric_weights(self, bits: int) -> bool:
        """Whether a layer with ``bits``-bit weights uses the asymmetric grid (``weight_grid``)."""
        return self.weight_grid != "symmetric" and bits <= 4

    # ------------------------------------------------------------------ presets
    @classmethod
    def w8a8(cls, **overrides: Any) -> "QuantRecipe":
        """8-bit weights and activations, round-to-nearest, min-max observers."""
        return cls(**{"name": "w8a8", "weight_bits": 8, "act_bits": 8, **overrides})

    @classmethod
    def w4a8(cls, **overrides: Any) -> "QuantRecipe":
        """4-bit weights, 8-bit activations, Q-Diffusion: block reconstruction (AdaRound +
        LSQ) on MSE-searched symmetric weight scales, shortcut-split; first and last layers at
        8 bit.

        Q-Diffusion's own weight grid is opt-in: ``w4a8(weight_grid="asymmetric",
        weight_observer="qdiff-mse")`` (asymmetric 4-bit weights chosen by its |error|^2.4
        search). After reconstruction it lowers per-layer error but not the end-to-end error:
        over three calibration seeds, MNIST ε SNR_Q −1.8 dB and FID +28, CIFAR-10 FID +2.0 at
        every seed (bench/results/fidelity-20261203.md), so it is not the default here (it is
        for the round-to-nearest ``w4a4``).

        ``w4a8(method="rtn", split=False)`` is the linear-quantization baseline (min-max weight
        scales, round to nearest); ``w4a8(method="rtn")`` keeps the split.
        """
        method = overrides.get("method", "qdiffusion")
        return cls(**{"name": "w4a8", "weight_bits": 4, "act_bits": 8, "method": method, "split": True,
                      "weight_observer": "mse" if method == "qdiffusion" else "minmax",
                      "keep_8bit": ("conv_in", "conv_out"), **overrides})

    @classmethod
    def w4a4(cls, **overrides: Any) -> "QuantRecipe":
        """4-bit weights and activations, round to nearest; first and last layers at 8 bit.
        Activation ranges by Q-Diffusion's |error|^2.4 search (``act_observer="search"``) and
        4-bit weights on Q-Diffusion's asymmetric grid with its search (``weight_grid=
        "asymmetric", weight_observer="qdiff-mse"``). Against min-max ranges on the symmetric
        min-max grid, over three calibration seeds: ε SNR_Q +4.3 dB (CIFAR-10) / +4.6 dB
        (MNIST), CIFAR-10 FID −12 at every seed, MNIST FID worse (+42, within noise; the
        searched ranges cost it there) — bench/results/fidelity-20261203.md. Asymmetric codes
        run the int8 kernel on the device (codes minus zero points)."""
        return cls(**{"name": "w4a4", "weight_bits": 4, "act_bits": 4, "act_observer": "search",
                      "weight_grid": "asymmetric", "weight_observer": "qdiff-mse",
                      "keep_8bit": ("conv_in", "conv_out"), **overrides})

    @classmethod
    def ptqd(cls, **overrides: Any) -> "QuantRecipe":
        """Q-Diffusion W4A8 plus PTQD noise statistics (correlated-noise correction, bias
        correction and variance schedule calibration at sampling time)."""
        return cls.w4a8(**{"name": "ptqd", "noise_correction": True, **overrides})

    @classmethod
    def mixed(cls, **overrides: Any) -> "QuantRecipe":
        """PTQD step-aware mixed precision: 4-bit weights for all steps, activations at 4 or
        8 bits per step (W4A4/A8), Q-Diffusion calibration per precision on its own steps,
        with PTQD noise correction."""
        return cls.w4a8(**{"name": "mixed", "noise_correction": True, "act_bits_mixed": (4, 8), **overrides})

    @classmethod
    def preset(cls, name: str) -> "QuantRecipe":
        presets = {"w8a8": cls.w8a8, "w4a8": cls.w4a8, "w4a4": cls.w4a4, "ptqd": cls.ptqd, "mixed": cls.mixed}
        if name not in presets:
            raise ValueError(f"unknown recipe {name!r}; available: {sorted(presets)}")
        return presets[name]()

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["keep_8bit"] = list(self.keep_8bit)
        d["skip"] = list(self.skip)
        d["adaround_beta"] = list(self.adaround_beta)
        d["recon_units"] = list(self.recon_units)
        d["act_bits_mixed"] = list(self.act_bits_mixed)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantRecipe":
        """A recipe from :meth:`to_dict`'s form; an older version's recipe (see
        :data:`RECIPE_FIELDS_ADDED`) gets the values that keep its behaviour and reads as the
        current version."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"QuantRecipe: unknown fields {sorted(unknown)} (written by a newer qdcompile?)")
        version = d.get("version", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            if version not in READABLE_RECIPE_VERSIONS:
                raise ValueError(f"QuantRecipe version {version!r} is not supported (this qdcompile reads "
                                 f"{list(READABLE_RECIPE_VERSIONS)})")
            added = recipe_fields_added_after(version)
            present = sorted(set(added) & set(d))
            if present:
                raise ValueError(f"QuantRecipe version {version} cannot have fields {present} (added in a later version)")
            d = {**d, **added, "version": RECIPE_VERSION}
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "QuantRecipe":
        return cls.from_dict(json.loads(s))


def matches(name: str, patterns) -> bool:
    """Whether the layer ``name`` matches one of the fnmatch ``patterns`` (``keep_8bit``, ``skip``)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def layer_bits(name: str, recipe: QuantRecipe) -> tuple[int, int | None]:
    """``(weight bits, activation bits or None)`` that ``recipe`` gives the layer ``name``
    (``keep_8bit`` layers at 8)."""
    if matches(name, recipe.keep_8bit):
        return 8, (8 if recipe.act_bits is not None else None)
    return recipe.weight_bits, recipe.act_bits


def recipe_fields_added_after(version: int) -> dict[str, Any]:
    """The fields recipe versions after ``version`` added, with their backward-compatible values."""
    return {k: v for ver, fields in sorted(RECIPE_FIELDS_ADDED.items()) if ver > version for k, v in fields.items()}
