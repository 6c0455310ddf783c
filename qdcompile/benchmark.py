"""Benchmarks shared by ``bench/size.py``, ``bench/latency.py`` and ``qdcompile bench``.

Two parts:

* **Size and BOPs accounting** (no weights needed: models are built on the ``meta``
  device). :func:`census` runs one forward pass with hooks and records, per conv/linear
  layer, its parameters and MACs, the MACs of every attention matmul (``QKᵀ`` and ``AV``,
  counted separately and always as float) and every other parameter by role (norms,
  embeddings, …). :func:`model_size` and :func:`bops` then price a census under a
  :class:`~qdcompile.QuantRecipe`: quantized weights at the recipe's bits (``keep_8bit``
  layers at 8), every other parameter — biases, norms, embeddings, layers the kernels
  cannot run — at FP32 or FP16, plus (optionally) the per-output-channel weight scales
  and per-tensor activation scale/zero-point the integer kernels read. ``BOPs = MACs ·
  b_w · b_a`` (PTQD §5.1, following Bayesian Bits' definition).
  :func:`ptqd_table2` reproduces the model sizes of PTQD's Table 2 (LDM-4 ImageNet); see
  its docstring for the accounting convention that matches and how close it gets.

* **End-to-end latency** (:func:`run_latency`, the ``latency`` mode of
  :func:`cmd_bench`): one run times several contenders on the same U-Net and inputs —
  float eager, float ``torch.compile`` (Inductor), torchao int8 dynamic quantization,
  qdiff W8A8 / W4A8 — and writes a table, JSON, CSV, a PNG bar chart and a per-op
  (kernel-category) profile of the compiled models under ``bench/results/``.

On a CPU everything runs (the qdiff layers take the pure-torch reference path), but CPU
timings say nothing about GPU speed.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import fnmatch
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .devices import synchronize
from .io import atomic_write, write_json
from .metrics import snr_db

MB = 1e6          # the papers' "MB": 10^6 bytes (PTQD's Table 2 only matches with this)
MIB = 2 ** 20

# ============================================================================ model configs
# Written out here (no hub access). Values are the published diffusers configs.

SD15_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
)

SDXL_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
)

# LDM-4 ImageNet 256² (CompVis latent-diffusion configs/latent-diffusion/cin256-v2.yaml), as the
# equivalent diffusers UNet2DConditionModel: model_channels 192, channel_mult (1, 2, 3, 5),
# 2 res blocks, SpatialTransformer (depth 1, one head) at downsampling factors 2/4/8, class
# conditioning through cross-attention on a 512-d class embedding (1 token; the embedding
# table belongs to the cond stage, not to the U-Net). Parameter count: 400,920,579.
LDM4_CIN256_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(192, 384, 576, 960),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=512, attention_head_dim=1, norm_num_groups=32,
)

# Tiny U-Net for CPU smoke runs when the shipped reference model's weights are missing.
TINY_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
)


def _mnist_config() -> dict[str, Any]:
    from .reference_models import MNIST_UNET_CONFIG

    return dict(MNIST_UNET_CONFIG)


# name -> (diffusers class, config factory, text tokens for encoder_hidden_states, description)
UNET_CONFIGS: dict[str, tuple[str, Callable[[], dict[str, Any]], int, str]] = {
    "ldm4-imagenet": ("UNet2DConditionModel", lambda: dict(LDM4_CIN256_UNET_CONFIG), 1,
                      "LDM-4 ImageNet 256² (cin256-v2) U-Net, 64² latent, 1 class token"),
    "sd15": ("UNet2DConditionModel", lambda: dict(SD15_UNET_CONFIG), 77, "Stable Diffusion 1.5 U-Net, 64² latent"),
    "sdxl": ("UNet2DConditionModel", lambda: dict(SDXL_UNET_CONFIG), 77, "SDXL base U-Net, 128² latent"),
    "mnist": ("UNet2DModel", _mnist_config, 0, "shipped MNIST reference U-Net config, 28²"),
    "tiny": ("UNet2DModel", lambda: dict(TINY_UNET_CONFIG), 0, "tiny UNet2DModel (smoke tests), 16²"),
}


def build_unet(name: str, device: str | torch.device = "meta", dtype: torch.dtype | None = None, seed: int = 0):
    """A diffusers U-Net from :data:`UNET_CONFIGS` with random weights (none on ``meta``)."""
    import diffusers

    if name not in UNET_CONFIGS:
        raise ValueError(f"unknown model config {name!r}; available: {sorted(UNET_CONFIGS)}")
    cls_name, cfg, _, _ = UNET_CONFIGS[name]
    cls = getattr(diffusers, cls_name)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = cls(**cfg())
    if dtype is not None and dtype != next(unet.parameters()).dtype:
        unet = unet.to(dtype)
    return unet.eval()


def text_tokens(unet) -> int:
    """Tokens of ``encoder_hidden_states`` used for a model: the config's, else 77."""
    for name, (cls_name, cfg, tokens, _) in UNET_CONFIGS.items():
        if type(unet).__name__ == cls_name and tokens and _same_config(unet.config, cfg()):
            return tokens
    return 77


def _same_config(config, cfg: dict) -> bool:
    def norm(v):
        return list(v) if isinstance(v, (tuple, list)) else v
    return all(norm(config.get(k)) == norm(v) for k, v in cfg.items())


