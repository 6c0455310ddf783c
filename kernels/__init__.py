"""qdcompile.kernels — integer GEMM / implicit-GEMM conv kernels for quantized U-Nets.

Public functional API (the ``qdiff`` backend and users call these; semantics in
``docs/METHODS.md`` §1 and in each module's pure-torch reference):

* :func:`quantize_act` — float → per-tensor asymmetric unsigned codes.
* :func:`pack_int4` / :func:`unpack_int4` — the int4 storage layout.
* :func:`prepare_weight` — reorder/pack/row-sum weight codes once per layer.
* :func:`qlinear`, :func:`qconv2d` and the split-concat forms :func:`qlinear_split`,
  :func:`qconv2d_split`.

The ops are also ``torch.ops.qdiff.*``, registered on import of :mod:`.ops` (which
:mod:`.functional` and the ``qdiff`` backend import).

Importing this package does not import Triton: the quantizers, the int4 layout and
:func:`prepare_weight` are pure torch and load eagerly; the Triton-backed names (the
functional ops, :func:`kernel_mode`) load on first use. So ``qdcompile.kernels.quantizers``
(and calibration, which uses it) works where Triton is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .int4 import pack_int4, unpack_int4
from .layout import PreparedWeight, QPart, prepare_weight
from .quantizers import act_qparams, dequantize_act, dequantize_weight, quantize_weight, weight_scales

# name -> submodule that defines it; imported (with Triton) on first access
_LAZY = {
    "quantize_act": "functional", "qlinear": "functional", "qconv2d": "functional",
    "qlinear_split": "functional", "qconv2d_split": "functional", "kernel_mode": "ops",
}

__all__ = [
    "quantize_act", "pack_int4", "unpack_int4", "prepare_weight", "PreparedWeight", "QPart",
    "qlinear", "qconv2d", "qlinear_split", "qconv2d_split", "kernel_mode",
    "act_qparams", "dequantize_act", "weight_scales", "quantize_weight", "dequantize_weight",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover
    from .functional import qconv2d, qconv2d_split, qlinear, qlinear_split, quantize_act
    from .ops import kernel_mode
