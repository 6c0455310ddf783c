"""Attach metadata to a model, and report what the compiled model runs per layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layers import conv_linear_layers, unsupported_reason
from .metadata import QuantMetadata
from .noise import eps_channels
from .passes import registry
from .sampling import unwrap


def attach(unet: torch.nn.Module, meta: QuantMetadata) -> torch.nn.Module:
    """Check ``meta`` against ``unet`` and bind it, so ``torch.compile(unet, backend="qdiff")``
    runs the quantized layers. Raises :class:`~qdcompile.MetadataError` naming any mismatch.

    Attach before compiling: an already compiled model keeps the graphs it has.
    """
    base = unwrap(unet)
    meta.check_model(base)   # validates every record first: a malformed one is a MetadataError
    detach(base)
    decisions: dict[str, registry.Decision] = {}
    modules = dict(base.named_modules())
    variants = {bits: meta.records_for(bits) for bits in meta.precisions if bits != meta.default_act_bits}
    correction = None
    if meta.noise and meta.noise_layer in meta.layers and not meta.layers[meta.noise_layer].split:
        layer = modules[meta.noise_layer]
        correction = registry.OutputCorrection(meta.layers[meta.noise_layer].weight_scale, layer.bias,
                                               eps_channels(base))
    for name, rec in meta.layers.items():
        registry.bind(modules[name].weight, registry.Binding(
            name, rec, decisions, variants={b: v[name] for b, v in variants.items()},
            correction=correction if name == meta.noise_layer else None))
    base.__dict__["_qdiff_meta"] = meta
    base.__dict__["_qdiff_correction"] = correction
    base.__dict__["_qdiff_decisions"] = decisions
    return unet


def detach(unet: torch.nn.Module) -> None:
    """Remove attached metadata (later compilations run in float)."""
    base = unwrap(unet)
    meta = base.__dict__.pop("_qdiff_meta", None)
    base.__dict__.pop("_qdiff_decisions", None)
    base.__dict__.pop("_qdiff_correction", None)
    if meta is not None:
        modules = dict(base.named_modules())
        for name in meta.layers:
            if name in modules:
                registry.unbind(modules[name].weight)


def attached_metadata(unet: torch.nn.Module) -> QuantMetadata | None:
    return unwrap(unet).__dict__.get("_qdiff_meta")


def fused_correction(unet: torch.nn.Module) -> registry.OutputCorrection | None:
    """The PTQD output correction the compiled model applies in its last conv (None: none bound)."""
    return unwrap(unet).__dict__.get("_qdiff_correction")


@dataclass
class LayerRow:
    name: str
    op: str
    bits: str
    kernel: str
    reason: str


class Report:
    """Per conv/linear layer: name, op, bits, kernel or float fallback, and why."""

    def __init__(self, rows: list[LayerRow], title: str):
        self.rows, self.title = rows, title

    @property
    def counts(self) -> dict[str, int]:
        quant = sum(r.kernel.startswith("qdiff.") for r in self.rows)
        pending = sum(r.kernel == "not compiled yet" for r in self.rows)
        failed = sum(r.kernel == "failed" for r in self.rows)   # their graph did not compile: nothing ran
        return {"layers": len(self.rows), "quantized": quant, "pending": pending, "failed": failed,
                "float": len(self.rows) - quant - pending - failed}

    def __str__(self) -> str:
        headers = ("layer", "op", "bits", "kernel", "note")
        table = [headers] + [(r.name, r.op, r.bits, r.kernel, r.reason) for r in self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(4)]
        lines = [self.title]
        for row in table:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + ("  " + row[4] if row[4] else ""))
        c = self.counts
        lines.append(f"{c['layers']} conv/linear layers: {c['quantized']} on integer kernels, "
                     f"{c['float']} float" + (f", {c['pending']} not compiled yet" if c["pending"] else "")
                     + (f", {c['failed']} failed to compile" if c["failed"] else ""))
        return "\n".join(lines)

    __repr__ = __str__


def report(model: torch.nn.Module) -> Report:
    """What ``model`` (compiled or not) runs for every conv/linear layer."""
    base = unwrap(model)
    meta = attached_metadata(base)
    decisions = base.__dict__.get("_qdiff_decisions", {})
    compiled = model is not base
    rows = []
    for name, (module, op) in conv_linear_layers(base).items():
        rec = meta.layers.get(name) if meta else None
        bits = rec.bits_label() if rec else "float"
        if meta is None:
            rows.append(LayerRow(name, op, bits, "float", "no qdcompile metadata attached"))
        elif rec is None:
            reason = meta.fallbacks.get(name) or unsupported_reason(module, op) or "not in the metadata"
            rows.append(LayerRow(name, op, bits, "float", reason))
        elif name in decisions:
            d = decisions[name]
            rows.append(LayerRow(name, op, bits, d.kernel, d.reason))
        else:
            note = "call the compiled model once" if compiled else "compile with torch.compile(model, backend='qdiff')"
            rows.append(LayerRow(name, op, bits, "not compiled yet", note))
    recipe = meta.recipe.name if meta else "none"
    title = f"qdcompile report: {type(base).__name__}, recipe {recipe}"
    if meta is not None and len(meta.precisions) > 1:
        title += (f" (activation precision per step: {'/'.join(f'A{b}' for b in sorted(meta.precisions))}; bits "
                  f"below are A{meta.default_act_bits}'s)")
    return Report(rows, title)
