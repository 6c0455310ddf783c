"""Bindings from weight tensors to their quantization records.

``qdcompile.attach`` binds each quantized layer's weight *parameter object* to its record;
the ``qdiff`` backend finds conv/linear calls in the Dynamo graph, looks their weight up
here, and records what it did per layer in the binding's ``decisions`` (read by
``qdcompile.report``). Records are duck-typed (fields of ``qdcompile.metadata.LayerQuant``):
passes know the metadata they consume, nothing of how it was calibrated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary


@dataclass
class Decision:
    """What the backend did with one layer."""

    op: str              # "conv2d" | "linear"
    kernel: str          # e.g. "qdiff.qconv2d [triton]", or "float"
    reason: str = ""     # why it fell back to float (empty when quantized)

    @property
    def quantized(self) -> bool:
        return self.kernel.startswith("qdiff.")


@dataclass
class Binding:
    name: str
    record: Any
    decisions: dict[str, Decision]
    prepared: dict[Any, Any] = field(default_factory=dict)   # (device, kind) → tensors, built once


_BINDINGS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def bind(weight: torch.Tensor, binding: Binding) -> None:
    _BINDINGS[weight] = binding


def unbind(weight: torch.Tensor) -> None:
    _BINDINGS.pop(weight, None)


def lookup(weight: torch.Tensor) -> Binding | None:
    return _BINDINGS.get(weight)
