"""Pure shape functions of the fast path: autotune pruning, split-K choice, int4-on-device choice,
per-tap weight sums, and the static sm_90 throughput model (no GPU, no compiler)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from qdcompile.kernels import prepare_weight, unpack_int4
from qdcompile.kernels.autotune import CANDIDATES, MAX_KEPT, kept_configs, split_k_for
from qdcompile.kernels.layout import device_weight_bits
from qdcompile.kernels.sm90_model import KernelFacts, LayerShape, fp16_seconds, int8_seconds, prefer_float

ROOT = Path(__file__).resolve().parents[2]


def _sd_shapes():
    spec = importlib.util.spec_from_file_location("bench_kernels_shapes", ROOT / "bench" / "kernels.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    gemms, convs = mod.sd_shapes("sd15")
    return [(g.m, g.n, g.k, False) for g in gemms] + [(*c.mnk(), c.split is not None) for c in convs]


def test_kept_configs_per_sd15_problem():
    for m, n, k, split in _sd_shapes() + [(2, 1280, 1280, False), (2, 320, 1280, False)]:
        kept = kept_configs(m, n, k, split)
        assert 1 <= len(kept) <= MAX_KEPT, (m, n, k, split, kept)
        assert set(kept) <= set(CANDIDATES)
        if m <= 256:
            assert all(t.block_m == 64 for t in kept), (m, kept)
        if split:
            assert all(t.block_m * t.block_n <= 128 * 64 for t in kept), kept


def test_split_k_only_where_the_tiles_cannot_fill_the_sms():
    assert split_k_for(8192, 320, 2880) == 1
    assert split_k_for(2048, 1280, 11520) == 1            # 160 tiles of 128×128: a full wave
    s = split_k_for(128, 1280, 11520)                      # 8² latent conv: 10 tiles
    assert s > 1 and 10 * s <= 132 and 11520 // s >= 1024
    assert split_k_for(154, 1280, 768) == 1                # short K: nothing to split


def test_device_weight_bits_and_prepared_int8_copy():
    assert device_weight_bits("linear", 1280, 1280, 2, 4) == 4
    assert device_weight_bits("conv2d", 320, 2880, 8192, 4) == 8
    assert device_weight_bits("conv2d", 320, 2880, 8192, 8) == 8
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (5, 3, 3, 3), generator=gen, dtype=torch.int8)
    packed, wide = prepare_weight(q, 4), prepare_weight(q, 4, device_bits=8)
    assert packed.bits == 4 and wide.bits == 8 and wide.w.dtype == torch.int8 and wide.w.shape == (5, 27)
    assert torch.equal(unpack_int4(packed.w, 27), wide.w) and torch.equal(packed.rowsum, wide.rowsum)
    with pytest.raises(ValueError, match="device_bits"):
        prepare_weight(q, 4, device_bits=2)


def test_tapsum_is_the_per_tap_weight_sum():
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(-128, 128, (7, 5, 3, 2), generator=gen, dtype=torch.int8)
    tapsum = prepare_weight(q, 8).tapsum
    assert tapsum.dtype == torch.int32 and tapsum.shape == (6, 7)
    want = q.to(torch.int32).sum(dim=1).reshape(7, 6).t()          # Σ over input channels, taps (kh, kw)
    assert torch.equal(tapsum, want)
    assert torch.equal(tapsum.sum(0), prepare_weight(q, 8).rowsum)
    assert prepare_weight(q.reshape(7, 30), 8).tapsum is None


def _facts(wait_depth: int, loop: int = 70, regs: int = 128) -> KernelFacts:
    return KernelFacts(128, 128, 64, 8, regs, 64 * 1024, loop, 600, wait_depth)


def test_model_monotone_and_prefers_float_only_where_it_should():
    big = LayerShape(8192, 1280, 5760, 2048 * 1280)
    assert int8_seconds(big, _facts(1)) <= int8_seconds(big, _facts(0))
    assert int8_seconds(big, _facts(0, loop=400)) > int8_seconds(big, _facts(0, loop=70))
    assert int8_seconds(big, _facts(0, regs=200)) >= int8_seconds(big, _facts(0, regs=128))   # 1 CTA/SM, not 2
    assert int8_seconds(LayerShape(8192, 1280, 11520, 2048 * 1280), _facts(0)) > int8_seconds(big, _facts(0))
    assert not prefer_float(big, {"t": _facts(0)})                   # compute-bound: int8 MMA is 2× FP16
    gemv = LayerShape(2, 1280, 1280, 2 * 1280)
    assert prefer_float(gemv, {"t": _facts(0)})                      # a GEMV: one tile, latency-bound
    assert fp16_seconds(gemv) > 0