def unet_inputs(unet, batch: int, device=None, dtype=None, resolution: int | None = None, seed: int = 0,
                tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Random ``(sample, timestep, kwargs)`` for one U-Net call of ``batch`` items.

    ``kwargs`` holds what the config needs: ``encoder_hidden_states`` ``[B, tokens, D]`` for a
    ``UNet2DConditionModel``, ``added_cond_kwargs`` (``text_embeds``, ``time_ids``) for SDXL's
    ``text_time`` embedding, ``class_labels`` for class-embedding configs.
    """
    cfg = unet.config
    p = next(unet.parameters())
    device = device if device is not None else p.device
    dtype = dtype if dtype is not None else p.dtype
    size = resolution or cfg.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        if torch.device(device).type == "meta":
            return torch.empty(*shape, device="meta", dtype=dtype)
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    x = randn(batch, cfg.in_channels, h, w)
    # a 0-d timestep expanded to the batch (stride 0), exactly as qdcompile.sample passes it,
    # so that a compiled model timed here is not recompiled (guard on strides) for sampling
    t = torch.tensor(500, dtype=torch.long, device=device).expand(batch)
    kwargs: dict[str, Any] = {}
    cross = cfg.get("cross_attention_dim")
    if type(unet).__name__ == "UNet2DConditionModel" and cross is not None:
        dim = cross[0] if isinstance(cross, (tuple, list)) else cross
        kwargs["encoder_hidden_states"] = randn(batch, tokens or text_tokens(unet), dim)
    if cfg.get("addition_embed_type") == "text_time":
        n_time = 6
        text_dim = cfg.projection_class_embeddings_input_dim - n_time * cfg.addition_time_embed_dim
        time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]).repeat(batch, 1)
        if torch.device(device).type == "meta":
            time_ids = torch.empty(batch, n_time, device="meta", dtype=dtype)
        else:
            time_ids = time_ids.to(device=device, dtype=dtype)
        kwargs["added_cond_kwargs"] = {"text_embeds": randn(batch, text_dim), "time_ids": time_ids}
    if cfg.get("class_embed_type") is not None or cfg.get("num_class_embeds") is not None:
        n = cfg.get("num_class_embeds") or 1000
        kwargs["class_labels"] = torch.zeros(batch, dtype=torch.long, device=device) % n
    return x, t, kwargs


# ============================================================================ census
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
    from .layers import conv_linear_layers, unsupported_reason

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
        from .reference_models import reference_model

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


# ============================================================================ size / BOPs
def layer_precision(layer: LayerInfo, recipe) -> tuple[int | None, int | None, str]:
    """``(weight_bits, act_bits, why)`` a recipe gives a layer; ``None`` bits mean float.

    Mirrors calibration: layers the kernels cannot run and ``skip`` matches stay float;
    ``keep_8bit`` matches get W8 (A8 when the recipe quantizes activations).
    """
    if recipe is None:
        return None, None, "float model"
    if layer.unsupported is not None:
        return None, None, layer.unsupported
    if any(fnmatch.fnmatchcase(layer.name, p) for p in recipe.skip):
        return None, None, "skipped by the recipe"
    if any(fnmatch.fnmatchcase(layer.name, p) for p in recipe.keep_8bit):
        return 8, (8 if recipe.act_bits is not None else None), "keep_8bit"
    return recipe.weight_bits, recipe.act_bits, "quantized"


@dataclass
class SizeReport:
    """Bytes of a model under a recipe (see :func:`model_size`)."""

    recipe: str
    float_bytes: int
    count_scales: bool
    params: dict[str, int]          # quantized / quantized_8bit / float_layers / bias / <role>… -> parameters
    bytes: dict[str, float]         # weights_q, scales, float_weights, bias, other -> bytes
    runtime_bytes: float            # kernel-side buffers not counted above (Σq_w row sums, int32)

    @property
    def total_bytes(self) -> float:
        return sum(self.bytes.values())

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    @property
    def mb(self) -> float:
        return self.total_bytes / MB

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["total_bytes"], d["total_params"], d["MB"], d["MiB"] = (self.total_bytes, self.total_params, self.mb,
                                                                   self.total_bytes / MIB)
        return d


def model_size(c: Census, recipe=None, float_bytes: int = 4, count_scales: bool = True,
               ops: tuple[str, ...] | None = None) -> SizeReport:
    """Storage of the U-Net of census ``c`` under ``recipe`` (``None``: all float).

    * quantized conv/linear weights: ``b_w`` bits each (int4 packed two per byte along K);
    * ``keep_8bit`` layers: 8 bits;
    * everything else — biases (also of quantized layers: the epilogue adds them in float),
      norms, embeddings, skipped or non-quantizable layers — ``float_bytes`` per parameter;
    * ``count_scales``: + per-output-channel weight scale (fp32) per quantized layer, and
      its per-tensor activation scale (fp32) + zero point (int32). The kernels' weight row
      sums (int32 per output channel) are reported apart as ``runtime_bytes``.
    * ``ops`` restricts quantization to these op kinds (torchao-style ``("linear",)``).
    """
    params = {"quantized": 0, "quantized_8bit": 0, "float_layers": 0, "bias": 0}
    nbytes = {"weights_q": 0.0, "scales": 0.0, "float_weights": 0.0, "bias": 0.0, "other": 0.0}
    runtime = 0.0
    for layer in c.layers:
        wb, ab, _ = layer_precision(layer, recipe)
        if ops is not None and layer.op not in ops:
            wb = ab = None
        params["bias"] += layer.bias_params
        nbytes["bias"] += layer.bias_params * float_bytes
        if wb is None:
            params["float_layers"] += layer.weight_params
            nbytes["float_weights"] += layer.weight_params * float_bytes
            continue
        params["quantized_8bit" if (wb == 8 and recipe is not None and recipe.weight_bits != 8) else "quantized"] += \
            layer.weight_params
        k = layer.weight_params // max(layer.out_channels, 1)
        nbytes["weights_q"] += layer.out_channels * math.ceil(k * wb / 8)
        if count_scales:
            nbytes["scales"] += 4 * layer.out_channels + (8 if ab is not None else 0)
        runtime += 4 * layer.out_channels
    for role, n in c.other_params.items():
        params[role] = params.get(role, 0) + n
        nbytes["other"] += n * float_bytes
    name = "fp32" if recipe is None and float_bytes == 4 else "fp16" if recipe is None else recipe.name
    return SizeReport(name, float_bytes, count_scales, params, nbytes, runtime)


def bops(c: Census, recipe=None, float_bits: int = 32, ops: tuple[str, ...] | None = None) -> dict[str, float]:
    """Bit operations of one U-Net evaluation: ``Σ MACs · b_w · b_a`` over conv/linear layers
    (float layers at ``float_bits``², weight-only layers at ``b_w · float_bits``), and, apart,
    the attention matmuls, always float (``attention``)."""
    layer_bops = 0.0
    for layer in c.layers:
        wb, ab, _ = layer_precision(layer, recipe)
        if ops is not None and layer.op not in ops:
            wb = ab = None
        layer_bops += layer.macs * (wb or float_bits) * (ab or float_bits)
    attention = c.attn_macs * float_bits * float_bits
    return {"layers": layer_bops, "attention": attention, "total": layer_bops + attention}


# ============================================================================ PTQD Table 2
PTQD_TABLE2 = {"fp32": {"MB": 1603.35, "TBOPs": 102.21}, "w8a8": {"MB": 430.06, "TBOPs": 8.25},
               "w4a8": {"MB": 234.51, "TBOPs": 5.12}}


def _ptqd_fp32(name: str, convention: str) -> bool:
    """Parameters kept at FP32 in the quantized models under a PTQD size convention."""
    if name in ("time_embedding.linear_1.weight",) or (name.endswith(".time_emb_proj.weight")):
        return True
    if convention == "exact":
        return name.endswith(".conv_shortcut.bias")
    if convention == "first-last":
        return name in ("conv_in.weight", "conv_out.weight")
    raise ValueError(f"unknown PTQD convention {convention!r}")


def ptqd_convention_size(unet, weight_bits: int | None, convention: str = "exact") -> float:
    """Bytes of the (meta) LDM-4 U-Net under the reverse-engineered PTQD Table 2 convention
    (see :func:`ptqd_table2`); ``weight_bits=None`` is the FP32 model."""
    modules = dict(unet.named_modules())
    total = 0.0
    for name, p in unet.named_parameters():
        owner = modules.get(name.rsplit(".", 1)[0])
        if isinstance(owner, torch.nn.GroupNorm):
            continue
        bits = 32 if (weight_bits is None or _ptqd_fp32(name, convention)) else weight_bits
        total += p.numel() * bits / 8
    return total


def ptqd_table2() -> dict[str, Any]:
    """Reproduce the model sizes (and compare the BOPs) of PTQD's Table 2, LDM-4 ImageNet 256².

    What counts (worked out from the numbers; the paper does not state it):

    * the **U-Net only** (``model.diffusion_model``; the VQ-f4 first stage, 55.3 M parameters,
      and the 1001×512 class embedder are not counted), and **MB = 10⁶ bytes** (with 2²⁰ no
      natural set of parts reaches 1603.35);
    * **GroupNorm parameters are not counted** (82,560). The full U-Net is 400,920,579
      parameters = 1603.68 MB in FP32; 1603.35 MB needs 83,079 ± 1,250 fewer, and GroupNorm is
      the only natural group of that size (a counter with no rule for GroupNorm, as e.g.
      ``thop`` has none, reports exactly this);
    * at FP32 in the quantized models: the time-embedding MLP's first linear
      (``time_embed.0`` → ``time_embedding.linear_1``) and **every ResBlock's time-embedding
      projection** (``emb_layers`` → ``time_emb_proj``), 9,732,096 weights; plus, to land
      inside the last printed digit, the biases of the 1×1 shortcut convs (8,256; the FP32
      set must hold 9,738,750 – 9,741,711 parameters for all three sizes to round right);
    * **everything else at the weight bit width** — all other conv/linear weights *and*
      biases and LayerNorm parameters — with no scale overhead; the 8-bit input/output
      layers are not visible (at W4, counting conv_in/conv_out at 8 bit would add 0.005 MB
      and print 234.52).

    The ``first-last`` alternative (FP32: PTQD's "first and last layers" — time_embed.0,
    conv_in, out conv — plus the time-embedding projections, no shortcut biases) is the
    closest convention built from groups the paper names; it gives 430.07 / 234.52 MB,
    0.01 MB off in the last digit.

    BOPs are compared, not reproduced: our conv/linear MACs at 32×32 bits give 102.16 T
    (PTQD: 102.21 T; the 0.05 % gap is about 2 ops per GroupNorm element), but PTQD's
    quantized BOPs (8.25 T W8A8, 5.12 T W4A8) imply ~1.94 G MACs left at 32×32 bits, which
    we could not attribute to any natural group of layers; ours (all conv/linear at 8×8,
    conv_in/conv_out at 8×8 for W4A8) are 6.39 T and 3.19 T.
    """
    from .recipe import QuantRecipe

    unet = build_unet("ldm4-imagenet", device="meta")
    c = census(unet, batch=1, name="ldm4-imagenet")
    rows = []
    for key, wbits, recipe in (("fp32", None, None), ("w8a8", 8, QuantRecipe.w8a8()), ("w4a8", 4, QuantRecipe.w4a8())):
        exact = ptqd_convention_size(unet, wbits, "exact") / MB
        first_last = ptqd_convention_size(unet, wbits, "first-last") / MB
        ours = model_size(c, recipe, float_bytes=4, count_scales=True).mb
        b = bops(c, recipe)
        rows.append({"bitwidth": key, "paper_MB": PTQD_TABLE2[key]["MB"], "exact_convention_MB": exact,
                     "first_last_convention_MB": first_last, "qdcompile_MB": ours,
                     "paper_TBOPs": PTQD_TABLE2[key]["TBOPs"], "qdcompile_TBOPs": b["layers"] / 1e12,
                     "attention_TBOPs_float": b["attention"] / 1e12})
    return {"model": "ldm4-imagenet", "params": c.total_params, "rows": rows,
            "groupnorm_params": c.other_params.get("GroupNorm", 0), "census": c}


# ============================================================================ size CLI
def size_table(models: list[str], recipes: list[str], float_bytes: int = 4, count_scales: bool = True,
               batch: int = 1, resolution: int | None = None) -> list[dict[str, Any]]:
    from .recipe import QuantRecipe

    rows = []
    for name in models:
        c = config_census(name, batch=batch, resolution=resolution)
        for r in recipes:
            recipe = None if r in ("fp32", "fp16", "float") else QuantRecipe.preset(r)
            fb = 2 if r == "fp16" else float_bytes
            s = model_size(c, recipe, float_bytes=fb, count_scales=count_scales)
            fbits = 16 if r == "fp16" else 32 if recipe is None else fb * 8
            b = bops(c, recipe, float_bits=fbits)
            rows.append({"model": name, "recipe": s.recipe, "params": c.total_params, "roles": role_breakdown(c),
                         "bytes_by_part": s.bytes, "params_by_precision": s.params,
                         "quantized_params": s.params["quantized"] + s.params["quantized_8bit"],
                         "MB": s.mb, "MiB": s.total_bytes / MIB, "scales_MB": s.bytes["scales"] / MB,
                         "float_MB": (s.bytes["float_weights"] + s.bytes["bias"] + s.bytes["other"]) / MB,
                         "GMACs_layers": c.layer_macs / 1e9, "GMACs_attention": c.attn_macs / 1e9,
                         "TBOPs_layers": b["layers"] / 1e12, "TBOPs_attention_float": b["attention"] / 1e12,
                         "batch": c.batch, "resolution": list(c.resolution)})
    return rows


def _fmt_table(rows: list[dict[str, Any]], cols: list[tuple[str, str, str]]) -> str:
    """cols: (key, header, format)."""
    head = [h for _, h, _ in cols]
    body = []
    for r in rows:
        line = []
        for k, _, f in cols:
            v = r.get(k)
            line.append("—" if v is None else (format(v, f) if f and isinstance(v, (int, float)) else str(v)))
        body.append(line)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    out = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in body]
    return "\n".join(out)


def run_size(args) -> int:
    models = args.models or ["ldm4-imagenet", "sd15", "sdxl", "mnist"]
    recipes = args.recipes or ["fp32", "fp16", "w8a8", "w4a8", "w4a4"]
    fb = 2 if args.float_fp16 else 4
    print("Model size and BOPs per U-Net evaluation (sizes: MB = 10^6 bytes; BOPs = MACs x b_w x b_a)")
    print(f"  quantized conv/linear weights at the recipe's bits (keep_8bit layers: 8; int4 packed 2/byte); "
          f"biases, norms, embeddings, non-quantizable layers at {'FP16' if fb == 2 else 'FP32'}")
    print(f"  per-channel weight scales (fp32) + per-tensor act scale/zero-point: "
          f"{'counted' if not args.no_scales else 'NOT counted'}; kernel row sums (int32/channel) not counted")
    print(f"  MACs: conv/linear at batch {args.batch}, default latent resolution unless --resolution; "
          "attention matmuls (QK^T, AV) counted separately, always float\n")
    rows = size_table(models, recipes, fb, not args.no_scales, args.batch, args.resolution)
    print(_fmt_table(rows, [("model", "model", ""), ("recipe", "recipe", ""), ("params", "params", ",d"),
                            ("MB", "MB", ".2f"), ("MiB", "MiB", ".2f"), ("scales_MB", "scales MB", ".3f"),
                            ("float_MB", "float MB", ".2f"), ("GMACs_layers", "GMACs", ".2f"),
                            ("TBOPs_layers", "TBOPs", ".3f"), ("GMACs_attention", "attn GMACs", ".2f"),
                            ("TBOPs_attention_float", "attn TBOPs", ".3f")]))
    print("\nParameters by role:")
    seen = set()
    for r in rows:
        if r["model"] in seen:
            continue
        seen.add(r["model"])
        print(f"  {r['model']}: " + ", ".join(f"{k} {v:,}" for k, v in r["roles"].items() if v))
    t2 = None
    if "ldm4-imagenet" in models:
        t2 = ptqd_table2()
        print("\nPTQD Table 2 (LDM-4 ImageNet 256², U-Net only, MB = 10^6 bytes):")
        print(_fmt_table(t2["rows"], [("bitwidth", "W/A", ""), ("paper_MB", "paper MB", ".2f"),
                                      ("exact_convention_MB", "reproduced MB", ".3f"),
                                      ("first_last_convention_MB", "first/last conv. MB", ".3f"),
                                      ("qdcompile_MB", "qdcompile MB", ".2f"), ("paper_TBOPs", "paper TBOPs", ".2f"),
                                      ("qdcompile_TBOPs", "our TBOPs", ".2f")]))
        print("  reproduced: GroupNorm params not counted; FP32 = time_embedding.linear_1 + all ResBlock "
              "time_emb_proj weights + conv_shortcut biases; everything else (incl. biases, LayerNorm) at the "
              "weight bits; no scale overhead. First/last convention: FP32 = time_embedding.linear_1, conv_in, "
              "conv_out + time_emb_proj. qdcompile: our own accounting (biases/norms FP32, scales counted).")
        print("  BOPs: PTQD's FP32 count matches ours to 0.05%; its W8A8/W4A8 counts imply ~1.94 GMACs at 32x32 "
              "bits that no natural layer group explains (ours: all conv/linear quantized).")
    if args.json:
        payload = {"rows": rows, "float_bytes": fb, "scales_counted": not args.no_scales,
                   "ptqd_table2": None if t2 is None else {k: v for k, v in t2.items() if k != "census"}}
        write_json(args.json, payload)
        print(f"\nwrote {args.json}")
    return 0


def add_size_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", choices=sorted(UNET_CONFIGS), default=None,
                   help="configs (default: ldm4-imagenet sd15 sdxl mnist)")
    p.add_argument("--recipes", nargs="+", choices=["fp32", "fp16", "w8a8", "w4a8", "w4a4"], default=None)
    p.add_argument("--float-fp16", action="store_true", help="price float parameters at FP16 (default FP32)")
    p.add_argument("--no-scales", action="store_true", help="do not count weight/activation scale overhead")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--resolution", type=int, default=None, help="latent resolution (default: config sample_size)")
    p.add_argument("--json", default=None, help="also write the numbers here")


# ============================================================================ latency
CONTENDERS = ("fp-eager", "fp-compiled", "fp-compiled-max-autotune", "torchao-int8", "qdiff-w8a8", "qdiff-w4a8",
              "qdiff-w4a4", "qdiff-mixed")
# order = priority: contenders not started within --budget-s are skipped
DEFAULT_CONTENDERS = ("fp-eager", "fp-compiled", "qdiff-w8a8", "qdiff-w4a8", "torchao-int8", "qdiff-mixed")
SMOKE_CONTENDERS = ("fp-eager", "fp-compiled", "qdiff-w8a8", "torchao-int8", "qdiff-mixed")

_PROFILE_CATEGORIES = ("qdiff int GEMM/conv (Triton)", "qdiff act quantize", "float GEMM/conv (cuBLAS/cuDNN/Inductor)",
                       "attention", "norms", "elementwise/other")


def classify_kernel(name: str) -> str:
    """Category of a CUDA kernel (or CPU op) name for the per-op breakdown."""
    n = name.lower()
    if re.search(r"_q(gemm|conv2d|conv|linear)\w*kernel|qdiff::q(linear|conv2d)", n):
        return "qdiff int GEMM/conv (Triton)"
    if re.search(r"quantize_act|qdiff::quantize", n):
        return "qdiff act quantize"
    if re.match(r"triton_(poi|red|per)_", n):
        if "norm" in n:
            return "norms"
        if "softmax" in n or "attention" in n:
            return "attention"
        return "elementwise/other"
    if re.search(r"flash|fmha|attention|attn|sdpa|softmax|mha", n):
        return "attention"
    if re.search(r"norm|rowwisemoments|computefusedparams|welford", n):
        return "norms"
    if re.search(r"gemm|conv|xmma|nvjet|cutlass|cublas|implicit|wgmma|triton_tem|_int_mm|\bmm\b|addmm|bmm|matmul|"
                 r"aten::mm|aten::linear|fprop|winograd|sm\d\d_", n):
        return "float GEMM/conv (cuBLAS/cuDNN/Inductor)"
    return "elementwise/other"


def _event_time_us(e, device: bool) -> float:
    names = (("self_device_time_total", "self_cuda_time_total", "device_time_total", "cuda_time_total")
             if device else ("self_cpu_time_total",))
    for attr in names:
        v = getattr(e, attr, None)
        if v:
            return float(v)
    return 0.0


def profile_breakdown(fn: Callable[[], Any], device: str, steps: int = 3) -> dict[str, Any]:
    """Time per kernel category over ``steps`` calls of ``fn`` (torch.profiler).

    CUDA: device time of every kernel, by kernel name. CPU: self CPU time of every op,
    attributed to its outermost enclosing ``qdiff::`` op if any (the aten ops of the
    reference integer path count as qdiff), else to its own or its nearest ancestor's
    category."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()
    synchronize(device)
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        synchronize(device)
    cats = {c: 0.0 for c in _PROFILE_CATEGORIES}
    kernels: dict[str, float] = {}
    category: dict[str, str] = {}
    source = "CUDA kernel time"
    if cuda:
        for e in prof.events():
            if str(getattr(e, "device_type", "")).endswith("CUDA"):
                t = _event_time_us(e, True)
                if t > 0:
                    kernels[e.name] = kernels.get(e.name, 0.0) + t
        for k, t in kernels.items():
            category[k] = classify_kernel(k)
            cats[category[k]] += t
    if not kernels:   # CPU run, or no device events recorded (no CUPTI): attribute CPU op time
        source = "CPU self time" if not cuda else "CPU self time (the profiler recorded no CUDA kernels)"
        for e in prof.events():
            t = _event_time_us(e, False)
            if t <= 0:
                continue
            chain, p = [classify_kernel(e.name)], e
            while getattr(p, "cpu_parent", None) is not None:
                p = p.cpu_parent
                chain.append(classify_kernel(p.name))
            qd = [c for c in chain if c.startswith("qdiff")]
            named = [c for c in chain if c != "elementwise/other"]
            cat = qd[-1] if qd else (named[0] if named else chain[0])
            key = f"{e.name}  (in {cat})" if cat != chain[0] else e.name
            category[key] = cat
            kernels[key] = kernels.get(key, 0.0) + t
            cats[cat] += t
    total = sum(cats.values()) or 1.0
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:25]
    return {"steps": steps, "source": source,
            "per_step_ms": {c: v / steps / 1e3 for c, v in cats.items()},
            "share": {c: v / total for c, v in cats.items()},
            "top": [{"name": k, "per_step_ms": v / steps / 1e3, "category": category[k]} for k, v in top]}


