"""One-call GPU check (``bash bench/gpu_check.sh``): kernels and the SD 1.5 U-Net step on a fresh H100/H200.

Stages, each in its own ``try`` (a failing stage or shape is recorded with its error, never
fatal), each skipped when the time budget (``--budget-s``, default 7.5 minutes) is spent; the
JSON and Markdown under ``--out-dir`` are rewritten after every stage:

1. ``env``: device, SMs, torch / Triton / CUDA versions, where qdcompile was imported from;
2. ``kernels``: compiled-kernel correctness on SD 1.5 shapes (each shape checked against the
   pure-torch reference before it is timed) and kernel time vs ``torch._int_mm`` and FP16
   cuBLAS/cuDNN (``bench/kernels.py`` with short repetitions, ``--max-shapes`` per kind);
3. ``unet``: the SD 1.5 U-Net (``UNet2DConditionModel`` from the SD 1.5 config, random
   weights, no download; batch 2, 64² latent, FP16): FP16 eager, FP16 ``torch.compile`` with
   CUDA graphs (``mode="reduce-overhead"``), qdiff W8A8 and W4A8 with CUDA graphs
   (``torch.compile(unet, backend="qdiff", mode="reduce-overhead")`` after a round-to-nearest
   speed-run calibration); median step time over ``--steps`` CUDA-event-timed calls;
4. ``profile``: a ``torch.profiler`` breakdown (top kernels by CUDA time) of one compiled
   qdiff W8A8 step;
5. ``prediction``: the static sm_90 model's predicted ratios (``bench/sm90_report.py``'s last
   committed result) next to the measured ones.

``--smoke``: the same stages on the CPU (kernels under the Triton interpreter on tiny shapes,
the tiny U-Net config in float32, the compiled stages without CUDA graphs); checks the
script, the numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _checkout import use_checkout  # noqa: E402


CONTENDERS = (("fp16_eager", None), ("fp16_compiled", "inductor"), ("qdiff_w8a8", "w8a8"), ("qdiff_w4a8", "w4a8"))


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _time_calls(torch, fn, steps: int, cuda: bool) -> dict:
    """Median / min of ``steps`` timed calls after two warm-up calls (compilation, capture)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(steps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "n": len(times)}


def stage_env(torch) -> dict:
    import triton
    cuda = torch.cuda.is_available()
    out = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "qdcompile": use_checkout(), "device": "cpu"}
    if cuda:
        p = torch.cuda.get_device_properties(0)
        out.update(device=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                   capability=f"{p.major}.{p.minor}")
    return out


def stage_kernels(args, out_dir: Path) -> dict:
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_kernels", HERE / "kernels.py")
    bench_kernels = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench_kernels     # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(bench_kernels)
    kargs = argparse.Namespace(smoke=args.smoke, models=["sd15"], kinds=["gemm", "conv"], rep=args.rep,
                               max_shapes=args.max_shapes, peak_size=4096, no_check=False)
    record = bench_kernels.run_kernel_bench(kargs, out_dir, "bench/gpu_check.py (kernels stage)")
    failed = [r["name"] for r in record["rows"] if r["error"]]
    return {"rows": len(record["rows"]), "failed_shapes": failed, "int8_peak_tops": record["int8_peak_tops"],
            "files": record["paths"], "ok": not failed}


def _unet(torch, name: str, device, dtype):
    from qdcompile.benchmarks.configs import build_unet, unet_inputs
    unet = build_unet(name, device=device, dtype=dtype, seed=0).eval()
    x, t, kw = unet_inputs(unet, 2, device=device, dtype=dtype, seed=0)
    return unet, (x, t, kw)


def _qdiff_model(torch, name: str, preset: str, device, dtype, mode):
    import qdcompile
    from diffusers import DDPMScheduler
    from qdcompile.benchmarks.configs import unet_inputs
    from qdcompile.benchmarks.latency import speed_recipe
    unet, inputs = _unet(torch, name, device, dtype)
    _, _, kw = unet_inputs(unet, 1, device=device, dtype=dtype, seed=1)
    qdcompile.calibrate(unet, DDPMScheduler(num_train_timesteps=1000), speed_recipe(preset), num_samples=1,
                        num_inference_steps=2, sample_kwargs=kw or None, progress=False)
    return torch.compile(unet, backend="qdiff", mode=mode, dynamic=False), inputs


def stage_unet(args, torch, record, budget: Budget, save) -> None:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    name = "tiny" if args.smoke else "sd15"
    mode = "reduce-overhead" if cuda else None          # CUDA graphs
    results = record["stages"].setdefault("unet", {"model": name, "batch": 2, "dtype": str(dtype),
                                                   "compile_mode": mode, "contenders": {}})
    contenders = [(key, how) for key, how in CONTENDERS if key in args.contenders]
    for key, how in contenders:
        if budget.left() < 60:
            results["contenders"][key] = {"status": "skipped: time budget spent"}
            save()
            continue
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                if how is None:
                    fn, (x, t, kw) = _unet(torch, name, device, dtype)
                elif how == "inductor":
                    unet, (x, t, kw) = _unet(torch, name, device, dtype)
                    fn = torch.compile(unet, mode=mode, dynamic=False)
                else:
                    fn, (x, t, kw) = _qdiff_model(torch, name, how, device, dtype, mode)
                fn(x, t, **kw)                       # compile / autotune / capture
                setup = time.perf_counter() - t0
                timing = _time_calls(torch, lambda: fn(x, t, **kw), args.steps, cuda)
            results["contenders"][key] = {"status": "ok", "setup_s": round(setup, 1), **timing}
        except Exception as err:  # noqa: BLE001 - recorded, not fatal
            results["contenders"][key] = {"status": f"failed: {type(err).__name__}: {err}"[:500],
                                          "traceback": traceback.format_exc(limit=6)}
        save()
    c = results["contenders"]
    base = c.get("fp16_compiled", {}).get("median_ms")
    results["speedup_vs_fp16_compiled"] = {k: round(base / v["median_ms"], 3) for k, v in c.items()
                                           if base and v.get("median_ms")}


