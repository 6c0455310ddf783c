"""Checks that a compiled quantized model computes what its metadata says."""

from __future__ import annotations

import contextlib
import copy
import sys

import torch

from qdcompile.metrics import snr_db
from qdcompile.simulate import simulate


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / a.float().norm())


@torch.no_grad()
def simulated(model, meta, *args, dtype=torch.float32, **kwargs) -> torch.Tensor:
    m = copy.deepcopy(model).to(dtype)
    cast = [a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    kw = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kwargs.items()}
    with simulate(m, meta):
        return m(*cast, **kw).sample.float()


def assert_matches_simulation(out: torch.Tensor, model, meta, *args, **kwargs) -> dict[str, float]:
    """``out`` (compiled integer model) must equal the fake-quant evaluation up to float rounding.

    Layer by layer the integer ops equal their fake-quant layers to < 1e-5 relative (see
    test_every_layer_matches_fake_quant_given_the_same_input). End to end, a quantized network
    is discontinuous: a rounding-level difference in one activation can move a value across a
    code boundary, and that flip propagates. So the end-to-end check accepts either
    * a difference within 3x of how far float rounding alone moves the simulation (the same
      simulation in float64 vs float32), or
    * a difference below 1/5 of the quantization error itself (simulation vs float model):
      flips move a few activations by one code step; a wrong scale, layer or bias moves the
      output by at least the quantization error.
    """
    sim32 = simulated(model, meta, *args, **kwargs)
    sim64 = simulated(model, meta, *args, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        fp = model(*args, **kwargs).sample.float()
    rounding, qerr, err = rel(sim32, sim64), rel(fp, sim32), rel(sim32, out)
    assert err <= max(3 * rounding + 2e-5, 0.2 * qerr), (
        f"compiled output differs from the fake-quant simulation by {err:.3e} (relative); float rounding "
        f"alone moves the simulation by {rounding:.3e}; quantization error {qerr:.3e}")
    return {"err": err, "rounding": rounding, "qerr": qerr}


# ---------------------------------------------------------------------------- float64 fake-quant reference
# A quantized network is a discontinuous function of its inputs: where a layer input lies within
# float rounding of a code boundary (x/Δ + Z ≈ k + ½), an fp32 evaluation (the compiled model) and a
# float64 one can pick adjacent codes. That one-code flip moves hundreds of downstream values by a
# good part of a code step, which flips more codes, layer after layer, until the two outputs differ
# by about as much as quantization noise itself (measured: one flip of 300k codes in a tiny W4A8
# U-Net took the difference from 146 dB to 33 dB). Some ties recur on many inputs: a layer that
# reads another quantized layer's output directly (an upsampler conv feeding the next block's split
# shortcut) sees in channel n only the values bias_n + Δ·s_n·j (j integer), and a j whose value
# lies within rounding of a boundary flips wherever it occurs. Neither output is wrong: both are
# evaluations of the metadata. So the check below is exact where the metadata defines one answer
# and lets the compiled model choose only at code boundaries it lies within float rounding of: the
# float64 reference follows the code the compiled model used wherever its own code differs,
# provided the float64 value is within ``tie_tol`` code units of the boundary between the two codes
# (anything else is a defect and fails, naming the layer). Every quantizer's input must also agree
# with the compiled model's to float rounding, so a quantizer applied to another tensor fails too.

def _part_key(w_scale: torch.Tensor, act_scale: float, act_zero_point: int, act_bits: int) -> tuple:
    return (w_scale.detach().float().cpu().numpy().tobytes(), float(act_scale), int(act_zero_point), int(act_bits))


def _record_parts(rec) -> list[tuple]:
    """(channels, weight scale, Δ, Z, bits) of each quantized input part of a record (none: weight-only)."""
    if rec.split:
        return [(p.channels, p.weight_scale, p.act_scale, p.act_zero_point, p.act_bits) for p in rec.split]
    if rec.act_bits is None:
        return []
    return [(None, rec.weight_scale, rec.act_scale, rec.act_zero_point, rec.act_bits)]


@contextlib.contextmanager
def integer_op_inputs(meta):
    """Within the block, ``{layer: [[(input, Δ, Z, bits) per part] per call]}``: the float activations
    the qdiff integer ops were given and the quantizers they applied, attributed to ``meta``'s layers
    by their weight scales and activation quantizers."""
    owners: dict[tuple, str] = {}
    for name, rec in meta.layers.items():
        parts = _record_parts(rec)
        if parts:
            key = tuple(_part_key(*p[1:]) for p in parts)
            if key in owners:
                raise ValueError(f"layers {owners[key]!r} and {name!r} have identical quantizers: "
                                 "cannot attribute integer op calls to layers")
            owners[key] = name
    seen: dict[str, list[list[torch.Tensor]]] = {}

    def recording(run):
        def wrapper(parts, *args, **kwargs):
            key = tuple(_part_key(p.w_scale, p.act_scale, p.act_zero_point, p.act_bits) for p in parts)
            if key not in owners:
                raise AssertionError("a qdiff integer op ran with weight scales / activation quantizers of no layer "
                                     f"of the metadata (Δ {[p.act_scale for p in parts]})")
            seen.setdefault(owners[key], []).append([(p.x.detach().clone(), p.act_scale, p.act_zero_point, p.act_bits)
                                                     for p in parts])
            return run(parts, *args, **kwargs)
        return wrapper

    # every loaded copy of the ops module: under `python -m pytest` the repository root is on sys.path and
    # diffusers' optional `from kernels import get_kernel` imports kernels/ a second time as `kernels`,
    # whose import registers torch.ops.qdiff.* again (the copy registered last runs)
    copies = [m for n, m in list(sys.modules.items()) if n.endswith("kernels.ops") and hasattr(m, "run_qconv2d")]
    saved = [(m, m.run_qgemm, m.run_qconv2d) for m in copies]
    for m, gemm, conv in saved:
        m.run_qgemm, m.run_qconv2d = recording(gemm), recording(conv)
    try:
        yield seen
    finally:
        for m, gemm, conv in saved:
            m.run_qgemm, m.run_qconv2d = gemm, conv


def _codes64(x: torch.Tensor, scale: float, zero_point: int, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale) + zero_point, 0, 2 ** bits - 1)