def _time_calls(fn: Callable[[], Any], device: str, warmup: int, repeats: int, rep_ms: float) -> dict[str, float]:
    """Median / p20 / p80 seconds per call: triton.testing.do_bench on CUDA (events, L2
    flushed between calls), CUDA events or perf_counter otherwise."""
    if device.startswith("cuda"):
        try:
            from triton.testing import do_bench

            q = do_bench(fn, warmup=max(rep_ms / 4, 25), rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
            return {"median_s": q[0] / 1e3, "p20_s": q[1] / 1e3, "p80_s": q[2] / 1e3, "method": "triton.do_bench"}
        except Exception:  # noqa: BLE001 - fall back to plain events
            pass
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return {"median_s": statistics.median(times), "p20_s": q(0.2), "p80_s": q(0.8),
            "method": "cuda events" if device.startswith("cuda") else "perf_counter"}


def _graph_callable(fn: Callable[[], Any], device: str):
    """Capture ``fn`` (static inputs) into a CUDA graph; returns a replay callable."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g.replay


def _graph_count() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001
        return 0


class _LayoutAdapter(torch.nn.Module):
    """What ``qdcompile.sample`` calls: converts the latents to the benchmark's memory format
    and calls the contender (``unwrap`` finds the U-Net through ``_orig_mod``)."""

    def __init__(self, unet, fn, channels_last: bool):
        super().__init__()
        self._orig_mod = unet
        self.__dict__["_fn"] = fn
        self.__dict__["_cl"] = channels_last

    def forward(self, x, *args, **kwargs):
        if self._cl:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._fn(x, *args, **kwargs)


def _out_tensor(out) -> torch.Tensor:
    return out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, tuple) else out)


def device_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
                            "platform": platform.platform(), "cpu_threads": torch.get_num_threads()}
    for mod in ("triton", "diffusers", "torchao"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            info[mod] = f"unavailable ({type(e).__name__}: {e})"
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(torch.device(device))
        info.update({"gpu": p.name, "gpu_memory_GiB": round(p.total_memory / 2 ** 30, 1),
                     "sm_count": p.multi_processor_count, "capability": f"{p.major}.{p.minor}",
                     "cuda": torch.version.cuda})
        info["nvidia_smi_before"] = _nvidia_smi()
    else:
        info["gpu"] = "cpu"
    return info


def _nvidia_smi() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,pstate,clocks.sm,clocks.max.sm,"
                               "clocks.mem,temperature.gpu,power.draw,power.limit,memory.used",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def measure_ceilings(device: str) -> dict[str, float]:
    """Measured ceilings (METHOD.md): fp16 and int8 matmul rate, device-to-device copy bandwidth."""
    if not device.startswith("cuda"):
        return {}
    out: dict[str, float] = {}
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.float16)
    b = torch.randn(n, n, device=device, dtype=torch.float16)
    t = _time_calls(lambda: a @ b, device, 3, 10, 300)["median_s"]
    out["fp16_matmul_TFLOPs"] = 2 * n ** 3 / t / 1e12
    try:
        ai = torch.randint(-128, 127, (n, n), device=device, dtype=torch.int8)
        bi = torch.randint(-128, 127, (n, n), device=device, dtype=torch.int8).t()   # column-major: cuBLASLt TN
        t = _time_calls(lambda: torch._int_mm(ai, bi), device, 3, 10, 300)["median_s"]
        out["int8_matmul_TOPs"] = 2 * n ** 3 / t / 1e12
        del ai, bi
    except Exception as e:  # noqa: BLE001
        out["int8_matmul_error"] = f"{type(e).__name__}: {e}"  # type: ignore[assignment]
    src = torch.empty(2 ** 30, device=device, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    t = _time_calls(lambda: dst.copy_(src), device, 3, 10, 300)["median_s"]
    out["copy_TBps_read_plus_write"] = 2 * src.numel() / t / 1e12
    del a, b, src, dst
    torch.cuda.empty_cache()
    return out


@dataclass
class Scenario:
    model: str              # sd15 | sdxl | reference | tiny | path
    batch: int
    resolution: int | None = None

    @property
    def tag(self) -> str:
        name = Path(self.model).name if os.sep in self.model else self.model
        return f"{name}-b{self.batch}" + (f"-r{self.resolution}" if self.resolution else "")


def _family(cid: str) -> str:
    return "qdiff" if cid.startswith("qdiff") else "eager" if cid == "fp-eager" else "Inductor"


class _Budget:
    """Wall-clock budget of a run: a contender is skipped when the last contender of its
    family (eager / Inductor-compiled / qdiff) took longer than the time left."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds
        self.took: dict[str, float] = {}

    def estimate(self, cid: str) -> float | None:
        return self.took.get(_family(cid))

    def record(self, cid: str, seconds: float) -> None:
        self.took[_family(cid)] = seconds

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed

    def line(self) -> str:
        return f"[t={self.elapsed:6.1f}s / budget {self.seconds:.0f}s]"


def _load_model(scn: Scenario, device: str, dtype, seed: int):
    """(unet, scheduler, description) for a scenario; weights are random except for the
    shipped reference model and ``--model DIR``."""
    from diffusers import DDIMScheduler

    if scn.model in ("sd15", "sdxl", "tiny"):
        unet = build_unet(scn.model, device=device, dtype=dtype, seed=seed)
        sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False)
        return unet, sched, UNET_CONFIGS[scn.model][3] + " (random weights)"
    if scn.model == "reference":
        from .reference_models import reference_model

        try:
            unet, sched = reference_model("mnist", device=device, dtype=dtype)
            return unet, sched, "shipped MNIST reference model (trained weights)"
        except FileNotFoundError:
            unet = build_unet("tiny", device=device, dtype=dtype, seed=seed)
            from diffusers import DDPMScheduler

            return unet, DDPMScheduler(num_train_timesteps=1000), \
                "tiny UNet2DModel, random weights (shipped reference weights are missing)"
    from .models import load_model

    unet, sched = load_model(scn.model, device=device, dtype=dtype)
    return unet, sched, f"{scn.model} (from_pretrained)"


