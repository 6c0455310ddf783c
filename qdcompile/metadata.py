"""The calibration metadata file: the single source of truth the compiled model executes.

A ``.qdiff`` file is a safetensors file. Its header (``__metadata__``) holds a JSON document
with the format name and version, the model it was calibrated for (class, config and a
config hash), the recipe, calibration facts and, per quantized layer, the scalar fields;
the tensors (integer weight codes, per-channel weight scales, weight digests) are stored
under ``"<layer>.<field>"`` keys. Files are written atomically (temporary file in the same
folder, then ``os.replace``): an interrupted save never leaves a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .recipe import QuantRecipe

FORMAT_NAME = "qdcompile.quant_metadata"
FORMAT_VERSION = 4
# 2 added activation variants, PTQD noise statistics and the precision plan; 3 the space of the
# noise statistics (a version-2 reader would apply sampler-space statistics to the U-Net output);
# 4 the corrections the calibration's check kept (a version-3 reader would apply dropped ones)
READABLE_VERSIONS = (1, 2, 3, 4)
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
    ``weight_q`` / ``weight_scale`` are the per-part fields concatenated along the input
    channels (codes) and stacked (scales, ``[parts, N]``).
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


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, sort_keys=True, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def model_identity(model: torch.nn.Module) -> dict[str, Any]:
    """Class name, config (private ``_`` keys dropped) and a hash of both."""
    cfg = _jsonable(_config_of(model))
    cls = type(model).__name__
    digest = hashlib.sha256(json.dumps({"class": cls, "config": cfg}, sort_keys=True).encode()).hexdigest()[:16]
    return {"class": cls, "config": cfg, "config_hash": digest}


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
    # PTQD statistics: activation bit width → per time step (see qdcompile.ptqd.StepNoise)
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
        from .ptqd import nearest

        return nearest(self.precision_plan, int(timestep), key=lambda e: e[0])[1]

    def noise_at(self, act_bits: int | None, timestep: int):
        """PTQD statistics (:class:`qdcompile.ptqd.StepNoise`) of ``act_bits`` nearest ``timestep``."""
        from .ptqd import nearest

        bits = self.default_act_bits if act_bits is None else act_bits
        if bits not in self.noise:
            raise MetadataError(f"this metadata has no PTQD noise statistics for A{bits} "
                                "(calibrate with a recipe with noise_correction=True)")
        return nearest(self.noise[bits], int(timestep))

    # ------------------------------------------------------------------ file I/O
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically to ``path`` (conventionally ``<model>.<recipe>.qdiff``)."""
        from safetensors.torch import save_file

        path = Path(path)
        header: dict[str, Any] = {
            "format": FORMAT_NAME, "format_version": self.format_version,
            "qdcompile_version": _package_version(),
            "recipe": self.recipe.to_dict(), "model": self.model, "fallbacks": self.fallbacks,
            "calibration": _jsonable(self.calibration), "layers": {},
            "layer_order": list(self.layers),  # JSON objects are key-sorted on write; keep model order
        }
        tensors: dict[str, torch.Tensor] = {}
        for name, rec in self.layers.items():
            entry = {"op": rec.op, "weight_bits": rec.weight_bits, "act_bits": rec.act_bits,
                     "act_scale": rec.act_scale, "act_zero_point": rec.act_zero_point,
                     "act_range": list(rec.act_range) if rec.act_range is not None else None,
                     "split": None}
            tensors[f"{name}.weight_q"] = rec.weight_q.detach().cpu().contiguous()
            tensors[f"{name}.weight_scale"] = rec.weight_scale.detach().float().cpu().contiguous()
            if rec.weight_digest is not None:
                tensors[f"{name}.weight_digest"] = rec.weight_digest.detach().float().cpu().contiguous()
            if rec.split:
                entry["split"] = []
                for i, part in enumerate(rec.split):
                    entry["split"].append({"channels": part.channels, "act_bits": part.act_bits,
                                           "act_scale": part.act_scale, "act_zero_point": part.act_zero_point})
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
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"format": FORMAT_NAME, "format_version": str(self.format_version),
                                              "header": json.dumps(header, sort_keys=True)})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    # ------------------------------------------------------------------ checks against a model
    def check_model(self, model: torch.nn.Module) -> None:
        """Raise :class:`MetadataError` naming what does not match ``model``."""
        from .layers import quantizable_layers

        ident = model_identity(model)
        if ident["class"] != self.model.get("class") or ident["config_hash"] != self.model.get("config_hash"):
            diff = _config_diff(self.model.get("config", {}), ident["config"])
            raise MetadataError(
                f"metadata was calibrated for a {self.model.get('class')} (config {self.model.get('config_hash')}), "
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


def load_metadata(path: str | os.PathLike) -> QuantMetadata:
    """Read a ``.qdiff`` file written by :meth:`QuantMetadata.save`, with clear errors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metadata file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for garbage
        raise MetadataError(f"{str(path)!r} is not a readable qdcompile metadata file (corrupt or another format): {e}") from e
    if meta.get("format") != FORMAT_NAME:
        raise MetadataError(f"{str(path)!r} is not a qdcompile metadata file (header format {meta.get('format')!r}, "
                            f"expected {FORMAT_NAME!r})")
    try:
        version = int(meta.get("format_version", "-1"))
    except ValueError:
        version = -1
    if version not in READABLE_VERSIONS:
        hint = "upgrade qdcompile" if version > FORMAT_VERSION else "re-run `qdcompile calibrate` to write a current file"
        raise MetadataError(f"{str(path)!r} has metadata format version {meta.get('format_version')!r}; this qdcompile "
                            f"reads versions {', '.join(map(str, READABLE_VERSIONS))} ({hint})")
    try:
        header = json.loads(meta["header"])
        recipe = QuantRecipe.from_dict(header["recipe"])
        order = header.get("layer_order") or list(header["layers"])
        if sorted(order) != sorted(header["layers"]):
            raise MetadataError(f"{str(path)!r}: corrupt metadata header (layer_order does not list the layers)")
        layers = {name: _layer_from(name, header["layers"][name], tensors) for name in order}
        from .ptqd import StepNoise

        variants = {int(b): {n: [ActQuant.from_dict(a) for a in acts] for n, acts in v.items()}
                    for b, v in header.get("act_variants", {}).items()}
        result = QuantMetadata(recipe=recipe, model=header["model"], layers=layers,
                               fallbacks=dict(header.get("fallbacks", {})),
                               calibration=dict(header.get("calibration", {})), format_version=version,
                               act_variants=variants,
                               noise={int(b): [StepNoise.from_dict(d) for d in steps]
                                      for b, steps in header.get("noise", {}).items()},
                               noise_layer=header.get("noise_layer"),
                               noise_space=header.get("noise_space") or ("output" if header.get("noise") else None),
                               corrections=header.get("corrections"),
                               precision_plan=[(int(t), int(b)) for t, b in header.get("precision_plan", [])])
        validate_variants(result)
        return result
    except MetadataError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise MetadataError(f"{str(path)!r}: corrupt metadata header ({type(e).__name__}: {e})") from e


def _layer_from(name: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LayerQuant:
    def tensor(key: str) -> torch.Tensor:
        if key not in tensors:
            raise MetadataError(f"layer {name!r}: tensor {key!r} is missing from the metadata file")
        return tensors[key]

    split = None
    if entry.get("split"):
        split = [SplitPart(channels=int(p["channels"]), act_bits=int(p["act_bits"]), act_scale=float(p["act_scale"]),
                           act_zero_point=int(p["act_zero_point"]),
                           weight_q=tensor(f"{name}.split.{i}.weight_q"),
                           weight_scale=tensor(f"{name}.split.{i}.weight_scale"))
                 for i, p in enumerate(entry["split"])]
    rec = LayerQuant(op=entry["op"], weight_bits=int(entry["weight_bits"]),
                     act_bits=None if entry["act_bits"] is None else int(entry["act_bits"]),
                     weight_q=tensor(f"{name}.weight_q"), weight_scale=tensor(f"{name}.weight_scale"),
                     act_scale=None if entry["act_scale"] is None else float(entry["act_scale"]),
                     act_zero_point=None if entry["act_zero_point"] is None else int(entry["act_zero_point"]),
                     act_range=tuple(entry["act_range"]) if entry.get("act_range") else None,
                     weight_digest=tensors.get(f"{name}.weight_digest"), split=split)
    validate_layer(name, rec)
    return rec


def validate_variants(meta: QuantMetadata) -> None:
    """Check the activation variants, noise statistics and plan against the layers."""
    for bits, variant in meta.act_variants.items():
        for name, acts in variant.items():
            if name not in meta.layers:
                raise MetadataError(f"activation variant A{bits} has a quantizer for layer {name!r}, which has no record")
            validate_layer(f"{name} (A{bits})", meta.layers[name].with_act(acts))
    known = set(meta.precisions)
    for t, bits in meta.precision_plan:
        if bits not in known:
            raise MetadataError(f"precision plan uses A{bits} at time step {t}; the metadata has "
                                f"{['A%d' % b for b in sorted(known)]}")
    if meta.noise and meta.noise_layer not in meta.layers:
        raise MetadataError(f"PTQD statistics name layer {meta.noise_layer!r} for the correction; it has no record")
    if meta.noise and meta.noise_space not in NOISE_SPACES:
        raise MetadataError(f"PTQD statistics are in space {meta.noise_space!r}; expected one of {NOISE_SPACES}")
    c = meta.corrections
    if c is not None and (not isinstance(c, dict) or sorted(c) != sorted(CORRECTION_KEYS)
                          or not all(isinstance(v, bool) for v in c.values())):
        raise MetadataError(f"the default PTQD corrections must map {list(CORRECTION_KEYS)} to true/false, got {c!r}")
    if c is not None and any(c.values()) and not meta.noise:
        raise MetadataError(f"the default PTQD corrections {c!r} need noise statistics; this metadata has none")


def validate_layer(name: str, rec: LayerQuant) -> None:
    """Check one record's internal consistency (dtypes, shapes, code ranges)."""
    from .kernels.quantizers import MAX_ACT_SCALE, MIN_ACT_SCALE, SUPPORTED_BITS, weight_qrange

    if rec.weight_bits not in SUPPORTED_BITS:
        raise MetadataError(f"layer {name!r}: weight_bits {rec.weight_bits} not in {SUPPORTED_BITS}")
    if rec.weight_q.dtype != torch.int8:
        raise MetadataError(f"layer {name!r}: weight_q must be int8 codes, got {rec.weight_q.dtype}")
    qmin, qmax = weight_qrange(rec.weight_bits)
    if rec.weight_q.numel() and (int(rec.weight_q.min()) < qmin or int(rec.weight_q.max()) > qmax):
        raise MetadataError(f"layer {name!r}: weight codes outside the {rec.weight_bits}-bit range [{qmin}, {qmax}]")
    n = rec.weight_q.shape[0]
    if rec.split:
        if sum(p.channels for p in rec.split) != rec.weight_q.shape[1]:
            raise MetadataError(f"layer {name!r}: split part channels {[p.channels for p in rec.split]} do not add up "
                                f"to the weight's {rec.weight_q.shape[1]} input channels")
        parts = [(f"split part {i}", p.act_bits, p.act_scale, p.act_zero_point, p.weight_scale) for i, p in enumerate(rec.split)]
        if tuple(rec.weight_scale.shape) != (len(rec.split), n):
            raise MetadataError(f"layer {name!r}: split weight_scale shape {list(rec.weight_scale.shape)}, expected the "
                                f"parts' scales stacked, [{len(rec.split)}, {n}]")
    else:
        if tuple(rec.weight_scale.shape) != (n,):
            raise MetadataError(f"layer {name!r}: weight_scale shape {list(rec.weight_scale.shape)}, expected [{n}]")
        parts = [] if rec.act_bits is None else [("input", rec.act_bits, rec.act_scale, rec.act_zero_point, rec.weight_scale)]
    for what, bits, scale, zp, wscale in parts:
        if bits not in SUPPORTED_BITS:
            raise MetadataError(f"layer {name!r} {what}: act_bits {bits} not in {SUPPORTED_BITS}")
        if scale is None or not MIN_ACT_SCALE <= scale <= MAX_ACT_SCALE:
            raise MetadataError(f"layer {name!r} {what}: act_scale must lie in [2^-100, 2^100], got {scale}")
        if zp is None or not 0 <= zp <= (1 << bits) - 1:
            raise MetadataError(f"layer {name!r} {what}: act_zero_point {zp} outside [0, {(1 << bits) - 1}]")
        if tuple(wscale.shape) != (n,):
            raise MetadataError(f"layer {name!r} {what}: weight_scale shape {list(wscale.shape)}, expected [{n}]")
    if not bool(torch.all(rec.weight_scale > 0)):
        raise MetadataError(f"layer {name!r}: weight scales must be positive")
