"""Which layers of a model qdcompile quantizes, and why others stay in float."""

from __future__ import annotations

import torch
from torch import nn

_OPS = ((nn.Conv2d, "conv2d"), (nn.Linear, "linear"), (nn.Conv1d, "conv1d"), (nn.Conv3d, "conv3d"),
        (nn.ConvTranspose2d, "conv_transpose2d"))


def _op_of(module: nn.Module) -> str | None:
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "conv_transpose2d" if isinstance(module, nn.ConvTranspose2d) else "conv_transpose"
    for cls, op in _OPS:
        if isinstance(module, cls):
            return op
    return None


def conv_linear_layers(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Every conv/linear module of ``model`` by qualified name, with its op name."""
    out = {}
    for name, module in model.named_modules():
        op = _op_of(module)
        if op is not None:
            out[name] = (module, op)
    return out


def unsupported_reason(module: nn.Module, op: str) -> str | None:
    """Why the integer kernels cannot run this layer (None when they can)."""
    if op not in ("conv2d", "linear"):
        return f"{op} has no integer kernel (conv2d and linear only)"
    if op == "conv2d":
        m: nn.Conv2d = module  # type: ignore[assignment]
        if m.groups != 1:
            return f"groups={m.groups} (kernel supports groups=1)"
        if tuple(m.dilation) != (1, 1):
            return f"dilation={tuple(m.dilation)} (kernel supports dilation 1)"
        if m.padding_mode != "zeros":
            return f"padding_mode={m.padding_mode!r} (kernel supports zero padding)"
        if isinstance(m.padding, str):
            return f"padding={m.padding!r} (kernel needs explicit padding)"
    if getattr(module, "weight", None) is None or not isinstance(module.weight, torch.Tensor):
        return "no weight tensor"
    return None


def quantizable_layers(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """The conv2d/linear layers the integer kernels can run."""
    return {n: (m, op) for n, (m, op) in conv_linear_layers(model).items() if unsupported_reason(m, op) is None}