def speed_recipe(name: str):
    """The preset ``name`` with the cheapest calibration method (round-to-nearest, min-max
    scales) but the preset's layer choices (bits, ``keep_8bit``, ``skip``, ``split``), which
    decide what the compiled model runs."""
    from .recipe import QuantRecipe

    preset = QuantRecipe.preset(name)
    overrides = {"method": "rtn"}
    if "weight_observer" in {f.name for f in dataclasses.fields(QuantRecipe)}:
        overrides["weight_observer"] = "minmax"
    return dataclasses.replace(preset, **overrides)


def _calib_kwargs(unet, n: int, device, dtype) -> dict[str, Any] | None:
    _, _, kw = unet_inputs(unet, n, device=device, dtype=dtype, seed=1)
    return kw or None


def _torchao_config():
    import torchao  # noqa: F401
    from torchao import quantization as q

    for name in ("Int8DynamicActivationInt8WeightConfig",):
        if hasattr(q, name):
            return getattr(q, name)(), name
    if hasattr(q, "int8_dynamic_activation_int8_weight"):
        return q.int8_dynamic_activation_int8_weight(), "int8_dynamic_activation_int8_weight"
    raise ImportError("torchao has neither Int8DynamicActivationInt8WeightConfig nor "
                      "int8_dynamic_activation_int8_weight")


