"""``qdcompile`` command line: demo, calibrate, sample, eval, bench, train-reference."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Callable

logger = logging.getLogger("qdcompile")


def snr_db(ref, test) -> float:
    from .evaluate import snr_db as _snr_db

    return _snr_db(ref, test)


def psnr_db(ref, test) -> float:
    from .evaluate import psnr_db as _psnr_db

    return _psnr_db(ref, test)


# ---------------------------------------------------------------------------- helpers
def _device(name: str) -> str:
    from .evaluate import _resolve_device

    return _resolve_device(name)


def _dtype(device: str):
    import torch

    return torch.float16 if device.startswith("cuda") else torch.float32


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], device: str, repeats: int = 10, warmup: int = 2) -> float:
    """Median seconds per call (do_bench / CUDA events on GPU, perf_counter on CPU)."""
    from .benchmark import _time_calls

    return _time_calls(fn, device, warmup=warmup, repeats=repeats, rep_ms=100)["median_s"]


def _sample_kwargs(unet, path: str | None, device: str, dtype):
    from .evaluate import _sample_kwargs as prompt_kwargs

    return prompt_kwargs(unet, path, device, dtype)


def _load(args, device: str, dtype):
    """``(unet, scheduler, sample_kwargs, pipeline or None)``: with ``--prompt`` the model is a
    text-to-image pipeline folder and the U-Net is conditioned on the prompt's embeddings."""
    from .models import load_model, load_text_pipeline, prompt_embeddings

    prompt = getattr(args, "prompt", None)
    if prompt is None:
        unet, scheduler = load_model(args.model, device=device, dtype=dtype)
        return unet, scheduler, _sample_kwargs(unet, args.prompt_embeds, device, dtype), None
    if args.prompt_embeds:
        raise ValueError("pass --prompt (encoded by the pipeline's text encoder) or --prompt-embeds FILE.pt, not both")
    pipe = load_text_pipeline(args.model, device=device, dtype=dtype)
    return pipe.unet, pipe.scheduler, {"encoder_hidden_states": prompt_embeddings(pipe, prompt)}, pipe


PIPELINE_GUIDANCE = 7.5   # `sample --prompt`'s classifier-free guidance scale unless --guidance-scale


def _guidance(args, pipe, default=None) -> dict:
    """``calibrate`` arguments for classifier-free guidance with a text pipeline (``--prompt``):
    the scale (``--guidance-scale``, else ``default``; none: unguided) and the empty prompt's
    embeddings as the unconditional arguments."""
    from .models import prompt_embeddings

    g = args.guidance_scale if getattr(args, "guidance_scale", None) is not None else default
    if pipe is None or g is None:
        return {}
    return {"guidance_scale": g, "uncond_kwargs": {"encoder_hidden_states": prompt_embeddings(pipe, "")}}


@contextlib.contextmanager
def _heartbeat(label: str, every: float = 15.0, quiet: bool = False):
    """Print ``label ... Ns`` every ``every`` seconds while the block runs (long compilations)."""
    if quiet:
        yield
        return
    done = threading.Event()
    t0 = time.perf_counter()

    def beat():
        while not done.wait(every):
            print(f"{label} ... {time.perf_counter() - t0:.0f}s", flush=True)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


# ---------------------------------------------------------------------------- commands
def cmd_calibrate(args) -> int:
    import qdcompile

    from .io import check_writable

    check_writable(args.out, "--out")
    if args.checkpoint:
        check_writable(args.checkpoint, "--checkpoint")
    device = _device(args.device)
    if args.guidance_scale is not None and args.prompt is None:
        raise ValueError("--guidance-scale applies to --prompt calibration of a Stable Diffusion pipeline folder")
    unet, scheduler, kwargs, pipe = _load(args, device, _dtype(device))
    recipe = qdcompile.QuantRecipe.preset(args.recipe)
    with _say_resume():
        meta = qdcompile.calibrate(unet, scheduler, recipe, num_samples=args.num_samples,
                                   num_inference_steps=args.steps, num_calib_steps=args.calib_steps,
                                   batch_size=args.batch_size, seed=args.seed, progress=not args.quiet,
                                   sample_kwargs=kwargs, checkpoint=args.checkpoint, **_guidance(args, pipe))
    path = meta.save(args.out)
    print(f"wrote {path} ({len(meta.layers)} layers quantized, {len(meta.fallbacks)} left in float)")
    from .pipeline import format_correction_check

    if meta.calibration.get("correction_check"):
        print(format_correction_check(meta.calibration["correction_check"]))
    return 0


