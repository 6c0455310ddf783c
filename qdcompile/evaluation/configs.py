"""The configurations one evaluation compares (FP, W8A8, W4A8 RTN / Q-Diffusion, PTQD, …) and how a
quantized model of one is built."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch

from ..api import attach
from ..recipe import QuantRecipe
from ..sampling import unwrap
from ..simulate import simulate


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
               (("method", "qdiffusion"), ("weight_grid", "symmetric"), ("weight_observer", "mse"), ("split", True)),
               expect_method="reconstruction"),
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
    their pure-torch reference), every quantized layer integer (``prefer_float=False``: quality is
    measured for the recipe itself, not for the sm_90 speed choice that keeps some layers float).
    ``backend="simulate"``: the fake-quant simulation of the same
    metadata (float math, no compilation).
    """
    if backend not in ("qdiff", "simulate"):
        raise ValueError(f"backend must be 'qdiff' or 'simulate', got {backend!r}")
    q = copy.deepcopy(unwrap(unet))
    if backend == "qdiff":
        attach(q, meta)
        yield torch.compile(q, backend="qdiff", options={"prefer_float": False})
    else:
        with simulate(q, meta) as m:
            yield m
