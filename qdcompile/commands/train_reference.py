"""``qdcompile train-reference``: re-train the embedded reference model from the shared data."""

from __future__ import annotations

import argparse

from ..reference_models import train_reference
from .common import add_common_arguments, count


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``qdcompile train-reference`` to the CLI's subparsers."""
    p = subparsers.add_parser("train-reference", help="re-train the embedded reference model from the shared data")
    p.add_argument("--model", default="mnist")
    p.add_argument("--out", default=None, help="output folder (default: the package's assets)")
    p.add_argument("--steps", type=count(), default=None)
    add_common_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    path = train_reference(args.model, out_dir=args.out, steps=args.steps, seed=args.seed, progress=not args.quiet)
    print(f"wrote {path}")
    return 0
