"""``torch.library`` ops of the ``qdiff`` namespace and their dispatch.

``torch.ops.qdiff.{quantize_act, qlinear, qlinear_split, qconv2d, qconv2d_split}`` trace
under ``torch.compile`` (each has a fake/Meta implementation) and run:

* the Triton kernels on CUDA;
* the pure-torch reference integer path on CPU;
* the Triton kernels on CPU under the interpreter when ``QDCOMPILE_KERNELS=triton`` and
  ``TRITON_INTERPRET=1`` are set.

``QDCOMPILE_KERNELS`` = ``auto`` (default) | ``triton`` | ``reference`` chooses.

Activations come in as float (quantize-on-load inside the kernel) or, on the compiled path,
as int8 *signed codes* ``q − 2^(b−1)`` that the producing kernel wrote (the ``qdiff``
backend puts the quantizer into the graph, Inductor fuses it into the producer); the ops
then take ``out_dtype``, the dtype the float activation had.

No Python between kernels on CUDA: under ``torch.compile`` the GEMM/conv ops decompose (in
AOTAutograd's functional tracing, as ``torch.library.triton_op`` does) into their launcher
with ``torch.library.wrap_triton``, so Inductor's generated wrapper launches the Triton
kernel itself and the validation and constant set-up run once, at compile time. On CPU
(reference or interpreter) they stay opaque custom ops.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from . import qconv, qgemm, quantize
from .autotune import interpreting
from .layout import QPart, check_parts
from .qconv import conv_out_size

_MODES = ("auto", "triton", "reference")


def kernel_mode(device: torch.device) -> str:
    """Which implementation runs on ``device``: ``"triton"`` or ``"reference"``."""
    mode = os.environ.get("QDCOMPILE_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"QDCOMPILE_KERNELS={mode!r} is not one of {_MODES}")
    if mode == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if mode == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"QDCOMPILE_KERNELS=triton on a {device.type} tensor needs the Triton interpreter: "
            "set TRITON_INTERPRET=1 before starting Python")
    return mode


def _linear_k(p: QPart) -> int:
    return p.x.shape[-1]


def _conv_k(kernel_size: Sequence[int]):
    return lambda p: kernel_size[0] * kernel_size[1] * p.x.shape[1]


def _check_conv_geometry(op: str, parts: Sequence[QPart], kernel_size, stride, padding) -> None:
    for name, v in (("kernel_size", kernel_size), ("stride", stride), ("padding", padding)):
        if len(v) != 2:
            raise ValueError(f"{op}: {name} must have 2 entries, got {list(v)}")
    if min(kernel_size) < 1 or min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"{op}: invalid geometry kernel_size={list(kernel_size)} stride={list(stride)} padding={list(padding)}")
    x0 = parts[0].x
    for i, p in enumerate(parts):
        if p.x.dim() != 4:
            raise ValueError(f"{op}: part {i} activation must be 4-D [B, C, H, W], got {list(p.x.shape)}")
        if p.x.shape[0] != x0.shape[0] or p.x.shape[2:] != x0.shape[2:]:
            raise ValueError(f"{op}: split parts must share batch and spatial size, got {list(x0.shape)} and {list(p.x.shape)}")
    for d in (0, 1):
        if conv_out_size(x0.shape[2 + d], kernel_size[d], stride[d], padding[d]) < 1:
            raise ValueError(f"{op}: input {list(x0.shape)} too small for kernel {list(kernel_size)} with padding {list(padding)}")


def _check_linear_geometry(op: str, parts: Sequence[QPart]) -> None:
    x0 = parts[0].x
    for i, p in enumerate(parts):
        if p.x.dim() < 1 or p.x.shape[:-1] != x0.shape[:-1]:
            raise ValueError(f"{op}: split parts must share leading dims, got {list(x0.shape)} and {list(p.x.shape)}")


def run_qgemm(parts: Sequence[QPart], weight_bits: int, bias, bias_correction, out_dtype=None,
              kernel_wrapper=None) -> torch.Tensor:
    """Validate then run the linear family on the selected implementation (``kernel_wrapper``:
    see :func:`.qgemm.launch_qgemm`; forces the Triton kernels)."""
    op = "qlinear_split" if len(parts) == 2 else "qlinear"
    _check_linear_geometry(op, parts)
    check_parts(op, parts, weight_bits, _linear_k, bias, bias_correction)
    qgemm.codes_in(op, parts, out_dtype)
    if kernel_wrapper is None and kernel_mode(parts[0].x.device) == "reference":
        return qgemm.qgemm_reference(parts, weight_bits, bias, bias_correction, out_dtype=out_dtype)
    return qgemm.launch_qgemm(parts, weight_bits, bias, bias_correction, out_dtype=out_dtype,
                              kernel_wrapper=kernel_wrapper)


def _check_tapsum(op: str, parts: Sequence[QPart], kernel_size) -> None:
    for i, p in enumerate(parts):
        t = p.w_tapsum
        want = [kernel_size[0] * kernel_size[1], p.w.shape[0]]
        if t is not None and (t.dtype != torch.int32 or list(t.shape) != want or t.device != p.w.device):
            raise ValueError(f"{op}: part {i} w_tapsum must be int32 {want} on {p.w.device} (per-tap weight sums, "
                             f"PreparedWeight.tapsum), got {t.dtype} {list(t.shape)} on {t.device}")


def run_qconv2d(parts: Sequence[QPart], weight_bits: int, kernel_size, stride, padding,
                bias, bias_correction, out_dtype=None, kernel_wrapper=None) -> torch.Tensor:
    """Validate then run the conv family on the selected implementation."""
    op = "qconv2d_split" if len(parts) == 2 else "qconv2d"
    _check_conv_geometry(op, parts, kernel_size, stride, padding)
    check_parts(op, parts, weight_bits, _conv_k(kernel_size), bias, bias_correction)
    _check_tapsum(op, parts, kernel_size)
    qgemm.codes_in(op, parts, out_dtype)
    fmt = conv_memory_format(parts[0].x)
    if kernel_wrapper is None and kernel_mode(parts[0].x.device) == "reference":
        return qconv.qconv2d_reference(parts, weight_bits, list(kernel_size), list(stride), list(padding), bias,
                                       bias_correction, memory_format=fmt, out_dtype=out_dtype)
    return qconv.launch_qconv2d(parts, weight_bits, list(kernel_size), list(stride), list(padding), bias,
                                bias_correction, out_dtype=out_dtype, memory_format=fmt,
                                kernel_wrapper=kernel_wrapper)


def conv_memory_format(x: torch.Tensor) -> torch.memory_format:
    """Output layout of the conv ops: like ``torch.conv2d``, channels-last when the input is
    channels-last (and not also plain contiguous), else contiguous NCHW."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


