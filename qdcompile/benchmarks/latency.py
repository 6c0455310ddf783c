"""End-to-end latency of quantized U-Nets against float eager / compiled and torchao (the ``latency``
mode of ``qdcompile bench``): table, JSON, CSV, PNG and a per-kernel-category profile."""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

import qdcompile
from ..devices import resolve_device, synchronize
from ..io import atomic_write, write_json
from ..metrics import snr_db
from ..models import load_model
from ..passes.backend import qdiff_backend
from ..pipeline import QuantizedUNet
from ..recipe import QuantRecipe
from ..reference_models import reference_model
from .census import Census, census, meta_unet_from_folder
from .configs import UNET_CONFIGS, build_unet, unet_inputs
from .size import MB, format_rows, layer_precision, model_size

CONTENDERS = ("fp-eager", "fp-compiled", "fp-compiled-max-autotune", "torchao-int8", "qdiff-w8a8", "qdiff-w4a8",
              "qdiff-w4a4", "qdiff-mixed")


# order = priority: contenders not started within --budget-s are skipped
DEFAULT_CONTENDERS = ("fp-eager", "fp-compiled", "qdiff-w8a8", "qdiff-w4a8", "torchao-int8", "qdiff-mixed")


SMOKE_CONTENDERS = ("fp-eager", "fp-compiled", "qdiff-w8a8", "torchao-int8", "qdiff-mixed")


_PROFILE_CATEGORIES = ("qdiff int GEMM/conv (Triton)", "qdiff act quantize", "float GEMM/conv (cuBLAS/cuDNN/Inductor)",
                       "attention", "norms", "elementwise/other")


def classify_kernel(name: str) -> str:
    """Category of a CUDA kernel (or CPU op) name for the per-op breakdown."""
    n = name.lower()
    if re.search(r"_q(gemm|conv2d|conv|linear)\w*kernel|qdiff::q(linear|conv2d)", n):
        return "qdiff int GEMM/conv (Triton)"
    if re.search(r"quantize_act|qdiff::quantize", n):
        return "qdiff act quantize"
    if re.match(r"triton_(poi|red|per)_", n):
        if "norm" in n:
            return "norms"
        if "softmax" in n or "attention" in n:
            return "attention"
        return "elementwise/other"
    if re.search(r"flash|fmha|attention|attn|sdpa|softmax|mha", n):
        return "attention"
    if re.search(r"norm|rowwisemoments|computefusedparams|welford", n):
        return "norms"
    if re.search(r"gemm|conv|xmma|nvjet|cutlass|cublas|implicit|wgmma|triton_tem|_int_mm|\bmm\b|addmm|bmm|matmul|"
                 r"aten::mm|aten::linear|fprop|winograd|sm\d\d_", n):
        return "float GEMM/conv (cuBLAS/cuDNN/Inductor)"
    return "elementwise/other"


def _event_time_us(e, device: bool) -> float:
    names = (("self_device_time_total", "self_cuda_time_total", "device_time_total", "cuda_time_total")
             if device else ("self_cpu_time_total",))
    for attr in names:
        v = getattr(e, attr, None)
        if v:
            return float(v)
    return 0.0


def profile_breakdown(fn: Callable[[], Any], device: str, steps: int = 3) -> dict[str, Any]:
    """Time per kernel category over ``steps`` calls of ``fn`` (torch.profiler).

    CUDA: device time of every kernel, by kernel name. CPU: self CPU time of every op,
    attributed to its outermost enclosing ``qdiff::`` op if any (the aten ops of the
    reference integer path count as qdiff), else to its own or its nearest ancestor's
    category."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()
    synchronize(device)
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        synchronize(device)
    cats = {c: 0.0 for c in _PROFILE_CATEGORIES}
    kernels: dict[str, float] = {}
    category: dict[str, str] = {}
    source = "CUDA kernel time"
    if cuda:
        for e in prof.events():
            if str(getattr(e, "device_type", "")).endswith("CUDA"):
                t = _event_time_us(e, True)
                if t > 0:
                    kernels[e.name] = kernels.get(e.name, 0.0) + t
        for k, t in kernels.items():
            category[k] = classify_kernel(k)
            cats[category[k]] += t
    if not kernels:   # CPU run, or no device events recorded (no CUPTI): attribute CPU op time
        source = "CPU self time" if not cuda else "CPU self time (the profiler recorded no CUDA kernels)"
        for e in prof.events():
            t = _event_time_us(e, False)
            if t <= 0:
                continue
            chain, p = [classify_kernel(e.name)], e
            while getattr(p, "cpu_parent", None) is not None:
                p = p.cpu_parent
                chain.append(classify_kernel(p.name))
            qd = [c for c in chain if c.startswith("qdiff")]
            named = [c for c in chain if c != "elementwise/other"]
            cat = qd[-1] if qd else (named[0] if named else chain[0])
            key = f"{e.name}  (in {cat})" if cat != chain[0] else e.name
            category[key] = cat
            kernels[key] = kernels.get(key, 0.0) + t
            cats[cat] += t
    total = sum(cats.values()) or 1.0
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:25]
    return {"steps": steps, "source": source,
            "per_step_ms": {c: v / steps / 1e3 for c, v in cats.items()},
            "share": {c: v / total for c, v in cats.items()},
            "top": [{"name": k, "per_step_ms": v / steps / 1e3, "category": category[k]} for k, v in top]}


def time_calls(fn: Callable[[], Any], device: str, warmup: int, repeats: int, rep_ms: float) -> dict[str, float]:
    """Median / p20 / p80 seconds per call: triton.testing.do_bench on CUDA (events, L2
    flushed between calls), CUDA events or perf_counter otherwise."""
    if device.startswith("cuda"):
        try:
            from triton.testing import do_bench

            q = do_bench(fn, warmup=max(rep_ms / 4, 25), rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
            return {"median_s": q[0] / 1e3, "p20_s": q[1] / 1e3, "p80_s": q[2] / 1e3, "method": "triton.do_bench"}
        except Exception:  # noqa: BLE001 - fall back to plain events
            pass
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return {"median_s": statistics.median(times), "p20_s": q(0.2), "p80_s": q(0.8),
            "method": "cuda events" if device.startswith("cuda") else "perf_counter"}


def _graph_callable(fn: Callable[[], Any], device: str):
    """Capture ``fn`` (static inputs) into a CUDA graph; returns a replay callable."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g.replay


