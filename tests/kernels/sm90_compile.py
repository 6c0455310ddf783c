"""Compile kernel variants ahead of time for Hopper (sm_90) without a GPU; print PTX facts as JSON.

Run in a process *without* ``TRITON_INTERPRET`` (the interpreter replaces the compiler)::

    python tests/kernels/sm90_compile.py gemm:8 gemm:4:split conv:4

Each variant is compiled like a JIT launch on SD-like shapes would specialise it
(unit strides constant, sizes and strides divisible by 16), at a 128×128×64 tile with
8 warps and 3 stages. Used by ``test_sm90_compile.py``; handy when editing the kernels.
"""

from __future__ import annotations

import json
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from qdcompile.kernels import qconv, qgemm, quantize  # noqa: E402

_UNIT = ("stride_x1k", "stride_x2k", "stride_yn", "stride_x1c", "stride_x2c")
_ALIGNED = ("M", "N", "K1", "K2", "C1", "C2")
_TILE = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)


def _jit_fn(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def _type(name: str, weight_bits: int) -> str:
    if name in ("x1_ptr", "x2_ptr", "x_ptr"):
        return "*fp16"
    if name in ("w1_ptr", "w2_ptr"):
        return "*u8" if weight_bits == 4 else "*i8"
    if name == "q_ptr":
        return "*u8"
    if name.startswith("rowsum"):
        return "*i32"
    if name.startswith(("w_scale", "bias")):
        return "*fp32"
    if name == "y_ptr":
        return "*fp16"
    if name.startswith(("act_scale", "inv_scale", "x_lo", "x_hi")) or name == "scale":
        return "fp32"
    return "i32"


def compile_variant(spec: str) -> dict:
    kind, *rest = spec.split(":")
    weight_bits = int(rest[0]) if rest else 8
    split = "split" in rest
    if kind == "quantize":
        kernel, consts, warps, stages = quantize._quantize_act_kernel, {"BLOCK": 2048}, 4, 1
    else:
        consts = dict(ACT_BITS1=8, ACT_BITS2=8, W_BITS=weight_bits, SPLIT=split, HAS_BIAS=True, HAS_BC=False,
                      INPUT_CODES=False, **_TILE)
        if kind == "gemm":
            kernel = qgemm._qgemm_kernel
            consts.update(EVEN_K1=True, EVEN_K2=True)
        else:
            kernel = qconv._qconv2d_kernel
            consts.update(KH=3, KW=3, EVEN_C1=True, EVEN_C2=True, PAIRED1=True, PAIRED2=True)
        warps, stages = 8, 3
    fn = _jit_fn(kernel)
    consts.update({name: 1 for name in _UNIT if name in fn.arg_names})
    signature = {name: "constexpr" if name in consts else _type(name, weight_bits) for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name].startswith("*") or (signature[name] == "i32"
                                                     and (name.startswith("stride") or name in _ALIGNED))}
    compiled = triton.compile(ASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=warps, num_stages=stages, enable_fp_fusion=False))
    ptx = compiled.asm["ptx"]
    return {
        "variant": spec,
        "int8_wgmma": len(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.s32\.s8\.s8", ptx)),
        "div": len(re.findall(r"\bdiv\.(?:rn|full|approx)\.f32", ptx)),
        "fma": len(re.findall(r"\bfma\.rn\.f32", ptx)),
        "cp_async": len(re.findall(r"cp\.async\.cg", ptx)),
        "shared_bytes": compiled.metadata.shared,
    }


def main(argv: list[str]) -> int:
    print(json.dumps([compile_variant(spec) for spec in argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
