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

    A quantized network is discontinuous: a rounding-level difference in one activation can
    move a value across a code boundary, and that flip propagates. So "up to float rounding"
    is measured against the sensitivity of the simulation itself to float rounding: the same
    simulation run in float64 instead of float32. The compiled output may differ from the
    fp32 simulation by at most 3x that (plus 2e-5 relative for the case where neither flips).
    """
    sim32 = simulated(model, meta, *args, **kwargs)
    sim64 = simulated(model, meta, *args, dtype=torch.float64, **kwargs)
    rounding = rel(sim32, sim64)
    err = rel(sim32, out)
    assert err <= 3 * rounding + 2e-5, (
        f"compiled output differs from the fake-quant simulation by {err:.3e} (relative); float rounding "
        f"alone moves the simulation by {rounding:.3e}")
    return {"err": err, "rounding": rounding}
