"""Activation quantization kernel: float tensor → per-tensor asymmetric unsigned codes.

Standalone form of the quantize-on-load that the GEMM/conv kernels fuse; used where a
consumer cannot quantize on load. Semantics: :func:`.quantizers.quantize_act`.
"""

from __future__ import annotations

import torch

from .quantizers import quantize_act as quantize_act_reference  # noqa: F401  (the reference)


def quantize_act_triton(x: torch.Tensor, scale: float, zero_point: int, bits: int) -> torch.Tensor:
    raise NotImplementedError("the Triton quantize_act kernel is not written yet")
