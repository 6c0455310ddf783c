"""Census of a U-Net: one forward pass with hooks records, per conv/linear layer, its parameters and
MACs, the MACs of every attention matmul (always float) and every other parameter by role."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..layers import conv_linear_layers, unsupported_reason
from ..reference_models import reference_model
from .configs import build_unet, unet_inputs


@dataclass
class LayerInfo:
    """One conv/linear layer of a census."""

    name: str
    op: str                      # conv2d | linear | conv1d | conv_transpose2d | …
    weight_params: int
    bias_params: int
    out_channels: int
    macs: int                    # per U-Net evaluation at the census batch/resolution
    unsupported: str | None      # why the integer kernels cannot run it (None: they can)


@dataclass
class Census:
    """Parameters and MACs of one U-Net evaluation, by layer and role (see :func:`census`)."""

    model: str
    batch: int
    resolution: tuple[int, int]
    layers: list[LayerInfo]
    attention_macs: dict[str, int]            # Attention module -> QKᵀ + AV MACs
    other_params: dict[str, int]              # role (module class) -> parameters outside conv/linear
    other_param_names: dict[str, list[str]]   # role -> parameter names (for conventions)
    total_params: int

    @property
    def layer_macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def attn_macs(self) -> int:
        return sum(self.attention_macs.values())

    def layer(self, name: str) -> LayerInfo:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


@torch.no_grad()
def census(unet, batch: int = 1, resolution: int | None = None, name: str | None = None,
           inputs: tuple | None = None) -> Census:
    """Count parameters by role and MACs per conv/linear layer and per attention, with one
    forward pass (use a model on the ``meta`` device: no weights, no arithmetic).

    MACs: conv ``out.numel() · C_in/groups · kh · kw``; linear ``tokens · in · out``;
    attention ``B · N_q · N_k · inner_dim`` for each of ``QKᵀ`` and ``AV``.
    """
    layers = conv_linear_layers(unet)
    macs: dict[str, int] = {n: 0 for n in layers}
    attn: dict[str, int] = {}
    handles = []

    def conv_linear_hook(lname, op):
        def hook(module, args, out):
            w = module.weight
            if op == "linear":
                macs[lname] += (out.numel() // out.shape[-1]) * w.shape[0] * w.shape[1]
            elif op.startswith("conv_transpose"):
                macs[lname] += args[0].numel() * w[0].numel()
            else:
                macs[lname] += out.numel() * w[0].numel()
        return hook

    try:
        from diffusers.models.attention_processor import Attention
    except ImportError:  # pragma: no cover - diffusers is a dependency
        Attention = ()

    def attn_hook(aname):
        def hook(module, args, kwargs):
            hs = args[0] if args else kwargs["hidden_states"]
            ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            b = hs.shape[0]
            nq = hs.shape[2] * hs.shape[3] if hs.dim() == 4 else hs.shape[1]
            nk = nq if ehs is None else (ehs.shape[2] * ehs.shape[3] if ehs.dim() == 4 else ehs.shape[1])
            inner = module.to_q.out_features
            attn[aname] = attn.get(aname, 0) + 2 * b * nq * nk * inner
        return hook

    for lname, (module, op) in layers.items():
        handles.append(module.register_forward_hook(conv_linear_hook(lname, op)))
    for aname, module in unet.named_modules():
        if Attention and isinstance(module, Attention):
            handles.append(module.register_forward_pre_hook(attn_hook(aname), with_kwargs=True))
    try:
        x, t, kw = inputs if inputs is not None else unet_inputs(unet, batch, resolution=resolution)
        unet(x, t, **kw)
    finally:
        for h in handles:
            h.remove()

    infos = []
    in_layers = set()
    for lname, (module, op) in layers.items():
        w = module.weight
        b = getattr(module, "bias", None)
        infos.append(LayerInfo(lname, op, w.numel(), b.numel() if b is not None else 0,
                               w.shape[1] if op.startswith("conv_transpose") else w.shape[0],
                               macs[lname], unsupported_reason(module, op)))
        in_layers.update({f"{lname}.weight", f"{lname}.bias"})
    other: dict[str, int] = {}
    other_names: dict[str, list[str]] = {}
    modules = dict(unet.named_modules())
    for pname, p in unet.named_parameters():
        if pname in in_layers:
            continue
        owner = modules.get(pname.rsplit(".", 1)[0]) if "." in pname else unet
        role = type(owner).__name__ if owner is not None else "Parameter"
        other[role] = other.get(role, 0) + p.numel()
        other_names.setdefault(role, []).append(pname)
    res = tuple(x.shape[-2:])
    return Census(model=name or type(unet).__name__, batch=x.shape[0], resolution=res, layers=infos,
                  attention_macs=attn, other_params=other, other_param_names=other_names,
                  total_params=sum(p.numel() for p in unet.parameters()))


def meta_unet_from_folder(path: str | os.PathLike):
    """The U-Net of a diffusers folder (pipeline layout or a U-Net folder) built from its
    config on the meta device: no weights are read."""
    import diffusers

    root = Path(path)
    cfg_path = root / "unet" / "config.json" if (root / "unet" / "config.json").is_file() else root / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cls = getattr(diffusers, cfg.get("_class_name", "UNet2DConditionModel"))
    with torch.device("meta"):
        return cls.from_config(cfg).eval()


def config_census(name: str, batch: int = 1, resolution: int | None = None) -> Census:
    """:func:`census` of a :data:`UNET_CONFIGS` model built on the meta device (``mnist``: the
    shipped model itself, loaded with ``qdcompile.reference_model``, when its weights exist)."""
    if name == "mnist":
        try:
            unet, _ = reference_model("mnist")
            return census(unet, batch=batch, resolution=resolution, name="mnist (shipped weights)")
        except FileNotFoundError:
            pass
    unet = build_unet(name, device="meta")
    return census(unet, batch=batch, resolution=resolution, name=name)


def role_breakdown(c: Census) -> dict[str, int]:
    """Parameters by role: conv/linear weights the kernels can / cannot run, biases, and the
    other parameters by module class (GroupNorm, LayerNorm, Embedding, …)."""
    out = {"conv/linear weights (integer kernels can run)": 0, "conv/linear weights (float only)": 0,
           "conv/linear biases": 0}
    for layer in c.layers:
        key = "conv/linear weights (float only)" if layer.unsupported else "conv/linear weights (integer kernels can run)"
        out[key] += layer.weight_params
        out["conv/linear biases"] += layer.bias_params
    out.update(sorted(c.other_params.items(), key=lambda kv: -kv[1]))
    return out
