"""The calibration metadata file: the single source of truth the compiled model executes.

A ``.qdiff`` file is a safetensors file. Its header (``__metadata__``) holds a JSON document
with the format name and version, the model it was calibrated for (class, config and a
config hash), the recipe, calibration facts and, per quantized layer, the scalar fields;
the tensors (integer weight codes, per-channel weight scales, weight digests) are stored
under ``"<layer>.<field>"`` keys. Files are written atomically (temporary file in the same
folder, then ``os.replace``): an interrupted save never leaves a half-written file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .io import atomic_write, jsonable
from .kernels.quantizers import MAX_ACT_SCALE, MIN_ACT_SCALE, SUPPORTED_BITS, dequantize_weight, weight_qrange
from .layers import quantizable_layers
from .noise import StepNoise, eps_channels, nearest
from .recipe import QuantRecipe, layer_bits, recipe_fields_added_after

FORMAT_NAME = "qdcompile.quant_metadata"
FORMAT_VERSION = 6
# 2 added activation variants, PTQD noise statistics and the precision plan; 3 the space of the
# noise statistics (a version-2 reader would apply sampler-space statistics to the U-Net output);
# 4 the corrections the calibration's check kept (a version-3 reader would apply dropped ones);
# 5 SHA-256 checksums of the header and of the tensor payload, and per layer whether it has a
# weight digest (a version-4 reader would not notice flipped bytes or a removed digest);
# 6 asymmetric 4-bit weights: per layer (and split part) weight_zero_point, one integer per output
# channel or null (a version-5 reader would take the unsigned codes for signed ones)
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6)
CHECKSUM_VERSION = 5
ZERO_POINT_VERSION = 6
# Weight scales outside (0, 2^100] are corrupt (the kernels' activation scale bound; a real
# per-channel scale max|W|/qmax is far inside). The weight codes must also reproduce the float
# weights the record was calibrated on: the dequantized weight's RMS within this factor of the
# digest's RMS (rounding and MSE clipping move it by < 1%: 0.996-1.001 measured on the tiny test
# U-Nets at W8 and W4; all-zero codes of a non-zero weight, or scales off by more than 2x, are
# corrupt). All-zero codes of an all-zero weight (a zero-initialised layer) are valid: unusual,
# not wrong.
MAX_WEIGHT_SCALE = 2.0 ** 100
WEIGHT_RMS_TOLERANCE = 2.0
NOISE_SPACES = ("output", "sampler")
CORRECTION_KEYS = ("correlated", "bias", "variance")


class MetadataError(ValueError):
    """A metadata file or object that does not fit (wrong file, version, model or layer)."""


@dataclass
class SplitPart:
    """One part of a shortcut-split layer input (concat order), with its own quantizers."""

    channels: int
    act_bits: int
    act_scale: float
    act_zero_point: int
    weight_q: torch.Tensor      # int8 codes of this part's weight slice [N, channels, ...]
    weight_scale: torch.Tensor  # float32 [N]
    weight_zero_point: torch.Tensor | None = None   # int32 [N] on the asymmetric grid (codes 0 … 2^b − 1), else None


@dataclass(frozen=True)
class ActQuant:
    """One activation quantizer (a layer input, or one part of a split input)."""

    act_bits: int
    act_scale: float
    act_zero_point: int
    act_range: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"act_bits": self.act_bits, "act_scale": self.act_scale, "act_zero_point": self.act_zero_point,
                "act_range": list(self.act_range) if self.act_range is not None else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ActQuant":
        return cls(int(d["act_bits"]), float(d["act_scale"]), int(d["act_zero_point"]),
                   tuple(d["act_range"]) if d.get("act_range") else None)


@dataclass
class LayerQuant:
    """Quantization of one conv/linear layer (METHODS §1 quantizers).

    ``act_bits`` is None where the layer's input stays float (weight-only). For a
    shortcut-split layer ``split`` lists the parts; the top-level ``act_*`` are then None and
    ``weight_q`` / ``weight_scale`` / ``weight_zero_point`` are the per-part fields concatenated
    along the input channels (codes) and stacked (scales and zero points, ``[parts, N]``).
    """

    op: str                          # "conv2d" | "linear"
    weight_bits: int
    act_bits: int | None
    weight_q: torch.Tensor           # int8, same shape as the layer weight (int4 unpacked)
    weight_scale: torch.Tensor       # float32 [N] (per output channel)
    act_scale: float | None
    act_zero_point: int | None
    act_range: tuple[float, float] | None = None   # calibrated [min, max] (before widening to 0)
    weight_digest: torch.Tensor | None = None      # identifies the float weights calibrated on
    split: list[SplitPart] | None = None
    # asymmetric grid (format 6): int32 per output channel, shaped like weight_scale ([N], split: the
    # parts' stacked, [parts, N]); Ŵ = (weight_q − weight_zero_point) · weight_scale. None: symmetric
    weight_zero_point: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.op not in ("conv2d", "linear"):
            raise MetadataError(f"layer op must be 'conv2d' or 'linear', got {self.op!r}")

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.weight_q.shape)

    def act_quants(self) -> list[ActQuant]:
        """The activation quantizer(s) of this record: one per split part, else one (or none)."""
        if self.split:
            return [ActQuant(p.act_bits, p.act_scale, p.act_zero_point) for p in self.split]
        if self.act_bits is None:
            return []
        return [ActQuant(self.act_bits, self.act_scale, self.act_zero_point, self.act_range)]

    def with_act(self, acts: list[ActQuant]) -> "LayerQuant":
        """This record with other activation quantizers (weights shared, not copied)."""
        import dataclasses

        if self.split:
            if len(acts) != len(self.split):
                raise MetadataError(f"{len(acts)} activation quantizers for a {len(self.split)}-part split layer")
            return dataclasses.replace(self, split=[dataclasses.replace(p, act_bits=a.act_bits, act_scale=a.act_scale,
                                                                        act_zero_point=a.act_zero_point)
                                                    for p, a in zip(self.split, acts)])
        if len(acts) != 1:
            raise MetadataError(f"{len(acts)} activation quantizers for a layer with one input")
        a = acts[0]
        return dataclasses.replace(self, act_bits=a.act_bits, act_scale=a.act_scale, act_zero_point=a.act_zero_point,
                                   act_range=a.act_range)

    @property
    def asymmetric(self) -> bool:
        """Whether the weights use the asymmetric grid (unsigned codes, per-channel zero point)."""
        return self.weight_zero_point is not None

    def bits_label(self) -> str:
        if self.split:
            acts = "/".join(str(p.act_bits) for p in self.split)
            return f"W{self.weight_bits}A{acts} split"
        return f"W{self.weight_bits}A{self.act_bits if self.act_bits is not None else 'float'}"


def weight_digest(weight: torch.Tensor) -> torch.Tensor:
    """A small float32 signature of a float weight: mean |W|, RMS and 8 fixed entries.

    Stable under dtype casts (fp16/bf16 change it by < 1%), different for other weights.
    """
    w = weight.detach().float().reshape(-1)
    idx = torch.linspace(0, w.numel() - 1, 8, dtype=torch.float64).round().long().to(w.device)
    return torch.cat([w.abs().mean()[None], w.pow(2).mean().sqrt()[None], w[idx]]).cpu()


def digests_match(a: torch.Tensor, b: torch.Tensor) -> bool:
    rms = float(max(a[1], b[1], 1e-12))
    return bool(torch.allclose(a, b, rtol=1e-2, atol=1e-2 * rms))


def _config_of(model: torch.nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    items = dict(cfg)
    return {k: v for k, v in items.items() if not str(k).startswith("_")}


def model_identity(model: torch.nn.Module) -> dict[str, Any]:
    """Class name, config (private ``_`` keys dropped) and a hash of both."""
    cfg = jsonable(_config_of(model))
    cls = type(model).__name__
    return {"class": cls, "config": cfg, "config_hash": _identity(cls, cfg)}


def _identity(cls: str, config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"class": cls, "config": config}, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class QuantMetadata:
    """Calibration result: recipe, model identity and per-layer quantization records."""

    recipe: QuantRecipe
    model: dict[str, Any]
    layers: dict[str, LayerQuant]
    fallbacks: dict[str, str] = field(default_factory=dict)   # layer → why it stays float
    calibration: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # step-aware mixed precision: activation bit width → layer → quantizer per input part,
    # for the precisions other than the records' own (weights are shared by all precisions)
    act_variants: dict[int, dict[str, list[ActQuant]]] = field(default_factory=dict)
    # PTQD statistics: activation bit width → per time step (see qdcompile.noise.StepNoise)
    noise: dict[int, list[Any]] = field(default_factory=dict)
    noise_layer: str | None = None                   # the last conv, whose epilogue applies the correction
    # what the statistics describe: "output" (the U-Net's ε, corrected in noise_layer's epilogue) or
    # "sampler" (the ε the scheduler step uses after clipping its x0 prediction, corrected there)
    noise_space: str | None = None
    # the PTQD corrections the sampler applies by default (those the calibration's correction check
    # kept: {"correlated": bool, "bias": bool, "variance": bool}); None = all of them
    corrections: dict[str, bool] | None = None
    precision_plan: list[tuple[int, int]] = field(default_factory=list)   # (timestep, act bits)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    # ------------------------------------------------------------------ precisions
    @property
    def default_act_bits(self) -> int | None:
        return self.recipe.act_bits

    @property
    def precisions(self) -> list[int]:
        """Activation bit widths this metadata can run (the records' own first)."""
        own = [self.default_act_bits] if self.default_act_bits is not None else []
        return own + sorted(b for b in self.act_variants if b not in own)

    def records_for(self, act_bits: int | None) -> dict[str, LayerQuant]:
        """The layer records at activation width ``act_bits`` (None or the default: the records)."""
        if act_bits is None or act_bits == self.default_act_bits:
            return self.layers
        if act_bits not in self.act_variants:
            raise MetadataError(f"this metadata has no activation precision A{act_bits} "
                                f"(available: {['A%d' % b for b in self.precisions]})")
        variant = self.act_variants[act_bits]
        return {n: (rec.with_act(variant[n]) if n in variant else rec) for n, rec in self.layers.items()}

    def at_precision(self, act_bits: int | None) -> "QuantMetadata":
        """A view of this metadata whose records run at ``act_bits`` (weights shared)."""
        import dataclasses

        return dataclasses.replace(self, layers=self.records_for(act_bits))

    def bits_at(self, timestep: int) -> int | None:
        """Activation bit width of the plan at ``timestep`` (the nearest planned step)."""
        if not self.precision_plan:
            return self.default_act_bits

        return nearest(self.precision_plan, int(timestep), key=lambda e: e[0])[1]

    def noise_at(self, act_bits: int | None, timestep: int):
        """PTQD statistics (:class:`qdcompile.noise.StepNoise`) of ``act_bits`` nearest ``timestep``."""
        bits = self.default_act_bits if act_bits is None else act_bits
        if bits not in self.noise:
            raise MetadataError(f"this metadata has no PTQD noise statistics for A{bits} "
                                "(calibrate with a recipe with noise_correction=True)")
        return nearest(self.noise[bits], int(timestep))

    # ------------------------------------------------------------------ file I/O
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically to ``path`` (conventionally ``<model>.<recipe>.qdiff``), with the
        checksums of the header and of the tensor payload (format 5)."""
        from safetensors.torch import save_file

        header: dict[str, Any] = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "qdcompile_version": _package_version(),
            "recipe": self.recipe.to_dict(), "model": self.model, "fallbacks": self.fallbacks,
            "calibration": jsonable(self.calibration), "layers": {},
            "layer_order": list(self.layers),  # JSON objects are key-sorted on write; keep model order
        }
        tensors: dict[str, torch.Tensor] = {}
        for name, rec in self.layers.items():
            entry = {"op": rec.op, "weight_bits": rec.weight_bits, "act_bits": rec.act_bits,
                     "act_scale": rec.act_scale, "act_zero_point": rec.act_zero_point,
                     "act_range": list(rec.act_range) if rec.act_range is not None else None,
                     "split": None, "weight_digest": rec.weight_digest is not None,
                     "weight_zero_point": (_zero_point_list(rec.weight_zero_point)
                                           if rec.weight_zero_point is not None and not rec.split else None)}
            tensors[f"{name}.weight_q"] = rec.weight_q.detach().cpu().contiguous()
            tensors[f"{name}.weight_scale"] = rec.weight_scale.detach().float().cpu().contiguous()
            if rec.weight_digest is not None:
                tensors[f"{name}.weight_digest"] = rec.weight_digest.detach().float().cpu().contiguous()
            if rec.split:
                entry["split"] = []
                for i, part in enumerate(rec.split):
                    entry["split"].append({"channels": part.channels, "act_bits": part.act_bits,
                                           "act_scale": part.act_scale, "act_zero_point": part.act_zero_point,
                                           "weight_zero_point": _zero_point_list(part.weight_zero_point)})
                    tensors[f"{name}.split.{i}.weight_q"] = part.weight_q.detach().cpu().contiguous()
                    tensors[f"{name}.split.{i}.weight_scale"] = part.weight_scale.detach().float().cpu().contiguous()
            header["layers"][name] = entry
        header["act_variants"] = {str(b): {n: [a.to_dict() for a in acts] for n, acts in v.items()}
                                  for b, v in self.act_variants.items()}
        header["noise"] = {str(b): [s.to_dict() for s in steps] for b, steps in self.noise.items()}
        header["noise_layer"] = self.noise_layer
        header["noise_space"] = self.noise_space
        header["corrections"] = self.corrections
        header["precision_plan"] = [list(e) for e in self.precision_plan]
        text = json.dumps(header, sort_keys=True)
        file_meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "header": text,
                     "header_sha256": _sha256(text.encode()), "payload_sha256": payload_sha256(tensors)}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=file_meta), fsync=True)

    # ------------------------------------------------------------------ checks against a model
    def check_model(self, model: torch.nn.Module) -> None:
        """Raise :class:`MetadataError` naming what does not match ``model`` (or what is malformed
        in the records themselves)."""
        for name, rec in self.layers.items():
            validate_layer(name, rec)
        ident = model_identity(model)
        stored = self.model if isinstance(self.model, dict) else {}
        if ident["class"] != stored.get("class") or ident["config"] != stored.get("config"):
            diff = _config_diff(stored.get("config") if isinstance(stored.get("config"), dict) else {}, ident["config"])
            raise MetadataError(
                f"metadata was calibrated for a {stored.get('class')} (config {stored.get('config_hash')}), "
                f"but this model is a {ident['class']} (config {ident['config_hash']})"
                + (f"; differing config keys: {diff}" if diff else ""))
        found = quantizable_layers(model)
        for name in self.layers:
            if name not in found:
                raise MetadataError(f"metadata has a record for layer {name!r}, which this model does not have "
                                    "(or which is no longer a conv2d/linear)")
        for name, (module, op) in found.items():
            rec = self.layers.get(name)
            if rec is None:
                if name in self.fallbacks:
                    continue
                raise MetadataError(f"metadata has no record for layer {name!r} ({op}) of this model: "
                                    "it was calibrated for a different model, or the file is incomplete")
            if rec.op != op:
                raise MetadataError(f"layer {name!r}: metadata says {rec.op}, the model has a {op}")
            if tuple(module.weight.shape) != rec.weight_shape:
                raise MetadataError(f"layer {name!r}: metadata weight shape {list(rec.weight_shape)}, "
                                    f"model weight shape {list(module.weight.shape)}")
            if rec.weight_digest is not None and not digests_match(rec.weight_digest, weight_digest(module.weight)):
                raise MetadataError(f"layer {name!r}: the model's weights differ from the weights this metadata "
                                    "was calibrated on (same architecture, other checkpoint?); re-run calibrate")


def _config_diff(a: dict[str, Any], b: dict[str, Any], limit: int = 6) -> str:
    keys = sorted(set(a) | set(b))
    diffs = [f"{k}: {a.get(k, '<absent>')!r} vs {b.get(k, '<absent>')!r}" for k in keys if a.get(k) != b.get(k)]
    more = f" (+{len(diffs) - limit} more)" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


def _package_version() -> str:
    try:
        from importlib.metadata import version
        return version("qdcompile")
    except Exception:  # not installed (source checkout)
        return "unknown"


def _zero_point_list(zp: torch.Tensor | None) -> list[int] | None:
    return None if zp is None else [int(v) for v in zp.reshape(-1).tolist()]


def _zero_point_from(v: Any, where: str, version: int) -> torch.Tensor | None:
    """A header's ``weight_zero_point``: null, or a list of integers (range and length are checked
    against the layer by :func:`validate_layer`)."""
    if v is None:
        return None
    if version < ZERO_POINT_VERSION:
        raise MetadataError(f"{where}: weight_zero_point needs metadata format {ZERO_POINT_VERSION}, the file says "
                            f"format {version}")
    if not isinstance(v, list) or not v or not all(_is_int(x) and -2 ** 31 <= x < 2 ** 31 for x in v):
        raise MetadataError(f"{where}: weight_zero_point must be null or a list of integers (one per output "
                            f"channel), got {v if not isinstance(v, list) else v[:8]!r}")
    return torch.tensor(v, dtype=torch.int32)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order (format 5's
    ``payload_sha256``: any flipped, lost or added byte of the tensors changes it)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def load_metadata(path: str | os.PathLike) -> QuantMetadata:
    """Read a ``.qdiff`` file written by :meth:`QuantMetadata.save`.

    Every problem is a :class:`MetadataError` naming the file, the layer or field and what was
    expected: unreadable or foreign files, other versions, checksums (format 5) that do not
    match the header or the tensors, and any field of the wrong type, shape, dtype or range.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"metadata file {str(path)!r} does not exist")
    if not path.is_file():
        raise MetadataError(f"metadata file {str(path)!r} is a folder, not a file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for garbage
        raise MetadataError(f"{str(path)!r} is not a readable qdcompile metadata file (corrupt or another format): {e}") from e
    if meta.get("format") != FORMAT_NAME:
        raise MetadataError(f"{str(path)!r} is not a qdcompile metadata file (header format {meta.get('format')!r}, "
                            f"expected {FORMAT_NAME!r})")
    raw_version = meta.get("format_version", "-1")
    version = int(raw_version) if raw_version.isdigit() and len(raw_version) < 6 else -1
    if version not in READABLE_VERSIONS:
        hint = "upgrade qdcompile" if version > FORMAT_VERSION else "re-run `qdcompile calibrate` to write a current file"
        raise MetadataError(f"{str(path)!r} has metadata format version {raw_version!r}; this qdcompile "
                            f"reads versions {', '.join(map(str, READABLE_VERSIONS))} ({hint})")
    if version >= CHECKSUM_VERSION:
        if "header_sha256" not in meta or "payload_sha256" not in meta or "header" not in meta:
            raise MetadataError(f"{str(path)!r}: format {version} file without its header or checksums "
                                "(header, header_sha256, payload_sha256): corrupt or edited")
        if _sha256(meta["header"].encode()) != meta["header_sha256"]:
            raise MetadataError(f"{str(path)!r}: the metadata header does not match its checksum: the file was "
                                "edited or is corrupt; re-run `qdcompile calibrate`")
        if payload_sha256(tensors) != meta["payload_sha256"]:
            raise MetadataError(f"{str(path)!r}: the tensor payload does not match its checksum (flipped, lost or "
                                "added bytes): the file is corrupt; re-run `qdcompile calibrate`")
    try:
        header = json.loads(meta["header"])
        return _from_header(header, tensors, version)
    except MetadataError as e:
        raise MetadataError(f"{str(path)!r}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as e:
        raise MetadataError(f"{str(path)!r}: corrupt metadata header ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------------------- typed fields
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    """A finite JSON number that reads as a float exactly (integers beyond 2^53 do not)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return abs(v) <= 2 ** 53 if isinstance(v, int) else math.isfinite(v)


def _int(v: Any, where: str, lo: int | None = None, hi: int | None = None,
         choices: tuple[int, ...] | None = None) -> int:
    if not _is_int(v):
        raise MetadataError(f"{where} must be an integer, got {v!r}")
    if choices is not None and v not in choices:
        raise MetadataError(f"{where} {v} not in {choices}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise MetadataError(f"{where} {v} outside [{lo}, {'...' if hi is None else hi}]")
    return v


def _number(v: Any, where: str, lo: float | None = None, hi: float | None = None, what: str = "") -> float:
    if not _is_number(v):
        raise MetadataError(f"{where} must be a finite number{what}, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise MetadataError(f"{where} must lie in [{lo}, {'inf' if hi is None else hi}]{what}, got {v!r}")
    return float(v)


def _dict(v: Any, where: str) -> dict:
    if not isinstance(v, dict):
        raise MetadataError(f"{where} must be an object, got {type(v).__name__}")
    return v


def _list(v: Any, where: str) -> list:
    if not isinstance(v, list):
        raise MetadataError(f"{where} must be a list, got {type(v).__name__}")
    return v


def _fields(d: Any, where: str, required: tuple[str, ...]) -> dict:
    _dict(d, where)
    missing = [k for k in required if k not in d]
    if missing:
        raise MetadataError(f"{where}: missing field(s) {missing}")
    return d


def _act_range(v: Any, where: str) -> tuple[float, float] | None:
    if v is None:
        return None
    if not isinstance(v, (list, tuple)) or len(v) != 2 or not all(_is_number(x) for x in v) or v[0] > v[1]:
        raise MetadataError(f"{where}: act_range must be null or [min, max], two finite numbers, got {v!r}")
    return float(v[0]), float(v[1])


def _act_quant(d: Any, where: str, with_range: bool = True, strict: bool = False) -> ActQuant:
    """A strictly typed activation quantizer (``act_bits``, ``act_scale``, ``act_zero_point``;
    ``strict``: also ``act_range``, which format 5 always writes)."""
    _fields(d, where, ("act_bits", "act_scale", "act_zero_point") + (("act_range",) if strict else ()))
    bits = _int(d["act_bits"], f"{where}: act_bits", choices=SUPPORTED_BITS)
    scale = _number(d["act_scale"], f"{where}: act_scale", MIN_ACT_SCALE, MAX_ACT_SCALE, " (2^-100 .. 2^100)")
    zp = _int(d["act_zero_point"], f"{where}: act_zero_point", 0, (1 << bits) - 1)
    if not with_range and d.get("act_range") is not None:
        raise MetadataError(f"{where}: act_range must be null here (split parts keep no range), got {d['act_range']!r}")
    return ActQuant(bits, scale, zp, _act_range(d.get("act_range"), where) if with_range else None)


_RECIPE_TEXT = ("name", "method", "weight_observer", "act_observer", "noise_inputs", "noise_space", "weight_grid",
                "act_lsq_schedule")
_RECIPE_LISTS = {"keep_8bit": str, "skip": str, "recon_units": str, "adaround_beta": float, "act_bits_mixed": int}


def _recipe(d: Any, strict: bool = False) -> QuantRecipe:
    """The recipe of a header, every field of its documented type (no silent conversions);
    ``strict`` (format 5, which writes them all): every field of the recipe's version present, none
    defaulted (fields added by later recipe versions, :data:`~qdcompile.recipe.RECIPE_FIELDS_ADDED`, are
    absent from older recipes and read with their backward-compatible values)."""
    version = d.get("version") if isinstance(d, dict) else None
    later = recipe_fields_added_after(version) if _is_int(version) else {}
    _fields(d, "recipe", tuple(f.name for f in dataclasses.fields(QuantRecipe) if f.name not in later)
            if strict else ())
    for key, v in d.items():
        default = {f.name: f.default for f in dataclasses.fields(QuantRecipe)}.get(key)
        where = f"recipe field {key!r}"
        if key in _RECIPE_LISTS:
            kind = _RECIPE_LISTS[key]
            ok = isinstance(v, list) and all(_is_number(x) if kind is float else _is_int(x) if kind is int
                                             else isinstance(x, str) for x in v)
            if not ok:
                raise MetadataError(f"{where} must be a list of {kind.__name__}, got {v!r}")
        elif key in _RECIPE_TEXT:
            if not isinstance(v, str):
                raise MetadataError(f"{where} must be a string, got {v!r}")
        elif isinstance(default, bool):
            if not isinstance(v, bool):
                raise MetadataError(f"{where} must be true or false, got {v!r}")
        elif key == "act_bits":
            if v is not None:
                _int(v, where)
        elif isinstance(default, int):
            _int(v, where)
        elif isinstance(default, float):
            _number(v, where)
    try:
        return QuantRecipe.from_dict(d)
    except (TypeError, ValueError) as e:
        raise MetadataError(f"recipe: {e}") from None


_LAYER_FIELDS = ("op", "weight_bits", "act_bits", "act_scale", "act_zero_point")
_LAYER_FIELDS_V5 = ("act_range", "split", "weight_digest")   # format 5 writes every field
_HEADER_FIELDS_V5 = ("fallbacks", "calibration", "layer_order", "act_variants", "noise", "noise_layer", "noise_space",
                     "corrections", "precision_plan")


def _layer_from(name: str, entry: Any, tensors: dict[str, torch.Tensor], version: int) -> LayerQuant:
    where = f"layer {name!r}"
    _fields(entry, where, _LAYER_FIELDS + (_LAYER_FIELDS_V5 if version >= CHECKSUM_VERSION else ())
            + (("weight_zero_point",) if version >= ZERO_POINT_VERSION else ()))

    def tensor(key: str) -> torch.Tensor:
        if key not in tensors:
            raise MetadataError(f"{where}: tensor {key!r} is missing from the metadata file")
        return tensors[key]

    if entry["op"] not in ("conv2d", "linear"):
        raise MetadataError(f"{where}: op must be 'conv2d' or 'linear', got {entry['op']!r}")
    weight_bits = _int(entry["weight_bits"], f"{where}: weight_bits", choices=SUPPORTED_BITS)
    act_range = _act_range(entry.get("act_range"), where)
    act_bits = act_scale = act_zp = split = None
    if entry.get("split") is not None:
        parts = _list(entry["split"], f"{where}: split")
        if len(parts) != 2:
            raise MetadataError(f"{where}: split must list 2 parts (the kernels' split form), got {len(parts)}")
        if any(entry.get(k) is not None for k in ("act_bits", "act_scale", "act_zero_point", "act_range")):
            raise MetadataError(f"{where}: a split layer keeps its activation quantizers in its parts; "
                                "act_bits/act_scale/act_zero_point/act_range must be null")
        if entry.get("weight_zero_point") is not None:
            raise MetadataError(f"{where}: a split layer keeps its weight zero points in its parts; "
                                "the top-level weight_zero_point must be null")
        split = []
        for i, p in enumerate(parts):
            pwhere = f"{where} split part {i}"
            aq = _act_quant(_fields(p, pwhere, ("channels",) + (("weight_zero_point",) if version >= ZERO_POINT_VERSION
                                                                 else ())), pwhere, with_range=False)
            split.append(SplitPart(channels=_int(p["channels"], f"{pwhere}: channels", 1),
                                   act_bits=aq.act_bits, act_scale=aq.act_scale, act_zero_point=aq.act_zero_point,
                                   weight_q=tensor(f"{name}.split.{i}.weight_q"),
                                   weight_scale=tensor(f"{name}.split.{i}.weight_scale"),
                                   weight_zero_point=_zero_point_from(p.get("weight_zero_point"), pwhere, version)))
    elif entry["act_bits"] is not None:
        aq = _act_quant(entry, where)
        act_bits, act_scale, act_zp = aq.act_bits, aq.act_scale, aq.act_zero_point
    elif entry["act_scale"] is not None or entry["act_zero_point"] is not None or act_range is not None:
        raise MetadataError(f"{where}: a weight-only layer (act_bits null) has no act_scale, act_zero_point "
                            "or act_range")
    key = f"{name}.weight_digest"
    if version >= CHECKSUM_VERSION:
        has = entry.get("weight_digest")
        if not isinstance(has, bool):
            raise MetadataError(f"{where}: weight_digest must be true or false, got {has!r}")
        if has != (key in tensors):
            raise MetadataError(f"{where}: the header {'lists' if has else 'does not list'} a weight digest, but the "
                                f"file {'lacks' if has else 'has'} tensor {key!r}")
    if split is None:
        zero_point = _zero_point_from(entry.get("weight_zero_point"), where, version)
    elif all(p.weight_zero_point is None for p in split):
        zero_point = None
    elif any(p.weight_zero_point is None for p in split):
        raise MetadataError(f"{where}: either every split part has a weight_zero_point (asymmetric grid) or none")
    elif len({p.weight_zero_point.numel() for p in split}) != 1:
        raise MetadataError(f"{where}: the split parts' weight_zero_point lists differ in length "
                            f"{[p.weight_zero_point.numel() for p in split]} (one per output channel each)")
    else:
        zero_point = torch.stack([p.weight_zero_point for p in split])
    rec = LayerQuant(op=entry["op"], weight_bits=weight_bits, act_bits=act_bits,
                     weight_q=tensor(f"{name}.weight_q"), weight_scale=tensor(f"{name}.weight_scale"),
                     act_scale=act_scale, act_zero_point=act_zp, act_range=act_range if split is None else None,
                     weight_digest=tensors.get(key), split=split, weight_zero_point=zero_point)
    validate_layer(name, rec)
    return rec


def _from_header(header: Any, tensors: dict[str, torch.Tensor], version: int) -> QuantMetadata:
    _fields(header, "metadata header", ("recipe", "model", "layers")
            + (_HEADER_FIELDS_V5 if version >= CHECKSUM_VERSION else ()))
    strict = version >= CHECKSUM_VERSION
    recipe = _recipe(header["recipe"], strict)
    model = _fields(header["model"], "model", ("class", "config", "config_hash"))
    if not isinstance(model["class"], str) or not isinstance(model["config"], dict) \
            or not isinstance(model["config_hash"], str):
        raise MetadataError("model must have a class name, a config object and a config_hash string")
    if version >= CHECKSUM_VERSION:
        ident = _identity(model["class"], model["config"])
        if ident != model["config_hash"]:
            raise MetadataError(f"model config_hash {model['config_hash']!r} does not match the stored config "
                                f"(hash {ident!r}): the model config was edited")
    layers_d = _dict(header["layers"], "layers")
    order = header.get("layer_order") or list(layers_d)
    if not isinstance(order, list) or not all(isinstance(n, str) for n in order) or len(set(order)) != len(order) \
            or set(order) != set(layers_d):
        raise MetadataError("corrupt metadata header (layer_order does not list the layers, each once)")
    layers = {name: _layer_from(name, layers_d[name], tensors, version) for name in order}
    fallbacks = _dict(header.get("fallbacks", {}), "fallbacks")
    if not all(isinstance(v, str) for v in fallbacks.values()) or set(fallbacks) & set(layers):
        raise MetadataError("fallbacks must map layers without a record to the reason (text) they stay float")
    variants: dict[int, dict[str, list[ActQuant]]] = {}
    for b, v in _dict(header.get("act_variants", {}), "act_variants").items():
        bits = _int(int(b) if b.isdigit() and len(b) < 4 else b, "act_variants key", choices=SUPPORTED_BITS)
        variants[bits] = {n: [_act_quant(a, f"activation variant A{bits} of layer {n!r}",
                                         with_range=not (n in layers and layers[n].split), strict=strict)
                              for a in _list(acts, f"activation variant A{bits} of layer {n!r}")]
                          for n, acts in _dict(v, f"act_variants[{b!r}]").items()}
    noise: dict[int, list[Any]] = {}
    for b, steps in _dict(header.get("noise", {}), "noise").items():
        bits = _int(int(b) if b.isdigit() and len(b) < 4 else b, "noise key", choices=SUPPORTED_BITS)
        noise[bits] = [StepNoise.from_dict(_step_noise(d, f"PTQD statistics A{bits} step {i}", strict))
                       for i, d in enumerate(_list(steps, f"noise[{b!r}]"))]
    plan = []
    for i, e in enumerate(_list(header.get("precision_plan", []), "precision_plan")):
        if not isinstance(e, list) or len(e) != 2:
            raise MetadataError(f"precision_plan entry {i} must be [timestep, act bits], got {e!r}")
        t, bits = _int(e[0], f"precision_plan entry {i}: timestep", 0), _int(e[1], f"precision_plan entry {i}: act bits")
        if bits not in SUPPORTED_BITS:
            raise MetadataError(f"precision plan uses A{bits} at time step {t}; supported: "
                                f"{', '.join('A%d' % b for b in SUPPORTED_BITS)}")
        plan.append((t, bits))
    space = header.get("noise_space")
    if space is None and not strict:   # before format 3 the statistics were the U-Net output's
        space = "output" if header.get("noise") else None
    if space is not None and space not in NOISE_SPACES:
        raise MetadataError(f"noise_space: PTQD statistics in space {space!r}; expected one of {NOISE_SPACES} or null")
    noise_layer = header.get("noise_layer")
    if noise_layer is not None and not isinstance(noise_layer, str):
        raise MetadataError(f"noise_layer must be a layer name or null, got {noise_layer!r}")
    result = QuantMetadata(recipe=recipe, model=model, layers=layers, fallbacks=dict(fallbacks),
                           calibration=dict(_dict(header.get("calibration", {}), "calibration")),
                           format_version=version, act_variants=variants, noise=noise, noise_layer=noise_layer,
                           noise_space=space, corrections=header.get("corrections"), precision_plan=plan)
    validate_variants(result)
    validate_recipe(result)
    return result


def _step_noise(d: Any, where: str, strict: bool = False) -> dict[str, Any]:
    """One step's PTQD statistics, typed: time step, k >= 0, mu, var >= 0, SNRs >= 0 (or "inf")."""
    _fields(d, where, ("timestep", "k", "mu", "var", "snr_q", "snr_q_corrected") + (("samples",) if strict else ()))
    _int(d["timestep"], f"{where}: timestep", 0)
    _number(d["k"], f"{where}: k", 0.0, what=" (the correlation coefficient, >= 0)")
    _number(d["var"], f"{where}: var", 0.0, what=" (a variance, >= 0)")
    mu = _list(d["mu"], f"{where}: mu")
    if not mu or not all(_is_number(v) for v in mu):
        raise MetadataError(f"{where}: mu must list one finite number per output channel, got {mu!r}")
    for key in ("snr_q", "snr_q_corrected"):
        if d[key] != "inf":
            _number(d[key], f"{where}: {key}", 0.0, what=' (or "inf")')
    if "samples" in d:
        _int(d["samples"], f"{where}: samples", 0)
    return d


def validate_variants(meta: QuantMetadata) -> None:
    """Check the activation variants, noise statistics and plan against the layers."""
    for bits, variant in meta.act_variants.items():
        if bits == meta.default_act_bits:
            raise MetadataError(f"activation variant A{bits} is the records' own precision")
        for name, acts in variant.items():
            if name not in meta.layers:
                raise MetadataError(f"activation variant A{bits} has a quantizer for layer {name!r}, which has no record")
            if any(a.act_bits != bits for a in acts):
                raise MetadataError(f"activation variant A{bits} of layer {name!r} has act_bits "
                                    f"{[a.act_bits for a in acts]}, expected {bits}")
            validate_layer(f"{name} (A{bits})", meta.layers[name].with_act(acts), weights=False)
    known = set(meta.precisions)
    times = [t for t, _ in meta.precision_plan]
    if len(set(times)) != len(times):
        raise MetadataError("precision plan lists a time step more than once")
    for t, bits in meta.precision_plan:
        if bits not in known:
            raise MetadataError(f"precision plan uses A{bits} at time step {t}; the metadata has "
                                f"{['A%d' % b for b in sorted(known)]}")
    if meta.noise:
        _validate_noise(meta)
    c = meta.corrections
    if c is not None and (not isinstance(c, dict) or sorted(c) != sorted(CORRECTION_KEYS)
                          or not all(isinstance(v, bool) for v in c.values())):
        raise MetadataError(f"the default PTQD corrections must map {list(CORRECTION_KEYS)} to true/false, got {c!r}")
    if c is not None and any(c.values()) and not meta.noise:
        raise MetadataError(f"the default PTQD corrections {c!r} need noise statistics; this metadata has none")


def _validate_noise(meta: QuantMetadata) -> None:
    """PTQD statistics: for the records' precisions, on a non-split corrected layer, mu with one value
    per predicted-noise channel, time steps distinct and inside the schedule, every planned precision."""
    rec = meta.layers.get(meta.noise_layer) if isinstance(meta.noise_layer, str) else None
    if rec is None:
        raise MetadataError(f"PTQD statistics name layer {meta.noise_layer!r} for the correction; it has no record")
    if rec.split:
        raise MetadataError(f"PTQD statistics correct layer {meta.noise_layer!r}, a split layer (no fused correction)")
    if meta.noise_space not in NOISE_SPACES:
        raise MetadataError(f"PTQD statistics are in space {meta.noise_space!r}; expected one of {NOISE_SPACES}")
    outputs = rec.weight_q.shape[0]
    channels = _eps_channels(meta.model.get("config", {}), outputs)
    steps_total = meta.calibration.get("num_train_timesteps")
    for bits, steps in meta.noise.items():
        if bits not in meta.precisions:
            raise MetadataError(f"PTQD statistics for A{bits}, a precision this metadata has no quantizers for "
                                f"({['A%d' % b for b in meta.precisions]})")
        if not steps:
            raise MetadataError(f"PTQD statistics for A{bits} list no time step")
        times = [s.timestep for s in steps]
        if len(set(times)) != len(times):
            raise MetadataError(f"PTQD statistics for A{bits} list a time step more than once")
        if _is_int(steps_total) and max(times) >= steps_total:
            raise MetadataError(f"PTQD statistics for A{bits} at time step {max(times)}, outside the schedule's "
                                f"[0, {steps_total - 1}]")
        plan_times = {t for t, _ in meta.precision_plan}
        if plan_times and not set(times) <= plan_times:
            raise MetadataError(f"PTQD statistics for A{bits} at time steps {sorted(set(times) - plan_times)}, which "
                                "the precision plan (the calibrated schedule) does not have")
        for i, s in enumerate(steps):
            _step_noise(s.to_dict(), f"PTQD statistics A{bits} step {i}")   # also in-memory statistics
            if len(s.mu) != channels:
                raise MetadataError(f"PTQD statistics A{bits} at time step {s.timestep}: mu has {len(s.mu)} values, "
                                    f"expected one per predicted-noise channel of {meta.noise_layer!r} ({channels})")
    if meta.default_act_bits not in meta.noise and not meta.precision_plan:
        raise MetadataError(f"PTQD statistics lack the records' own precision A{meta.default_act_bits}")
    missing = sorted({b for _, b in meta.precision_plan} - set(meta.noise))
    if missing:
        raise MetadataError(f"the precision plan uses {['A%d' % b for b in missing]}, which have no PTQD statistics")


def _eps_channels(config: dict[str, Any], outputs: int) -> int:
    """Channels of the predicted noise: the config's (the first half when the U-Net also predicts a
    variance, see :func:`qdcompile.noise.eps_channels`), else all outputs of the corrected layer."""
    from types import SimpleNamespace

    if not isinstance(config, dict) or not _is_int(config.get("in_channels")):
        return outputs
    out = config.get("out_channels")
    channels = eps_channels(SimpleNamespace(config=SimpleNamespace(in_channels=config["in_channels"],
                                                                   out_channels=out if _is_int(out) else None)))
    if not 0 < channels <= outputs:
        raise MetadataError(f"the model config predicts {channels} noise channels; the corrected layer has {outputs} "
                            "outputs")
    return channels


def validate_recipe(meta: QuantMetadata) -> None:
    """Each record's bit widths are what the recipe gives its layer (``keep_8bit`` layers at 8)."""
    recipe = meta.recipe
    for name, rec in meta.layers.items():
        wbits, abits = layer_bits(name, recipe)
        if rec.asymmetric != recipe.asymmetric_weights(rec.weight_bits):
            raise MetadataError(f"layer {name!r} has {'asymmetric' if rec.asymmetric else 'symmetric'} weights, but "
                                f"the recipe {recipe.name!r} (weight_grid {recipe.weight_grid!r}) gives its "
                                f"{rec.weight_bits}-bit weights the "
                                f"{'asymmetric' if recipe.asymmetric_weights(rec.weight_bits) else 'symmetric'} grid")
        acts = {a.act_bits for a in rec.act_quants()}
        if rec.weight_bits != wbits or acts != ({abits} if abits is not None else set()):
            raise MetadataError(f"layer {name!r} is {rec.bits_label()}, but the recipe {recipe.name!r} gives it "
                                f"W{wbits}A{abits if abits is not None else 'float'}")
    extra = sorted(set(meta.act_variants) - set(recipe.act_bits_mixed))
    if extra:
        raise MetadataError(f"activation variants {['A%d' % b for b in extra]} are not among the recipe's mixed "
                            f"precisions {list(recipe.act_bits_mixed)}")
    for bits, variant in meta.act_variants.items():
        pinned = sorted(n for n in variant if layer_bits(n, recipe)[1] != recipe.act_bits)
        if pinned:
            raise MetadataError(f"activation variant A{bits} has quantizers for {pinned[:3]}, which the recipe keeps "
                                "at 8 bits")


def validate_layer(name: str, rec: LayerQuant, weights: bool = True) -> None:
    """Check one record's internal consistency: types, dtypes, shapes, finiteness and ranges of every
    field, split parts against the layer's tensors and (``weights``) the codes against the digest."""
    where = f"layer {name!r}"
    _int(rec.weight_bits, f"{where}: weight_bits", choices=SUPPORTED_BITS)
    for key in ("weight_q", "weight_scale"):
        if not isinstance(getattr(rec, key), torch.Tensor):
            raise MetadataError(f"{where}: {key} must be a tensor, got {type(getattr(rec, key)).__name__}")
    q, scale = rec.weight_q, rec.weight_scale
    if q.dtype != torch.int8:
        raise MetadataError(f"{where}: weight_q must be int8 codes, got {q.dtype}")
    dims = 4 if rec.op == "conv2d" else 2
    if q.dim() != dims or 0 in q.shape:
        raise MetadataError(f"{where}: weight_q of a {rec.op} must have {dims} non-empty dimensions, got "
                            f"shape {list(q.shape)}")
    zp = rec.weight_zero_point
    n = q.shape[0]
    if zp is not None:
        if rec.weight_bits != 4:
            raise MetadataError(f"{where}: weight_zero_point on {rec.weight_bits}-bit weights; the asymmetric grid is "
                                "for 4-bit weights only (8-bit weights are symmetric)")
        want = (len(rec.split), n) if rec.split else (n,)
        if not isinstance(zp, torch.Tensor) or zp.dtype != torch.int32 or tuple(zp.shape) != want:
            raise MetadataError(f"{where}: weight_zero_point must be {want[-1]} integers (one per output channel"
                                f"{', per split part' if rec.split else ''}), got "
                                f"{getattr(zp, 'dtype', type(zp).__name__)} {list(getattr(zp, 'shape', []))}")
        if int(zp.min()) < 0 or int(zp.max()) > (1 << rec.weight_bits) - 1:
            raise MetadataError(f"{where}: weight_zero_point values must lie in the {rec.weight_bits}-bit code range "
                                f"[0, {(1 << rec.weight_bits) - 1}], got [{int(zp.min())}, {int(zp.max())}]")
    qmin, qmax = weight_qrange(rec.weight_bits, asymmetric=zp is not None)
    if weights and (int(q.min()) < qmin or int(q.max()) > qmax):
        raise MetadataError(f"{where}: weight codes outside the {rec.weight_bits}-bit "
                            f"{'asymmetric' if zp is not None else 'signed'} range [{qmin}, {qmax}]")
    if rec.split:
        if len(rec.split) != 2:
            raise MetadataError(f"{where}: split must have 2 parts, got {len(rec.split)}")
        if sum(p.channels for p in rec.split) != q.shape[1]:
            raise MetadataError(f"{where}: split part channels {[p.channels for p in rec.split]} do not add up "
                                f"to the weight's {q.shape[1]} input channels")
        if tuple(scale.shape) != (len(rec.split), n):
            raise MetadataError(f"{where}: split weight_scale shape {list(scale.shape)}, expected the "
                                f"parts' scales stacked, [{len(rec.split)}, {n}]")
        if rec.act_bits is not None or rec.act_scale is not None or rec.act_zero_point is not None:
            raise MetadataError(f"{where}: a split layer's activation quantizers are its parts' (top-level act_* null)")
        parts = [(f"split part {i}", p.act_bits, p.act_scale, p.act_zero_point) for i, p in enumerate(rec.split)]
        start = 0
        for i, p in enumerate(rec.split):
            if not isinstance(p.weight_q, torch.Tensor) or not isinstance(p.weight_scale, torch.Tensor) \
                    or p.weight_q.dtype != torch.int8 or p.weight_scale.dtype != torch.float32 \
                    or tuple(p.weight_scale.shape) != (n,) \
                    or tuple(p.weight_q.shape) != (n, p.channels, *q.shape[2:]):
                raise MetadataError(f"{where} split part {i}: weight_q must be int8 [{n}, {p.channels}, ...] and "
                                    f"weight_scale float32 [{n}]")
            if weights and (not torch.equal(p.weight_q, q[:, start:start + p.channels])
                            or not torch.equal(p.weight_scale, scale[i])):
                raise MetadataError(f"{where} split part {i}: its weight codes or scales differ from the layer's "
                                    "(weight_q / weight_scale): corrupt file")
            if (p.weight_zero_point is None) != (zp is None) or (
                    zp is not None and not torch.equal(p.weight_zero_point.to(torch.int32), zp[i])):
                raise MetadataError(f"{where} split part {i}: its weight_zero_point differs from the layer's "
                                    "(every part asymmetric with the layer's zero points, or none)")
            start += p.channels
    else:
        if tuple(scale.shape) != (n,):
            raise MetadataError(f"{where}: weight_scale shape {list(scale.shape)}, expected [{n}]")
        if rec.act_bits is None:
            if rec.act_scale is not None or rec.act_zero_point is not None:
                raise MetadataError(f"{where}: a weight-only layer (act_bits None) has no act_scale/act_zero_point")
            parts = []
        else:
            parts = [("input", rec.act_bits, rec.act_scale, rec.act_zero_point)]
    for what, bits, a_scale, zp in parts:
        _int(bits, f"{where} {what}: act_bits", choices=SUPPORTED_BITS)
        _number(a_scale, f"{where} {what}: act_scale", MIN_ACT_SCALE, MAX_ACT_SCALE, " (2^-100 .. 2^100)")
        _int(zp, f"{where} {what}: act_zero_point", 0, (1 << bits) - 1)
    if scale.dtype != torch.float32:
        raise MetadataError(f"{where}: weight_scale must be float32, got {scale.dtype}")
    if weights and not bool(torch.all((scale > 0) & (scale <= MAX_WEIGHT_SCALE))):
        raise MetadataError(f"{where}: weight scales must be finite, > 0 and <= 2^100")
    if rec.weight_digest is not None and weights:
        _check_digest(where, rec)


def dequantized_weight(rec: LayerQuant) -> torch.Tensor:
    """``s · q`` (symmetric) or ``s · (q − z)`` (asymmetric grid), per part for split layers."""
    if rec.split:
        return torch.cat([dequantize_weight(p.weight_q, p.weight_scale, p.weight_zero_point) for p in rec.split], dim=1)
    return dequantize_weight(rec.weight_q, rec.weight_scale, rec.weight_zero_point)


def _check_digest(where: str, rec: LayerQuant) -> None:
    """The digest is well formed and the codes reproduce the weights it describes (RMS within
    :data:`WEIGHT_RMS_TOLERANCE`; all-zero codes only for a zero weight)."""
    d = rec.weight_digest
    if not isinstance(d, torch.Tensor) or d.dtype != torch.float32 or tuple(d.shape) != (10,) \
            or not bool(torch.isfinite(d).all()) or float(d[0]) < 0 or float(d[1]) < 0:
        raise MetadataError(f"{where}: weight_digest must be 10 finite float32 values (mean |W|, RMS >= 0, 8 "
                            f"entries), got {getattr(d, 'dtype', type(d).__name__)} {list(getattr(d, 'shape', []))}")
    rms = float(dequantized_weight(rec).pow(2).mean().sqrt())
    ref = float(d[1])
    ok = rms == 0 if ref == 0 else 1 / WEIGHT_RMS_TOLERANCE <= rms / ref <= WEIGHT_RMS_TOLERANCE
    if not ok:
        raise MetadataError(f"{where}: the weight codes x scales (RMS {rms:.3g}) do not reproduce the weights "
                            f"the record was calibrated on (RMS {ref:.3g} per its weight_digest): corrupt codes "
                            "or scales")