class _ResumeNote(logging.Filter):
    """Prints the calibration's "resuming calibration from FILE (N blocks done)" line (its other
    info lines stay quiet, warnings pass)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and str(record.msg).startswith("resuming"):
            print(record.getMessage(), flush=True)
        return record.levelno >= logging.WARNING


@contextlib.contextmanager
def _say_resume():
    """Within the block, a calibration resumed from a checkpoint says so, and from where."""
    log = logging.getLogger("qdcompile.calibration")
    note, level = _ResumeNote(), log.level
    log.addFilter(note)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeFilter(note)
        log.setLevel(level)


def cmd_sample(args) -> int:
    import torch

    import qdcompile
    from .images import save_comparison_grid
    from .pipeline import Corrections, QuantizedUNet

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
    from .io import check_writable

    for flag in ("out", "save_metadata"):
        if getattr(args, flag):
            check_writable(getattr(args, flag), f"--{flag.replace('_', '-')}")
    device = _device(args.device)
    dtype = _dtype(device)
    unet, scheduler, kwargs, pipe = _load(args, device, dtype)
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
                                   **_guidance(args, pipe, default=PIPELINE_GUIDANCE))
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
            from .evaluate import colour_shift, format_colour_shift

            print(f"colour shift vs FP (mean per channel, 8-bit levels): "
                  f"{format_colour_shift(colour_shift(fp, quant))}")
    if args.out:
        if quant.shape[1] not in (1, 3):
            from .io import atomic_write

            atomic_write(Path(args.out).with_suffix(".pt"), lambda tmp: torch.save(quant.cpu(), tmp))
            print(f"latent samples ({quant.shape[1]} channels) saved to {Path(args.out).with_suffix('.pt')}")
        else:
            print(f"wrote {save_comparison_grid(rows, args.out)}")
    print(qdcompile.report(quant_unet.model))
    return 0


def _run_pipeline(pipe, args):
    """Images ``[N, 3, H, W]`` in [0, 1] of ``args.prompt`` from a text-to-image pipeline."""
    import torch

    g = torch.Generator().manual_seed(args.seed)
    guidance = PIPELINE_GUIDANCE if args.guidance_scale is None else args.guidance_scale
    return pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=guidance,
                num_images_per_prompt=args.num_images, generator=g, eta=args.eta, output_type="pt").images.float().cpu()


def cmd_demo(args) -> int:
    import torch

    import qdcompile
    from .images import save_comparison_grid
    from .io import atomic_write, check_writable_dir

    out = check_writable_dir(args.out, "--out")   # created by the first file written into it
    device = _device(args.device)
    dtype = _dtype(device)
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
    from .pipeline import QuantizedUNet

    quant_unet = QuantizedUNet(unet, meta, backend="qdiff")   # per-step precision + PTQD corrections, if any
    fast = quant_unet.model
    c, h, w = unet.config.in_channels, unet.config.sample_size, unet.config.sample_size
    x = torch.randn(args.num_images, c, h, w, device=device, dtype=dtype)
    t = torch.full((args.num_images,), 500, device=device)
    t0 = time.perf_counter()
    with torch.no_grad(), _heartbeat("      compiling", quiet=args.quiet):
        eps_q = fast(x, t).sample
    _sync(device)
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
    _sync(device)
    quant_s = time.perf_counter() - t0
    # the eager module is still the float model: metadata only changes what the qdiff backend compiles
    t0 = time.perf_counter()
    fp = run(lambda **kw: qdcompile.sample(unet, scheduler, **kw))
    _sync(device)
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
        from .classifier import digit_metrics

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
    atomic_write(out / "demo_summary.json", json.dumps(summary, indent=2))
    print(f"  grid: {grid}\n  metadata: {meta_path}\n  summary: {out / 'demo_summary.json'}")
    return 0


def cmd_train_reference(args) -> int:
    from .reference_models import train_reference

    path = train_reference(args.model, out_dir=args.out, steps=args.steps, seed=args.seed, progress=not args.quiet)
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------- parsers
def _count(minimum: int = 1):
    """argparse type: an integer >= ``minimum`` (the message names the option)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = "count"
    return parse


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


