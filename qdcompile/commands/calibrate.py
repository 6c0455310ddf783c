"""``qdcompile calibrate``: calibrate a diffusers U-Net and write a metadata file."""

from __future__ import annotations

import argparse
import contextlib
import logging

import qdcompile
from ..devices import default_dtype, resolve_device
from ..io import check_writable
from ..pipeline import format_correction_check
from .common import RECIPES, add_common_arguments, count, guidance_arguments, load_model_for


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``qdcompile calibrate`` to the CLI's subparsers."""
    p = subparsers.add_parser("calibrate", help="calibrate a diffusers U-Net and write a metadata file")
    p.add_argument("--model", required=True, help="diffusers folder, or a shipped reference name (mnist)")
    p.add_argument("--recipe", default="w8a8", choices=RECIPES)
    p.add_argument("--out", required=True, help="metadata file to write (e.g. model.w8a8.qdiff)")
    p.add_argument("--num-samples", type=count(), default=64)
    p.add_argument("--steps", type=count(), default=50, help="sampling steps of the calibration trajectory")
    p.add_argument("--calib-steps", type=count(), default=None, help="time steps kept (uniform); default all")
    p.add_argument("--batch-size", type=count(), default=None,
                   help="calibration batch (default: all samples at once)")
    p.add_argument("--prompt-embeds", default=None, help="conditional U-Nets: torch.save'd encoder_hidden_states")
    p.add_argument("--prompt", default=None, help="Stable Diffusion pipeline folders: calibrate on this prompt, "
                   "encoded by the pipeline's text encoder (needs transformers)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="with --prompt: calibrate for classifier-free guidance at this scale (the PTQD statistics and "
                        "the mixed plan's SNR on the guided ε the sampler uses; unconditional half: the empty prompt)")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="save progress here after every finished block; rerun the same command to resume")
    add_common_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    check_writable(args.out, "--out")
    if args.checkpoint:
        check_writable(args.checkpoint, "--checkpoint")
    if args.guidance_scale is not None and args.prompt is None:
        raise ValueError("--guidance-scale applies to --prompt calibration of a Stable Diffusion pipeline folder")
    device = resolve_device(args.device)
    unet, scheduler, kwargs, pipe = load_model_for(args, device, default_dtype(device))
    recipe = qdcompile.QuantRecipe.preset(args.recipe)
    with _say_resume():
        meta = qdcompile.calibrate(unet, scheduler, recipe, num_samples=args.num_samples,
                                   num_inference_steps=args.steps, num_calib_steps=args.calib_steps,
                                   batch_size=args.batch_size, seed=args.seed, progress=not args.quiet,
                                   sample_kwargs=kwargs, checkpoint=args.checkpoint,
                                   **guidance_arguments(args, pipe))
    path = meta.save(args.out)
    print(f"wrote {path} ({len(meta.layers)} layers quantized, {len(meta.fallbacks)} left in float)")

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
