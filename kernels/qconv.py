"""Quantized 2-D convolution as implicit GEMM over NHWC activations.

``y = dequant(conv(q(x), W_q)) + bias [+ bias_correction]`` with the contraction over
``k = (kh, kw, c)``; zero padding pads with the code of real zero ``Z`` (METHODS §1).
Variants (int8/int4 weights, A8/A4, the two-part split-concat input) are switches of one
kernel. The input may have any strides (channels-last is the fast layout); the output is
``[B, N, OH, OW]`` in channels-last memory format, in the activation dtype. Epilogue as in
:mod:`.qgemm`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .layout import QPart, unpack_weight
from .qgemm import _epilogue, add_bias
from .quantizers import quantize_act


def conv_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def qconv2d_triton(parts: Sequence[QPart], weight_bits: int, kernel_size: Sequence[int], stride: Sequence[int],
                   padding: Sequence[int], bias: torch.Tensor | None,
                   bias_correction: torch.Tensor | None) -> torch.Tensor:
    raise NotImplementedError("the Triton qconv2d kernel is not written yet")


def qconv2d_reference(parts: Sequence[QPart], weight_bits: int, kernel_size: Sequence[int], stride: Sequence[int],
                      padding: Sequence[int], bias: torch.Tensor | None = None,
                      bias_correction: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch definition of the quantized conv (exact integer contraction in float64)."""
    kh, kw = kernel_size
    ph, pw = padding
    out = None
    for p in parts:
        c = p.x.shape[1]
        n = p.w.shape[0]
        q = quantize_act(p.x, p.act_scale, p.act_zero_point, p.act_bits).to(torch.float64)
        q = F.pad(q, (pw, pw, ph, ph), value=float(p.act_zero_point))
        wq = unpack_weight(p.w, kh * kw * c, weight_bits).reshape(n, kh, kw, c).permute(0, 3, 1, 2)
        acc = F.conv2d(q, wq.to(torch.float64), stride=tuple(stride))
        centered = acc - p.act_zero_point * p.w_rowsum.to(torch.float64).view(1, -1, 1, 1)
        out = _epilogue(out, centered, p, (1, -1, 1, 1))
    out = add_bias(out, bias, bias_correction, (1, -1, 1, 1))
    return out.to(parts[0].x.dtype).contiguous(memory_format=torch.channels_last)
