"""Quality of FP vs quantized configurations of one diffusion U-Net, same seeds and sample counts.

Configurations (``--configs``): ``fp`` · ``w8a8`` (RTN) · ``w4a8-rtn`` · ``w4a8-qdiff``
(Q-Diffusion, no shortcut split) · ``w4a8-qdiff-split`` (Q-Diffusion + split). A configuration
this qdcompile cannot build is reported as "not available" with the reason.

For each: FID and KID against real MNIST test images (torch-fidelity with the project's MNIST
classifier as an offline feature extractor — **not Inception, so not comparable to published
FIDs** — or Inception-v3 with ``--inception-weights PATH``), mean and min SNR_Q over the
sampling steps (PTQD, on FP trajectories, against SNR_F), PSNR of the quantized samples against
the FP samples from the same seeds, and the calibration time. Prints the table and writes
``bench/results/quality-<model>-<stamp>.json``, ``.md``, ``-samples.png`` and ``-snr.png``.

    python bench/quality.py                                   # shipped MNIST model, all configurations
    python bench/quality.py --num-samples 256 --steps 50 --configs fp,w8a8,w4a8-rtn
    python bench/quality.py --fid-backend builtin             # where torch-fidelity cannot be imported
    python bench/quality.py --model path/to/diffusers/folder --inception-weights pt_inception.pth

Same as ``qdcompile eval`` (which writes to ``qdcompile-eval/`` by default). On a CPU the
quantized layers run the pure-torch reference of the integer kernels (``--backend qdiff``,
includes compilation time in "sample s") or the fake-quant simulation (``--backend simulate``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from qdcompile.commands.eval import add_eval_arguments, run as run_eval

    parser = argparse.ArgumentParser(prog="bench/quality.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_arguments(parser, default_out=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_eval(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"bench/quality.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
