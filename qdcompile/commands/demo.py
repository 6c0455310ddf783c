"""``qdcompile demo``: calibrate, compile and sample the embedded model; grid, report, timings."""

from __future__ import annotations

import argparse
import time

import torch

import qdcompile
from ..classifier import digit_metrics
from ..devices import default_dtype, resolve_device, synchronize
from ..images import save_comparison_grid
from ..io import check_writable_dir, write_json
from ..metrics import psnr_db, snr_db
from ..pipeline import QuantizedUNet
from .common import RECIPES, add_common_arguments, count, heartbeat, median_seconds


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``qdcompile demo`` to the CLI's subparsers."""
    p = subparsers.add_parser("demo", help="calibrate + compile + sample the embedded model; grid, report, timings")
    p.add_argument("--model", default="mnist", help="shipped reference model")
    p.add_argument("--recipe", default="w8a8", choices=RECIPES)
    p.add_argument("--num-images", type=count(), default=16)
    p.add_argument("--steps", type=count(), default=50)
    p.add_argument("--calib-samples", type=count(), default=64)
    p.add_argument("--out", default="qdcompile-demo", help="output folder")
    add_common_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    out = check_writable_dir(args.out, "--out")   # created by the first file written into it
    device = resolve_device(args.device)
    dtype = default_dtype(device)
    unet, scheduler = qdcompile.reference_model(args.model, device=device, dtype=dtype)
    recipe = qdcompile.QuantRecipe.preset(args.recipe)
    print(f"[1/4] calibrating {args.model} for {recipe.name}: {args.calib_samples} samples x {args.steps} steps "
          f"(device {device})")
    t0 = time.perf_counter()
    meta = qdcompile.calibrate(unet, scheduler, recipe, num_samples=args.calib_samples,
                               num_inference_steps=args.steps, seed=args.seed + 1, progress=not args.quiet)
    meta_path = meta.save(out / f"{args.model}.{recipe.name}.qdiff")
    print(f"      done in {time.perf_counter() - t0:.1f}s -> {meta_path}")

    print("[2/4] compiling with torch.compile(unet, backend='qdiff'): the first call traces the U-Net, rewrites "
          "its conv/linear layers to integer kernels and compiles the rest with Inductor"
          + (" (and autotunes the Triton kernels)" if device.startswith("cuda") else "")
          + "; this takes minutes once, later calls reuse the compiled code")

    quant_unet = QuantizedUNet(unet, meta, backend="qdiff")   # per-step precision + PTQD corrections, if any
    fast = quant_unet.model
    c, h, w = unet.config.in_channels, unet.config.sample_size, unet.config.sample_size
    x = torch.randn(args.num_images, c, h, w, device=device, dtype=dtype)
    # the same tensor layout as the sampler's timestep (a 0-d tensor expanded to the batch, stride 0):
    # a contiguous one would make Dynamo compile the U-Net a second time on the first sampling step
    t = torch.full((), 500, device=device).expand(args.num_images)
    t0 = time.perf_counter()
    with torch.no_grad(), heartbeat("      compiling", quiet=args.quiet):
        eps_q = fast(x, t).sample
    synchronize(device)
    compile_s = time.perf_counter() - t0
    print(f"      compiled in {compile_s:.1f}s")

    print(f"[3/4] sampling {args.num_images} images, {args.steps} steps, FP and {recipe.name}, same seeds")
    if meta.precision_plan or meta.noise:
        print(quant_unet.format_plan(scheduler, args.steps))
        print("      each activation precision compiles its own variant on its first step (slow once)")

    def run(sample_fn):
        g = torch.Generator().manual_seed(args.seed)
        return sample_fn(num_images=args.num_images, num_inference_steps=args.steps, generator=g,
                         progress=not args.quiet)

    t0 = time.perf_counter()
    quant = run(lambda **kw: quant_unet.sample(scheduler, **kw))
    synchronize(device)
    quant_s = time.perf_counter() - t0
    # the eager module is still the float model: metadata only changes what the qdiff backend compiles
    t0 = time.perf_counter()
    fp = run(lambda **kw: qdcompile.sample(unet, scheduler, **kw))
    synchronize(device)
    fp_s = time.perf_counter() - t0
    with torch.no_grad():
        eps_fp = unet(x, t).sample
    grid = save_comparison_grid([("FP32" if dtype == torch.float32 else "FP16", fp), (f"{recipe.name} (qdiff)", quant)],
                                out / f"{args.model}.{recipe.name}.png")

    print("[4/4] results")
    print(qdcompile.report(fast))
    summary = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "recipe": recipe.name, "eps_snr_db_t500": snr_db(eps_fp, eps_q),
        "sample_psnr_db_vs_fp": psnr_db(fp, quant), "compile_s": compile_s,
        "sampling_s": {"fp_eager": fp_s, "qdiff": quant_s},
    }
    print(f"  eps SNR vs FP (t=500):       {summary['eps_snr_db_t500']:.1f} dB")
    print(f"  sample PSNR vs FP (same seeds): {summary['sample_psnr_db_vs_fp']:.1f} dB")
    if args.model == "mnist":
        for label, imgs in (("FP", fp), (recipe.name, quant)):
            conf = digit_metrics(imgs)["confident_fraction"]
            summary[f"confident_digits_{label}"] = conf
            print(f"  {label:>5} samples classified as a digit with confidence > 0.9: {conf:.0%}")
    step = {}
    with torch.no_grad():
        step["fp_eager"] = median_seconds(lambda: unet(x, t), device)
        step["qdiff"] = median_seconds(lambda: fast(x, t), device)
    summary["unet_step_s"] = step
    print(f"  sampling time: FP eager {fp_s:.2f}s, qdiff {quant_s:.2f}s; U-Net step (median of 10): "
          f"FP eager {step['fp_eager'] * 1e3:.2f} ms, qdiff {step['qdiff'] * 1e3:.2f} ms")
    if not device.startswith("cuda"):
        print("  note: on CPU the quantized layers run the pure-torch reference integer path; "
              "CPU timings say nothing about GPU speed.")
    write_json(out / "demo_summary.json", summary)
    print(f"  grid: {grid}\n  metadata: {meta_path}\n  summary: {out / 'demo_summary.json'}")
    return 0
