"""Launch configurations shared by the integer GEMM and implicit-GEMM conv kernels.

Configs are *generated* by :func:`matmul_configs` (a candidate grid filtered by a
predicate), never listed at import time:

* on a GPU: a Hopper-oriented grid of tile shapes (``BLOCK_M × BLOCK_N × BLOCK_K`` up to
  ``128 × 256 × 128``), warps and pipeline depths, kept only when the staged operand
  tiles fit in shared memory and every warp owns a reasonable slice of the tile;
  :func:`prune_for_problem` then drops, per call, the tiles that are much larger than the
  problem (the tiny cross-attention GEMMs must not pay for a 256-wide tile).
* under the Triton interpreter (``TRITON_INTERPRET=1``): ONE small config. Autotuning
  there would only measure numpy, and small tiles keep the interpreted kernels fast
  while still exercising multi-tile grids, K tails and grouped program ordering.
"""

from __future__ import annotations

import itertools
import os

import triton

# Hopper (H100/H200) has 228 KiB of shared memory per SM, of which 227 KiB are usable by
# one block; keep a margin for the epilogue / layout-conversion scratch.
_SMEM_BUDGET = 200 * 1024
# Operand bytes staged per pipeline stage: the float activation tile (fp16/bf16, 2 bytes;
# fp32 configs that do not fit fail to compile and the autotuner skips them) and the
# int8 weight tile (1 byte).
_ACT_BYTES = 2
_W_BYTES = 1

INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}


def interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _fits(block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int) -> bool:
    """Predicate over a candidate: shared memory, warp shape, K depth vs tile size."""
    smem = num_stages * block_k * (block_m * _ACT_BYTES + block_n * _W_BYTES)
    if smem > _SMEM_BUDGET:
        return False
    tile = block_m * block_n
    # Hopper warpgroup MMAs: 8 warps (two warpgroups) for 128×128 and larger tiles, 4 below;
    # keeps the int32 accumulator at ≤ 128 registers per thread.
    if (num_warps == 8) != (tile >= 128 * 128) or tile // (num_warps * 32) > 128:
        return False
    # Deep K steps only for small tiles (more work per pipeline stage), with 3 stages.
    if block_k == 128 and (tile > 64 * 128 or num_stages != 3):
        return False
    # 256-row tiles only as 256×128 (the 2-warpgroup M-major shape).
    if block_m == 256 and block_n != 128:
        return False
    return True


def matmul_configs() -> list[triton.Config]:
    """Candidate configs for the int8 GEMM/conv kernels on the current backend."""
    if interpreting():
        return [triton.Config(dict(INTERPRETER_CONFIG), num_warps=4, num_stages=1)]
    configs = []
    for block_m, block_n, block_k, num_warps, num_stages in itertools.product(
            (64, 128, 256), (64, 128, 256), (64, 128), (4, 8), (3, 4)):
        if _fits(block_m, block_n, block_k, num_warps, num_stages):
            configs.append(triton.Config(
                {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
                num_warps=num_warps, num_stages=num_stages))
    return configs


def prune_for_problem(configs, named_args, **kwargs):
    """``early_config_prune`` hook, per call: drop tiles far larger than the problem, and
    the largest tiles for the split variant (it holds a second accumulator). Keeps ≥ 1."""
    m, n = named_args["M"], named_args["N"]
    k = max(int(named_args.get(name, 0) or 0) for name in ("K1", "K2", "C1", "C2"))
    split = bool(kwargs.get("SPLIT", named_args.get("SPLIT", False)))
    cap_m = max(64, triton.next_power_of_2(m))
    cap_n = max(64, triton.next_power_of_2(n))
    cap_k = max(64, triton.next_power_of_2(k))
    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] <= cap_m and c.kwargs["BLOCK_N"] <= cap_n and c.kwargs["BLOCK_K"] <= cap_k
            and not (split and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 128 * 128)]
    return kept or configs[:1]


AUTOTUNE_PRUNE = {"early_config_prune": prune_for_problem}


def launch_options() -> dict:
    """Compile options for every launch: no fp contraction, so the fp32 epilogue rounds
    exactly like the pure-torch reference (a mul followed by an add, never an FMA).
    The interpreter ignores the option."""
    return {"enable_fp_fusion": False}