def _contender_label(cid: str, dtype) -> str:
    fp = {torch.float16: "FP16", torch.bfloat16: "BF16", torch.float32: "FP32"}.get(dtype, str(dtype))
    return {"fp-eager": f"{fp} eager", "fp-compiled": f"{fp} compiled (Inductor)",
            "fp-compiled-max-autotune": f"{fp} compiled (max-autotune)",
            "torchao-int8": "torchao int8 dyn. act + int8 weight, compiled",
            "qdiff-w8a8": "qdiff W8A8", "qdiff-w4a8": "qdiff W4A8", "qdiff-w4a4": "qdiff W4A4",
            "qdiff-mixed": "qdiff mixed precision (PTQD)"}[cid]


def _run_one(cid: str, scn: Scenario, args, device: str, dtype, ref_out: dict, c_census: Census | None,
             budget: _Budget, ceilings: dict) -> dict[str, Any]:
    """Build, prepare, compile and time one contender on one scenario. Never raises."""
    import qdcompile

    row: dict[str, Any] = {"scenario": scn.tag, "model": scn.model, "batch": scn.batch, "contender": cid,
                           "label": _contender_label(cid, dtype), "dtype": str(dtype).replace("torch.", ""),
                           "status": "ok"}
    if cid == "torchao-int8":
        try:
            _torchao_config()
        except Exception as e:  # noqa: BLE001
            row.update(status="unavailable", reason=f"torchao: {type(e).__name__}: {e}")
            return row
    if cid.startswith("fp-compiled") or cid == "torchao-int8":
        if not device.startswith("cuda") and not args.cpu_inductor:
            row.update(status="skipped", reason="Inductor on CPU compiles C++ for minutes: pass --cpu-inductor")
            return row
    est = budget.estimate(cid)
    if budget.left() <= 0 or (est is not None and est > budget.left()):
        row.update(status="skipped", reason=f"time budget: {budget.left():.0f}s of --budget-s {args.budget_s:.0f}s "
                                            f"left" + (f", a {_family(cid)} contender took {est:.0f}s" if est else ""))
        return row

    unet = fn = meta = None
    try:
        torch._dynamo.reset()
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            mem0 = torch.cuda.memory_allocated()
        unet, sched, desc = _load_model(scn, device, dtype, args.seed)
        row["model_description"] = desc
        channels_last = args.memory_format == "channels_last" or (args.memory_format == "auto" and
                                                                   device.startswith("cuda"))
        row["memory_format"] = "channels_last" if channels_last else "contiguous"
        if channels_last:
            unet = unet.to(memory_format=torch.channels_last)
        x, t, kw = unet_inputs(unet, scn.batch, device=device, dtype=dtype, resolution=scn.resolution,
                               seed=args.seed)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        recipe = None
        t_setup = time.perf_counter()
        if cid == "fp-eager":
            fn = unet
        elif cid.startswith("fp-compiled"):
            mode = "max-autotune-no-cudagraphs" if cid.endswith("max-autotune") else None
            fn = torch.compile(unet, dynamic=False, mode=mode)
            row["compile_mode"] = mode or "default"
        elif cid == "torchao-int8":
            from torchao.quantization import quantize_

            cfg, cfg_name = _torchao_config()
            quantize_(unet, cfg)
            fn = torch.compile(unet, dynamic=False)
            row["torchao_config"] = cfg_name + " (nn.Linear only; convs stay float)"
        elif cid.startswith("qdiff-"):
            from .passes.backend import qdiff_backend

            recipe = speed_recipe(cid.split("-", 1)[1])
            if recipe.noise_correction:   # PTQD statistics on as many trajectories as the calibration
                recipe = dataclasses.replace(recipe, noise_samples=args.calib_samples)
            row["recipe"] = recipe.to_dict()
            t0 = time.perf_counter()
            meta = qdcompile.calibrate(unet, sched, recipe, num_samples=args.calib_samples,
                                       num_inference_steps=args.calib_steps,
                                       sample_kwargs=_calib_kwargs(unet, args.calib_samples, device, dtype),
                                       progress=False)
            row["calibration_s"] = time.perf_counter() - t0
            row["calibration"] = (f"cheap speed-run calibration: round-to-nearest (method='rtn'), "
                                  f"num_samples={args.calib_samples}, num_inference_steps={args.calib_steps}; the "
                                  "preset's layer choices (keep_8bit, split) are kept, so the same kernels run as with "
                                  "a full calibration: speed does not depend on calibration quality, the SNR does")
            fn = torch.compile(unet, backend=qdiff_backend, dynamic=False)
        mixed = None
        if cid == "qdiff-mixed":
            # the PTQD sampler: per-step activation precision + corrections; time each precision's
            # step and weight them by the plan (a median over a two-speed sequence would be meaningless)
            from .pipeline import QuantizedUNet

            mixed = QuantizedUNet(fn, meta, backend="qdiff")
            plan = mixed.plan(sched, args.calib_steps)
            mixed_t = {}
            for r in plan:
                mixed_t.setdefault(r["act_bits"], torch.full_like(t, r["timestep"]))
            row["precision_plan"] = {f"A{b}": sum(r["act_bits"] == b for r in plan) for b in mixed_t}
            fn = mixed
            t = mixed_t[max(mixed_t, key=lambda b: row["precision_plan"][f"A{b}"])]   # the commonest step
        call = lambda: fn(x, t, **kw)  # noqa: E731

        with torch.no_grad():
            t0 = time.perf_counter()
            out = _out_tensor(call())
            synchronize(device)
            row["first_call_s"] = time.perf_counter() - t0
            graphs0 = _graph_count()
            row["compile_s"] = row["first_call_s"] if cid != "fp-eager" else 0.0
            if cid.startswith("qdiff-"):
                try:
                    row["layers"] = qdcompile.report(fn).counts
                except Exception as e:  # noqa: BLE001 - the report is informative only
                    row["layers"] = f"report failed: {type(e).__name__}: {e}"
            ref = ref_out.get(scn.tag)
            if cid == "fp-eager":
                ref_out[scn.tag] = out.detach().float().cpu()
                row["snr_db_vs_fp_eager"] = None
            elif ref is not None:
                row["snr_db_vs_fp_eager"] = snr_db(ref, out.detach().float().cpu())
            row["output_finite"] = bool(torch.isfinite(out).all())
            del out
            for _ in range(args.warmup):
                call()
            synchronize(device)
            if device.startswith("cuda"):
                row["resident_bytes"] = torch.cuda.memory_allocated() - mem0
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                call()
                call()
                synchronize(device)
                row["peak_bytes"] = torch.cuda.max_memory_allocated() - mem0
                row["peak_activation_bytes"] = torch.cuda.max_memory_allocated() - base

            runs = []
            for _ in range(max(1, args.timing_passes)):
                runs.append(_time_calls(call, device, args.warmup, args.repeats, args.rep_ms))
            row["step_s"] = statistics.median(r["median_s"] for r in runs)
            row["step_p20_s"] = min(r["p20_s"] for r in runs)
            row["step_p80_s"] = max(r["p80_s"] for r in runs)
            row["step_pass_medians_s"] = [r["median_s"] for r in runs]
            row["timing_method"] = runs[0]["method"]
            if len(runs) > 1:
                meds = [r["median_s"] for r in runs]
                row["pass_spread_pct"] = 100 * (max(meds) - min(meds)) / min(meds)
            if mixed is not None:
                by_bits = {b: _time_calls(lambda tb=tb: fn(x, tb, **kw), device, args.warmup, args.repeats,
                                          args.rep_ms)["median_s"] for b, tb in mixed_t.items()}
                counts = row["precision_plan"]
                row["step_s_by_precision"] = {f"A{b}": v for b, v in by_bits.items()}
                row["step_s"] = sum(v * counts[f"A{b}"] for b, v in by_bits.items()) / sum(counts.values())
                row["mixed_note"] = (f"step_s = plan-weighted mean of the per-precision step medians over "
                                     f"{args.calib_steps} steps ({counts})")

            if args.cuda_graphs and device.startswith("cuda"):
                try:
                    replay = _graph_callable(call, device)
                    g = _time_calls(replay, device, args.warmup, args.repeats, args.rep_ms)
                    row["step_graph_s"] = g["median_s"]
                except Exception as e:  # noqa: BLE001
                    row["step_graph_s"] = None
                    row["graph_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    torch.cuda.synchronize()

            cfg_size = unet.config.sample_size
            if args.e2e_steps > 0 and scn.resolution and scn.resolution != cfg_size:
                row["e2e_note"] = (f"e2e skipped: qdcompile.sample draws latents at the config's sample_size "
                                   f"({cfg_size}), not --resolution {scn.resolution} (it would recompile)")
            elif args.e2e_steps > 0:
                # the sampler makes contiguous latents: hand them over in the timed layout, so that
                # a compiled model is not recompiled (Dynamo guards on strides) for sampling
                sampler_model = _LayoutAdapter(unet, fn, channels_last)
                e2e_sched = mixed.wrap_scheduler(sched) if mixed is not None else sched
                gen_times = []
                for i in range(args.e2e_repeats + 1):
                    g = torch.Generator().manual_seed(args.seed)
                    synchronize(device)
                    t0 = time.perf_counter()
                    qdcompile.sample(sampler_model, e2e_sched, num_images=scn.batch, num_inference_steps=args.e2e_steps,
                                     generator=g, sample_kwargs=kw, progress=False, to_image=False)
                    synchronize(device)
                    if i:  # the first run warms up the scheduler path
                        gen_times.append(time.perf_counter() - t0)
                row["e2e_steps"] = args.e2e_steps
                row["graphs_compiled_after_first_call"] = _graph_count() - graphs0  # 0 = no recompilation
                row["e2e_s"] = statistics.median(gen_times)
                row["e2e_scheduler"] = type(sched).__name__

            if cid in args.profile_set or (args.profile_all and cid != "fp-eager"):
                row["profile"] = profile_breakdown(call, device, steps=args.profile_steps)

        if c_census is not None:
            if cid == "torchao-int8":
                s = model_size(c_census, qdcompile.QuantRecipe.w8a8(), float_bytes=2, ops=("linear",))
            else:
                s = model_size(c_census, recipe, float_bytes=2 if dtype == torch.float16 else 4)
            row["weight_bytes"] = s.total_bytes
            row["weight_bytes_detail"] = s.bytes
            row["floor_s"] = _floor_seconds(c_census, recipe if cid.startswith("qdiff") else None, cid, ceilings)
        row["setup_s"] = time.perf_counter() - t_setup
    except Exception as e:  # noqa: BLE001 - one contender failing must not stop the run
        import traceback

        row.update(status="error", reason=f"{type(e).__name__}: {str(e)[:500]}",
                   traceback=traceback.format_exc()[-3000:])
    finally:
        del fn, unet, meta
        torch._dynamo.reset()
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    return row


def _floor_seconds(c: Census, recipe, cid: str, ceil: dict) -> float | None:
    """Compute floor of one step from the measured ceilings: float MACs at the fp16 rate,
    quantized MACs at the int8 rate (Hopper has no int4 MMA: W4 runs at the int8 rate);
    attention matmuls at the fp16 rate. Memory traffic is ignored (the U-Net is compute-bound)."""
    fp, i8 = ceil.get("fp16_matmul_TFLOPs"), ceil.get("int8_matmul_TOPs")
    if not fp:
        return None
    q_macs = f_macs = 0
    for layer in c.layers:
        wb, ab, _ = layer_precision(layer, recipe)
        if cid == "torchao-int8":
            wb, ab = (8, 8) if layer.op == "linear" else (None, None)
        if wb is not None and ab is not None and i8:
            q_macs += layer.macs
        else:
            f_macs += layer.macs
    f_macs += c.attn_macs
    return 2 * f_macs / (fp * 1e12) + (2 * q_macs / (i8 * 1e12) if q_macs else 0.0)


def _device_slug(info: dict) -> str:
    name = info.get("gpu") or "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def _write_results(payload: dict, out_dir: Path, stem: str) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out_dir / f"{stem}.json"), "csv": str(out_dir / f"{stem}.csv")}
    write_json(paths["json"], payload)
    cols = ["scenario", "contender", "label", "status", "dtype", "batch", "step_ms", "step_graph_ms", "speedup_vs_compiled",
            "speedup_vs_eager", "e2e_s", "e2e_steps", "compile_s", "calibration_s", "weight_MB", "resident_MB",
            "peak_MB", "snr_db_vs_fp_eager", "floor_ms", "pass_spread_pct", "reason"]

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for r in payload["rows"]:
                w.writerow(_flat_row(r))

    atomic_write(paths["csv"], write_csv)
    return paths


def _flat_row(r: dict) -> dict:
    ms = lambda k: None if r.get(k) is None else round(r[k] * 1e3, 3)  # noqa: E731
    mb = lambda k: None if r.get(k) is None else round(r[k] / MB, 1)  # noqa: E731
    return {**{k: r.get(k) for k in ("scenario", "contender", "label", "status", "dtype", "batch", "e2e_steps",
                                     "speedup_vs_compiled", "speedup_vs_eager", "reason", "pass_spread_pct")},
            "step_ms": ms("step_s"), "step_graph_ms": ms("step_graph_s"), "floor_ms": ms("floor_s"),
            "e2e_s": None if r.get("e2e_s") is None else round(r["e2e_s"], 3),
            "compile_s": None if r.get("compile_s") is None else round(r["compile_s"], 1),
            "calibration_s": None if r.get("calibration_s") is None else round(r["calibration_s"], 1),
            "weight_MB": mb("weight_bytes"), "resident_MB": mb("resident_bytes"), "peak_MB": mb("peak_bytes"),
            "snr_db_vs_fp_eager": None if r.get("snr_db_vs_fp_eager") is None else round(r["snr_db_vs_fp_eager"], 2)}


def _add_speedups(rows: list[dict]) -> None:
    by_scn: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_scn.setdefault(r["scenario"], {})[r["contender"]] = r
    for scn, rs in by_scn.items():
        comp = rs.get("fp-compiled", {}).get("step_s")
        eager = rs.get("fp-eager", {}).get("step_s")
        for r in rs.values():
            s = r.get("step_s")
            r["speedup_vs_compiled"] = round(comp / s, 3) if (comp and s) else None
            r["speedup_vs_eager"] = round(eager / s, 3) if (eager and s) else None


def format_latency_table(rows: list[dict]) -> str:
    flat = [_flat_row(r) for r in rows]
    for f, r in zip(flat, rows):
        f["status_or_reason"] = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"[:90]
    return _fmt_table(flat, [("scenario", "scenario", ""), ("label", "contender", ""), ("step_ms", "step ms", ".2f"),
                             ("step_graph_ms", "graph ms", ".2f"), ("speedup_vs_compiled", "x vs compiled", ".2f"),
                             ("e2e_s", "e2e s", ".2f"), ("compile_s", "compile s", ".1f"),
                             ("weight_MB", "weights MB", ".1f"), ("peak_MB", "peak MB", ".0f"),
                             ("snr_db_vs_fp_eager", "SNR dB", ".1f"), ("floor_ms", "floor ms", ".2f"),
                             ("status_or_reason", "status", "")])


def format_profiles(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        p = r.get("profile")
        if not p:
            continue
        lines.append(f"\n{r['scenario']} / {r['label']}: per-step time by category ({p['source']}, {p['steps']} steps)")
        for cat in _PROFILE_CATEGORIES:
            lines.append(f"  {cat:<42} {p['per_step_ms'][cat]:9.3f} ms  {100 * p['share'][cat]:5.1f} %")
        lines.append("  top kernels/ops:")
        for k in p["top"][:12]:
            lines.append(f"    {k['per_step_ms']:9.3f} ms  [{k['category']}]  {k['name'][:110]}")
    return "\n".join(lines)


def _plot(payload: dict, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        return f"PNG skipped: matplotlib unavailable ({type(e).__name__}: {e})"
    rows = [r for r in payload["rows"] if r.get("step_s")]
    if not rows:
        return "PNG skipped: no timed contender"
    prof = [r for r in rows if r.get("profile")]
    fig, axes = plt.subplots(1, 2 if prof else 1, figsize=(15 if prof else 9, 0.5 * len(rows) + 2.5), squeeze=False)
    ax = axes[0][0]
    labels = [f"{r['scenario']}: {r['label']}" for r in rows]
    vals = [r["step_s"] * 1e3 for r in rows]
    bars = ax.barh(range(len(rows)), vals, color=["#888" if r["contender"].startswith("fp") else
                                                   "#c60" if r["contender"].startswith("torchao") else "#06c"
                                                   for r in rows])
    for b, r in zip(bars, rows):
        sp = r.get("speedup_vs_compiled")
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {b.get_width():.2f} ms" + (f" ({sp:.2f}x)" if sp else ""),
                va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("U-Net step, median ms (speed-up vs float compiled)")
    ax.set_title(f"{payload['env'].get('gpu', 'cpu')} — torch {payload['env']['torch']}", fontsize=9)
    if prof:
        ax2 = axes[0][1]
        left = [0.0] * len(prof)
        for cat in _PROFILE_CATEGORIES:
            v = [r["profile"]["per_step_ms"][cat] for r in prof]
            ax2.barh(range(len(prof)), v, left=left, label=cat)
            left = [a + b for a, b in zip(left, v)]
        ax2.set_yticks(range(len(prof)), [f"{r['scenario']}: {r['label']}" for r in prof], fontsize=8)
        ax2.invert_yaxis()
        ax2.set_xlabel("ms per step by kernel category (profiler)")
        ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return str(path)


def _emit(payload: dict, out_dir: Path, stem: str, final: bool) -> dict[str, str]:
    _add_speedups(payload["rows"])
    paths = _write_results(payload, out_dir, stem)
    if final:
        prof = format_profiles(payload["rows"])
        ppath = out_dir / f"{stem}-profile.txt"
        atomic_write(ppath, (prof or "no profile collected") + "\n")
        paths["profile"] = str(ppath)
        paths["png"] = _plot(payload, out_dir / f"{stem}.png")
    return paths


def run_latency(args) -> int:
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    if args.merge:
        return _merge(args)
    cuda = dev.startswith("cuda")
    if not cuda and os.environ.get("QDCOMPILE_INDUCTOR") is None:
        os.environ["QDCOMPILE_INDUCTOR"] = "0"   # the qdiff backend runs its rewritten graph without Inductor
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("fp16" if cuda else "fp32")]
    threads = args.threads or (1 if (args.smoke and not cuda) else None)
    if threads:
        torch.set_num_threads(threads)   # a busy shared CPU makes OpenMP thread teams crawl
    if args.smoke:
        models, batches = args.models or ["tiny"], [1]
        args.repeats, args.warmup, args.timing_passes, args.rep_ms = 2, 1, 1, 50
        args.e2e_steps, args.e2e_repeats = min(args.e2e_steps, 2), 1
        args.calib_samples, args.calib_steps, args.profile_steps = 1, 2, 1
    else:
        models = args.models or (["sd15"] if cuda else ["reference"])
        batches = args.batch or ([2] if cuda else [1])
    if args.model_dir:
        models = [args.model_dir]
    contenders = list(args.contenders or (SMOKE_CONTENDERS if args.smoke else DEFAULT_CONTENDERS))
    if args.max_autotune and "fp-compiled-max-autotune" not in contenders:
        contenders.insert(contenders.index("fp-compiled") + 1 if "fp-compiled" in contenders else 1,
                          "fp-compiled-max-autotune")
    if "fp-eager" in contenders:  # the reference output of every scenario comes from the first, eager, run
        contenders.remove("fp-eager")
    contenders.insert(0, "fp-eager")
    args.profile_set = set(args.profile if args.profile is not None else
                           ["fp-compiled", "qdiff-w8a8", "qdiff-w4a8", "torchao-int8"])
    if cuda:
        torch.backends.cudnn.benchmark = True

    budget = _Budget(args.budget_s)
    try:
        from diffusers.utils import logging as dlogging

        dlogging.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass
    env = device_info(dev)
    stamp = _dt.datetime.now()
    scenarios = [Scenario(m, b, args.resolution) for m in models for b in batches]
    stem = f"latency-{_device_slug(env)}-{stamp:%Y-%m-%d}" + (f"-{args.tag}" if args.tag else
                                                              "-" + "_".join(s.tag for s in scenarios))
    out_dir = Path(args.out_dir)
    payload: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "argv": sys.argv, "date": stamp.isoformat(),
        "env": env, "settings": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()
                                 if k not in ("func",)},
        "notes": _notes(cuda), "ceilings": {}, "rows": [],
    }
    print(f"qdcompile latency benchmark on {env.get('gpu')} (torch {env['torch']}, triton {env.get('triton')}, "
          f"diffusers {env.get('diffusers')})")
    if not cuda:
        print("NOTE: CPU run — the qdiff layers run the pure-torch reference integer path; "
              "CPU timings say nothing about GPU speed.")
    print(f"scenarios: {[s.tag for s in scenarios]}; contenders: {contenders}; budget {args.budget_s:.0f}s")
    if cuda and not args.no_ceilings:
        try:
            payload["ceilings"] = measure_ceilings(dev)
        except Exception as e:  # noqa: BLE001
            payload["ceilings"] = {"error": f"{type(e).__name__}: {e}"}
        print(f"{budget.line()} measured ceilings: {payload['ceilings']}")
    ref_out: dict[str, torch.Tensor] = {}
    poisoned: str | None = None   # a sticky CUDA error leaves the context unusable for what follows
    for scn in scenarios:
        c = None
        try:
            if scn.model in UNET_CONFIGS or scn.model == "reference":
                meta_model, _, _ = _load_model(scn, "meta", torch.float32, 0) if scn.model != "reference" else \
                    _load_model(scn, "cpu", torch.float32, 0)
                c = census(meta_model, batch=scn.batch, resolution=scn.resolution, name=scn.model)
                del meta_model
            else:
                c = census(meta_unet_from_folder(scn.model), batch=scn.batch, resolution=scn.resolution,
                           name=scn.model)
        except Exception as e:  # noqa: BLE001
            print(f"  (no size/MAC census for {scn.tag}: {type(e).__name__}: {e})")
        if c is not None:
            payload.setdefault("census", {})[scn.tag] = {"params": c.total_params, "GMACs_layers": c.layer_macs / 1e9,
                                                         "GMACs_attention": c.attn_macs / 1e9}
        for cid in contenders:
            print(f"{budget.line()} {scn.tag}: {cid} ...", flush=True)
            t_start = budget.elapsed
            if poisoned:
                row = {"scenario": scn.tag, "model": scn.model, "batch": scn.batch, "contender": cid,
                       "label": _contender_label(cid, dtype), "status": "skipped",
                       "reason": f"CUDA context unusable after an error in {poisoned}: rerun with --contenders"}
            else:
                row = _run_one(cid, scn, args, dev, dtype, ref_out, c, budget, payload["ceilings"])
            if cuda and row["status"] == "error" and re.search(
                    r"CUDA error|illegal (memory|instruction)|device-side assert|unspecified launch failure",
                    row.get("reason", "") + row.get("traceback", "")):
                poisoned = f"{scn.tag}/{cid}"
            row["elapsed_at_end_s"] = budget.elapsed
            if row["status"] == "ok":
                budget.record(cid, budget.elapsed - t_start)
            payload["rows"].append(row)
            msg = (f"step {row['step_s'] * 1e3:.3f} ms" if row.get("step_s") else
                   f"{row['status']}: {row.get('reason', '')}")
            extra = "".join(f", {k} {row[k]:.1f}s" for k in ("calibration_s", "compile_s") if row.get(k))
            print(f"{budget.line()}   -> {msg}{extra}", flush=True)
            _emit(payload, out_dir, stem, final=False)
    if cuda:
        payload["env"]["nvidia_smi_after"] = _nvidia_smi()
    paths = _emit(payload, out_dir, stem, final=True)
    print()
    print(format_profiles(payload["rows"]))
    print("\n" + format_latency_table(payload["rows"]))
    if not cuda:
        print("\nCPU timings say nothing about GPU speed (reference integer path, float64 math).")
    print("\n" + "\n".join(f"wrote {v}" if not v.startswith("PNG skipped") else v for v in paths.values()))
    print(f"total {budget.elapsed:.1f}s")
    return 0


