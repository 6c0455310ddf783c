"""Simulated (fake-quant) evaluation built from ``meta.layers`` alone.

The float model with every recorded layer's weight replaced by ``s · q`` (``s · (q − z)`` on the
asymmetric grid) and its input by
``Δ · (q(x) − Z)`` (per part for split layers). This is what the integer kernels must
compute, up to float rounding; calibration (AdaRound/LSQ, PTQD statistics) also runs on it.

"Up to float rounding" includes the codes: where a layer input lies within float rounding of a
code boundary (``x/Δ + Z ≈ k + ½``), evaluations in different precisions or op orders may take
either adjacent code, and the network spreads that one-code difference (one such tie in ~10^5
codes takes a tiny W4A8 U-Net's output from 146 dB to ~30 dB of a float64 evaluation; it happens
on some inputs for any recipe or reconstruction length). Both are evaluations of the metadata;
``tests/equivalence.py`` (``fake_quant64``) checks the compiled model against the float64 one,
letting it choose only at such ties.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .kernels.quantizers import fake_quantize_act
from .metadata import LayerQuant, QuantMetadata, dequantized_weight  # noqa: F401  (re-exported)
from .sampling import unwrap


def fake_quant_input(rec: LayerQuant, x: torch.Tensor) -> torch.Tensor:
    if rec.split:
        dim = 1 if rec.op == "conv2d" else -1
        chunks = torch.split(x, [p.channels for p in rec.split], dim=dim)
        return torch.cat([fake_quantize_act(c, p.act_scale, p.act_zero_point, p.act_bits)
                          for c, p in zip(chunks, rec.split)], dim=dim).to(x.dtype)
    if rec.act_bits is None:
        return x
    return fake_quantize_act(x, rec.act_scale, rec.act_zero_point, rec.act_bits).to(x.dtype)


@contextlib.contextmanager
def simulate(unet: torch.nn.Module, meta: QuantMetadata) -> Iterator[torch.nn.Module]:
    """Within the block, ``unet`` computes the fake-quantized model of ``meta``."""
    base = unwrap(unet)
    modules = dict(base.named_modules())
    saved, handles = {}, []
    try:
        for name, rec in meta.layers.items():
            m = modules[name]
            saved[name] = m.weight.data
            m.weight.data = dequantized_weight(rec).to(m.weight.device, m.weight.dtype)
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, rec=rec: (fake_quant_input(rec, args[0]), *args[1:])))
        yield unet
    finally:
        for h in handles:
            h.remove()
        for name, data in saved.items():
            modules[name].weight.data = data
