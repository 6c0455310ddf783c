#!/usr/bin/env python
"""Re-create the embedded reference models from scratch.

Examples (run from the repository root)::

    # the digit classifier (~30 s), written to qdcompile/assets/mnist_classifier.safetensors
    python bench/train_reference.py --classifier

    # the MNIST DDPM with its default recipe (~30 min on one CPU core), written to
    # qdcompile/assets/mnist/, then sampled and scored with the classifier
    python bench/train_reference.py --model mnist --eval

    # only score the shipped model: 64 samples, 50 DDPM steps, grid PNG
    python bench/train_reference.py --model mnist --eval-only --grid /tmp/mnist_samples.png

Training uses one thread by default (``--threads``) so that it neither fights other
jobs for cores nor depends on the machine's core count.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def save_image_grid(images, path: str | os.PathLike, nrow: int = 8, pad: int = 2) -> None:
    """Save ``[N, 1, H, W]`` images in ``[0, 1]`` as one grayscale PNG grid."""
    import numpy as np
    import torch
    from PIL import Image

    n, _, h, w = images.shape
    ncol = min(nrow, n)
    rows = (n + ncol - 1) // ncol
    grid = np.zeros((rows * (h + pad) + pad, ncol * (w + pad) + pad), dtype=np.uint8)
    pixels = (images[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    for i in range(n):
        r, c = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = pixels[i]
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)


def evaluate(args) -> None:
    """Sample from the model and report classifier-based digit metrics."""
    from qdcompile.classifier import digit_metrics
    from qdcompile.reference_models import generate_samples, reference_model

    unet, scheduler = reference_model(args.model, path=args.out_dir)
    for steps in args.eval_steps:
        start = time.time()
        images = generate_samples(
            unet, scheduler, args.num_samples, num_inference_steps=steps, seed=args.seed, progress=args.progress
        )
        m = digit_metrics(images)
        print(
            f"{args.model}: {args.num_samples} samples, {steps} DDPM steps, seed {args.seed} "
            f"({time.time() - start:.0f} s): confident(>0.9) {m['confident_fraction']:.3f}, "
            f"mean confidence {m['mean_confidence']:.3f}, class histogram {m['histogram']}"
        )
        if args.grid:
            grid = Path(args.grid)
            if len(args.eval_steps) > 1:
                grid = grid.with_name(f"{grid.stem}_{steps}steps{grid.suffix}")
            save_image_grid(images, grid)
            print(f"wrote {grid}")


def main(argv: list[str] | None = None) -> int:
    from qdcompile.reference_models import available_reference_models

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=available_reference_models(), default=None,
                   help="diffusion model to train (default: mnist, unless only --classifier is given)")
    p.add_argument("--classifier", action="store_true", help="train the MNIST digit classifier")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the model's recipe)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None, help="output folder (default: the package assets)")
    p.add_argument("--classifier-epochs", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--eval", action="store_true", help="after training, sample and score with the classifier")
    p.add_argument("--eval-only", action="store_true", help="only sample and score the existing model")
    p.add_argument("--eval-steps", type=int, nargs="+", default=[50], help="DDPM inference steps to evaluate")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--grid", default=None, help="write the evaluated samples as a PNG grid here")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="disable progress bars")
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    if args.model is None and not args.classifier:
        args.model = "mnist"

    if args.classifier and not args.eval_only:
        from qdcompile.classifier import train_mnist_classifier

        path, acc = train_mnist_classifier(epochs=args.classifier_epochs, seed=args.seed, progress=args.progress)
        print(f"classifier: held-out accuracy {acc:.4f}, saved to {path}")

    if args.model is not None:
        if not args.eval_only:
            from qdcompile.reference_models import train_reference

            out = train_reference(
                args.model, out_dir=args.out_dir, steps=args.steps, batch_size=args.batch_size,
                lr=args.lr, seed=args.seed, progress=args.progress,
            )
            print(f"{args.model}: saved to {out}")
        if args.eval or args.eval_only:
            evaluate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