def _notes(cuda: bool) -> list[str]:
    n = ["step: median time of one U-Net call on fixed random inputs (triton.testing.do_bench on CUDA: CUDA events, "
         "L2 flushed between calls; several passes, their medians kept to show the run-to-run spread)",
         "graph: the same call captured in a CUDA graph and replayed (--cuda-graphs)",
         "e2e: qdcompile.sample over --e2e-steps scheduler steps, batch = scenario batch (a CFG batch of 2 is timed "
         "as 2 latents with their own text embeddings: the same U-Net cost), median of --e2e-repeats runs after one "
         "warm-up run; no CUDA graph",
         "compile_s: first call (Dynamo + Inductor + Triton autotuning of the qdiff kernels); calibration_s apart",
         "weights MB: stored format (quantized codes + scales + float params at the run dtype), from the census; "
         "resident MB: GPU memory held after setup (for qdiff this includes the float weights, which the module keeps)",
         "peak MB: max_memory_allocated during two steps, from the contender's start (weights + activations)",
         "SNR dB: U-Net output vs the float eager output on the same inputs (random weights, cheap calibration: "
         "a smoke signal for broken kernels, not a quality number)",
         "floor ms: float MACs at the measured fp16 matmul rate + quantized MACs at the measured int8 rate "
         "(attention matmuls float); memory traffic ignored",
         "qdiff mixed precision: PTQD sampler (W4A4/A8 per step + corrections), plan from a cheap RTN "
         "calibration; its step time is the plan-weighted mean of the per-precision steps"]
    if not cuda:
        n.insert(0, "CPU run: CPU timings say nothing about GPU speed")
    return n


