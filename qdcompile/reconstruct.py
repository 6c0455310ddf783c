"""Block reconstruction (BRECQ) with AdaRound weight rounding and LSQ-style activation
step sizes — the calibration of Q-Diffusion (METHODS §2).

The U-Net is cut into units: each module whose class is in ``recipe.recon_units``
(diffusers ``ResnetBlock2D``, ``BasicTransformerBlock``, ``Attention``; the outermost one
wins) holds the quantized layers inside it; every other quantized conv/linear is a unit
of its own. Units are reconstructed in forward order. For each unit:

* **Data.** Its inputs are captured from the model *quantized so far* (finished units run
  their final fake-quant records, later ones are float), its targets are the float model's
  outputs on float inputs. So each unit learns to undo the error that reaches it from
  upstream, as in BRECQ/Q-Diffusion, and is tuned on the inputs it will really see.
* **Weights (AdaRound).** With the unit's activations in float, a soft rounding variable
  ``V`` per weight gives ``Ŵ = s · clamp(floor(W/s) + h(V), qmin, qmax)`` (on the asymmetric grid
  ``Ŵ = s · (clamp(floor(W/s) + h(V) + z, 0, 2^b − 1) − z)``),
  ``h(V) = clamp(sigmoid(V)·(ζ − γ) + γ, 0, 1)``, initialised so that ``Ŵ = W`` (inside the clipping range). Adam
  minimises the unit-output error plus ``λ · Σ 1 − |2h(V) − 1|^β``; the regularizer is off
  for a warm-up fraction, then ``β`` falls linearly from 20 to 2, pushing every ``h`` to 0
  or 1. The hard rounding ``V ≥ 0`` becomes ``rounding_offset`` of
  :func:`~qdcompile.kernels.quantizers.quantize_weight` (scales are not changed).
* **Activations (LSQ).** With the hard-rounded weights, each layer input (each part of a
  split layer) is fake-quantized with a straight-through round; Adam learns ``log Δ``
  from the observed range's ``Δ``, the integer zero point ``Z`` is kept. So the result is
  the METHODS §1 quantizer of the range ``[−ZΔ, (2^b − 1 − Z)Δ]``.

Each phase keeps its result only if it lowers the unit-output error on the whole
calibration set (otherwise the round-to-nearest codes / observed ranges stay), and every
unit's minibatches come from a generator seeded by ``(seed, unit index)``, so a run
resumed after unit ``k`` equals an uninterrupted one.

The error is the squared difference summed over channels, averaged over the batch and
positions (BRECQ's reconstruction loss).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from tqdm.auto import tqdm

from .kernels.quantizers import act_qmax, quantize_weight, weight_qrange
from .metadata import LayerQuant, QuantMetadata
from .recipe import QuantRecipe
from .simulate import simulate
from .split import scale_map, zero_point_map
from .sampling import call_unet, unwrap

logger = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1   # AdaRound's rectified-sigmoid stretch
UnitDone = Callable[[int, dict[str, LayerQuant], list[dict[str, Any]]], None]


@dataclass
class Unit:
    """A block reconstructed as one: a module and the quantized layers inside it."""

    name: str
    module: nn.Module
    layers: list[str]
    calls: int = 1   # calls per U-Net forward


def reconstruction_units(unet: nn.Module, layer_names, recipe: QuantRecipe, x: torch.Tensor, t: torch.Tensor,
                         kwargs: dict[str, Any]) -> list[Unit]:
    """The units holding ``layer_names``, in the order one forward on ``(x, t, kwargs)`` runs them.
    Units that do not run are left out (their layers keep their records)."""
    base = unwrap(unet)
    modules = dict(base.named_modules())

    def owner(name: str) -> str:
        parts = name.split(".")
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i])
            if any(c.__name__ in recipe.recon_units for c in type(modules[prefix]).__mro__):
                return prefix
        return name

    groups: dict[str, list[str]] = {}
    for name in layer_names:
        groups.setdefault(owner(name), []).append(name)
    calls: dict[str, int] = {}

    def seen(name):
        return lambda module, args: calls.__setitem__(name, calls.get(name, 0) + 1)

    handles = [modules[u].register_forward_pre_hook(seen(u)) for u in groups]
    try:
        with torch.no_grad():
            call_unet(base, x, t, kwargs)
    finally:
        for h in handles:
            h.remove()
    missing = sorted(set(groups) - set(calls))
    if missing:
        logger.warning("not reconstructed (never executed): %s", missing)
    return [Unit(u, modules[u], groups[u], calls[u]) for u in calls]  # dicts keep insertion = forward order


# ---------------------------------------------------------------------------- captured data
class _Stop(Exception):
    """Raised by a capture hook once the unit has run: the rest of the U-Net is not needed."""


def _first_tensor(out: Any) -> torch.Tensor:
    if torch.is_tensor(out):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return out[0]


class Captured:
    """Trees of tensors (a block's ``(args, kwargs)`` or its output) captured over the
    calibration set, indexable by sample. Batch-first tensor leaves are concatenated (float
    ones as float32, on the CPU); other leaves are kept from the first call."""

    def __init__(self) -> None:
        self.spec = None
        self.batched: list[bool] = []
        self.leaves: list[Any] = []
        self.chunks: list[list[torch.Tensor]] = []

    def add(self, tree: Any, batch: int) -> None:
        leaves, spec = tree_flatten(tree)
        if self.spec is None:
            self.spec = spec
            self.batched = [torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batch for v in leaves]
            self.leaves = [None if b else v for v, b in zip(leaves, self.batched)]
            self.chunks = [[] for _ in leaves]
        elif spec != self.spec:
            raise RuntimeError("a reconstruction block was called with differently structured arguments")
        for i, (v, b) in enumerate(zip(leaves, self.batched)):
            if b:
                v = v.detach()
                self.chunks[i].append((v.float() if v.is_floating_point() else v).cpu())

    @classmethod
    def of(cls, tree: Any) -> "Captured":
        """One batch: every tensor leaf whose first dimension is the first leaf's is batched."""
        leaves, _ = tree_flatten(tree)
        batch = next(v.shape[0] for v in leaves if torch.is_tensor(v) and v.dim() > 0)
        store = cls()
        store.add(tree, batch)
        return store.finish()

    def finish(self) -> "Captured":
        self.leaves = [torch.cat(c) if b else v for c, b, v in zip(self.chunks, self.batched, self.leaves)]
        self.chunks = []
        return self

    def __len__(self) -> int:
        return next(v.shape[0] for v, b in zip(self.leaves, self.batched) if b)

    def get(self, idx: torch.Tensor, device: torch.device) -> Any:
        leaves = [v[idx].to(device) if b else (v.to(device) if torch.is_tensor(v) else v)
                  for v, b in zip(self.leaves, self.batched)]
        return tree_unflatten(leaves, self.spec)


@torch.no_grad()
def _capture(base: nn.Module, calib, unit: Unit, *, inputs: bool, outputs: bool,
             done: Optional[QuantMetadata] = None) -> tuple[Optional[Captured], Optional[Captured]]:
    """The unit's inputs and/or outputs over the calibration set, running the fake-quant
    records of ``done`` (float where it has none)."""
    ins, outs = (Captured() if inputs else None), (Captured() if outputs else None)
    state = {"batch": 0, "calls": 0}

    def pre(module, args, kwargs):
        if ins is not None:
            ins.add((args, kwargs), state["batch"])

    def post(module, args, kwargs, out):
        if outs is not None:
            outs.add(_first_tensor(out), state["batch"])
        state["calls"] += 1
        if state["calls"] == unit.calls:
            raise _Stop

    p = next(base.parameters())
    handles = [unit.module.register_forward_pre_hook(pre, with_kwargs=True),
               unit.module.register_forward_hook(post, with_kwargs=True)]
    try:
        with simulate(base, done) if done is not None else contextlib.nullcontext():
            for x, t, kw in calib.batches(p.device, p.dtype):
                state["batch"], state["calls"] = x.shape[0], 0
                try:
                    call_unet(base, x, t, kw)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    return (ins.finish() if ins is not None else None), (outs.finish() if outs is not None else None)


class _Data:
    """Minibatches (seeded) and full passes over one unit's captured inputs and targets."""

    def __init__(self, inputs: Captured, targets: Captured, batch_size: int, generator: torch.Generator,
                 device: torch.device):
        self.inputs, self.targets, self.bs, self.gen, self.device = inputs, targets, batch_size, generator, device
        self.n = len(targets)

    def batch(self):
        idx = torch.randint(self.n, (min(self.bs, self.n),), generator=self.gen)
        args, kwargs = self.inputs.get(idx, self.device)
        return args, kwargs, self.targets.get(idx, self.device)

    @torch.no_grad()
    def error(self, run: Callable) -> float:
        """Mean unit-output error over all captured samples."""
        total, count = 0.0, 0
        for i in range(0, self.n, 4 * self.bs):
            idx = torch.arange(i, min(self.n, i + 4 * self.bs))
            args, kwargs = self.inputs.get(idx, self.device)
            err = _error(run(args, kwargs), self.targets.get(idx, self.device))
            total, count = total + float(err.sum()), count + err.numel()
        return total / count


def _error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (dim 1 of NCHW, last dim otherwise), per position."""
    return (out.float() - target).pow(2).sum(dim=1 if out.dim() == 4 else -1)


# ---------------------------------------------------------------------------- quantized layers
def _fake_quant_ste(x: torch.Tensor, scale: torch.Tensor, zero_point: int, qmax: int) -> torch.Tensor:
    """METHODS §1 activation fake-quant with a straight-through round (gradients reach Δ, LSQ)."""
    v = x / scale
    v = v + (torch.round(v) - v).detach()
    return (torch.clamp(v + zero_point, 0, qmax) - zero_point) * scale


class _ActQuant(nn.Module):
    def __init__(self, channels: Optional[int], bits: int, scale: float, zero_point: int, device):
        super().__init__()
        self.channels, self.bits, self.zero_point, self.qmax = channels, bits, zero_point, act_qmax(bits)
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale), dtype=torch.float32, device=device))

    def scale(self) -> float:
        return float(self.log_scale.detach().exp())

    def forward(self, x):
        return _fake_quant_ste(x, self.log_scale.exp(), self.zero_point, self.qmax)


class _QLayer:
    """One quantized layer of the unit's float32 copy: its record, soft/hard weight rounding
    and input quantizers."""

    def __init__(self, key: str, module: nn.Module, rec: LayerQuant):
        self.key, self.module, self.rec = key, module, rec
        w = module.weight.detach().float()
        self.w, self.s = w, scale_map(rec).to(w.device)
        self.floor = torch.floor(w / self.s)
        self.qmin, self.qmax = weight_qrange(rec.weight_bits, asymmetric=rec.asymmetric)
        zp = zero_point_map(rec)
        self.z = zp.to(w.device) if zp is not None else torch.zeros((), device=w.device)
        self.codes = rec.weight_q.to(w.device).float()
        self.v: Optional[nn.Parameter] = None
        if rec.split:
            self.acts = [_ActQuant(p.channels, p.act_bits, p.act_scale, p.act_zero_point, w.device) for p in rec.split]
        elif rec.act_bits is not None:
            self.acts = [_ActQuant(None, rec.act_bits, rec.act_scale, rec.act_zero_point, w.device)]
        else:
            self.acts = []
        self.quantize_input = False

    @property
    def param_name(self) -> str:
        return f"{self.key}.weight" if self.key else "weight"

    def weight(self) -> torch.Tensor:
        return self.s * (self.codes - self.z)

    def init_rounding(self) -> None:
        rest = self.w / self.s - self.floor
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def soft_weight(self) -> torch.Tensor:
        return self.s * (torch.clamp(self.floor + self.h() + self.z, self.qmin, self.qmax) - self.z)

    def adopt_rounding(self) -> None:
        """Hard-round ``V`` into ``rounding_offset`` and store the codes (per part)."""
        offset = (self.v.detach() >= 0).float()
        rec = self.rec
        if rec.split:
            sizes = [p.channels for p in rec.split]
            parts = [dataclasses.replace(p, weight_q=quantize_weight(
                         w, p.weight_scale.to(w.device), rec.weight_bits, rounding_offset=o,
                         zero_point=None if p.weight_zero_point is None else p.weight_zero_point.to(w.device)).cpu())
                     for p, w, o in zip(rec.split, torch.split(self.w, sizes, 1), torch.split(offset, sizes, 1))]
            self.rec = dataclasses.replace(rec, split=parts, weight_q=torch.cat([p.weight_q for p in parts], 1))
        else:
            zp = None if rec.weight_zero_point is None else rec.weight_zero_point.to(self.w.device)
            codes = quantize_weight(self.w, rec.weight_scale.to(self.w.device), rec.weight_bits, rounding_offset=offset,
                                    zero_point=zp)
            self.rec = dataclasses.replace(rec, weight_q=codes.cpu())
        self.codes = self.rec.weight_q.to(self.w.device).float()

    def input_hook(self, module, args):
        if not self.quantize_input:
            return None
        x = args[0]
        if len(self.acts) == 1 and self.acts[0].channels is None:
            return (self.acts[0](x), *args[1:])
        chunks = torch.split(x, [a.channels for a in self.acts], dim=1)
        return (torch.cat([a(c) for a, c in zip(self.acts, chunks)], dim=1), *args[1:])

    def record(self) -> LayerQuant:
        """The record with the learned step sizes (zero points unchanged)."""
        def act_range(a: _ActQuant) -> tuple[float, float]:
            s = a.scale()
            return (-a.zero_point * s, (a.qmax - a.zero_point) * s)

        rec = self.rec
        if rec.split:
            return dataclasses.replace(rec, split=[dataclasses.replace(p, act_scale=a.scale())
                                                   for p, a in zip(rec.split, self.acts)])
        if self.acts:
            return dataclasses.replace(rec, act_scale=self.acts[0].scale(), act_range=act_range(self.acts[0]))
        return rec


def _run(block: nn.Module, qlayers: list[_QLayer], weights: list[torch.Tensor]) -> Callable:
    params = {q.param_name: w for q, w in zip(qlayers, weights)}
    return lambda args, kwargs: _first_tensor(torch.func.functional_call(block, params, tuple(args), kwargs))


# ---------------------------------------------------------------------------- the two phases
def _adaround(block, qlayers: list[_QLayer], data: _Data, recipe: QuantRecipe, progress: bool) -> dict[str, float]:
    for q in qlayers:
        q.init_rounding()
    opt = torch.optim.Adam([q.v for q in qlayers], lr=recipe.recon_lr)
    iters, (b_start, b_end) = recipe.recon_iters, recipe.adaround_beta
    warmup = int(recipe.recon_warmup * iters)
    for it in tqdm(range(iters), desc="  AdaRound", leave=False, disable=not progress):
        args, kwargs, target = data.batch()
        loss = _error(_run(block, qlayers, [q.soft_weight() for q in qlayers])(args, kwargs), target).mean()
        if it >= warmup:
            beta = b_end + (b_start - b_end) * max(0.0, 1.0 - (it - warmup) / max(iters - warmup, 1))
            reg = sum((1 - (2 * q.h() - 1).abs().pow(beta)).sum() for q in qlayers)
            loss = loss + recipe.adaround_reg_weight * reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    rtn = data.error(_run(block, qlayers, [q.weight() for q in qlayers]))
    saved = [(q.rec, q.codes) for q in qlayers]
    for q in qlayers:
        q.adopt_rounding()
    ada = data.error(_run(block, qlayers, [q.weight() for q in qlayers]))
    if ada > rtn:
        logger.info("AdaRound did not beat round-to-nearest on this block (%.4g vs %.4g): kept rounding to nearest",
                    ada, rtn)
        for q, (rec, codes) in zip(qlayers, saved):
            q.rec, q.codes = rec, codes
    for q in qlayers:
        q.v = None
    return {"rtn_error": rtn, "adaround_error": ada}


def _lsq(block, qlayers: list[_QLayer], data: _Data, recipe: QuantRecipe, progress: bool) -> dict[str, float]:
    acts = [a for q in qlayers for a in q.acts]
    run = _run(block, qlayers, [q.weight() for q in qlayers])
    for q in qlayers:
        q.quantize_input = True
    try:
        before = data.error(run)
        init = [a.log_scale.detach().clone() for a in acts]
        opt = torch.optim.Adam([a.log_scale for a in acts], lr=recipe.act_lsq_lr)
        sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.act_lsq_iters, eta_min=0.0)
                 if recipe.act_lsq_schedule == "cosine" and recipe.act_lsq_iters > 0 else None)
        for _ in tqdm(range(recipe.act_lsq_iters), desc="  LSQ", leave=False, disable=not progress):
            args, kwargs, target = data.batch()
            loss = _error(run(args, kwargs), target).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
        after = data.error(run) if recipe.act_lsq_iters else before
        if after > before:
            with torch.no_grad():
                for a, v in zip(acts, init):
                    a.log_scale.copy_(v)
    finally:
        for q in qlayers:
            q.quantize_input = False
    return {"act_init_error": before, "act_lsq_error": min(before, after)}


def reconstruct_block(block: nn.Module, records: dict[str, LayerQuant], inputs: Captured, targets: Captured,
                      recipe: QuantRecipe, *, generator: Optional[torch.Generator] = None,
                      progress: bool = False) -> tuple[dict[str, LayerQuant], dict[str, Any]]:
    """AdaRound, then LSQ, on one block; return the new records and the errors per phase.

    ``records`` are keyed by layer name relative to ``block`` (``""`` when ``block`` is the
    layer itself); ``inputs`` hold ``(args, kwargs)`` of the block's calls, ``targets`` the
    outputs to match. A float32 copy of ``block`` is optimised; ``block`` is not modified.
    """
    device = next(block.parameters()).device
    copy_ = copy.deepcopy(block).float().requires_grad_(False)
    modules = dict(copy_.named_modules())
    qlayers = [_QLayer(key, modules[key], rec) for key, rec in records.items()]
    handles = [q.module.register_forward_pre_hook(q.input_hook) for q in qlayers if q.acts]
    data = _Data(inputs, targets, recipe.recon_batch_size, generator or torch.Generator().manual_seed(0), device)
    stats: dict[str, Any] = {"layers": len(qlayers), "samples": data.n}
    try:
        if recipe.recon_iters > 0:
            stats.update(_adaround(copy_, qlayers, data, recipe, progress))
        if any(q.acts for q in qlayers):
            stats.update(_lsq(copy_, qlayers, data, recipe, progress))
    finally:
        for h in handles:
            h.remove()
    return {q.key: q.record() for q in qlayers}, stats


def _reconstruct_unit(base: nn.Module, calib, unit: Unit, records: dict[str, LayerQuant],
                      done: dict[str, LayerQuant], recipe: QuantRecipe, generator: torch.Generator,
                      progress: bool) -> tuple[dict[str, LayerQuant], dict[str, Any]]:
    if done:
        inputs, _ = _capture(base, calib, unit, inputs=True, outputs=False,
                             done=QuantMetadata(recipe=recipe, model={}, layers=done))
        _, targets = _capture(base, calib, unit, inputs=False, outputs=True)
    else:  # nothing quantized upstream yet: one pass gives both
        inputs, targets = _capture(base, calib, unit, inputs=True, outputs=True)
    key = {name: ("" if name == unit.name else name[len(unit.name) + 1:]) for name in unit.layers}
    new, stats = reconstruct_block(unit.module, {key[n]: records[n] for n in unit.layers}, inputs, targets, recipe,
                                   generator=generator, progress=progress)
    return {n: new[key[n]] for n in unit.layers}, {"unit": unit.name, **stats}


def reconstruct(unet: nn.Module, calib, records: dict[str, LayerQuant], recipe: QuantRecipe, *, start: int = 0,
                stats: Optional[list[dict[str, Any]]] = None, on_unit_done: Optional[UnitDone] = None,
                seed: int = 0, progress: bool = True) -> tuple[dict[str, LayerQuant], list[dict[str, Any]]]:
    """Reconstruct the units of ``unet`` in forward order, starting at unit ``start``.

    ``records``: a record for every quantized layer (round-to-nearest to start with; for
    units before ``start`` their reconstructed records). After unit ``k``,
    ``on_unit_done(k + 1, records of units 0..k, stats)`` is called (the checkpoint hook).
    Returns the new records and per-unit statistics (errors before and after each phase).
    """
    base = unwrap(unet)
    records, stats = dict(records), list(stats or [])
    p = next(base.parameters())
    x, t, kw = next(calib.batches(p.device, p.dtype))
    kw = {k: (v[:1] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == x.shape[0] else v) for k, v in kw.items()}
    units = reconstruction_units(base, list(records), recipe, x[:1], t, kw)
    if start > len(units):
        raise ValueError(f"cannot resume at block {start}: this model has {len(units)} reconstruction blocks")
    bar = tqdm(total=len(units), initial=start, desc="reconstructing blocks", disable=not progress)
    try:
        for k in range(start, len(units)):
            unit = units[k]
            bar.set_postfix_str(unit.name)
            done = {n: records[n] for u in units[:k] for n in u.layers}
            generator = torch.Generator().manual_seed(seed * 100_003 + k)
            cuda = p.device.type == "cuda"
            if cuda:
                torch.cuda.reset_peak_memory_stats(p.device)
            t0 = time.perf_counter()
            new, unit_stats = _reconstruct_unit(base, calib, unit, records, done, recipe, generator, progress)
            unit_stats["seconds"] = time.perf_counter() - t0   # capture + AdaRound + LSQ of this block
            if cuda:
                unit_stats["peak_gpu_mb"] = torch.cuda.max_memory_allocated(p.device) / 2 ** 20
            records.update(new)
            stats.append(unit_stats)
            logger.info("block %d/%d %s: %s", k + 1, len(units), unit.name,
                        {k_: v for k_, v in unit_stats.items() if k_.endswith("error")})
            if on_unit_done is not None:
                on_unit_done(k + 1, {n: records[n] for u in units[:k + 1] for n in u.layers}, stats)
            bar.update()
    finally:
        bar.close()
    return records, stats
