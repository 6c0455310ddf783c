"""Bindings from weight tensors to their quantization records.

``qdcompile.attach`` binds each quantized layer's weight *parameter object* to its record;
the ``qdiff`` backend finds conv/linear calls in the Dynamo graph, looks their weight up
here, and records what it did per layer in the binding's ``decisions`` (read by
``qdcompile.report``). Records are duck-typed (fields of ``qdcompile.metadata.LayerQuant``):
passes know the metadata they consume, nothing of how it was calibrated.

Step-aware mixed precision: a binding holds one record per activation bit width (weights
shared); :func:`precision` selects which one graphs compiled from now on use, and the
backend keeps one compiled variant per precision. A binding may carry an
:class:`OutputCorrection` (PTQD): per-channel buffers that replace the layer's weight scale
and bias correction in its kernel epilogue, rewritten in place before every step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

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


class OutputCorrection:
    """``y_c = a ⊙ y + b`` on the first ``channels`` outputs of one quantized layer, fused into
    its epilogue: the kernel gets ``scale = s ⊙ a`` for the weight scale ``s`` and the bias
    correction ``(a − 1) ⊙ bias + b`` (channels beyond ``channels`` pass unchanged).

    The buffers are graph constants of the compiled model; :meth:`set` writes them in place,
    so changing the correction never recompiles.
    """

    def __init__(self, weight_scale: torch.Tensor, bias: Optional[torch.Tensor], channels: int):
        self.weight_scale = weight_scale.detach().float().cpu()
        n = self.weight_scale.numel()
        if not 0 < channels <= n:
            raise ValueError(f"output correction on {channels} channels of a layer with {n} outputs")
        self.bias = (bias.detach().float().cpu() if bias is not None else torch.zeros(n))
        self.channels = channels
        self.a = torch.ones(channels, dtype=torch.float64)
        self.b = torch.zeros(channels, dtype=torch.float64)
        self._buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _values(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.weight_scale.double().clone()
        shift = torch.zeros_like(scale)
        c = self.channels
        scale[:c] *= self.a
        shift[:c] = (self.a - 1) * self.bias[:c].double() + self.b
        return scale.float(), shift.float()

    def buffers(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift)`` on ``device`` — the tensors the compiled graph reads."""
        key = str(device)
        if key not in self._buffers:
            scale, shift = self._values()
            self._buffers[key] = (scale.to(device), shift.to(device))
        return self._buffers[key]

    def set(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Use ``y_c = a ⊙ y + b`` from the next call on (``a``, ``b``: ``[channels]``)."""
        a, b = a.detach().double().cpu().reshape(-1), b.detach().double().cpu().reshape(-1)
        if a.numel() != self.channels or b.numel() != self.channels:
            raise ValueError(f"output correction needs {self.channels} values per vector, got {a.numel()} and {b.numel()}")
        self.a, self.b = a, b
        scale, shift = self._values()
        for s_buf, b_buf in self._buffers.values():
            s_buf.copy_(scale, non_blocking=True)
            b_buf.copy_(shift, non_blocking=True)

    def reset(self) -> None:
        self.set(torch.ones(self.channels), torch.zeros(self.channels))


@dataclass
class Binding:
    name: str
    record: Any
    decisions: dict[str, Decision]
    prepared: dict[Any, Any] = field(default_factory=dict)   # (device, kind) → tensors, built once
    variants: dict[int, Any] = field(default_factory=dict)   # activation bits → record (other precisions)
    correction: Optional[OutputCorrection] = None

    def record_for(self, act_bits: Optional[int]) -> Any:
        """The record to compile at activation width ``act_bits`` (None: the default)."""
        return self.variants.get(act_bits, self.record) if act_bits is not None else self.record


_PRECISION: list[Optional[int]] = [None]


@contextlib.contextmanager
def precision(act_bits: Optional[int]) -> Iterator[None]:
    """Within the block, compiled models run (and compile) their ``act_bits`` variant."""
    saved = _PRECISION[0]
    _PRECISION[0] = act_bits
    try:
        yield
    finally:
        _PRECISION[0] = saved


def active_precision() -> Optional[int]:
    return _PRECISION[0]


_BINDINGS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_GENERATION = [0]


def bind(weight: torch.Tensor, binding: Binding) -> None:
    _BINDINGS[weight] = binding
    _GENERATION[0] += 1


def unbind(weight: torch.Tensor) -> None:
    if _BINDINGS.pop(weight, None) is not None:
        _GENERATION[0] += 1


def generation() -> int:
    """Changes whenever a binding is added or removed (compiled graphs re-check theirs then)."""
    return _GENERATION[0]


def lookup(weight: torch.Tensor) -> Binding | None:
    return _BINDINGS.get(weight)
