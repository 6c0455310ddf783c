"""Static throughput model of one quantized GEMM/conv layer on an H100 SXM (sm_90).

Pure functions over numbers: no GPU, no compiler. ``bench/sm90_report.py`` feeds them the
facts it reads from the SASS of every kernel variant × config (compiled ahead of time on a
CPU); :mod:`.sm90_choice` applies them, from the facts shipped with the package, to keep a
layer in float where the model says float is faster (:func:`prefer_float`'s rule).

Model of one integer layer (``M × N × K`` GEMM, or the implicit GEMM of a conv):

* the tile grid ``⌈M/BM⌉·⌈N/BN⌉`` (× split-K pieces) is spread over the SMs; ``c`` CTAs
  are resident per SM (registers, shared memory and threads of the compiled kernel);
* one K step of one CTA costs ``mma = BM·BN·BK / (4096 · 0.9)`` cycles on the SM's tensor
  cores (1979 dense int8 TOPS / 132 SMs / 1.83 GHz = 4096 int8 MACs per cycle per SM, at
  :data:`INT8_MMA_EFFICIENCY` = 90 % sustained when fed) and
  ``issue = loop_instructions · warps / 4`` cycles of instruction issue (4 schedulers, one
  instruction per cycle each); with the MMA kept in flight (wait depth ≥ 1) a lone CTA's
  step is ``max(mma, issue)``, with ``wait 0`` every step it is ``mma + issue +``
  :data:`WGMMA_LATENCY`; ``g`` CTAs resident together share the tensor cores and the
  schedulers: ``max(g·mma, g·issue, lone step)`` per step of all ``g``;
* epilogue: ``epilogue_instructions · warps / 4`` issue cycles per CTA;
* memory: activation + weight + output bytes once through DRAM at 3.35 TB/s; the layer
  takes the larger of the two times (they overlap), plus, with split-K, the int32 partial
  sums written and read once more and one extra kernel launch.

FP16 baseline of the same layer (cuBLAS / cuDNN under ``torch.compile``): the larger of
``2·M·N·K`` at :data:`FP16_EFFICIENCY` of 989 TFLOPS and its bytes at 3.35 TB/s — i.e.
the libraries are assumed to reach 75 % of peak on every shape, small ones included
(generous to the baseline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# H100 SXM5 (datasheet, dense): the rates every prediction of the report is based on.
SMS = 132
CLOCK_HZ = 1.83e9
INT8_OPS = 1979e12
FP16_FLOPS = 989e12
DRAM_BYTES_S = 3.35e12
REGS_PER_SM = 65536
SMEM_PER_SM = 228 * 1024
THREADS_PER_SM = 2048
INT8_MACS_PER_CYCLE_SM = INT8_OPS / 2 / SMS / CLOCK_HZ     # = 4096
INT8_MMA_EFFICIENCY = 0.9   # sustained fraction of the int8 MMA peak while the tensor cores are fed (assumed)
WGMMA_LATENCY = 100          # cycles from the last wgmma issue to its wait returning (assumed)
FP16_EFFICIENCY = 0.75       # fraction of FP16 peak cuBLAS/cuDNN reach on a conv/linear layer (assumed)
LAUNCH_S = 2e-6              # one extra kernel launch inside a CUDA graph (assumed)


@dataclass(frozen=True)
class KernelFacts:
    """What the SASS of one kernel variant at one config says (see tests/kernels/sm90_compile.py)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    registers: int
    shared_bytes: int
    loop_instructions: int
    epilogue_instructions: int
    wait_depth: int


@dataclass(frozen=True)
class LayerShape:
    """One conv/linear layer as a GEMM. ``act_elems``: elements of the activation tensor the
    kernel reads (``M·K`` for a linear, ``B·H·W·C`` for a conv: the implicit GEMM reads each
    input pixel once from DRAM, the re-reads of the taps hit L2)."""

    m: int
    n: int
    k: int
    act_elems: int


def ctas_per_sm(f: KernelFacts) -> int:
    threads = 32 * f.num_warps
    regs = math.ceil(max(f.registers, 1) / 8) * 8 * threads
    by_regs = REGS_PER_SM // regs
    by_smem = SMEM_PER_SM // (f.shared_bytes + 1024)
    return max(1, min(by_regs, by_smem, THREADS_PER_SM // threads))


def int8_seconds(s: LayerShape, f: KernelFacts, weight_bits: int = 8, split_k: int = 1) -> float:
    """Predicted time of the integer kernel on one layer (codes in, fp16 out)."""
    tiles = math.ceil(s.m / f.block_m) * math.ceil(s.n / f.block_n)
    ctas = tiles * split_k
    steps = math.ceil(math.ceil(s.k / split_k) / f.block_k)
    mma = f.block_m * f.block_n * f.block_k / (INT8_MACS_PER_CYCLE_SM * INT8_MMA_EFFICIENCY)
    issue = f.loop_instructions * f.num_warps / 4
    lone = max(mma, issue) if f.wait_depth >= 1 else mma + issue + WGMMA_LATENCY
    per_sm = math.ceil(ctas / SMS)
    c = ctas_per_sm(f)
    g = min(c, per_sm)
    groups = math.ceil(per_sm / c)
    cycles = groups * (steps * max(g * mma, g * issue, lone) + g * f.epilogue_instructions * f.num_warps / 4)
    compute = cycles / CLOCK_HZ
    nbytes = s.act_elems + s.n * s.k * weight_bits / 8 + 2 * s.m * s.n
    extra = 0.0
    if split_k > 1:
        nbytes += 2 * 4 * s.m * s.n * split_k
        extra = LAUNCH_S
    return max(compute, nbytes / DRAM_BYTES_S) + extra


def fp16_seconds(s: LayerShape) -> float:
    """Predicted time of the FP16 library kernel on one layer (see module docstring)."""
    nbytes = 2 * (s.act_elems + s.n * s.k + s.m * s.n)
    return max(2.0 * s.m * s.n * s.k / (FP16_FLOPS * FP16_EFFICIENCY), nbytes / DRAM_BYTES_S)


def best_int8(s: LayerShape, configs: "dict[str, KernelFacts]", weight_bits: int = 8,
              split_k: int = 1) -> tuple[float, str]:
    """Fastest (time, config name) over ``configs`` (the autotuner's kept configs) at the
    launcher's split-K (``kernels.autotune.split_k_for``)."""
    if not configs:
        raise ValueError("best_int8: no kernel config given")
    return min((int8_seconds(s, f, weight_bits, split_k), name) for name, f in configs.items())


def prefer_float(s: LayerShape, configs: "dict[str, KernelFacts]", weight_bits: int = 8, split_k: int = 1) -> bool:
    """The static decision "float is faster" for one layer: the FP16 library kernel is
    predicted faster than the best integer config (the layer then stays in float)."""
    return fp16_seconds(s) < best_int8(s, configs, weight_bits, split_k)[0]