# ---------------------------------------------------------------- torch.library registration

@torch.library.custom_op("qdiff::quantize_act", mutates_args=())
def quantize_act_op(x: torch.Tensor, scale: float, zero_point: int, bits: int) -> torch.Tensor:
    if kernel_mode(x.device) == "triton":
        return quantize.quantize_act_triton(x, scale, zero_point, bits)
    return quantize.quantize_act_reference(x, scale, zero_point, bits)


@quantize_act_op.register_fake
def _(x, scale, zero_point, bits):
    return torch.empty_like(x, dtype=torch.uint8)


# ---- GEMM/conv ops. Optional arguments are keyword-only: the same call reaches the eager kernel,
# the fake kernel and the CUDA decomposition unchanged.

@torch.library.custom_op("qdiff::qlinear", mutates_args=())
def qlinear_op(x: torch.Tensor, w: torch.Tensor, w_rowsum: torch.Tensor, w_scale: torch.Tensor,
               act_scale: float, act_zero_point: int, act_bits: int, weight_bits: int,
               bias: Optional[torch.Tensor] = None, bias_correction: Optional[torch.Tensor] = None, *,
               out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    return _qlinear(x, w, w_rowsum, w_scale, act_scale, act_zero_point, act_bits, weight_bits, bias=bias,
                    bias_correction=bias_correction, out_dtype=out_dtype)


def _qlinear(x, w, w_rowsum, w_scale, act_scale, act_zero_point, act_bits, weight_bits, bias=None,
             bias_correction=None, *, out_dtype=None, kernel_wrapper=None):
    parts = [QPart(x, w, w_rowsum, w_scale, act_scale, act_zero_point, act_bits)]
    return run_qgemm(parts, weight_bits, bias, bias_correction, out_dtype, kernel_wrapper)


@qlinear_op.register_fake
def _(x, w, *args, out_dtype=None, **kwargs):
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=out_dtype or x.dtype)


