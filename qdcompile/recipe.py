"""Quantization recipes: one frozen, versioned config type; presets are named constructors."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

RECIPE_VERSION = 1

_OBSERVERS = ("minmax", "percentile")
_METHODS = ("rtn",)


@dataclass(frozen=True)
class QuantRecipe:
    """What to quantize and how.

    * ``weight_bits`` / ``act_bits``: 4 or 8; ``act_bits=None`` keeps layer inputs in float
      (weight-only quantization).
    * ``method``: ``"rtn"`` — round-to-nearest with min-max per-channel weight scales.
    * ``act_observer``: ``"minmax"`` (running min/max over the calibration set) or
      ``"percentile"`` (mean over calibration batches of the ``act_percentile`` /
      ``100 − act_percentile`` quantiles, clipping rare outliers).
    * ``keep_8bit``: layer-name patterns (``fnmatch``) kept at 8-bit weights and activations
      whatever the bit widths (the papers keep the first and last layers at 8 bit).
    * ``skip``: layer-name patterns left in float (reported as float fallback).
    """

    name: str = "custom"
    weight_bits: int = 8
    act_bits: int | None = 8
    method: str = "rtn"
    act_observer: str = "minmax"
    act_percentile: float = 99.99
    keep_8bit: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    version: int = field(default=RECIPE_VERSION)

    def __post_init__(self) -> None:
        if self.weight_bits not in (4, 8):
            raise ValueError(f"QuantRecipe.weight_bits must be 4 or 8, got {self.weight_bits!r}")
        if self.act_bits not in (4, 8, None):
            raise ValueError(f"QuantRecipe.act_bits must be 4, 8 or None, got {self.act_bits!r}")
        if self.method not in _METHODS:
            raise ValueError(f"QuantRecipe.method must be one of {_METHODS}, got {self.method!r}")
        if self.act_observer not in _OBSERVERS:
            raise ValueError(f"QuantRecipe.act_observer must be one of {_OBSERVERS}, got {self.act_observer!r}")
        if not 50.0 < self.act_percentile <= 100.0:
            raise ValueError(f"QuantRecipe.act_percentile must be in (50, 100], got {self.act_percentile}")
        if self.version != RECIPE_VERSION:
            raise ValueError(f"QuantRecipe version {self.version} is not supported (this qdcompile reads {RECIPE_VERSION})")
        object.__setattr__(self, "keep_8bit", tuple(self.keep_8bit))
        object.__setattr__(self, "skip", tuple(self.skip))

    # ------------------------------------------------------------------ presets
    @classmethod
    def w8a8(cls, **overrides: Any) -> "QuantRecipe":
        """8-bit weights and activations, round-to-nearest, min-max observers."""
        return cls(**{"name": "w8a8", "weight_bits": 8, "act_bits": 8, **overrides})

    @classmethod
    def w4a8(cls, **overrides: Any) -> "QuantRecipe":
        """4-bit weights, 8-bit activations; first and last layers at 8 bit."""
        return cls(**{"name": "w4a8", "weight_bits": 4, "act_bits": 8,
                      "keep_8bit": ("conv_in", "conv_out"), **overrides})

    @classmethod
    def w4a4(cls, **overrides: Any) -> "QuantRecipe":
        """4-bit weights and activations; first and last layers at 8 bit."""
        return cls(**{"name": "w4a4", "weight_bits": 4, "act_bits": 4,
                      "keep_8bit": ("conv_in", "conv_out"), **overrides})

    @classmethod
    def preset(cls, name: str) -> "QuantRecipe":
        presets = {"w8a8": cls.w8a8, "w4a8": cls.w4a8, "w4a4": cls.w4a4}
        if name not in presets:
            raise ValueError(f"unknown recipe {name!r}; available: {sorted(presets)}")
        return presets[name]()

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["keep_8bit"] = list(self.keep_8bit)
        d["skip"] = list(self.skip)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantRecipe":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"QuantRecipe: unknown fields {sorted(unknown)} (written by a newer qdcompile?)")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "QuantRecipe":
        return cls.from_dict(json.loads(s))