RECIPES = ["w8a8", "w4a8", "w4a4", "ptqd", "mixed"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qdcompile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="calibrate + compile + sample the embedded model; grid, report, timings")
    p.add_argument("--model", default="mnist", help="shipped reference model")
    p.add_argument("--recipe", default="w8a8", choices=RECIPES)
    p.add_argument("--num-images", type=_count(), default=16)
    p.add_argument("--steps", type=_count(), default=50)
    p.add_argument("--calib-samples", type=_count(), default=64)
    p.add_argument("--out", default="qdcompile-demo", help="output folder")
    _common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("calibrate", help="calibrate a diffusers U-Net and write a metadata file")
    p.add_argument("--model", required=True, help="diffusers folder, or a shipped reference name (mnist)")
    p.add_argument("--recipe", default="w8a8", choices=RECIPES)
    p.add_argument("--out", required=True, help="metadata file to write (e.g. model.w8a8.qdiff)")
    p.add_argument("--num-samples", type=_count(), default=64)
    p.add_argument("--steps", type=_count(), default=50, help="sampling steps of the calibration trajectory")
    p.add_argument("--calib-steps", type=_count(), default=None, help="time steps kept (uniform); default all")
    p.add_argument("--batch-size", type=_count(), default=None,
                   help="calibration batch (default: all samples at once)")
    p.add_argument("--prompt-embeds", default=None, help="conditional U-Nets: torch.save'd encoder_hidden_states")
    p.add_argument("--prompt", default=None, help="Stable Diffusion pipeline folders: calibrate on this prompt, "
                   "encoded by the pipeline's text encoder (needs transformers)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="with --prompt: calibrate for classifier-free guidance at this scale (the PTQD statistics and "
                        "the mixed plan's SNR on the guided ε the sampler uses; unconditional half: the empty prompt)")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="save progress here after every finished block; rerun the same command to resume")
    _common(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("sample", help="sample with a quantized, compiled U-Net (per-step precision and PTQD "
                                      "corrections when the metadata has them)")
    p.add_argument("--model", required=True)
    p.add_argument("--metadata", default=None, help="calibration file to use")
    p.add_argument("--recipe", default=None, choices=RECIPES, help="calibrate with this recipe first (instead of "
                   "--metadata); mixed/ptqd print the per-step precision plan")
    p.add_argument("--calib-samples", type=_count(), default=32, help="with --recipe: calibration trajectories")
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
    p.add_argument("--num-images", type=_count(), default=16)
    p.add_argument("--steps", type=_count(), default=50)
    p.add_argument("--compare-fp", action="store_true", help="also sample the float model with the same seeds")
    p.add_argument("--prompt-embeds", default=None, help="conditional U-Nets: torch.save'd encoder_hidden_states")
    p.add_argument("--prompt", default=None, help="Stable Diffusion pipeline folders: run the diffusers pipeline "
                   "itself, quantized (text encoder, classifier-free guidance, VAE; needs transformers)")
    p.add_argument("--guidance-scale", type=float, default=None, help="with --prompt: classifier-free guidance scale "
                   "(default 7.5)")
    _common(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("train-reference", help="re-train the embedded reference model from the shared data")
    p.add_argument("--model", default="mnist")
    p.add_argument("--out", default=None, help="output folder (default: the package's assets)")
    p.add_argument("--steps", type=_count(), default=None)
    _common(p)
    p.set_defaults(func=cmd_train_reference)

    from .benchmark import add_bench_parser
    from .evaluate import add_eval_parser

    add_bench_parser(sub)
    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        resume = (f"; rerun the same command to resume from {args.checkpoint}"
                  if getattr(args, "checkpoint", None) else "")
        print(f"\nqdcompile {args.command}: interrupted{resume}", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, TypeError) as e:
        from .metadata import MetadataError

        if isinstance(e, (FileNotFoundError, MetadataError)) or type(e) is ValueError:
            print(f"qdcompile {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
