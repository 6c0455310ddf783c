"""``qdcompile sample``: sample with a quantized, compiled U-Net (per-step precision and PTQD corrections
when the metadata has them)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

import qdcompile
from ..devices import default_dtype, resolve_device
from ..evaluation.metrics import colour_shift, format_colour_shift
from ..images import save_comparison_grid
from ..io import atomic_write, check_writable
from ..metrics import psnr_db
from ..pipeline import Corrections, QuantizedUNet
from .common import PIPELINE_GUIDANCE, RECIPES, add_common_arguments, count, guidance_arguments, load_model_for


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``qdcompile sample`` to the CLI's subparsers."""
    p = subparsers.add_parser("sample", help="sample with a quantized, compiled U-Net (per-step precision and PTQD "
                                      "corrections when the metadata has them)")
    p.add_argument("--model", required=True)
    p.add_argument("--metadata", default=None, help="calibration file to use")
    p.add_argument("--recipe", default=None, choices=RECIPES, help="calibrate with this recipe first (instead of "
                   "--metadata); mixed/ptqd print the per-step precision plan")
    p.add_argument("--calib-samples", type=count(), default=32, help="with --recipe: calibration trajectories")
    p.add_argument("--save-metadata", default=None, help="with --recipe: also write the calibration file")
    p.add_argument("--snr-margin", type=float, default=None, metavar="DB",
                   help="with --recipe mixed: a step runs at the low width only if SNR_Q > SNR_F * 10^(DB/20) "
                        "(default 0: PTQD's rule)")
    p.add_argument("--scheduler", default="model", choices=["model", "ddim"], help="the model's scheduler, or DDIM")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (> 0: stochastic, PTQD's variance calibration applies)")
    p.add_argument("--no-correction", action="store_true", help="skip the PTQD corrections the metadata allows")
    p.add_argument("--all-corrections", action="store_true",
                   help="apply k, bias and VSC even where the calibration's correction check dropped one (it moved "
                        "its validation samples away from the float model's)")
    p.add_argument("--out", default=None, help="PNG grid to write")
    p.add_argument("--num-images", type=count(), default=16)
    p.add_argument("--steps", type=count(), default=50)
    p.add_argument("--compare-fp", action="store_true", help="also sample the float model with the same seeds")
    p.add_argument("--prompt-embeds", default=None, help="conditional U-Nets: torch.save'd encoder_hidden_states")
    p.add_argument("--prompt", default=None, help="Stable Diffusion pipeline folders: run the diffusers pipeline "
                   "itself, quantized (text encoder, classifier-free guidance, VAE; needs transformers)")
    p.add_argument("--guidance-scale", type=float, default=None, help="with --prompt: classifier-free guidance scale "
                   f"(default {PIPELINE_GUIDANCE})")
    add_common_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    if args.metadata is None and args.recipe is None:
        raise ValueError("say which quantization to sample: --metadata FILE (a calibration file) or --recipe NAME "
                         f"(calibrate now; one of {', '.join(RECIPES)})")
    if args.metadata is not None and args.recipe is not None:
        raise ValueError("pass --metadata FILE (calibrated before) or --recipe NAME (calibrate now), not both")
    if args.no_correction and args.all_corrections:
        raise ValueError("pass --no-correction or --all-corrections, not both")
    if args.guidance_scale is not None and args.prompt is None:
        raise ValueError("--guidance-scale applies to --prompt sampling of a Stable Diffusion pipeline folder")
    if args.snr_margin is not None and args.recipe != "mixed":
        raise ValueError("--snr-margin sets the mixed-precision rule at calibration: use it with --recipe mixed "
                         "(a --metadata file keeps the plan it was calibrated with)")

    for flag in ("out", "save_metadata"):
        if getattr(args, flag):
            check_writable(getattr(args, flag), f"--{flag.replace('_', '-')}")
    device = resolve_device(args.device)
    dtype = default_dtype(device)
    unet, scheduler, kwargs, pipe = load_model_for(args, device, dtype)
    if args.scheduler == "ddim":
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(scheduler.config)
        if pipe is not None:
            pipe.scheduler = scheduler
    elif args.eta:
        raise ValueError("--eta applies to DDIM sampling: add --scheduler ddim")
    fp_images = None
    if pipe is not None and args.compare_fp:   # the float pipeline, before its U-Net is replaced
        fp_images = _run_pipeline(pipe, args)
    if args.metadata:
        meta = qdcompile.load_metadata(args.metadata)
    else:
        recipe = qdcompile.QuantRecipe.preset(args.recipe)
        if args.snr_margin is not None:
            recipe = dataclasses.replace(recipe, mixed_margin_db=args.snr_margin)
        print(f"calibrating {args.model} for {recipe.name} ({args.calib_samples} samples x {args.steps} steps)")
        meta = qdcompile.calibrate(unet, scheduler, recipe, num_samples=args.calib_samples,
                                   num_inference_steps=args.steps, seed=args.seed + 1, progress=not args.quiet,
                                   sample_kwargs=kwargs, attach=False,
                                   **guidance_arguments(args, pipe, default=PIPELINE_GUIDANCE))
        if args.save_metadata:
            print(f"wrote {meta.save(args.save_metadata)}")
    corrections = (Corrections.none() if args.no_correction else Corrections() if args.all_corrections and meta.noise
                   else Corrections.default_for(meta))
    quant_unet = QuantizedUNet(unet, meta, backend="qdiff", corrections=corrections)
    if meta.precision_plan or meta.noise:
        print(quant_unet.format_plan(scheduler, args.steps, eta=args.eta))
    step_kwargs = {"eta": args.eta} if args.scheduler == "ddim" else None

    def run(sample_fn):
        g = torch.Generator().manual_seed(args.seed)
        return sample_fn(num_images=args.num_images, num_inference_steps=args.steps, generator=g,
                         sample_kwargs=kwargs, progress=not args.quiet, step_kwargs=step_kwargs)

    if pipe is not None:   # the diffusers pipeline itself: CFG, VAE decoding, the corrected scheduler
        pipe.unet = quant_unet
        qdcompile.quantize_pipeline(pipe, meta)
        quant = _run_pipeline(pipe, args)
    else:
        quant = run(lambda **kw: quant_unet.sample(scheduler, **kw))
    rows = [(f"{meta.recipe.name} (qdiff)", quant)]
    if args.compare_fp:
        fp = fp_images if pipe is not None else run(lambda **kw: qdcompile.sample(unet, scheduler, **kw))
        rows.insert(0, ("FP", fp))
        print(f"sample PSNR vs FP (same seeds): {psnr_db(fp, quant):.2f} dB")
        if quant.shape[1] in (1, 3):
            print(f"colour shift vs FP (mean per channel, 8-bit levels): "
                  f"{format_colour_shift(colour_shift(fp, quant))}")
    if args.out:
        if quant.shape[1] not in (1, 3):
            atomic_write(Path(args.out).with_suffix(".pt"), lambda tmp: torch.save(quant.cpu(), tmp))
            print(f"latent samples ({quant.shape[1]} channels) saved to {Path(args.out).with_suffix('.pt')}")
        else:
            print(f"wrote {save_comparison_grid(rows, args.out)}")
    print(qdcompile.report(quant_unet.model))
    return 0


def _run_pipeline(pipe, args):
    """Images ``[N, 3, H, W]`` in [0, 1] of ``args.prompt`` from a text-to-image pipeline."""
    g = torch.Generator().manual_seed(args.seed)
    guidance = PIPELINE_GUIDANCE if args.guidance_scale is None else args.guidance_scale
    return pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=guidance,
                num_images_per_prompt=args.num_images, generator=g, eta=args.eta, output_type="pt").images.float().cpu()
