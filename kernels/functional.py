"""The functional API over ``torch.ops.qdiff.*`` (importing this module registers the ops).

Reached as ``qdcompile.kernels.<name>``; semantics in ``docs/METHODS.md`` §1.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import ops  # noqa: F401  (registers torch.ops.qdiff.*)
from .layout import PreparedWeight


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def quantize_act(x: torch.Tensor, scale: float, zero_point: int, bits: int) -> torch.Tensor:
    """Per-tensor asymmetric quantization: ``clamp(round(x/Δ) + Z, 0, 2^b − 1)`` as uint8."""
    return torch.ops.qdiff.quantize_act(x, float(scale), int(zero_point), int(bits))


def qlinear(x: torch.Tensor, weight: PreparedWeight, weight_scale: torch.Tensor, act_scale: float,
            act_zero_point: int, act_bits: int, bias: Optional[torch.Tensor] = None,
            bias_correction: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y = Δ·s·(q(x)·W_qᵀ − Z·rowsum) + bias [+ bias_correction]``; ``x``: ``[..., K]`` float."""
    return torch.ops.qdiff.qlinear(x, weight.w, weight.rowsum, weight_scale, float(act_scale), int(act_zero_point),
                                   int(act_bits), weight.bits, bias=bias, bias_correction=bias_correction)


def qconv2d(x: torch.Tensor, weight: PreparedWeight, weight_scale: torch.Tensor, act_scale: float,
            act_zero_point: int, act_bits: int, kernel_size, stride=1, padding=0,
            bias: Optional[torch.Tensor] = None, bias_correction: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Quantized conv2d (groups=1, dilation=1, zero padding with the code of 0).

    The output layout follows the input like ``torch.conv2d`` (channels-last in, channels-last out)."""
    return torch.ops.qdiff.qconv2d(x, weight.w, weight.rowsum, weight_scale, float(act_scale), int(act_zero_point),
                                   int(act_bits), weight.bits, _pair(kernel_size), _pair(stride), _pair(padding),
                                   bias=bias, bias_correction=bias_correction)


def _split_args(xs, weights, weight_scales, act_scales, act_zero_points, act_bits):
    if not (len(xs) == len(weights) == len(weight_scales) == len(act_scales) == len(act_zero_points) == len(act_bits) == 2):
        raise ValueError("split ops take exactly two parts (one entry per part in every argument)")
    if weights[0].bits != weights[1].bits:
        raise ValueError(f"split parts must share the weight bit width, got {weights[0].bits} and {weights[1].bits}")
    return (xs[0], xs[1], weights[0].w, weights[1].w, weights[0].rowsum, weights[1].rowsum,
            weight_scales[0], weight_scales[1], float(act_scales[0]), float(act_scales[1]),
            int(act_zero_points[0]), int(act_zero_points[1]), int(act_bits[0]), int(act_bits[1]), weights[0].bits)


def qlinear_split(xs: Sequence[torch.Tensor], weights: Sequence[PreparedWeight], weight_scales: Sequence[torch.Tensor],
                  act_scales: Sequence[float], act_zero_points: Sequence[int], act_bits: Sequence[int],
                  bias: Optional[torch.Tensor] = None, bias_correction: Optional[torch.Tensor] = None) -> torch.Tensor:
    """qlinear of ``cat(xs, -1)`` with one quantizer per part; the concatenation is never built."""
    return torch.ops.qdiff.qlinear_split(*_split_args(xs, weights, weight_scales, act_scales, act_zero_points, act_bits),
                                         bias=bias, bias_correction=bias_correction)


def qconv2d_split(xs: Sequence[torch.Tensor], weights: Sequence[PreparedWeight], weight_scales: Sequence[torch.Tensor],
                  act_scales: Sequence[float], act_zero_points: Sequence[int], act_bits: Sequence[int],
                  kernel_size, stride=1, padding=0, bias: Optional[torch.Tensor] = None,
                  bias_correction: Optional[torch.Tensor] = None) -> torch.Tensor:
    """qconv2d of ``cat(xs, dim=1)`` with one quantizer per part; the concatenation is never built."""
    return torch.ops.qdiff.qconv2d_split(*_split_args(xs, weights, weight_scales, act_scales, act_zero_points, act_bits),
                                         _pair(kernel_size), _pair(stride), _pair(padding), bias=bias,
                                         bias_correction=bias_correction)
