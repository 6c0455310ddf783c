"""Benchmark the integer Triton kernels on the Stable Diffusion U-Net shapes.

For every GEMM / conv shape of SD 1.5 (512², CFG batch 2) and SDXL (1024², CFG batch 2)
this times (median of ``triton.testing.do_bench``):

* FP16 baseline: ``F.linear`` (cuBLAS) or ``F.conv2d`` on channels-last tensors (cuDNN);
* ``torch._int_mm`` (cuBLASLt int8 → int32, codes in, no epilogue) for the GEMMs;
* ours W8A8 and W4A8: float16 activation in, quantize-on-load, fused dequant epilogue;
* ours W8A8 with int8 signed codes in (the producer-quantized main path): the cost of
  quantizing on load is ``t(fused) / t(codes in) − 1``;
* ours W8A8 unfused: the standalone quantize kernel, then the codes-in GEMM/conv.

It reports TOPS (2·M·N·K / t) and the percentage of the *measured* int8 peak (a large
``torch._int_mm``), prints a speed-up table and writes
``bench/results/kernels-<device>-<date>.json`` and ``.md`` (device, torch/triton versions,
command line). Each of our kernels is checked once against its pure-torch reference before
it is timed (``--no-check`` skips that).

Run on a GPU, from a checkout (installed or not)::

    python bench/kernels.py                     # SD 1.5 shapes, short repetitions (a few minutes)
    python bench/kernels.py --models sd15 sdxl --rep 100 --kinds conv

A shape that fails (compile error, wrong result) is recorded in the JSON with its error and
the run goes on; the JSON and Markdown are rewritten after every shape.
``--smoke`` runs tiny shapes on the CPU under the Triton interpreter to check that the
script works; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _checkout import use_checkout  # noqa: E402


@dataclass(frozen=True)
class GemmShape:
    name: str
    m: int
    k: int
    n: int


@dataclass(frozen=True)
class ConvShape:
    name: str
    batch: int
    c: int            # input channels (c1 + c2 for a split/concat input)
    n: int
    hw: int           # input height = width
    kernel: int = 3
    stride: int = 1
    split: tuple[int, int] | None = None   # (deep, skip) channels of a concatenated input

    @property
    def padding(self) -> int:
        return self.kernel // 2

    @property
    def out_hw(self) -> int:
        return (self.hw + 2 * self.padding - self.kernel) // self.stride + 1

    def mnk(self) -> tuple[int, int, int]:
        return self.batch * self.out_hw ** 2, self.n, self.kernel * self.kernel * self.c


# ---------------------------------------------------------------- shapes

def _unet_up_inputs(chs: tuple[int, ...], levels: list[int]) -> list[tuple[int, int, int, int]]:
    """(deep, skip, out, hw) of the up-path ResNet blocks, whose input is cat(deep, skip).

    Skips are pushed on the down path (conv_in, two ResNets per block, each downsampler)
    and popped by the three ResNets of each up block, as in diffusers' UNet2DConditionModel.
    """
    skips = [chs[0]]
    for i, ch in enumerate(chs):
        skips += [ch, ch] + ([ch] if i < len(chs) - 1 else [])
    rows, deep = [], chs[-1]
    for level, out in enumerate(reversed(chs)):
        hw = levels[len(chs) - 1 - level]
        for _ in range(3):
            skip = skips.pop()
            rows.append((deep, skip, out, hw))
            deep = out
    return rows


def sd_shapes(model: str, batch: int = 2) -> tuple[list[GemmShape], list[ConvShape]]:
    """Main GEMM and conv shapes of the SD 1.5 / SDXL U-Nets (METHODS §5 for SD 1.5).

    SD 1.5: latent 64², channels (320, 640, 1280, 1280), attention at 64², 32², 16² and
    in the 8² mid block, text context 77 × 768. SDXL: latent 128², channels (320, 640, 1280),
    no attention at 128², transformer depth 2 at 64² and 10 at 32² (and mid), text context
    77 × 2048. Both with classifier-free guidance: batch 2.
    """
    if model == "sd15":
        chs, levels, ctx = (320, 640, 1280, 1280), [64, 32, 16, 8], 768
        attn = [(64, 320), (32, 640), (16, 1280), (8, 1280)]
    elif model == "sdxl":
        chs, levels, ctx = (320, 640, 1280), [128, 64, 32], 2048
        attn = [(64, 640), (32, 1280)]
    else:
        raise ValueError(f"unknown model {model!r}")
    gemms: list[GemmShape] = []
    for hw, d in attn:
        t = batch * hw * hw
        gemms += [GemmShape(f"{model} attn q/k/v/out {t}×{d}→{d}", t, d, d),
                  GemmShape(f"{model} GEGLU proj {t}×{d}→{8 * d}", t, d, 8 * d),
                  GemmShape(f"{model} FF out {t}×{4 * d}→{d}", t, 4 * d, d),
                  GemmShape(f"{model} cross-attn k/v {batch * 77}×{ctx}→{d}", batch * 77, ctx, d)]
    convs: list[ConvShape] = []
    seen: set = set()

    def add(shape: ConvShape) -> None:
        key = (shape.c, shape.n, shape.hw, shape.kernel, shape.stride, shape.split)
        if key not in seen:
            seen.add(key)
            convs.append(shape)

    prev = chs[0]
    for i, (ch, hw) in enumerate(zip(chs, levels)):
        if prev != ch:
            add(ConvShape(f"{model} down conv1 {prev}→{ch} @{hw}²", batch, prev, ch, hw))
        add(ConvShape(f"{model} conv {ch}→{ch} @{hw}²", batch, ch, ch, hw))
        if i < len(chs) - 1:
            add(ConvShape(f"{model} downsample {ch} @{hw}²→{hw // 2}²", batch, ch, ch, hw, stride=2))
        prev = ch
    for deep, skip, out, hw in _unet_up_inputs(chs, levels):
        add(ConvShape(f"{model} up conv1 {deep + skip}→{out} @{hw}²", batch, deep + skip, out, hw))
        add(ConvShape(f"{model} up shortcut 1×1 {deep}+{skip}→{out} @{hw}² (split)", batch, deep + skip, out, hw,
                      kernel=1, split=(deep, skip)))
    for ch, hw in zip(list(reversed(chs))[:-1], reversed(levels[:-1])):   # up block l's upsampler conv
        add(ConvShape(f"{model} upsample conv {ch} @{hw}²", batch, ch, ch, hw))
    unique = {(g.m, g.k, g.n): g for g in reversed(gemms)}
    return [g for g in gemms if unique[(g.m, g.k, g.n)] is g], convs


def smoke_shapes() -> tuple[list[GemmShape], list[ConvShape]]:
    return ([GemmShape("smoke gemm", 48, 64, 40), GemmShape("smoke cross-attn", 20, 48, 32)],
            [ConvShape("smoke conv 3×3", 1, 16, 24, 6), ConvShape("smoke downsample", 1, 16, 16, 6, stride=2),
             ConvShape("smoke shortcut (split)", 1, 24, 16, 5, kernel=1, split=(16, 8))])


# ---------------------------------------------------------------- timing

def make_timer(device: str, rep_ms: int):
    if device == "cuda":
        import triton.testing

        def bench(fn) -> float:
            fn()  # compile / autotune outside the measurement
            return float(triton.testing.do_bench(fn, warmup=max(10, rep_ms // 4), rep=rep_ms, return_mode="median"))
        return bench

    def bench_cpu(fn) -> float:  # interpreter smoke run: one wall-clock call after a warm-up (meaningless)
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return bench_cpu


@dataclass
class Row:
    kind: str
    name: str
    m: int
    n: int
    k: int
    ms: dict = field(default_factory=dict)
    error: str | None = None

    def tops(self, key: str) -> float | None:
        t = self.ms.get(key)
        return None if t is None else 2.0 * self.m * self.n * self.k / (t * 1e-3) / 1e12


# ---------------------------------------------------------------- benchmarks

def _random_weight(torch, n: int, in_shape, bits: int, device: str):
    from qdcompile.kernels import prepare_weight, quantize_weight, weight_scales
    w = torch.randn((n, *in_shape), device=device) * 0.05
    scale = weight_scales(w, bits)
    return prepare_weight(quantize_weight(w, scale, bits), bits), scale, w


def _check(torch, got, want, what: str) -> None:
    err = (got.float() - want.float()).abs().max().item()
    bound = 2.0 ** -9 * want.float().abs().max().item() + 1e-6   # ≤ 1 fp16 ulp of the largest output
    if not err <= bound:
        raise AssertionError(f"{what}: kernel disagrees with the reference (max err {err:.3g} > {bound:.3g})")


def bench_gemm(torch, F, shape: GemmShape, device: str, bench, check: bool) -> Row:
    from qdcompile.kernels import QPart, quantize_act
    from qdcompile.kernels.layout import signed_codes
    from qdcompile.kernels.qgemm import launch_qgemm, qgemm_reference
    row = Row("gemm", shape.name, shape.m, shape.n, shape.k)
    x = torch.randn(shape.m, shape.k, device=device, dtype=torch.float16)
    bias = torch.randn(shape.n, device=device, dtype=torch.float16)
    act_scale, act_zp = float(x.float().abs().max()) / 127.5, 128
    w8, s8, wf = _random_weight(torch, shape.n, (shape.k,), 8, device)
    w4, s4, _ = _random_weight(torch, shape.n, (shape.k,), 4, device)
    w16 = wf.half()
    row.ms["fp16"] = bench(lambda: F.linear(x, w16, bias))
    p8 = QPart(x, w8.w, w8.rowsum, s8, act_scale, act_zp, 8)
    p4 = QPart(x, w4.w, w4.rowsum, s4, act_scale, act_zp, 8)
    a8 = signed_codes(quantize_act(x, act_scale, act_zp, 8), 8)
    p8c = p8._replace(x=a8)
    f16 = torch.float16
    if check:
        _check(torch, launch_qgemm([p8], 8, bias, None), qgemm_reference([p8], 8, bias), f"{shape.name} W8A8")
        _check(torch, launch_qgemm([p4], 4, bias, None), qgemm_reference([p4], 4, bias), f"{shape.name} W4A8")
        _check(torch, launch_qgemm([p8c], 8, bias, None, out_dtype=f16), qgemm_reference([p8], 8, bias),
               f"{shape.name} W8A8 codes in")
    row.ms["w8a8"] = bench(lambda: launch_qgemm([p8], 8, bias, None))
    row.ms["w4a8"] = bench(lambda: launch_qgemm([p4], 4, bias, None))
    row.ms["w8a8_codes_in"] = bench(lambda: launch_qgemm([p8c], 8, bias, None, out_dtype=f16))
    row.ms["w4a8_codes_in"] = bench(lambda: launch_qgemm([p4._replace(x=a8)], 4, bias, None, out_dtype=f16))
    row.ms["w8a8_unfused"] = bench(lambda: launch_qgemm(
        [p8._replace(x=signed_codes(quantize_act(x, act_scale, act_zp, 8), 8))], 8, bias, None, out_dtype=f16))
    b8 = w8.w.t()                                   # [K, N] column-major, cuBLASLt's preferred layout
    if shape.m > 16 and shape.k % 8 == 0 and shape.n % 8 == 0:
        try:
            row.ms["int_mm"] = bench(lambda: torch._int_mm(a8, b8))
        except RuntimeError as err:   # e.g. no int8 mm on this backend
            print(f"  torch._int_mm unavailable for {shape.name}: {err}", file=sys.stderr)
    return row


def bench_conv(torch, F, shape: ConvShape, device: str, bench, check: bool) -> Row:
    from qdcompile.kernels import QPart, quantize_act
    from qdcompile.kernels.layout import signed_codes
    from qdcompile.kernels.qconv import launch_qconv2d, qconv2d_reference
    m, n, k = shape.mnk()
    row = Row("conv", shape.name, m, n, k)
    cl = torch.channels_last
    geom = ([shape.kernel] * 2, [shape.stride] * 2, [shape.padding] * 2)
    x = torch.randn(shape.batch, shape.c, shape.hw, shape.hw, device=device, dtype=torch.float16).contiguous(
        memory_format=cl)
    bias = torch.randn(shape.n, device=device, dtype=torch.float16)
    chans = shape.split or (shape.c,)
    xs = [x[:, :chans[0]].contiguous(memory_format=cl)] + ([x[:, chans[0]:].contiguous(memory_format=cl)]
                                                             if shape.split else [])
    wf = torch.randn(shape.n, shape.c, shape.kernel, shape.kernel, device=device) * 0.05
    w16 = wf.half().contiguous(memory_format=cl)
    row.ms["fp16"] = bench(lambda: F.conv2d(x, w16, bias, stride=shape.stride, padding=shape.padding))

    def parts(bits: int):
        out = []
        for xp in xs:
            pw, sc, _ = _random_weight(torch, shape.n, (xp.shape[1], shape.kernel, shape.kernel), bits, device)
            out.append(QPart(xp, pw.w, pw.rowsum, sc, float(xp.float().abs().max()) / 127.5, 128, 8, pw.tapsum))
        return out

    def codes(ps):
        return [p._replace(x=signed_codes(quantize_act(p.x, p.act_scale, p.act_zero_point, 8), 8)) for p in ps]

    p8, p4 = parts(8), parts(4)
    p8c, p4c = codes(p8), codes(p4)
    f16 = torch.float16
    if check:
        _check(torch, launch_qconv2d(p8, 8, *geom, bias, None), qconv2d_reference(p8, 8, *geom, bias),
               f"{shape.name} W8A8")
        _check(torch, launch_qconv2d(p4, 4, *geom, bias, None), qconv2d_reference(p4, 4, *geom, bias),
               f"{shape.name} W4A8")
        _check(torch, launch_qconv2d(p8c, 8, *geom, bias, None, out_dtype=f16), qconv2d_reference(p8, 8, *geom, bias),
               f"{shape.name} W8A8 codes in")
    row.ms["w8a8"] = bench(lambda: launch_qconv2d(p8, 8, *geom, bias, None))
    row.ms["w4a8"] = bench(lambda: launch_qconv2d(p4, 4, *geom, bias, None))
    row.ms["w8a8_codes_in"] = bench(lambda: launch_qconv2d(p8c, 8, *geom, bias, None, out_dtype=f16))
    row.ms["w4a8_codes_in"] = bench(lambda: launch_qconv2d(p4c, 4, *geom, bias, None, out_dtype=f16))
    row.ms["w8a8_unfused"] = bench(lambda: launch_qconv2d(codes(p8), 8, *geom, bias, None, out_dtype=f16))
    return row


def measure_int8_peak(torch, device: str, bench, size: int) -> float | None:
    """TOPS of a large square ``torch._int_mm``: the practical int8 peak of this device."""
    a = torch.randint(-128, 128, (size, size), device=device, dtype=torch.int8)
    b = torch.randint(-128, 128, (size, size), device=device, dtype=torch.int8).t()
    try:
        t = bench(lambda: torch._int_mm(a, b))
    except RuntimeError as err:
        print(f"int8 peak not measured: {err}", file=sys.stderr)
        return None
    return 2.0 * size ** 3 / (t * 1e-3) / 1e12


# ---------------------------------------------------------------- report

def _fmt(v, spec=".3f", none="—"):
    return none if v is None else format(v, spec)


def table(rows: list[Row], peak: float | None) -> str:
    head = ["kind", "shape", "M", "N", "K", "fp16 ms", "_int_mm ms", "W8A8 ms", "W4A8 ms", "codes-in ms",
            "W4A8 codes-in ms", "quant+codes-in ms", "codes-in/fp16", "W8A8/fp16", "W4A8/fp16", "codes-in % of _int_mm",
            "codes-in TOPS", "% int8 peak", "error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        t = r.ms
        speed = lambda key: t["fp16"] / t[key] if key in t and "fp16" in t else None  # noqa: E731
        of_int_mm = 100.0 * t["int_mm"] / t["w8a8_codes_in"] if "int_mm" in t and "w8a8_codes_in" in t else None
        tops = r.tops("w8a8_codes_in")
        cells = [r.kind, r.name, r.m, r.n, r.k, _fmt(t.get("fp16")), _fmt(t.get("int_mm")), _fmt(t.get("w8a8")),
                 _fmt(t.get("w4a8")), _fmt(t.get("w8a8_codes_in")), _fmt(t.get("w4a8_codes_in")),
                 _fmt(t.get("w8a8_unfused")), _fmt(speed("w8a8_codes_in"), ".2f") + "×",
                 _fmt(speed("w8a8"), ".2f") + "×", _fmt(speed("w4a8"), ".2f") + "×", _fmt(of_int_mm, ".0f"),
                 _fmt(tops, ".0f"), _fmt(None if peak is None or tops is None else 100.0 * tops / peak, ".0f"),
                 (r.error or "").splitlines()[0][:80] if r.error else ""]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def run_kernel_bench(args, out_dir: Path, command: str) -> dict:
    """Time every shape (each in its own try: a failure is recorded, the run goes on); the
    JSON and Markdown are rewritten after every shape. Returns the JSON record."""
    import torch
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"      # must precede the first import of triton / our kernels
    where = use_checkout()
    import torch.nn.functional as F
    import triton

    device = "cuda" if cuda else "cpu"
    device_name = torch.cuda.get_device_name() if cuda else f"cpu-interpreter ({platform.processor() or 'cpu'})"
    if not cuda:
        print("*** SMOKE RUN on the CPU under the Triton interpreter: the timings below mean NOTHING; "
              "this only checks that the benchmark runs. ***")
    torch.manual_seed(0)
    bench = make_timer(device, args.rep)
    gemms, convs = [], []
    for model in (["smoke"] if args.smoke else args.models):
        g, c = smoke_shapes() if model == "smoke" else sd_shapes(model)
        gemms += g if "gemm" in args.kinds else []
        convs += c if "conv" in args.kinds else []
    if args.max_shapes:
        gemms, convs = gemms[:args.max_shapes], convs[:args.max_shapes]
    try:
        peak = measure_int8_peak(torch, device, bench, 256 if args.smoke else args.peak_size)
    except Exception as err:  # noqa: BLE001 - recorded, not fatal
        print(f"int8 peak not measured: {err}", file=sys.stderr)
        peak = None
    print(f"device: {device_name}; torch {torch.__version__}; triton {triton.__version__}; qdcompile from {where}; "
          f"measured int8 peak (_int_mm): {_fmt(peak, '.0f')} TOPS")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = f"kernels-{_slug(device_name if cuda else 'cpu-interpreter')}-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": device_name, "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(), "qdcompile": where,
        "command": command, "date": _dt.datetime.now().isoformat(timespec="seconds"), "smoke": bool(args.smoke),
        "timings_meaningful": cuda,
        "timer": "triton.testing.do_bench median" if cuda else "CPU wall clock (meaningless)",
        "int8_peak_tops": peak,
    }
    rows: list[Row] = []

    def write() -> dict:
        record = {**meta, "rows": [{**asdict(r), "tops": {k: r.tops(k) for k in r.ms}} for r in rows]}
        from qdcompile.io import atomic_write

        atomic_write(out_dir / f"{stem}.json", json.dumps(record, indent=2) + "\n")
        header = "\n".join(f"- {k}: {v}" for k, v in meta.items())
        warn = "\n**Smoke run on the CPU interpreter: timings are meaningless.**\n" if not cuda else ""
        (out_dir / f"{stem}.md").write_text(f"# Kernel benchmark\n\n{header}\n{warn}\n{table(rows, peak)}\n")
        return record

    write()
    for kind, shapes, fn in (("gemm", gemms, bench_gemm), ("conv", convs, bench_conv)):
        for s in shapes:
            try:
                rows.append(fn(torch, F, s, device, bench, not args.no_check))
            except Exception as err:  # noqa: BLE001 - a failing shape is recorded, not fatal
                m, n, k = (s.m, s.n, s.k) if kind == "gemm" else s.mnk()
                rows.append(Row(kind, s.name, m, n, k, error=f"{type(err).__name__}: {err}\n"
                                + traceback.format_exc(limit=3)))
            r = rows[-1]
            print(f"  {s.name}: " + (", ".join(f"{k} {v:.4f} ms" for k, v in r.ms.items())
                                     + (f"  FAILED: {r.error.splitlines()[0]}" if r.error else "")), flush=True)
            write()
    print()
    print(table(rows, peak))
    print(f"\nwrote {out_dir / stem}.json and .md")
    return {**write(), "paths": [str(out_dir / f"{stem}.json"), str(out_dir / f"{stem}.md")]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes; on a CPU-only machine under the Triton interpreter (timings mean nothing)")
    parser.add_argument("--models", nargs="+", default=["sd15"], choices=["sd15", "sdxl"])
    parser.add_argument("--kinds", nargs="+", default=["gemm", "conv"], choices=["gemm", "conv"])
    parser.add_argument("--rep", type=int, default=25, help="do_bench repetition time per measurement, ms")
    parser.add_argument("--max-shapes", type=int, default=0, help="at most this many shapes per kind (0: all)")
    parser.add_argument("--peak-size", type=int, default=8192, help="size of the square _int_mm peak measurement")
    parser.add_argument("--no-check", action="store_true", help="skip the correctness check before timing")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    import torch
    if not torch.cuda.is_available() and not args.smoke:
        parser.error("no CUDA device: the benchmark needs a GPU (use --smoke to check the script on a CPU)")
    command = " ".join([sys.executable, *sys.argv]) if argv is None else " ".join(["bench/kernels.py", *argv])
    record = run_kernel_bench(args, args.out_dir, command)
    return 0 if not any(r["error"] for r in record["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
