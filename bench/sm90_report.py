"""Static sm_90 report: every integer kernel variant × kept config compiled for Hopper on the CPU,
and a throughput model of the SD 1.5 U-Net step (batch 2, 512²) built on those facts.

    python bench/sm90_report.py                    # compile + model, writes bench/results/sm90-report-*.md/json
    python bench/sm90_report.py --facts F.json     # model only, from facts of an earlier run
    python bench/sm90_report.py --facts F.json --model sdxl   # the SDXL base U-Net (128² latent) instead

Table: registers, spill bytes, shared memory, SASS instructions per thread per K step of the
K loop, the MMA instruction and its wait depth (``WARPGROUP.DEPBAR.LE gsb0, N`` in the loop),
cp.async (``LDGSTS``) or TMA (``UTMALDG``) loads — read from the cubin that Triton's bundled
ptxas builds for ``GPUTarget("cuda", 90, 32)`` (see ``tests/kernels/sm90_compile.py``).

Model (assumptions in :mod:`qdcompile.kernels.sm90_model`, H100 SXM: 1979 dense int8 TOPS,
989 FP16 TFLOPS, 3.35 TB/s): every conv/linear layer of the SD 1.5 U-Net census at batch 2
gets an FP16 time and an integer time (best kept config; W4A8 weights on the device at the
bits :func:`qdcompile.kernels.layout.device_weight_bits` picks); everything else — attention
``QKᵀ``/``AV`` at 50 % of FP16 peak, and the pointwise producers of each layer input (norms,
activations, residual adds) as DRAM traffic, 2 bytes read + 2 written per element in FP16,
2 read + 1 written (int8 codes) when quantized — is a stated FP16 cost in both. The last line
is the predicted step speed-up vs FP16 compiled.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPILE_TOOL = ROOT / "tests" / "kernels" / "sm90_compile.py"
ATTENTION_EFFICIENCY = 0.5     # flash attention on H100, fraction of FP16 peak (assumed)

# kernel variants of the codes-in main path (+ the float-in eager path for comparison)
VARIANTS = ("gemm:8:codes", "gemm:4:codes", "conv:8:codes", "conv:4:codes", "conv1:8:codes", "conv1:4:codes",
            "conv:8:codes:split", "conv1:8:codes:split", "gemm:8", "conv:8")


def compile_facts(specs: list[str], jobs: int) -> list[dict]:
    """Run the compile tool on ``specs`` in ``jobs`` parallel processes (no TRITON_INTERPRET)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    chunks = [specs[i::jobs] for i in range(jobs) if specs[i::jobs]]
    procs = [subprocess.Popen([sys.executable, str(COMPILE_TOOL), *chunk], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for chunk in chunks]
    out = []
    for p in procs:
        stdout, stderr = p.communicate()
        if p.returncode:
            raise RuntimeError(f"sm90 compile failed:\n{stderr[-4000:]}")
        out += json.loads(stdout.strip().splitlines()[-1])
    order = {s: i for i, s in enumerate(specs)}
    return sorted(out, key=lambda f: order[f["variant"]])


def specs_for(variants, tiles) -> list[str]:
    specs = []
    for v in variants:
        for t in tiles:
            if "split" in v and t.block_m * t.block_n > 128 * 64:
                continue      # never kept for the split input (kept_configs)
            specs.append(f"{v}@{t.name}")
    return specs


def candidate_facts(facts: list[dict]) -> list[dict]:
    """The facts of tiles that are candidates now (kept for some problem of their variant)."""
    from qdcompile.kernels.autotune import CANDIDATES, kept_configs
    names = {t.name for t in CANDIDATES}
    split_names = {t.name for t in kept_configs(1 << 20, 1 << 20, 1 << 20, split=True)} | {
        t.name for t in kept_configs(256, 1 << 20, 1 << 20, split=True)}
    out = []
    for f in facts:
        variant, _, tile = f["variant"].partition("@")
        if tile in (split_names if "split" in variant else names):
            out.append(f)
    return out


def facts_table(facts: list[dict]) -> str:
    head = ["variant", "config", "regs", "spill B", "smem KiB", "loop instr/K-step", "MMA", "wait depth",
            "loads", "epilogue instr"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in facts:
        variant, _, tile = f["variant"].partition("@")
        loads = "TMA" if f.get("loop_tma") else ("cp.async" if f.get("loop_ldgsts") else "ld.global")
        if f.get("loop_sts"):
            loads += " + regs→smem"
        lines.append("| " + " | ".join(str(c) for c in (
            variant, tile, f["registers"], f["spill_bytes"], f"{f['shared_bytes'] / 1024:.0f}", f["loop_instructions"],
            ",".join(f["loop_mma"]), f["wait_depth"], loads, f["epilogue_instructions"])) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- model

MODELS = {"sd15": "SD1.5", "sdxl": "SDXL"}    # census configs of qdcompile.benchmarks → label


def unet_layers(model: str = "sd15", batch: int = 2):
    """(name, kind, LayerShape, split, kernel) of every conv/linear layer of the ``model`` U-Net
    (config of qdcompile.benchmarks, meta device, census at ``batch``), and the census."""
    from qdcompile.benchmarks.census import census
    from qdcompile.benchmarks.configs import build_unet
    from qdcompile.kernels.sm90_choice import layer_shape

    unet = build_unet(model, device="meta")
    c = census(unet, batch=batch)
    modules = dict(unet.named_modules())
    rows = []
    for layer in c.layers:
        mod = modules[layer.name]
        m = layer.macs // layer.weight_params
        act = None
        if layer.op != "linear":     # the implicit GEMM reads each input pixel once
            kh, kw = mod.kernel_size
            sh, sw = mod.stride
            act = m * sh * sw * (layer.weight_params // layer.out_channels // (kh * kw))
        kind, shape = layer_shape(layer.op, mod.weight.shape, m, act)
        split = (".up_blocks." in f".{layer.name}" and ".resnets." in layer.name
                 and layer.name.endswith(("conv1", "conv_shortcut")))
        rows.append((layer.name, kind, shape, split, layer.unsupported))
    return rows, c


def model(facts: list[dict], split_k_on: bool = True, codes: bool = True, device_int8: bool = True,
          unet: str = "sd15") -> dict:
    from qdcompile.kernels.sm90_choice import estimate, facts_by_variant
    from qdcompile.kernels.sm90_model import fp16_seconds, DRAM_BYTES_S, FP16_FLOPS

    by = facts_by_variant(facts)
    layers, c = unet_layers(unet)
    rows = []
    tot = {"fp16": 0.0, "w8a8": 0.0, "w4a8": 0.0, "w8a8_float_fallback": 0.0, "w4a8_float_fallback": 0.0}
    pointwise = {"fp16": 0.0, "q": 0.0}
    w_bytes = {"w8a8": 0, "w4a8": 0, "w4a8_file": 0}
    kernels_needed = {"w8a8": set(), "w4a8": set()}
    autotune_runs = {"w8a8": set(), "w4a8": set()}
    for name, kind, s, split, unsupported in layers:
        t16 = fp16_seconds(s)
        shared_input = name.endswith((".to_k", ".to_v"))   # same input as to_q / each other: one producer
        if not shared_input:
            pointwise["fp16"] += 4 * s.act_elems / DRAM_BYTES_S
            pointwise["q"] += (3 if not unsupported else 4) * s.act_elems / DRAM_BYTES_S
        row = {"layer": name, "kind": kind + (" split" if split else ""), "m": s.m, "n": s.n, "k": s.k,
               "fp16_us": t16 * 1e6}
        tot["fp16"] += t16
        for key, bits in (("w8a8", 8), ("w4a8", 4)):
            if unsupported:
                t, cfg, sk, dev_bits, faster = t16, "float (unsupported)", 1, 16, False
            else:
                e = estimate(kind, s, bits, by, split=split, codes=codes, split_k_on=split_k_on,
                             device_int8=device_int8)
                t, cfg, sk, dev_bits, variant, kept = e.int_s, e.config, e.split_k, e.device_bits, e.variant, e.kept
                faster = e.float_faster      # the backend's decision (sm90_choice), same function
            if not unsupported:
                for tile in kept:
                    kernels_needed[key].add((variant, tile, sk > 1))
                    autotune_runs[key].add((variant, s.m, s.n, s.k, tile))
            row[f"{key}_us"] = t * 1e6
            row[f"{key}_config"] = cfg + (f" split-K {sk}" if sk > 1 else "")
            row[f"{key}_device_bits"] = dev_bits
            tot[key] += t
            tot[f"{key}_float_fallback"] += t16 if faster else t
            row[f"{key}_float_faster"] = faster
            w_bytes[key] += s.n * s.k * dev_bits // 8
            if key == "w4a8":
                w_bytes["w4a8_file"] += s.n * s.k * (4 if not unsupported else 16) // 8
        row["prefer_float"] = row["w8a8_float_faster"]
        rows.append(row)
    attn = 2 * c.attn_macs / (FP16_FLOPS * ATTENTION_EFFICIENCY)
    step = {"fp16": tot["fp16"] + attn + pointwise["fp16"]}
    for key in ("w8a8", "w4a8", "w8a8_float_fallback", "w4a8_float_fallback"):
        step[key] = tot[key] + attn + pointwise["q"]
    compile_s = [f["compile_s"] for f in facts if f.get("compile_s")]
    mean_compile = sum(compile_s) / len(compile_s) if compile_s else None
    first_call = {key: {"kernels": len(kernels_needed[key]), "autotune_runs": len(autotune_runs[key]),
                        "compile_s": None if mean_compile is None else len(kernels_needed[key]) * mean_compile}
                  for key in kernels_needed}
    return {"rows": rows, "first_call": first_call, "mean_compile_s": mean_compile, "layer_seconds": tot, "attention_seconds": attn, "pointwise_seconds": pointwise,
            "step_seconds": step, "weight_bytes": w_bytes, "attn_macs": c.attn_macs, "layer_macs": c.layer_macs,
            "speedup": {k: step["fp16"] / v for k, v in step.items() if k != "fp16"}}


def model_text(m: dict) -> str:
    lines = ["| layer | kind | M | N | K | FP16 µs | W8A8 µs (config) | W4A8 µs (device bits) | float faster |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in m["rows"]:
        lines.append(f"| {r['layer']} | {r['kind']} | {r['m']} | {r['n']} | {r['k']} | {r['fp16_us']:.1f} | "
                     f"{r['w8a8_us']:.1f} ({r['w8a8_config']}) | {r['w4a8_us']:.1f} ({r['w4a8_device_bits']}) | "
                     f"{'yes' if r['prefer_float'] else ''} |")
    ls, st, pw = m["layer_seconds"], m["step_seconds"], m["pointwise_seconds"]
    ms = lambda v: f"{v * 1e3:.3f} ms"  # noqa: E731
    wb = m["weight_bytes"]
    lines += [
        "",
        f"- conv/linear layers: {m['layer_macs'] / 1e9:.1f} GMAC; FP16 {ms(ls['fp16'])}, W8A8 {ms(ls['w8a8'])}, "
        f"W4A8 {ms(ls['w4a8'])}",
        f"- attention QKᵀ/AV (float in every model): {m['attn_macs'] / 1e9:.1f} GMAC at "
        f"{ATTENTION_EFFICIENCY:.0%} of FP16 peak = {ms(m['attention_seconds'])}",
        f"- pointwise producers (norms, activations, adds), DRAM traffic: FP16 {ms(pw['fp16'])}, "
        f"quantized (int8 codes written) {ms(pw['q'])}",
        f"- step: FP16 compiled {ms(st['fp16'])}, W8A8 {ms(st['w8a8'])}, W4A8 {ms(st['w4a8'])}; "
        f"with the per-layer float-is-faster decision W8A8 {ms(st['w8a8_float_fallback'])}, "
        f"W4A8 {ms(st['w4a8_float_fallback'])}",
        f"- float parts' share of the W8A8 step: {(m['attention_seconds'] + pw['q']) / st['w8a8']:.0%}",
        f"- device weight bytes: W8A8 {wb['w8a8'] / 2**20:.1f} MiB, W4A8 {wb['w4a8'] / 2**20:.1f} MiB on the device "
        f"({wb['w4a8_file'] / 2**20:.1f} MiB in the 4-bit file)",
        "- first call (every layer integer): " + "; ".join(
            f"{k.upper()} {v['kernels']} distinct kernel binaries (variant × kept tile × split-K), "
            + (f"≈ {v['compile_s']:.0f} s of sm_90 compile at {m['mean_compile_s']:.1f} s each on this CPU"
               if v["compile_s"] is not None else "compile time not measured in these facts")
            + f", {v['autotune_runs']} autotune timing runs (distinct shape × kept config)"
            for k, v in m["first_call"].items()),
        f"- speed-up with the float-is-faster decision: W8A8 {m['speedup']['w8a8_float_fallback']:.2f}x, "
        f"W4A8 {m['speedup']['w4a8_float_fallback']:.2f}x",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--facts", type=Path, help="reuse the compile facts of an earlier run (JSON)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--model", choices=sorted(MODELS), default="sd15",
                        help="U-Net whose layer census is modelled (batch 2; default sd15)")
    parser.add_argument("--no-split-k", action="store_true", help="model the kernels without split-K")
    parser.add_argument("--baseline", action="store_true",
                        help="model the kernels before Fast path 2: float in (quantize-on-load), 4-bit weights "
                             "unpacked in the K loop, no split-K (use with --facts of the old kernels)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--label", default="", help="suffix of the result files (e.g. 'before')")
    parser.add_argument("--note", default="", help="a line saying where --facts came from")
    args = parser.parse_args(argv)

    import triton
    from qdcompile.kernels import autotune

    if args.facts:
        loaded = json.loads(args.facts.read_text())
        facts = loaded["facts"] if isinstance(loaded, dict) else loaded
    else:
        facts = compile_facts(specs_for(args.variants, autotune.CANDIDATES), args.jobs)
    m = model(facts, not (args.no_split_k or args.baseline), codes=not args.baseline, device_int8=not args.baseline,
              unet=args.model)
    label = MODELS[args.model]
    facts = candidate_facts(facts)
    table = facts_table(facts)
    text = model_text(m)
    deployed = "" if args.baseline else "_float_fallback"     # the kernels as the backend would run them
    last = (f"predicted {label} step speed-up vs FP16 compiled: W8A8 {m['speedup']['w8a8' + deployed]:.2f}x, "
            f"W4A8 {m['speedup']['w4a8' + deployed]:.2f}x")
    text += ("\n- last line: " + ("every supported layer integer (the backend before this report had no "
                                   "float-is-faster decision)" if args.baseline else
                                   "with the per-layer float-is-faster decision (kernels.sm90_choice, as the backend decides); "
                                   f"every layer integer: W8A8 {m['speedup']['w8a8']:.2f}x, "
                                   f"W4A8 {m['speedup']['w4a8']:.2f}x"))
    print(table)
    print()
    print(text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = (f"sm90-report-triton{triton.__version__}" + (f"-{args.model}" if args.model != "sd15" else "")
            + (f"-{args.label}" if args.label else ""))
    meta = {"triton": triton.__version__, "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(["python bench/sm90_report.py", *(argv if argv is not None else sys.argv[1:])]),
            "split_k": not (args.no_split_k or args.baseline), "baseline": args.baseline, "model": args.model}
    if args.note:
        meta["note"] = args.note
    from qdcompile.io import atomic_write

    atomic_write(args.out_dir / f"{stem}.json", json.dumps({**meta, "facts": facts, "model": m}, indent=1) + "\n")
    atomic_write(args.out_dir / f"{stem}.md",
        f"# Static sm_90 report\n\n" + "\n".join(f"- {k}: {v}" for k, v in meta.items())
        + f"\n\n{__doc__}\n\n## Kernels\n\n{table}\n\n## {label} U-Net step model (batch 2)\n\n{text}\n\n{last}\n")
    print(last)
    return 0


if __name__ == "__main__":
    sys.exit(main())
