"""Shortcut-split quantization (Q-Diffusion; METHODS §2).

In a diffusers U-Net up block every ResNet block is fed ``cat([hidden, skip], dim=1)``: the
deep feature coming up the decoder and the skip feature saved by the encoder. The two
halves have very different ranges, so one activation quantizer over the concatenation
wastes most of its codes on one of them. The layer that reads the concatenation itself is
the block's 1×1 ``conv_shortcut`` (``conv1`` reads ``SiLU(GroupNorm(cat))``, where the
parts are no longer separate tensors). Splitting gives each part its own activation
quantizer and each matching input-channel slice of the weight its own per-channel scales;
the split kernel consumes the two parts and never materialises the concatenation.

Detection is by observation, not by layer names: during one forward pass, a layer is split
when its input's trailing channels are *exactly* one of the skip tensors its up block was
given (so its input is that concatenation and nothing computed from it).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .kernels.quantizers import act_qparams, quantize_weight
from .metadata import LayerQuant, SplitPart, weight_digest
from .sampling import call_unet, unwrap

# weight slice, bits → (per-output-channel scales [N], zero points int32 [N] or None for symmetric)
GridFn = Callable[[torch.Tensor, int], "tuple[torch.Tensor, torch.Tensor | None]"]


def _skip_tensors(args: tuple, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The skip features handed to an up block (``res_hidden_states_tuple``, by keyword or position)."""
    found = kwargs.get("res_hidden_states_tuple")
    if found is None:
        found = next((a for a in args if isinstance(a, (tuple, list)) and a and all(torch.is_tensor(v) for v in a)), ())
    return [v for v in found if torch.is_tensor(v) and v.dim() == 4]


@torch.no_grad()
def find_split_layers(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                      kwargs: dict[str, Any] | None = None) -> dict[str, tuple[int, int]]:
    """Conv layers of the up blocks whose input is ``cat([deep, skip], dim=1)``.

    Runs ``unet`` once on ``(x, t, kwargs)``; returns ``{layer name: (deep channels, skip
    channels)}`` in concatenation order, in forward order.
    """
    base = unwrap(unet)
    up_blocks = list(getattr(base, "up_blocks", []))
    names = {m: n for n, m in base.named_modules()}
    skips: list[torch.Tensor] = []
    found: dict[str, tuple[int, int]] = {}

    def on_block(module, args, kw):
        skips[:] = _skip_tensors(args, kw)

    def on_conv(module, args):
        inp = args[0]
        for s in skips:
            c, cs = inp.shape[1], s.shape[1]
            if (inp.shape[0] == s.shape[0] and inp.shape[2:] == s.shape[2:] and c > cs
                    and torch.equal(inp[:, c - cs:], s)):
                found.setdefault(names[module], (c - cs, cs))
                return

    handles = [b.register_forward_pre_hook(on_block, with_kwargs=True) for b in up_blocks]
    handles += [m.register_forward_pre_hook(on_conv) for b in up_blocks for m in b.modules()
                if isinstance(m, torch.nn.Conv2d)]
    try:
        call_unet(base, x, t, kwargs or {})
    finally:
        for h in handles:
            h.remove()
    return found


def scale_map(rec: LayerQuant) -> torch.Tensor:
    """Per-weight-element scale of a record, broadcastable to its weight: ``[N, C_in, 1, ...]``
    with each part's per-channel scales over its input channels (``[N, 1, ...]`` unsplit)."""
    tail = [1] * (rec.weight_q.dim() - 2)
    if not rec.split:
        return rec.weight_scale.float().reshape(-1, 1, *tail)
    return torch.cat([p.weight_scale.float().reshape(-1, 1, *tail).expand(-1, p.channels, *tail) for p in rec.split], 1)


def zero_point_map(rec: LayerQuant) -> torch.Tensor | None:
    """Per-weight-element zero point of an asymmetric record (float32, shaped like
    :func:`scale_map`), or None for a symmetric one."""
    if rec.weight_zero_point is None:
        return None
    tail = [1] * (rec.weight_q.dim() - 2)
    if not rec.split:
        return rec.weight_zero_point.float().reshape(-1, 1, *tail)
    return torch.cat([p.weight_zero_point.float().reshape(-1, 1, *tail).expand(-1, p.channels, *tail)
                      for p in rec.split], 1)


def quantize_split_layer(module: torch.nn.Module, op: str, weight_bits: int, act_bits: int,
                         channels: tuple[int, ...], part_ranges: list[tuple[float, float]],
                         grid_fn: GridFn) -> LayerQuant:
    """Round-to-nearest split record: per part, an activation quantizer from its range and
    per-output-channel weight scales and zero points (``grid_fn(weight slice, bits)``) of its
    weight slice."""
    w = module.weight.detach()
    if sum(channels) != w.shape[1] or len(part_ranges) != len(channels):
        raise ValueError(f"split parts {list(channels)} do not fit a weight with {w.shape[1]} input channels "
                         f"(or {len(part_ranges)} ranges given)")
    parts = []
    for w_part, rng in zip(torch.split(w, list(channels), dim=1), part_ranges):
        got = grid_fn(w_part, weight_bits)
        scale, zp = got if isinstance(got, tuple) else (got, None)   # a bare tensor: symmetric scales
        a_scale, a_zp = act_qparams(rng[0], rng[1], act_bits)
        parts.append(SplitPart(channels=w_part.shape[1], act_bits=act_bits, act_scale=a_scale, act_zero_point=a_zp,
                               weight_q=quantize_weight(w_part, scale, weight_bits, zero_point=zp).cpu(),
                               weight_scale=scale.float().cpu(),
                               weight_zero_point=None if zp is None else zp.to(torch.int32).cpu()))
    asym = parts[0].weight_zero_point is not None
    return LayerQuant(op=op, weight_bits=weight_bits, act_bits=None,
                      weight_q=torch.cat([p.weight_q for p in parts], 1),
                      weight_scale=torch.stack([p.weight_scale for p in parts]),
                      act_scale=None, act_zero_point=None, act_range=None,
                      weight_digest=weight_digest(w), split=parts,
                      weight_zero_point=torch.stack([p.weight_zero_point for p in parts]) if asym else None)