def _merge(args) -> int:
    """Combine several result JSONs (same device) into one table/JSON/CSV/PNG."""
    payloads = [json.loads(Path(p).read_text()) for p in args.merge]
    gpus = {p["env"].get("gpu") for p in payloads}
    if len(gpus) > 1:
        print(f"warning: merging results from different devices {gpus}: compare timings only within a device")
    merged = dict(payloads[0])
    merged["rows"] = [r for p in payloads for r in p["rows"]]
    merged["merged_from"] = [str(p) for p in args.merge]
    merged["commands"] = [p["command"] for p in payloads]
    stem = args.tag or ("latency-" + _device_slug(merged["env"]) + f"-{_dt.datetime.now():%Y-%m-%d}-merged")
    paths = _emit(merged, Path(args.out_dir), stem, final=True)
    print(format_latency_table(merged["rows"]))
    print("\n" + "\n".join(f"wrote {v}" for v in paths.values()))
    return 0


def add_latency_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=None,
                   help="sd15 | sdxl | reference | tiny (default: sd15 on CUDA, reference on CPU)")
    p.add_argument("--model", dest="model_dir", default=None, help="a diffusers folder (real checkpoint) instead")
    p.add_argument("--batch", nargs="+", type=int, default=None, help="batch sizes (default: 2 on CUDA = CFG, 1 on CPU)")
    p.add_argument("--resolution", type=int, default=None, help="latent resolution (default: the config's)")
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=None,
                   help=f"default: {' '.join(DEFAULT_CONTENDERS)} (fp-eager always runs first: it is the reference)")
    p.add_argument("--max-autotune", action="store_true", help="add fp-compiled-max-autotune (slow compile)")
    p.add_argument("--cuda-graphs", action="store_true", help="also time CUDA-graph replay of each contender")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None, help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--memory-format", choices=["auto", "channels_last", "contiguous"], default="auto",
                   help="auto: channels_last on CUDA (all contenders), contiguous on CPU")
    p.add_argument("--calib-samples", type=int, default=2, help="qdiff calibration samples (speed runs: cheap)")
    p.add_argument("--calib-steps", type=int, default=4, help="qdiff calibration sampling steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20, help="timed calls per pass (when do_bench is not used)")
    p.add_argument("--rep-ms", type=float, default=1500.0, help="do_bench time budget per pass (ms)")
    p.add_argument("--timing-passes", type=int, default=2, help="independent timing passes (spread = noise)")
    p.add_argument("--e2e-steps", type=int, default=20, help="end-to-end sampling steps (0: skip)")
    p.add_argument("--e2e-repeats", type=int, default=2)
    p.add_argument("--profile", nargs="*", default=None,
                   help="contenders to profile per kernel category (default: fp-compiled qdiff-w8a8 qdiff-w4a8 "
                        "torchao-int8; none: --profile with no names)")
    p.add_argument("--profile-all", action="store_true")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="wall-clock budget of the run: a contender is skipped when the last one of its family "
                        "(eager / Inductor / qdiff) took longer than the time left; results are written as they come")
    p.add_argument("--no-ceilings", action="store_true", help="skip measuring fp16/int8 matmul and copy ceilings")
    p.add_argument("--cpu-inductor", action="store_true", help="on CPU, also run the Inductor contenders")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 for --smoke on CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument("--tag", default=None, help="file name suffix (default: the scenarios)")
    p.add_argument("--smoke", action="store_true", help="tiniest run (tiny random UNet2DModel unless --models, batch 1, few repeats, cheapest calibration)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="merge earlier result files and exit")


# ============================================================================ CLI glue
def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``qdcompile bench {latency,size}`` to a ``qdcompile`` sub-parser set."""
    p = subparsers.add_parser("bench", help="benchmarks: end-to-end latency/memory, model size and BOPs")
    sub = p.add_subparsers(dest="bench_command", required=True)
    lat = sub.add_parser("latency", help="U-Net step / sampling latency, memory, compile time vs FP16 and torchao")
    add_latency_arguments(lat)
    size = sub.add_parser("size", help="model size and BOPs of U-Net configs under the recipes")
    add_size_arguments(size)
    p.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args) -> int:
    if getattr(args, "bench_command", None) == "size":
        return run_size(args)
    return run_latency(args)
