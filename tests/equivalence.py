"""Checks that a compiled quantized model computes what its metadata says."""

from __future__ import annotations

import copy

import torch

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