def stage_profile(args, torch, budget: Budget) -> dict:
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    if budget.left() < 60:
        return {"status": "skipped: time budget spent"}
    name = "tiny" if args.smoke else "sd15"
    fn, (x, t, kw) = _qdiff_model(torch, name, "w8a8", "cuda" if cuda else "cpu",
                                  torch.float16 if cuda else torch.float32, None)
    with torch.no_grad():
        fn(x, t, **kw)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            fn(x, t, **kw)
            if cuda:
                torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:20]
    total = sum(getattr(e, key, 0) for e in prof.key_averages())
    return {"status": "ok", "metric": key, "total_us": total,
            "top": [{"name": e.key[:120], "us": getattr(e, key, 0), "calls": e.count} for e in events]}


def stage_prediction() -> dict:
    found = sorted((HERE / "results").glob("sm90-report-*-after.md"))
    if not found:
        return {"status": "no committed sm90 report"}
    last = found[-1].read_text().strip().splitlines()[-1]
    return {"status": "ok", "file": str(found[-1].relative_to(HERE.parent)), "line": last}


def markdown(record: dict) -> str:
    lines = ["# GPU check", ""] + [f"- {k}: {v}" for k, v in record["stages"].get("env", {}).items()]
    lines += [f"- command: {record['command']}", f"- elapsed: {record.get('elapsed_s')} s", ""]
    k = record["stages"].get("kernels")
    if k:
        lines += ["## Kernels", "", f"{json.dumps({x: y for x, y in k.items() if x != 'traceback'})}", ""]
    u = record["stages"].get("unet")
    if u:
        lines += ["## SD 1.5 U-Net step" if u.get("model") == "sd15" else f"## U-Net step ({u.get('model')})", "",
                  "| contender | status | median ms | min ms | setup s | × FP16 compiled |", "|---|---|---|---|---|---|"]
        for key, v in u["contenders"].items():
            lines.append(f"| {key} | {v['status'][:80]} | {v.get('median_ms', '')} | {v.get('min_ms', '')} | "
                         f"{v.get('setup_s', '')} | {u.get('speedup_vs_fp16_compiled', {}).get(key, '')} |")
        lines.append("")
    p = record["stages"].get("profile")
    if p and p.get("top"):
        lines += ["## Profile (qdiff W8A8, one step)", "", "| kernel | µs | calls |", "|---|---|---|"]
        lines += [f"| {e['name']} | {e['us']:.0f} | {e['calls']} |" for e in p["top"]]
        lines.append("")
    pr = record["stages"].get("prediction")
    if pr:
        lines += ["## Static model", "", f"{pr.get('line', pr.get('status'))} ({pr.get('file', '')})", ""]
    errors = {s: v.get("status") for s, v in record["stages"].items() if isinstance(v, dict)
              and str(v.get("status", "ok")).startswith("failed")}
    if errors:
        lines += ["## Failed stages", ""] + [f"- {s}: {e}" for s, e in errors.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU check of the script (tiny shapes/model)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting stages after this many seconds")
    parser.add_argument("--rep", type=int, default=20, help="do_bench repetition time per kernel timing, ms")
    parser.add_argument("--max-shapes", type=int, default=8, help="SD 1.5 shapes per kind in the kernel stage")
    parser.add_argument("--steps", type=int, default=10, help="timed U-Net calls per contender")
    parser.add_argument("--stages", nargs="+", default=["env", "kernels", "unet", "profile", "prediction"])
    parser.add_argument("--contenders", nargs="+", default=[k for k, _ in CONTENDERS],
                        choices=[k for k, _ in CONTENDERS])
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)

    import torch
    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.smoke:
            parser.error("no CUDA device (use --smoke to check the script on a CPU)")
        os.environ.setdefault("TRITON_INTERPRET", "1")          # before triton / the kernels are imported
        os.environ.setdefault("QDCOMPILE_KERNELS", "reference")  # the U-Net stages on CPU: reference path
    budget = Budget(args.budget_s)
    t_start = time.perf_counter()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"gpu-check-{'smoke-' if args.smoke else ''}{stamp}"
    record = {"command": " ".join(["bench/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
              "date": _dt.datetime.now().isoformat(timespec="seconds"), "smoke": args.smoke, "stages": {}}

    def save() -> None:
        record["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        from qdcompile.io import atomic_write

        atomic_write(stem.with_suffix(".json"), json.dumps(record, indent=2, default=str) + "\n")
        atomic_write(stem.with_suffix(".md"), markdown(record))

    for name in args.stages:
        try:
            if name == "env":
                record["stages"]["env"] = stage_env(torch)
            elif name == "kernels":
                record["stages"]["kernels"] = (stage_kernels(args, args.out_dir) if budget.left() > 60
                                               else {"status": "skipped: time budget spent"})
            elif name == "unet":
                stage_unet(args, torch, record, budget, save)
            elif name == "profile":
                record["stages"]["profile"] = stage_profile(args, torch, budget)
            elif name == "prediction":
                record["stages"]["prediction"] = stage_prediction()
        except Exception as err:  # noqa: BLE001 - a failing stage is recorded, not fatal
            record["stages"][name] = {"status": f"failed: {type(err).__name__}: {err}"[:500],
                                      "traceback": traceback.format_exc(limit=6)}
        save()
        print(f"[{record['elapsed_s']:.0f} s] {name}: "
              f"{json.dumps(record['stages'].get(name), default=str)[:300]}", flush=True)
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
