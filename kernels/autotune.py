"""Launch configurations shared by the integer GEMM and implicit-GEMM conv kernels.

Configs are *generated* by :func:`matmul_configs` (a fixed candidate set, filtered per
problem), never listed per call site:

* on a GPU: :data:`CANDIDATES`, seven Hopper tiles (``BLOCK_M × BLOCK_N × BLOCK_K``,
  warps, pipeline stages), each compiled for sm_90 by ``bench/sm90_report.py`` and checked
  by ``tests/kernels/test_sm90_compile.py`` (the tiles of highest register pressure): no
  register spills in any kernel variant it is kept for. :func:`prune_for_problem` keeps at most :data:`MAX_KEPT` of them per problem
  (:func:`kept_configs`): large tiles for large ``M·N``, 64-row tiles for small ``M``
  (cross-attention K/V, 8² and 16² latents), at most 128×64 tiles for the split-input variant
  (two accumulators; 128×128 spills there), so the first call autotunes ≤ 6 configs, not 17.
* under the Triton interpreter (``TRITON_INTERPRET=1``): ONE small config. Autotuning
  there would only measure numpy, and small tiles keep the interpreted kernels fast
  while still exercising multi-tile grids, K tails and grouped program ordering.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import triton

INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}
MAX_KEPT = 6


class Tile(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k}w{self.num_warps}s{self.num_stages}"


# Hopper tiles: 8 warps (two warpgroups) for 128×128 and larger, 4 below, so the int32
# accumulator stays at ≤ 64 registers per thread; ≤ 64 KiB of staged operands, so two CTAs
# fit per SM where the registers allow.
CANDIDATES = (
    Tile(128, 256, 64, 8, 3),     # (256×128×64 / 8 warps spills in the conv kernels: not a candidate)
    Tile(128, 128, 64, 8, 4),
    Tile(128, 128, 128, 8, 3),
    Tile(128, 64, 64, 4, 4),
    Tile(64, 128, 64, 4, 4),
    Tile(64, 64, 128, 4, 3),
    Tile(64, 64, 64, 4, 4),
)


def interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _config(t: Tile) -> triton.Config:
    return triton.Config({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_K": t.block_k, "GROUP_M": 8},
                         num_warps=t.num_warps, num_stages=t.num_stages)


def matmul_configs() -> list[triton.Config]:
    """Candidate configs for the int8 GEMM/conv kernels on the current backend."""
    if interpreting():
        return [triton.Config(dict(INTERPRETER_CONFIG), num_warps=4, num_stages=1)]
    return [_config(t) for t in CANDIDATES]


def kept_configs(m: int, n: int, k: int, split: bool = False) -> list[Tile]:
    """The candidate tiles autotuned for an ``M × N × K`` problem (≤ :data:`MAX_KEPT`).

    * no tile dimension beyond the problem's (rounded up to a power of two, at least 64);
    * ``M ≤ 256`` (cross-attention K/V, the 8²/16² latents at batch 2, the time embedding):
      64-row tiles only — more CTAs on 132 SMs;
    * ``M·N < 132 · 128²`` (fewer than one wave of 128×128 tiles): no 256-wide tiles;
    * split input (two accumulators live): at most 128×64 (larger tiles spill);
    * ``BLOCK_K = 128`` only when ``K ≥ 512``.
    """
    cap_m = max(64, triton.next_power_of_2(m))
    cap_n = max(64, triton.next_power_of_2(n))
    kept = []
    for t in CANDIDATES:
        if t.block_m > cap_m or t.block_n > cap_n:
            continue
        if m <= 256 and t.block_m != 64:
            continue
        if m * n < 132 * 128 * 128 and max(t.block_m, t.block_n) == 256:
            continue
        if split and t.block_m * t.block_n > 128 * 64:
            continue
        if t.block_k == 128 and k < 512:
            continue
        kept.append(t)
    return (kept or [CANDIDATES[-1]])[:MAX_KEPT]


def prune_for_problem(configs, named_args, **kwargs):
    """``early_config_prune`` hook, per call: the configs of :func:`kept_configs`."""
    m, n = named_args["M"], named_args["N"]
    k = max(int(named_args.get(name, 0) or 0) for name in ("K1", "K2", "C1", "C2"))
    if "KH" in kwargs or "KH" in named_args:
        k *= int(kwargs.get("KH", named_args.get("KH", 1))) * int(kwargs.get("KW", named_args.get("KW", 1)))
    split = bool(kwargs.get("SPLIT", named_args.get("SPLIT", False)))
    want = {t.name for t in kept_configs(m, n, k, split)}
    kept = [c for c in configs
            if Tile(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages).name
            in want]
    return kept or configs[:1]


MAX_SPLIT_K = 8
_SMS = 132   # H100/H200


def split_k_for(m: int, n: int, k: int) -> int:
    """K pieces for an ``M × N × K`` problem (one input part): split where the 128×128 tiles
    cannot fill half of the 132 SMs and each piece keeps ≥ 1024 of K (16 steps of 64), up to
    :data:`MAX_SPLIT_K`. A pure function of the shape (the launch grid and workspace depend
    on it, so it is not autotuned)."""
    tiles = -(-m // 128) * -(-n // 128)
    if 2 * tiles >= _SMS:
        return 1
    return max(1, min(MAX_SPLIT_K, _SMS // tiles, k // 1024))


AUTOTUNE_PRUNE = {"early_config_prune": prune_for_problem}


def launch_options() -> dict:
    """Compile options for every launch: no fp contraction, so the fp32 epilogue rounds
    exactly like the pure-torch reference (a mul followed by an add, never an FMA).
    The interpreter ignores the option."""
    return {"enable_fp_fusion": False}
