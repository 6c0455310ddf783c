"""Quantized GEMM (linear layers): ``y = dequant(q(x) · W_qᵀ) + bias [+ bias_correction]``.

One op family: W8A8, W4A8, W4A4 and the two-part split-concat input are variants of one
kernel. The activation is quantized on load (float in, codes never written to memory),
int32 accumulation, fp32 epilogue with zero-point folding (see :mod:`.layout`).

Epilogue order (the reference below defines it; kernels follow it):
``c_p = float32(acc_p − Z_p·rowsum_p) · float32(Δ_p · s_p[n])``, ``y = c_1 [+ c_2] + bias + bias_correction``
in fp32, then cast to the activation dtype.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .layout import QPart, unpack_weight
from .quantizers import quantize_act


def qgemm_triton(parts: Sequence[QPart], weight_bits: int, bias: torch.Tensor | None,
                 bias_correction: torch.Tensor | None) -> torch.Tensor:
    raise NotImplementedError("the Triton qgemm kernel is not written yet")


def _epilogue(out: torch.Tensor | None, centered: torch.Tensor, p: QPart, view: tuple[int, ...]) -> torch.Tensor:
    scale = torch.tensor(p.act_scale, dtype=torch.float32, device=p.w_scale.device) * p.w_scale
    contrib = centered.to(torch.float32) * scale.view(view)
    return contrib if out is None else out + contrib


def add_bias(out: torch.Tensor, bias: torch.Tensor | None, bias_correction: torch.Tensor | None,
             view: tuple[int, ...]) -> torch.Tensor:
    if bias is not None:
        out = out + bias.to(torch.float32).view(view)
    if bias_correction is not None:
        out = out + bias_correction.to(torch.float32).view(view)
    return out


def qgemm_reference(parts: Sequence[QPart], weight_bits: int, bias: torch.Tensor | None = None,
                    bias_correction: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch definition of the quantized GEMM. ``x_p``: ``[..., K_p]`` → ``[..., N]``.

    Integer products are exact (float64 holds every int32 accumulator exactly).
    """
    lead = parts[0].x.shape[:-1]
    out = None
    for p in parts:
        k = p.x.shape[-1]
        q = quantize_act(p.x, p.act_scale, p.act_zero_point, p.act_bits).reshape(-1, k).to(torch.float64)
        wq = unpack_weight(p.w, k, weight_bits).to(torch.float64)
        acc = q @ wq.T
        centered = acc - p.act_zero_point * p.w_rowsum.to(torch.float64)
        out = _epilogue(out, centered, p, (1, -1))
    out = add_bias(out, bias, bias_correction, (1, -1))
    return out.to(parts[0].x.dtype).reshape(*lead, out.shape[-1])