@torch.library.custom_op("qdiff::qlinear_split", mutates_args=())
def qlinear_split_op(x1: torch.Tensor, x2: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                     w_rowsum1: torch.Tensor, w_rowsum2: torch.Tensor, w_scale1: torch.Tensor, w_scale2: torch.Tensor,
                     act_scale1: float, act_scale2: float, act_zero_point1: int, act_zero_point2: int,
                     act_bits1: int, act_bits2: int, weight_bits: int,
                     bias: Optional[torch.Tensor] = None, bias_correction: Optional[torch.Tensor] = None, *,
                     out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    return _qlinear_split(x1, x2, w1, w2, w_rowsum1, w_rowsum2, w_scale1, w_scale2, act_scale1, act_scale2,
                          act_zero_point1, act_zero_point2, act_bits1, act_bits2, weight_bits, bias=bias,
                          bias_correction=bias_correction, out_dtype=out_dtype)


def _qlinear_split(x1, x2, w1, w2, w_rowsum1, w_rowsum2, w_scale1, w_scale2, act_scale1, act_scale2,
                   act_zero_point1, act_zero_point2, act_bits1, act_bits2, weight_bits, bias=None,
                   bias_correction=None, *, out_dtype=None, kernel_wrapper=None):
    parts = _split_parts(x1, x2, w1, w2, w_rowsum1, w_rowsum2, w_scale1, w_scale2, act_scale1, act_scale2,
                         act_zero_point1, act_zero_point2, act_bits1, act_bits2)
    return run_qgemm(parts, weight_bits, bias, bias_correction, out_dtype, kernel_wrapper)


@qlinear_split_op.register_fake
def _(x1, x2, w1, *args, out_dtype=None, **kwargs):
    return x1.new_empty((*x1.shape[:-1], w1.shape[0]), dtype=out_dtype or x1.dtype)


def _conv_fake(x: torch.Tensor, n: int, kernel_size, stride, padding, out_dtype) -> torch.Tensor:
    oh = conv_out_size(x.shape[2], kernel_size[0], stride[0], padding[0])
    ow = conv_out_size(x.shape[3], kernel_size[1], stride[1], padding[1])
    return x.new_empty((x.shape[0], n, oh, ow), dtype=out_dtype or x.dtype).contiguous(
        memory_format=conv_memory_format(x))


@torch.library.custom_op("qdiff::qconv2d", mutates_args=())
def qconv2d_op(x: torch.Tensor, w: torch.Tensor, w_rowsum: torch.Tensor, w_scale: torch.Tensor,
               act_scale: float, act_zero_point: int, act_bits: int, weight_bits: int,
               kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
               bias: Optional[torch.Tensor] = None, bias_correction: Optional[torch.Tensor] = None,
               w_tapsum: Optional[torch.Tensor] = None, *, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    return _qconv2d(x, w, w_rowsum, w_scale, act_scale, act_zero_point, act_bits, weight_bits, kernel_size, stride,
                    padding, bias, bias_correction, w_tapsum, out_dtype=out_dtype)


def _qconv2d(x, w, w_rowsum, w_scale, act_scale, act_zero_point, act_bits, weight_bits, kernel_size, stride, padding,
             bias=None, bias_correction=None, w_tapsum=None, *, out_dtype=None, kernel_wrapper=None):
    parts = [QPart(x, w, w_rowsum, w_scale, act_scale, act_zero_point, act_bits, w_tapsum)]
    return run_qconv2d(parts, weight_bits, kernel_size, stride, padding, bias, bias_correction, out_dtype,
                       kernel_wrapper)


@qconv2d_op.register_fake
def _(x, w, w_rowsum, w_scale, act_scale, act_zero_point, act_bits, weight_bits, kernel_size, stride, padding,
      bias=None, bias_correction=None, w_tapsum=None, *, out_dtype=None):
    return _conv_fake(x, w.shape[0], kernel_size, stride, padding, out_dtype)


@torch.library.custom_op("qdiff::qconv2d_split", mutates_args=())
def qconv2d_split_op(x1: torch.Tensor, x2: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                     w_rowsum1: torch.Tensor, w_rowsum2: torch.Tensor, w_scale1: torch.Tensor, w_scale2: torch.Tensor,
                     act_scale1: float, act_scale2: float, act_zero_point1: int, act_zero_point2: int,
                     act_bits1: int, act_bits2: int, weight_bits: int,
                     kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                     bias: Optional[torch.Tensor] = None, bias_correction: Optional[torch.Tensor] = None,
                     w_tapsum1: Optional[torch.Tensor] = None, w_tapsum2: Optional[torch.Tensor] = None, *,
                     out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    return _qconv2d_split(x1, x2, w1, w2, w_rowsum1, w_rowsum2, w_scale1, w_scale2, act_scale1, act_scale2,
                          act_zero_point1, act_zero_point2, act_bits1, act_bits2, weight_bits, kernel_size, stride,
                          padding, bias, bias_correction, w_tapsum1, w_tapsum2, out_dtype=out_dtype)


def _qconv2d_split(x1, x2, w1, w2, w_rowsum1, w_rowsum2, w_scale1, w_scale2, act_scale1, act_scale2,
                   act_zero_point1, act_zero_point2, act_bits1, act_bits2, weight_bits, kernel_size, stride, padding,
                   bias=None, bias_correction=None, w_tapsum1=None, w_tapsum2=None, *, out_dtype=None,
                   kernel_wrapper=None):
    parts = _split_parts(x1, x2, w1, w2, w_rowsum1, w_rowsum2, w_scale1, w_scale2, act_scale1, act_scale2,
                         act_zero_point1, act_zero_point2, act_bits1, act_bits2)
    parts = [parts[0]._replace(w_tapsum=w_tapsum1), parts[1]._replace(w_tapsum=w_tapsum2)]
    return run_qconv2d(parts, weight_bits, kernel_size, stride, padding, bias, bias_correction, out_dtype,
                       kernel_wrapper)


@qconv2d_split_op.register_fake
def _(x1, x2, w1, w2, w_rowsum1, w_rowsum2, w_scale1, w_scale2, act_scale1, act_scale2, act_zero_point1,
      act_zero_point2, act_bits1, act_bits2, weight_bits, kernel_size, stride, padding, bias=None, bias_correction=None,
      w_tapsum1=None, w_tapsum2=None, *, out_dtype=None):
    return _conv_fake(x1, w1.shape[0], kernel_size, stride, padding, out_dtype)


def _split_parts(x1, x2, w1, w2, w_rowsum1, w_rowsum2, w_scale1, w_scale2, act_scale1, act_scale2,
                 act_zero_point1, act_zero_point2, act_bits1, act_bits2):
    return [QPart(x1, w1, w_rowsum1, w_scale1, act_scale1, act_zero_point1, act_bits1),
            QPart(x2, w2, w_rowsum2, w_scale2, act_scale2, act_zero_point2, act_bits2)]


def _compiled_triton(tensors) -> bool:
    """True when a traced call should become Inductor-launched Triton kernels: CUDA tensors
    with the Triton implementation selected (not the interpreter, which Inductor cannot launch)."""
    x = tensors[0]
    return x.device.type == "cuda" and not interpreting() and kernel_mode(x.device) == "triton"


def _decompose_on_cuda(op_def, body) -> None:
    """Like ``torch.library.triton_op``, but for CUDA only: in AOTAutograd's functional tracing
    the op is replaced by ``body(..., kernel_wrapper=wrap_triton)`` — its launcher with the kernel
    wrapped — so Inductor sees the kernel and its generated wrapper launches it: no custom-op
    dispatch, validation or constant set-up per call. On other devices the op stays opaque (the
    reference or the interpreter runs in its eager kernel)."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    def decompose(mode, op, types, args, kwargs):
        if not _compiled_triton(args):
            return mode.__torch_dispatch__(op, types, args, kwargs)
        with mode:
            return body(*args, **kwargs, kernel_wrapper=torch.library.wrap_triton)

    op_def.register_torch_dispatch(FunctionalTensorMode, decompose)


for _op, _body in ((qlinear_op, _qlinear), (qlinear_split_op, _qlinear_split), (qconv2d_op, _qconv2d),
                   (qconv2d_split_op, _qconv2d_split)):
    _decompose_on_cuda(_op, _body)