def _graph_count() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001
        return 0


class _LayoutAdapter(torch.nn.Module):
    """What ``qdcompile.sample`` calls: converts the latents to the benchmark's memory format
    and calls the contender (``unwrap`` finds the U-Net through ``_orig_mod``)."""

    def __init__(self, unet, fn, channels_last: bool):
        super().__init__()
        self._orig_mod = unet
        self.__dict__["_fn"] = fn
        self.__dict__["_cl"] = channels_last

    def forward(self, x, *args, **kwargs):
        if self._cl:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._fn(x, *args, **kwargs)


def _out_tensor(out) -> torch.Tensor:
    return out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, tuple) else out)


def device_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
                            "platform": platform.platform(), "cpu_threads": torch.get_num_threads()}
    for mod in ("triton", "diffusers", "torchao"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            info[mod] = f"unavailable ({type(e).__name__}: {e})"
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(torch.device(device))
        info.update({"gpu": p.name, "gpu_memory_GiB": round(p.total_memory / 2 ** 30, 1),
                     "sm_count": p.multi_processor_count, "capability": f"{p.major}.{p.minor}",
                     "cuda": torch.version.cuda})
        info["nvidia_smi_before"] = _nvidia_smi()
    else:
        info["gpu"] = "cpu"
    return info


def _nvidia_smi() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,pstate,clocks.sm,clocks.max.sm,"
                               "clocks.mem,temperature.gpu,power.draw,power.limit,memory.used",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def measure_ceilings(device: str) -> dict[str, float]:
    """Measured ceilings (METHOD.md): fp16 and int8 matmul rate, device-to-device copy bandwidth."""
    if not device.startswith("cuda"):
        return {}
    out: dict[str, float] = {}
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.float16)
    b = torch.randn(n, n, device=device, dtype=torch.float16)
    t = time_calls(lambda: a @ b, device, 3, 10, 300)["median_s"]
    out["fp16_matmul_TFLOPs"] = 2 * n ** 3 / t / 1e12
    try:
        ai = torch.randint(-128, 127, (n, n), device=device, dtype=torch.int8)
        bi = torch.randint(-128, 127, (n, n), device=device, dtype=torch.int8).t()   # column-major: cuBLASLt TN
        t = time_calls(lambda: torch._int_mm(ai, bi), device, 3, 10, 300)["median_s"]
        out["int8_matmul_TOPs"] = 2 * n ** 3 / t / 1e12
        del ai, bi
    except Exception as e:  # noqa: BLE001
        out["int8_matmul_error"] = f"{type(e).__name__}: {e}"  # type: ignore[assignment]
    src = torch.empty(2 ** 30, device=device, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    t = time_calls(lambda: dst.copy_(src), device, 3, 10, 300)["median_s"]
    out["copy_TBps_read_plus_write"] = 2 * src.numel() / t / 1e12
    del a, b, src, dst
    torch.cuda.empty_cache()
    return out


@dataclass
class Scenario:
    model: str              # sd15 | sdxl | reference | tiny | path
    batch: int
    resolution: int | None = None

    @property
    def tag(self) -> str:
        name = Path(self.model).name if os.sep in self.model else self.model
        return f"{name}-b{self.batch}" + (f"-r{self.resolution}" if self.resolution else "")


def _family(cid: str) -> str:
    return "qdiff" if cid.startswith("qdiff") else "eager" if cid == "fp-eager" else "Inductor"


class _Budget:
    """Wall-clock budget of a run: a contender is skipped when the last contender of its
    family (eager / Inductor-compiled / qdiff) took longer than the time left."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds
        self.took: dict[str, float] = {}

    def estimate(self, cid: str) -> float | None:
        return self.took.get(_family(cid))

    def record(self, cid: str, seconds: float) -> None:
        self.took[_family(cid)] = seconds

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed

    def line(self) -> str:
        return f"[t={self.elapsed:6.1f}s / budget {self.seconds:.0f}s]"


def _load_model(scn: Scenario, device: str, dtype, seed: int):
    """(unet, scheduler, description) for a scenario; weights are random except for the
    shipped reference model and ``--model DIR``."""
    from diffusers import DDIMScheduler

    if scn.model in ("sd15", "sdxl", "tiny"):
        unet = build_unet(scn.model, device=device, dtype=dtype, seed=seed)
        sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False)
        return unet, sched, UNET_CONFIGS[scn.model][3] + " (random weights)"
    if scn.model == "reference":
        try:
            unet, sched = reference_model("mnist", device=device, dtype=dtype)
            return unet, sched, "shipped MNIST reference model (trained weights)"
        except FileNotFoundError:
            unet = build_unet("tiny", device=device, dtype=dtype, seed=seed)
            from diffusers import DDPMScheduler

            return unet, DDPMScheduler(num_train_timesteps=1000), \
                "tiny UNet2DModel, random weights (shipped reference weights are missing)"

    unet, sched = load_model(scn.model, device=device, dtype=dtype)
    return unet, sched, f"{scn.model} (from_pretrained)"


def speed_recipe(name: str):
    """The preset ``name`` with the cheapest calibration method (round-to-nearest, min-max
    scales) but the preset's layer choices (bits, ``keep_8bit``, ``skip``, ``split``), which
    decide what the compiled model runs."""
    preset = QuantRecipe.preset(name)
    overrides = {"method": "rtn"}
    if "weight_observer" in {f.name for f in dataclasses.fields(QuantRecipe)}:
        overrides["weight_observer"] = "minmax"
    return dataclasses.replace(preset, **overrides)


def _calib_kwargs(unet, n: int, device, dtype) -> dict[str, Any] | None:
    _, _, kw = unet_inputs(unet, n, device=device, dtype=dtype, seed=1)
    return kw or None


def _torchao_config():
    import torchao  # noqa: F401
    from torchao import quantization as q

    for name in ("Int8DynamicActivationInt8WeightConfig",):
        if hasattr(q, name):
            return getattr(q, name)(), name
    if hasattr(q, "int8_dynamic_activation_int8_weight"):
        return q.int8_dynamic_activation_int8_weight(), "int8_dynamic_activation_int8_weight"
    raise ImportError("torchao has neither Int8DynamicActivationInt8WeightConfig nor "
                      "int8_dynamic_activation_int8_weight")


def _contender_label(cid: str, dtype) -> str:
    fp = {torch.float16: "FP16", torch.bfloat16: "BF16", torch.float32: "FP32"}.get(dtype, str(dtype))
    return {"fp-eager": f"{fp} eager", "fp-compiled": f"{fp} compiled (Inductor)",
            "fp-compiled-max-autotune": f"{fp} compiled (max-autotune)",
            "torchao-int8": "torchao int8 dyn. act + int8 weight, compiled",
            "qdiff-w8a8": "qdiff W8A8", "qdiff-w4a8": "qdiff W4A8", "qdiff-w4a4": "qdiff W4A4",
            "qdiff-mixed": "qdiff mixed precision (PTQD)"}[cid]


def _run_one(cid: str, scn: Scenario, opts: LatencyOptions, device: str, dtype, ref_out: dict, c_census: Census | None,
             budget: _Budget, ceilings: dict, profile_set: frozenset[str]) -> dict[str, Any]:
    """Build, prepare, compile and time one contender on one scenario. Never raises."""
    row: dict[str, Any] = {"scenario": scn.tag, "model": scn.model, "batch": scn.batch, "contender": cid,
                           "label": _contender_label(cid, dtype), "dtype": str(dtype).replace("torch.", ""),
                           "status": "ok"}
    if cid == "torchao-int8":
        try:
            _torchao_config()
        except Exception as e:  # noqa: BLE001
            row.update(status="unavailable", reason=f"torchao: {type(e).__name__}: {e}")
            return row
    if cid.startswith("fp-compiled") or cid == "torchao-int8":
        if not device.startswith("cuda") and not opts.cpu_inductor:
            row.update(status="skipped", reason="Inductor on CPU compiles C++ for minutes: pass --cpu-inductor")
            return row
    est = budget.estimate(cid)
    if budget.left() <= 0 or (est is not None and est > budget.left()):
        row.update(status="skipped", reason=f"time budget: {budget.left():.0f}s of --budget-s {opts.budget_s:.0f}s "
                                            f"left" + (f", a {_family(cid)} contender took {est:.0f}s" if est else ""))
        return row

    unet = fn = meta = None
    try:
        torch._dynamo.reset()
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            mem0 = torch.cuda.memory_allocated()
        unet, sched, desc = _load_model(scn, device, dtype, opts.seed)
        row["model_description"] = desc
        channels_last = opts.memory_format == "channels_last" or (opts.memory_format == "auto" and
                                                                   device.startswith("cuda"))
        row["memory_format"] = "channels_last" if channels_last else "contiguous"
        if channels_last:
            unet = unet.to(memory_format=torch.channels_last)
        x, t, kw = unet_inputs(unet, scn.batch, device=device, dtype=dtype, resolution=scn.resolution,
                               seed=opts.seed)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        recipe = None
        t_setup = time.perf_counter()
        if cid == "fp-eager":
            fn = unet
        elif cid.startswith("fp-compiled"):
            mode = "max-autotune-no-cudagraphs" if cid.endswith("max-autotune") else None
            fn = torch.compile(unet, dynamic=False, mode=mode)
            row["compile_mode"] = mode or "default"
        elif cid == "torchao-int8":
            from torchao.quantization import quantize_

            cfg, cfg_name = _torchao_config()
            quantize_(unet, cfg)
            fn = torch.compile(unet, dynamic=False)
            row["torchao_config"] = cfg_name + " (nn.Linear only; convs stay float)"
        elif cid.startswith("qdiff-"):
            recipe = speed_recipe(cid.split("-", 1)[1])
            if recipe.noise_correction:   # PTQD statistics on as many trajectories as the calibration
                recipe = dataclasses.replace(recipe, noise_samples=opts.calib_samples)
            row["recipe"] = recipe.to_dict()
            t0 = time.perf_counter()
            meta = qdcompile.calibrate(unet, sched, recipe, num_samples=opts.calib_samples,
                                       num_inference_steps=opts.calib_steps,
                                       sample_kwargs=_calib_kwargs(unet, opts.calib_samples, device, dtype),
                                       progress=False)
            row["calibration_s"] = time.perf_counter() - t0
            row["calibration"] = (f"cheap speed-run calibration: round-to-nearest (method='rtn'), "
                                  f"num_samples={opts.calib_samples}, num_inference_steps={opts.calib_steps}; the "
                                  "preset's layer choices (keep_8bit, split) are kept, so the same kernels run as with "
                                  "a full calibration: speed does not depend on calibration quality, the SNR does")
            fn = torch.compile(unet, backend=qdiff_backend, dynamic=False)
        mixed = None
        if cid == "qdiff-mixed":
            # the PTQD sampler: per-step activation precision + corrections; time each precision's
            # step and weight them by the plan (a median over a two-speed sequence would be meaningless)

            mixed = QuantizedUNet(fn, meta, backend="qdiff")
            plan = mixed.plan(sched, opts.calib_steps)
            mixed_t = {}
            for r in plan:
                mixed_t.setdefault(r["act_bits"], torch.full_like(t, r["timestep"]))
            row["precision_plan"] = {f"A{b}": sum(r["act_bits"] == b for r in plan) for b in mixed_t}
            fn = mixed
            t = mixed_t[max(mixed_t, key=lambda b: row["precision_plan"][f"A{b}"])]   # the commonest step
        call = lambda: fn(x, t, **kw)  # noqa: E731

        with torch.no_grad():
            t0 = time.perf_counter()
            out = _out_tensor(call())
            synchronize(device)
            row["first_call_s"] = time.perf_counter() - t0
            graphs0 = _graph_count()
            row["compile_s"] = row["first_call_s"] if cid != "fp-eager" else 0.0
            if cid.startswith("qdiff-"):
                try:
                    row["layers"] = qdcompile.report(fn).counts
                except Exception as e:  # noqa: BLE001 - the report is informative only
                    row["layers"] = f"report failed: {type(e).__name__}: {e}"
            ref = ref_out.get(scn.tag)
            if cid == "fp-eager":
                ref_out[scn.tag] = out.detach().float().cpu()
                row["snr_db_vs_fp_eager"] = None
            elif ref is not None:
                row["snr_db_vs_fp_eager"] = snr_db(ref, out.detach().float().cpu())
            row["output_finite"] = bool(torch.isfinite(out).all())
            del out
            for _ in range(opts.warmup):
                call()
            synchronize(device)
            if device.startswith("cuda"):
                row["resident_bytes"] = torch.cuda.memory_allocated() - mem0
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                call()
                call()
                synchronize(device)
                row["peak_bytes"] = torch.cuda.max_memory_allocated() - mem0
                row["peak_activation_bytes"] = torch.cuda.max_memory_allocated() - base

            runs = []
            for _ in range(max(1, opts.timing_passes)):
                runs.append(time_calls(call, device, opts.warmup, opts.repeats, opts.rep_ms))
            row["step_s"] = statistics.median(r["median_s"] for r in runs)
            row["step_p20_s"] = min(r["p20_s"] for r in runs)
            row["step_p80_s"] = max(r["p80_s"] for r in runs)
            row["step_pass_medians_s"] = [r["median_s"] for r in runs]
            row["timing_method"] = runs[0]["method"]
            if len(runs) > 1:
                meds = [r["median_s"] for r in runs]
                row["pass_spread_pct"] = 100 * (max(meds) - min(meds)) / min(meds)
            if mixed is not None:
                by_bits = {b: time_calls(lambda tb=tb: fn(x, tb, **kw), device, opts.warmup, opts.repeats,
                                          opts.rep_ms)["median_s"] for b, tb in mixed_t.items()}
                counts = row["precision_plan"]
                row["step_s_by_precision"] = {f"A{b}": v for b, v in by_bits.items()}
                row["step_s"] = sum(v * counts[f"A{b}"] for b, v in by_bits.items()) / sum(counts.values())
                row["mixed_note"] = (f"step_s = plan-weighted mean of the per-precision step medians over "
                                     f"{opts.calib_steps} steps ({counts})")

            if opts.cuda_graphs and device.startswith("cuda"):
                try:
                    replay = _graph_callable(call, device)
                    g = time_calls(replay, device, opts.warmup, opts.repeats, opts.rep_ms)
                    row["step_graph_s"] = g["median_s"]
                except Exception as e:  # noqa: BLE001
                    row["step_graph_s"] = None
                    row["graph_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    torch.cuda.synchronize()

            cfg_size = unet.config.sample_size
            if opts.e2e_steps > 0 and scn.resolution and scn.resolution != cfg_size:
                row["e2e_note"] = (f"e2e skipped: qdcompile.sample draws latents at the config's sample_size "
                                   f"({cfg_size}), not --resolution {scn.resolution} (it would recompile)")
            elif opts.e2e_steps > 0:
                # the sampler makes contiguous latents: hand them over in the timed layout, so that
                # a compiled model is not recompiled (Dynamo guards on strides) for sampling
                sampler_model = _LayoutAdapter(unet, fn, channels_last)
                e2e_sched = mixed.wrap_scheduler(sched) if mixed is not None else sched
                gen_times = []
                for i in range(opts.e2e_repeats + 1):
                    g = torch.Generator().manual_seed(opts.seed)
                    synchronize(device)
                    t0 = time.perf_counter()
                    qdcompile.sample(sampler_model, e2e_sched, num_images=scn.batch, num_inference_steps=opts.e2e_steps,
                                     generator=g, sample_kwargs=kw, progress=False, to_image=False)
                    synchronize(device)
                    if i:  # the first run warms up the scheduler path
                        gen_times.append(time.perf_counter() - t0)
                row["e2e_steps"] = opts.e2e_steps
                row["graphs_compiled_after_first_call"] = _graph_count() - graphs0  # 0 = no recompilation
                row["e2e_s"] = statistics.median(gen_times)
                row["e2e_scheduler"] = type(sched).__name__

            if cid in profile_set or (opts.profile_all and cid != "fp-eager"):
                row["profile"] = profile_breakdown(call, device, steps=opts.profile_steps)

        if c_census is not None:
            if cid == "torchao-int8":
                s = model_size(c_census, qdcompile.QuantRecipe.w8a8(), float_bytes=2, ops=("linear",))
            else:
                s = model_size(c_census, recipe, float_bytes=2 if dtype == torch.float16 else 4)
            row["weight_bytes"] = s.total_bytes
            row["weight_bytes_detail"] = s.bytes
            row["floor_s"] = _floor_seconds(c_census, recipe if cid.startswith("qdiff") else None, cid, ceilings)
        row["setup_s"] = time.perf_counter() - t_setup
    except Exception as e:  # noqa: BLE001 - one contender failing must not stop the run
        import traceback

        row.update(status="error", reason=f"{type(e).__name__}: {str(e)[:500]}",
                   traceback=traceback.format_exc()[-3000:])
    finally:
        del fn, unet, meta
        torch._dynamo.reset()
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    return row


def _floor_seconds(c: Census, recipe, cid: str, ceil: dict) -> float | None:
    """Compute floor of one step from the measured ceilings: float MACs at the fp16 rate,
    quantized MACs at the int8 rate (Hopper has no int4 MMA: W4 runs at the int8 rate);
    attention matmuls at the fp16 rate. Memory traffic is ignored (the U-Net is compute-bound)."""
    fp, i8 = ceil.get("fp16_matmul_TFLOPs"), ceil.get("int8_matmul_TOPs")
    if not fp:
        return None
    q_macs = f_macs = 0
    for layer in c.layers:
        wb, ab, _ = layer_precision(layer, recipe)
        if cid == "torchao-int8":
            wb, ab = (8, 8) if layer.op == "linear" else (None, None)
        if wb is not None and ab is not None and i8:
            q_macs += layer.macs
        else:
            f_macs += layer.macs
    f_macs += c.attn_macs
    return 2 * f_macs / (fp * 1e12) + (2 * q_macs / (i8 * 1e12) if q_macs else 0.0)


def _device_slug(info: dict) -> str:
    name = info.get("gpu") or "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def _write_results(payload: dict, out_dir: Path, stem: str) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out_dir / f"{stem}.json"), "csv": str(out_dir / f"{stem}.csv")}
    write_json(paths["json"], payload)
    cols = ["scenario", "contender", "label", "status", "dtype", "batch", "step_ms", "step_graph_ms", "speedup_vs_compiled",
            "speedup_vs_eager", "e2e_s", "e2e_steps", "compile_s", "calibration_s", "weight_MB", "resident_MB",
            "peak_MB", "snr_db_vs_fp_eager", "floor_ms", "pass_spread_pct", "reason"]

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for r in payload["rows"]:
                w.writerow(_flat_row(r))

    atomic_write(paths["csv"], write_csv)
    return paths


def _flat_row(r: dict) -> dict:
    ms = lambda k: None if r.get(k) is None else round(r[k] * 1e3, 3)  # noqa: E731
    mb = lambda k: None if r.get(k) is None else round(r[k] / MB, 1)  # noqa: E731
    return {**{k: r.get(k) for k in ("scenario", "contender", "label", "status", "dtype", "batch", "e2e_steps",
                                     "speedup_vs_compiled", "speedup_vs_eager", "reason", "pass_spread_pct")},
            "step_ms": ms("step_s"), "step_graph_ms": ms("step_graph_s"), "floor_ms": ms("floor_s"),
            "e2e_s": None if r.get("e2e_s") is None else round(r["e2e_s"], 3),
            "compile_s": None if r.get("compile_s") is None else round(r["compile_s"], 1),
            "calibration_s": None if r.get("calibration_s") is None else round(r["calibration_s"], 1),
            "weight_MB": mb("weight_bytes"), "resident_MB": mb("resident_bytes"), "peak_MB": mb("peak_bytes"),
            "snr_db_vs_fp_eager": None if r.get("snr_db_vs_fp_eager") is None else round(r["snr_db_vs_fp_eager"], 2)}


def _add_speedups(rows: list[dict]) -> None:
    by_scn: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_scn.setdefault(r["scenario"], {})[r["contender"]] = r
    for scn, rs in by_scn.items():
        comp = rs.get("fp-compiled", {}).get("step_s")
        eager = rs.get("fp-eager", {}).get("step_s")
        for r in rs.values():
            s = r.get("step_s")
            r["speedup_vs_compiled"] = round(comp / s, 3) if (comp and s) else None
            r["speedup_vs_eager"] = round(eager / s, 3) if (eager and s) else None


def format_latency_table(rows: list[dict]) -> str:
    flat = [_flat_row(r) for r in rows]
    for f, r in zip(flat, rows):
        f["status_or_reason"] = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"[:90]
    return format_rows(flat, [("scenario", "scenario", ""), ("label", "contender", ""), ("step_ms", "step ms", ".2f"),
                             ("step_graph_ms", "graph ms", ".2f"), ("speedup_vs_compiled", "x vs compiled", ".2f"),
                             ("e2e_s", "e2e s", ".2f"), ("compile_s", "compile s", ".1f"),
                             ("weight_MB", "weights MB", ".1f"), ("peak_MB", "peak MB", ".0f"),
                             ("snr_db_vs_fp_eager", "SNR dB", ".1f"), ("floor_ms", "floor ms", ".2f"),
                             ("status_or_reason", "status", "")])


def format_profiles(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        p = r.get("profile")
        if not p:
            continue
        lines.append(f"\n{r['scenario']} / {r['label']}: per-step time by category ({p['source']}, {p['steps']} steps)")
        for cat in _PROFILE_CATEGORIES:
            lines.append(f"  {cat:<42} {p['per_step_ms'][cat]:9.3f} ms  {100 * p['share'][cat]:5.1f} %")
        lines.append("  top kernels/ops:")
        for k in p["top"][:12]:
            lines.append(f"    {k['per_step_ms']:9.3f} ms  [{k['category']}]  {k['name'][:110]}")
    return "\n".join(lines)


def _plot(payload: dict, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        return f"PNG skipped: matplotlib unavailable ({type(e).__name__}: {e})"
    rows = [r for r in payload["rows"] if r.get("step_s")]
    if not rows:
        return "PNG skipped: no timed contender"
    prof = [r for r in rows if r.get("profile")]
    fig, axes = plt.subplots(1, 2 if prof else 1, figsize=(15 if prof else 9, 0.5 * len(rows) + 2.5), squeeze=False)
    ax = axes[0][0]
    labels = [f"{r['scenario']}: {r['label']}" for r in rows]
    vals = [r["step_s"] * 1e3 for r in rows]
    bars = ax.barh(range(len(rows)), vals, color=["#888" if r["contender"].startswith("fp") else
                                                   "#c60" if r["contender"].startswith("torchao") else "#06c"
                                                   for r in rows])
    for b, r in zip(bars, rows):
        sp = r.get("speedup_vs_compiled")
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {b.get_width():.2f} ms" + (f" ({sp:.2f}x)" if sp else ""),
                va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("U-Net step, median ms (speed-up vs float compiled)")
    ax.set_title(f"{payload['env'].get('gpu', 'cpu')} — torch {payload['env']['torch']}", fontsize=9)
    if prof:
        ax2 = axes[0][1]
        left = [0.0] * len(prof)
        for cat in _PROFILE_CATEGORIES:
            v = [r["profile"]["per_step_ms"][cat] for r in prof]
            ax2.barh(range(len(prof)), v, left=left, label=cat)
            left = [a + b for a, b in zip(left, v)]
        ax2.set_yticks(range(len(prof)), [f"{r['scenario']}: {r['label']}" for r in prof], fontsize=8)
        ax2.invert_yaxis()
        ax2.set_xlabel("ms per step by kernel category (profiler)")
        ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return str(path)


def _emit(payload: dict, out_dir: Path, stem: str, final: bool) -> dict[str, str]:
    _add_speedups(payload["rows"])
    paths = _write_results(payload, out_dir, stem)
    if final:
        prof = format_profiles(payload["rows"])
        ppath = out_dir / f"{stem}-profile.txt"
        atomic_write(ppath, (prof or "no profile collected") + "\n")
        paths["profile"] = str(ppath)
        paths["png"] = _plot(payload, out_dir / f"{stem}.png")
    return paths


@dataclass
class LatencyOptions:
    """What :func:`run_latency` measures (the options of ``qdcompile bench latency``, same names)."""

    models: Optional[Sequence[str]] = None       # sd15 | sdxl | reference | tiny (default: sd15 on CUDA, reference on CPU)
    model_dir: Optional[str] = None              # a diffusers folder (real checkpoint) instead
    batch: Optional[Sequence[int]] = None        # batch sizes (default: 2 on CUDA = CFG, 1 on CPU)
    resolution: Optional[int] = None             # latent resolution (default: the config's)
    contenders: Optional[Sequence[str]] = None   # from CONTENDERS (default DEFAULT_CONTENDERS; fp-eager always first)
    max_autotune: bool = False                   # add fp-compiled-max-autotune
    cuda_graphs: bool = False                    # also time CUDA-graph replay
    dtype: Optional[str] = None                  # fp16 | bf16 | fp32 (default fp16 on CUDA, fp32 on CPU)
    memory_format: str = "auto"                  # auto | channels_last | contiguous
    calib_samples: int = 2
    calib_steps: int = 4
    warmup: int = 3
    repeats: int = 20
    rep_ms: float = 1500.0
    timing_passes: int = 2
    e2e_steps: int = 20
    e2e_repeats: int = 2
    profile: Optional[Sequence[str]] = None      # contenders to profile (default PROFILED; [] for none)
    profile_all: bool = False
    profile_steps: int = 3
    budget_s: float = 540.0
    no_ceilings: bool = False
    cpu_inductor: bool = False                   # on CPU, also run the Inductor contenders
    threads: Optional[int] = None                # recorded; the command sets torch's threads (see latency_threads)
    device: str = "auto"
    seed: int = 0
    out_dir: str = "bench/results"
    tag: Optional[str] = None
    smoke: bool = False                          # tiniest run
    merge: Optional[Sequence[str]] = None        # merge earlier result JSONs instead of measuring


PROFILED = ("fp-compiled", "qdiff-w8a8", "qdiff-w4a8", "torchao-int8")


def latency_threads(opts: LatencyOptions, device: str) -> Optional[int]:
    """The torch CPU thread count a run should use: ``opts.threads``, else 1 for a CPU smoke run (a
    busy shared CPU makes OpenMP thread teams crawl), else None (leave it)."""
    return opts.threads or (1 if (opts.smoke and not device.startswith("cuda")) else None)


def run_latency(opts: LatencyOptions) -> int:
    """Time every contender on every scenario of ``opts``; print the tables and write the files.

    Process settings are the caller's (``qdcompile bench latency`` makes them): on CPU the qdiff
    backend should run without Inductor (``QDCOMPILE_INDUCTOR=0``), and torch's thread count
    should be :func:`latency_threads`. This function changes neither."""
    dev = resolve_device(opts.device)
    if opts.merge:
        return _merge(opts)
    cuda = dev.startswith("cuda")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
        opts.dtype or ("fp16" if cuda else "fp32")]
    if opts.smoke:
        models, batches = list(opts.models or ["tiny"]), [1]
        opts = dataclasses.replace(opts, repeats=2, warmup=1, timing_passes=1, rep_ms=50,
                                   e2e_steps=min(opts.e2e_steps, 2), e2e_repeats=1,
                                   calib_samples=1, calib_steps=2, profile_steps=1)
    else:
        models = list(opts.models or (["sd15"] if cuda else ["reference"]))
        batches = list(opts.batch or ([2] if cuda else [1]))
    if opts.model_dir:
        models = [opts.model_dir]
    contenders = list(opts.contenders or (SMOKE_CONTENDERS if opts.smoke else DEFAULT_CONTENDERS))
    if opts.max_autotune and "fp-compiled-max-autotune" not in contenders:
        contenders.insert(contenders.index("fp-compiled") + 1 if "fp-compiled" in contenders else 1,
                          "fp-compiled-max-autotune")
    if "fp-eager" in contenders:  # the reference output of every scenario comes from the first, eager, run
        contenders.remove("fp-eager")
    contenders.insert(0, "fp-eager")
    profile_set = frozenset(opts.profile if opts.profile is not None else PROFILED)
    if cuda:
        torch.backends.cudnn.benchmark = True

    budget = _Budget(opts.budget_s)
    try:
        from diffusers.utils import logging as dlogging

        dlogging.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass
    env = device_info(dev)
    stamp = _dt.datetime.now()
    scenarios = [Scenario(m, b, opts.resolution) for m in models for b in batches]
    stem = f"latency-{_device_slug(env)}-{stamp:%Y-%m-%d}" + (f"-{opts.tag}" if opts.tag else
                                                              "-" + "_".join(s.tag for s in scenarios))
    out_dir = Path(opts.out_dir)
    payload: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "argv": sys.argv, "date": stamp.isoformat(),
        "env": env, "settings": {**dataclasses.asdict(opts), "profile_set": sorted(profile_set)},
        "notes": _notes(cuda), "ceilings": {}, "rows": [],
    }
    print(f"qdcompile latency benchmark on {env.get('gpu')} (torch {env['torch']}, triton {env.get('triton')}, "
          f"diffusers {env.get('diffusers')})")
    if not cuda:
        print("NOTE: CPU run — the qdiff layers run the pure-torch reference integer path; "
              "CPU timings say nothing about GPU speed.")
    print(f"scenarios: {[s.tag for s in scenarios]}; contenders: {contenders}; budget {opts.budget_s:.0f}s")
    if cuda and not opts.no_ceilings:
        try:
            payload["ceilings"] = measure_ceilings(dev)
        except Exception as e:  # noqa: BLE001
            payload["ceilings"] = {"error": f"{type(e).__name__}: {e}"}
        print(f"{budget.line()} measured ceilings: {payload['ceilings']}")
    ref_out: dict[str, torch.Tensor] = {}
    poisoned: str | None = None   # a sticky CUDA error leaves the context unusable for what follows
    for scn in scenarios:
        c = None
        try:
            if scn.model in UNET_CONFIGS or scn.model == "reference":
                meta_model, _, _ = _load_model(scn, "meta", torch.float32, 0) if scn.model != "reference" else \
                    _load_model(scn, "cpu", torch.float32, 0)
                c = census(meta_model, batch=scn.batch, resolution=scn.resolution, name=scn.model)
                del meta_model
            else:
                c = census(meta_unet_from_folder(scn.model), batch=scn.batch, resolution=scn.resolution,
                           name=scn.model)
        except Exception as e:  # noqa: BLE001
            print(f"  (no size/MAC census for {scn.tag}: {type(e).__name__}: {e})")
        if c is not None:
            payload.setdefault("census", {})[scn.tag] = {"params": c.total_params, "GMACs_layers": c.layer_macs / 1e9,
                                                         "GMACs_attention": c.attn_macs / 1e9}
        for cid in contenders:
            print(f"{budget.line()} {scn.tag}: {cid} ...", flush=True)
            t_start = budget.elapsed
            if poisoned:
                row = {"scenario": scn.tag, "model": scn.model, "batch": scn.batch, "contender": cid,
                       "label": _contender_label(cid, dtype), "status": "skipped",
                       "reason": f"CUDA context unusable after an error in {poisoned}: rerun with --contenders"}
            else:
                row = _run_one(cid, scn, opts, dev, dtype, ref_out, c, budget, payload["ceilings"], profile_set)
            if cuda and row["status"] == "error" and re.search(
                    r"CUDA error|illegal (memory|instruction)|device-side assert|unspecified launch failure",
                    row.get("reason", "") + row.get("traceback", "")):
                poisoned = f"{scn.tag}/{cid}"
            row["elapsed_at_end_s"] = budget.elapsed
            if row["status"] == "ok":
                budget.record(cid, budget.elapsed - t_start)
            payload["rows"].append(row)
            msg = (f"step {row['step_s'] * 1e3:.3f} ms" if row.get("step_s") else
                   f"{row['status']}: {row.get('reason', '')}")
            extra = "".join(f", {k} {row[k]:.1f}s" for k in ("calibration_s", "compile_s") if row.get(k))
            print(f"{budget.line()}   -> {msg}{extra}", flush=True)
            _emit(payload, out_dir, stem, final=False)
    if cuda:
        payload["env"]["nvidia_smi_after"] = _nvidia_smi()
    paths = _emit(payload, out_dir, stem, final=True)
    print()
    print(format_profiles(payload["rows"]))
    print("\n" + format_latency_table(payload["rows"]))
    if not cuda:
        print("\nCPU timings say nothing about GPU speed (reference integer path, float64 math).")
    print("\n" + "\n".join(f"wrote {v}" if not v.startswith("PNG skipped") else v for v in paths.values()))
    print(f"total {budget.elapsed:.1f}s")
    return 0


def _notes(cuda: bool) -> list[str]:
    n = ["step: median time of one U-Net call on fixed random inputs (triton.testing.do_bench on CUDA: CUDA events, "
         "L2 flushed between calls; several passes, their medians kept to show the run-to-run spread)",
         "graph: the same call captured in a CUDA graph and replayed (--cuda-graphs)",
         "e2e: qdcompile.sample over --e2e-steps scheduler steps, batch = scenario batch (a CFG batch of 2 is timed "
         "as 2 latents with their own text embeddings: the same U-Net cost), median of --e2e-repeats runs after one "
         "warm-up run; no CUDA graph",
         "compile_s: first call (Dynamo + Inductor + Triton autotuning of the qdiff kernels); calibration_s apart",
         "weights MB: stored format (quantized codes + scales + float params at the run dtype), from the census; "
         "resident MB: GPU memory held after setup (for qdiff this includes the float weights, which the module keeps)",
         "peak MB: max_memory_allocated during two steps, from the contender's start (weights + activations)",
         "SNR dB: U-Net output vs the float eager output on the same inputs (random weights, cheap calibration: "
         "a smoke signal for broken kernels, not a quality number)",
         "floor ms: float MACs at the measured fp16 matmul rate + quantized MACs at the measured int8 rate "
         "(attention matmuls float); memory traffic ignored",
         "qdiff mixed precision: PTQD sampler (W4A4/A8 per step + corrections), plan from a cheap RTN "
         "calibration; its step time is the plan-weighted mean of the per-precision steps"]
    if not cuda:
        n.insert(0, "CPU run: CPU timings say nothing about GPU speed")
    return n


def _merge(opts: LatencyOptions) -> int:
    """Combine several result JSONs (same device) into one table/JSON/CSV/PNG."""
    payloads = [json.loads(Path(p).read_text()) for p in opts.merge]
    gpus = {p["env"].get("gpu") for p in payloads}
    if len(gpus) > 1:
        print(f"warning: merging results from different devices {gpus}: compare timings only within a device")
    merged = dict(payloads[0])
    merged["rows"] = [r for p in payloads for r in p["rows"]]
    merged["merged_from"] = [str(p) for p in opts.merge]
    merged["commands"] = [p["command"] for p in payloads]
    stem = opts.tag or ("latency-" + _device_slug(merged["env"]) + f"-{_dt.datetime.now():%Y-%m-%d}-merged")
    paths = _emit(merged, Path(opts.out_dir), stem, final=True)
    print(format_latency_table(merged["rows"]))
    print("\n" + "\n".join(f"wrote {v}" for v in paths.values()))
    return 0