def _codes32(x: torch.Tensor, scale: float, zero_point: int, bits: int) -> torch.Tensor:
    """The codes of METHODS §1 computed as the kernels do: the fp32 quotient, rounded half to even."""
    q = torch.round(x.float() / torch.tensor(scale, dtype=torch.float32))
    return torch.clamp(q.double() + zero_point, 0, 2 ** bits - 1)


@torch.no_grad()
def fake_quant64(model, meta, *args, follow=None, tie_tol: float = 1e-3, input_tol: float = 1e-4, **kwargs):
    """Float64 output of the fake-quant model built from ``meta.layers`` alone (``Ŵ = s·q`` per output
    channel and per split part, ``x̂ = Δ·(clamp(round(x/Δ) + Z, 0, 2^b − 1) − Z)`` on each recorded
    layer's input, everything else float64), and the code decisions it took from ``follow``.

    ``follow``: :func:`integer_op_inputs` of the compiled model on the same input. Where its code
    differs from the float64 one, the reference takes it if the float64 value lies within
    ``tie_tol`` code units of the boundary between the two codes, and raises otherwise; each
    followed input must equal the float64 one to ``input_tol`` (relative)."""
    m = copy.deepcopy(model).double()
    modules = dict(m.named_modules())
    followed: list[tuple[str, int, float]] = []   # (layer, codes taken, worst distance to the boundary)
    calls: dict[str, int] = {}

    def hook(name, rec):
        parts = _record_parts(rec)
        dim = 1 if rec.op == "conv2d" else -1

        def pre(mod, a):
            x = a[0]
            chunks = torch.split(x, [p[0] for p in parts], dim=dim) if rec.split else (x,)
            got = None
            if follow is not None:
                i = calls.get(name, 0)
                calls[name] = i + 1
                if name not in follow or i >= len(follow[name]):
                    raise AssertionError(f"layer {name!r}: call {i} ran in the reference but not on the "
                                         "integer kernels")
                got = follow[name][i]
            out = []
            for j, (chunk, (_, _, scale, zp, bits)) in enumerate(zip(chunks, parts)):
                q = _codes64(chunk, scale, zp, bits)
                if got is not None:
                    x32, *used = got[j]
                    if x32.dtype == torch.int8:
                        # producer-side quantization: the op got the int8 signed codes q − 2^(b−1); they are
                        # held to the code rule below (a wrong tensor or quantizer moves codes off any tie)
                        if x32.shape != chunk.shape:
                            raise AssertionError(f"layer {name!r} part {j}: the integer op's codes have shape "
                                                 f"{list(x32.shape)}, the reference's input {list(chunk.shape)}")
                        q32 = x32.double() + (1 << (used[2] - 1))
                    else:
                        drift = float((x32.double() - chunk).norm() / chunk.norm().clamp_min(1e-300))
                        if x32.shape != chunk.shape or drift > input_tol:
                            raise AssertionError(
                                f"layer {name!r} part {j}: the integer op's input differs from the reference's by "
                                f"{drift:.3g} (relative; shapes {list(x32.shape)} vs {list(chunk.shape)}): the layers "
                                "before it compute something else than the metadata says, or this is not the tensor "
                                "it quantizes")
                        q32 = _codes32(x32, *used)
                    differ = q32 != q
                    if differ.any():
                        boundary = (q32[differ] + q[differ]) / 2 - zp
                        dist = (chunk[differ] / scale - boundary).abs()
                        step = (q32[differ] - q[differ]).abs()
                        if bool((step != 1).any()) or float(dist.max()) > tie_tol:
                            raise AssertionError(
                                f"layer {name!r} part {j}: {int(differ.sum())} of {q.numel()} activation codes "
                                f"differ from the float64 fake-quant (up to {int(step.max())} codes, "
                                f"{float(dist.max()):.3g} code units from a rounding boundary; ties allow "
                                f"{tie_tol:g}); the integer op quantized with (Δ, Z, bits) = {tuple(used)}, "
                                f"the metadata says {(scale, zp, bits)}")
                        followed.append((name, int(differ.sum()), float(dist.max())))
                        q = torch.where(differ, q32, q)
                out.append(scale * (q - zp))
            return (torch.cat(out, dim=dim) if rec.split else out[0], *a[1:])
        return pre

    for name, rec in meta.layers.items():
        mod = modules[name]
        ws = ([(p.weight_q, p.weight_scale, p.weight_zero_point) for p in rec.split] if rec.split
              else [(rec.weight_q, rec.weight_scale, rec.weight_zero_point)])
        mod.weight.data = torch.cat([(q.double() - (0 if z is None else z.double().reshape(-1, *[1] * (q.dim() - 1))))
                                     * s.double().reshape(-1, *[1] * (q.dim() - 1)) for q, s, z in ws], 1)
        if _record_parts(rec):
            mod.register_forward_pre_hook(hook(name, rec))
    cast = [v.double() if torch.is_tensor(v) and v.is_floating_point() else v for v in args]
    kw = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kwargs.items()}
    out = m(*cast, **kw).sample
    if follow is not None:
        missing = {n: len(v) - calls.get(n, 0) for n, v in follow.items() if len(v) != calls.get(n, 0)}
        if missing:
            raise AssertionError(f"integer op calls with no counterpart in the reference: {missing}")
    return out, followed


def assert_equals_fake_quant64(compiled, model, meta, *args, max_rel: float = 1e-5, reference_meta=None,
                               **kwargs) -> dict:
    """Run ``compiled`` (a qdiff-compiled ``model`` with ``meta`` attached) and assert its output equals
    the float64 fake-quant of ``reference_meta`` (default ``meta``) to float rounding (``max_rel``),
    following its code choices only at rounding ties (see :func:`fake_quant64`). Returns the
    measurements: ``snr_db`` of the compiled output against that reference, the ``followed``
    decisions (layer, codes, distance to the boundary), and both outputs."""
    with torch.no_grad(), integer_op_inputs(meta) as seen:
        out = compiled(*args, **kwargs).sample
    ref, followed = fake_quant64(model, reference_meta or meta, *args, follow=seen, **kwargs)
    err = rel(ref, out)
    assert err <= max_rel, (f"compiled output differs from the float64 fake-quant of its metadata by {err:.3e} "
                            f"(relative, {snr_db(ref, out):.1f} dB) after following {followed} at rounding ties")
    return {"snr_db": snr_db(ref, out), "followed": followed, "out": out, "ref": ref}
