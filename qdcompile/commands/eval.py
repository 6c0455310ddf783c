"""``qdcompile eval``: evaluate quantized configurations (FID/KID, per-step SNR, PSNR); writes a table,
JSON, markdown and PNGs."""

from __future__ import annotations

import json
from typing import Any

from ..evaluation.configs import CONFIGS
from ..evaluation.fid import FidelityUnavailable
from ..evaluation.report import format_table, write_outputs
from ..evaluation.runner import EvalOptions, run_quality


def add_eval_arguments(p, default_out: str) -> None:
    """The options shared by ``qdcompile eval`` and ``bench/quality.py``."""
    p.add_argument("--model", default="mnist", help="shipped reference model name (mnist) or a diffusers folder")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated, from: {', '.join(CONFIGS)} (default: all)")
    p.add_argument("--num-samples", type=int, default=64, help="generated samples per configuration")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (also of the calibration trajectory)")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration trajectories")
    p.add_argument("--calib-steps", type=int, default=None, help="calibration time steps kept (uniform); default all")
    p.add_argument("--batch-size", type=int, default=None, help="sampling batch (default: all samples at once)")
    p.add_argument("--snr-samples", type=int, default=32,
                   help="FP trajectories on which SNR_Q is measured (the first ones of the FP run)")
    p.add_argument("--real-samples", type=int, default=10000,
                   help="real MNIST test images for FID/KID (a fixed subset; with Inception on a CPU, use fewer)")
    p.add_argument("--backend", default="qdiff", choices=["qdiff", "simulate"],
                   help="quantized model: torch.compile(backend='qdiff') (integer kernels) or fake-quant simulation")
    p.add_argument("--fid-backend", default="torch-fidelity", choices=["torch-fidelity", "builtin"],
                   help="torch-fidelity (pip install -e \".[eval]\") or qdcompile's own implementation of the "
                        "same FID/KID formulas (MNIST-classifier features only)")
    p.add_argument("--no-fid", action="store_true", help="skip FID/KID")
    p.add_argument("--inception-weights", default=None,
                   help="local Inception-v3 (inception-v3-compat) weights file: FID/KID on Inception features")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--recipe-set", default="", metavar="FIELD=VALUE,...",
                   help="override QuantRecipe fields in every configuration whose recipe has them, e.g. "
                        "recon_iters=200,act_lsq_iters=50 (values parsed as JSON, else kept as strings)")
    p.add_argument("--prompt-embeds", default=None, help="conditional U-Nets: torch.save'd encoder_hidden_states")
    p.add_argument("--grid-images", type=int, default=16, help="samples per configuration in the PNG grid")
    p.add_argument("--out", default=default_out, help="output folder (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_parser(subparsers):
    """Add ``qdcompile eval`` to the CLI's subparsers."""
    p = subparsers.add_parser("eval", help="quality of FP vs quantized configurations: FID/KID, per-step SNR_Q, "
                                           "PSNR; table, JSON, markdown, PNGs")
    add_eval_arguments(p, default_out="qdcompile-eval")
    p.set_defaults(func=run)
    return p


def options_from_args(args) -> EvalOptions:
    configs = tuple(c.strip() for c in args.configs.split(",") if c.strip())
    return EvalOptions(model=args.model, configs=configs, num_samples=args.num_samples, steps=args.steps,
                       calib_samples=args.calib_samples, calib_steps=args.calib_steps, batch_size=args.batch_size,
                       snr_samples=args.snr_samples, real_samples=args.real_samples, backend=args.backend,
                       fid=not args.no_fid, fid_backend=args.fid_backend, inception_weights=args.inception_weights,
                       kid_subsets=args.kid_subsets, recipe_overrides=parse_recipe_set(args.recipe_set),
                       prompt_embeds=args.prompt_embeds,
                       grid_images=args.grid_images, device=args.device, seed=args.seed, progress=not args.quiet)


def parse_recipe_set(text: str) -> tuple[tuple[str, Any], ...]:
    """``"recon_iters=200,act_lsq_iters=50"`` → ``(("recon_iters", 200), ("act_lsq_iters", 50))``."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--recipe-set expects FIELD=VALUE items, got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.append((key.strip(), parsed))
    return tuple(out)


def run(args) -> int:
    """Run the configurations, print the table, write the files. 1 if a configuration failed."""
    opts = options_from_args(args)
    try:
        results = run_quality(opts)
    except FidelityUnavailable as e:
        raise SystemExit(f"qdcompile eval: {e}") from e
    print()
    print(format_table(results))
    paths = write_outputs(results, args.out)
    for kind, p in paths.items():
        print(f"  {kind}: {p}")
    return 1 if any(r["status"] == "failed" for r in results["configs"]) else 0
