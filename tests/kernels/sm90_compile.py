"""Compile kernel variants ahead of time for Hopper (sm_90) without a GPU; print their facts as JSON.

Run in a process *without* ``TRITON_INTERPRET`` (the interpreter replaces the compiler)::

    python tests/kernels/sm90_compile.py gemm:8 gemm:4:split conv:4:codes gemm:8:codes@128x128x64w8s3

A spec is ``KIND[:WBITS][:split][:codes][:splitk][@BMxBNxBKwWARPSsSTAGES]`` with ``KIND`` in
``gemm``, ``conv`` (3×3), ``conv1`` (1×1), ``quantize``; ``codes``: signed int8 codes in
(the producer-quantized main path), else fp16 in with quantize-on-load; ``splitk``: the
split-K program (4 pieces, partial sums out). Each variant is
compiled like a JIT launch on SD shapes specialises it (unit strides constant, sizes and
strides divisible by 16), by default at a 128×128×64 tile, 8 warps, 3 stages.

Facts (one dict per spec) — from the PTX, from the cubin's resource usage and from its SASS
(Triton's bundled ``cuobjdump``):

* ``int8_wgmma``, ``div``, ``fma``, ``cp_async`` (PTX counts), ``shared_bytes``;
* ``registers``, ``spill_bytes`` (local memory/stack frame of the cubin; > 0 means spills);
* ``loop_instructions``: SASS instructions in the K loop's body (the innermost backward
  branch around the MMA) — per thread per K step of ``BLOCK_K``; ``loop_mma`` the MMA
  instruction(s) inside (e.g. ``IGMMA.64x128x32.S8.S8``); ``wait_depth`` the smallest
  ``WARPGROUP.DEPBAR.LE gsb0, N`` in the loop (N ≥ 1: the MMA stays in flight across
  steps; 0: every step waits); ``loop_ldgsts`` / ``loop_tma`` (cp.async vs bulk tensor
  copies), ``loop_ldsm``, ``loop_sts`` (register → shared stores of an operand);
* ``epilogue_instructions``: SASS instructions after the last K loop;
* ``compile_s``: wall time of the compile (Triton cache off: ``TRITON_ALWAYS_COMPILE=1`` is set).

Used by ``test_sm90_compile.py`` and ``bench/sm90_report.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_ALWAYS_COMPILE", "1")     # compile_s measures a compile, not a cache hit

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from qdcompile.kernels import qconv, qgemm, quantize  # noqa: E402

_UNIT = ("stride_x1k", "stride_x2k", "stride_yn", "stride_x1c", "stride_x2c")
_ALIGNED = ("M", "N", "K1", "K2", "C1", "C2")
DEFAULT_TILE = (128, 128, 64, 8, 3)
_NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _jit_fn(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def _type(name: str, weight_bits: int, codes: bool, legacy_codes: bool = False) -> str:
    if name in ("x1_ptr", "x2_ptr", "x_ptr"):
        return ("*u8" if legacy_codes else "*i8") if codes else "*fp16"
    if name in ("w1_ptr", "w2_ptr"):
        return "*u8" if weight_bits == 4 else "*i8"
    if name == "q_ptr":
        return "*u8"
    if name.startswith(("rowsum", "partial", "tapsum")):
        return "*i32"
    if name.startswith(("w_scale", "bias")):
        return "*fp32"
    if name == "y_ptr":
        return "*fp16"
    if name.startswith(("act_scale", "inv_scale", "x_lo", "x_hi")) or name == "scale":
        return "fp32"
    return "i32"


def parse_spec(spec: str) -> dict:
    body, _, tile = spec.partition("@")
    kind, *rest = body.split(":")
    bm, bn, bk, warps, stages = DEFAULT_TILE
    if tile:
        m = re.fullmatch(r"(\d+)x(\d+)x(\d+)w(\d+)s(\d+)", tile)
        if not m:
            raise ValueError(f"bad tile {tile!r} in {spec!r}: expected BMxBNxBKwWARPSsSTAGES")
        bm, bn, bk, warps, stages = (int(v) for v in m.groups())
    return dict(kind=kind, weight_bits=int(rest[0]) if rest and rest[0].isdigit() else 8, split="split" in rest,
                codes="codes" in rest, split_k=4 if "splitk" in rest else 1, block=(bm, bn, bk), num_warps=warps, num_stages=stages)


def _sass_facts(cubin: bytes) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        cuobjdump = str(_NVIDIA_BIN / "cuobjdump")
        sass = subprocess.run([cuobjdump, "-sass", str(path)], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([cuobjdump, "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res))
    addrs: list[int] = []          # instruction addresses and texts in program order
    lines: list[str] = []
    for raw in sass.splitlines():
        ins = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", raw)
        if ins:
            addrs.append(int(ins.group(1), 16))
            lines.append(ins.group(2).strip())
    index = {a: i for i, a in enumerate(addrs)}
    loops = []                     # (first, last) instruction index of each backward branch's body
    for i, text in enumerate(lines):
        br = re.search(r"\bBRA\s+(?:`\()?0x([0-9a-f]+)", text)
        if br and int(br.group(1), 16) in index and index[int(br.group(1), 16)] <= i:
            body = lines[index[int(br.group(1), 16)]:i + 1]
            if any(re.search(r"\b[IHQ]GMMA\b|\bHMMA\b|\bIMMA\b", t) for t in body):
                loops.append((index[int(br.group(1), 16)], i, body))
    facts = {"registers": int(usage.get("REG", 0)),
             "spill_bytes": int(usage.get("LOCAL", 0)) + int(usage.get("STACK", 0)),
             "sass_instructions": len(lines)}
    if not loops:
        return {**facts, "loop_instructions": None, "wait_depth": None, "loop_mma": []}
    # the K loop: the first MMA loop that contains no other MMA loop (split kernels have two)
    inner = [lp for lp in loops if not any(o is not lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    start, end, body = min(inner, key=lambda lp: lp[0])
    waits = [int(w, 16) for t in body for w in re.findall(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x([0-9a-f]+)", t)]
    last_loop_end = max(lp[1] for lp in loops)
    tail = [t for t in lines[last_loop_end + 1:] if not t.startswith(("NOP", "BRA `(.L_x_"))]
    return {**facts,
            "loop_instructions": len(body),
            "loop_mma": sorted({m for t in body for m in re.findall(r"\b([IHQ]GMMA\.[\w.]+)", t)}),
            "wait_depth": min(waits) if waits else None,
            "loop_ldgsts": sum(t.startswith("LDGSTS") or " LDGSTS" in t for t in body),
            "loop_tma": sum("UTMALDG" in t for t in body),
            "loop_ldsm": sum("LDSM" in t for t in body),
            "loop_sts": sum(bool(re.search(r"\bSTS\b", t)) for t in body),
            "loop_ldg": sum(bool(re.search(r"\bLDG\b", t)) for t in body),
            "epilogue_instructions": len(tail)}


def compile_variant(spec: str, sass: bool = True) -> dict:
    v = parse_spec(spec)
    kind, weight_bits, codes = v["kind"], v["weight_bits"], v["codes"]
    if kind == "quantize":
        kernel, consts, warps, stages = quantize._quantize_act_kernel, {"BLOCK": 2048}, 4, 1
    else:
        bm, bn, bk = v["block"]
        consts = dict(ACT_BITS1=8, ACT_BITS2=8, W_BITS=weight_bits, SPLIT=v["split"], HAS_BIAS=True, HAS_BC=False,
                      CODES_IN=codes, SPLIT_K=v["split_k"], BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
        if kind == "gemm":
            kernel = qgemm._qgemm_kernel
            consts.update(EVEN_K1=True, EVEN_K2=True)
        elif kind in ("conv", "conv1"):
            kernel = qconv._qconv2d_kernel
            k = 3 if kind == "conv" else 1
            consts.update(KH=k, KW=k, EVEN_C1=True, EVEN_C2=True, PAIRED1=True, PAIRED2=True, PADDED=k > 1,
                          HAS_TAPSUM1=True, HAS_TAPSUM2=True)
        else:
            raise ValueError(f"unknown kernel kind {kind!r} in {spec!r}")
        warps, stages = v["num_warps"], v["num_stages"]
    fn = _jit_fn(kernel)
    if "INPUT_CODES" in fn.arg_names:          # kernels before the signed-codes path (baseline measurements)
        consts["INPUT_CODES"] = codes
    consts = {name: val for name, val in consts.items() if name in fn.arg_names}
    consts.update({name: 1 for name in _UNIT if name in fn.arg_names})
    signature = {name: "constexpr" if name in consts else _type(name, weight_bits, codes, "INPUT_CODES" in fn.arg_names) for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name].startswith("*") or (signature[name] == "i32"
                                                     and (name.startswith("stride") or name in _ALIGNED))}
    t0 = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=warps, num_stages=stages, enable_fp_fusion=False))
    compile_s = time.perf_counter() - t0
    ptx = compiled.asm["ptx"]
    facts = {
        "variant": spec,
        "triton": triton.__version__,
        "int8_wgmma": len(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.s32\.s8\.s8", ptx)),
        "div": len(re.findall(r"\bdiv\.(?:rn|full|approx)\.f32", ptx)),
        "fma": len(re.findall(r"\bfma\.rn\.f32", ptx)),
        "cp_async": len(re.findall(r"cp\.async\.cg", ptx)),
        "shared_bytes": compiled.metadata.shared,
        "compile_s": round(compile_s, 2),
    }
    if sass:
        facts.update(_sass_facts(compiled.asm["cubin"]))
    return facts


def main(argv: list[str]) -> int:
    print(json.dumps([compile_variant(spec) for spec in argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
