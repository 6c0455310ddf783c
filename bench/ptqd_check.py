"""PTQD corrections on the MNIST reference model with more samples than the quality table.

Calibrates ``QuantRecipe.ptqd`` (recon 40 / LSQ 20 iterations, 16 samples x 50 steps, 20 kept,
seed 1), prints the per-step noise statistics (k, channel bias, variance, SNR_Q before/after),
then FID/KID (MNIST-classifier features, builtin) of 384 samples (seeds 100-102) uncorrected,
with bias correction only, and with k + bias + VSC, and the PSNR of each against FP from the
same seeds. One CPU thread; about 20 minutes.

    python bench/ptqd_check.py
"""

from __future__ import annotations

import time

import torch

import qdcompile
from qdcompile.evaluation.fid import FeatureSpace, real_mnist_images
from qdcompile.metrics import psnr_db
from qdcompile.pipeline import Corrections, QuantizedUNet

SEEDS = (100, 101, 102)
BATCH = 128


def samples(model_sample, scheduler) -> torch.Tensor:
    return torch.cat([model_sample(scheduler, num_images=BATCH, num_inference_steps=50,
                                   generator=torch.Generator().manual_seed(s), progress=False) for s in SEEDS])


def main() -> None:
    torch.set_num_threads(1)
    unet, sched = qdcompile.reference_model("mnist")
    recipe = qdcompile.QuantRecipe.ptqd(recon_iters=40, act_lsq_iters=20)
    t0 = time.time()
    meta = qdcompile.calibrate(unet, sched, recipe, num_samples=16, num_inference_steps=50, num_calib_steps=20,
                               seed=1, progress=False, attach=False)
    print(f"calibrated in {time.time() - t0:.0f}s", flush=True)
    for s in meta.noise[8][::5] + [meta.noise[8][-1]]:
        print(f"t={s.timestep} k={s.k:.4f} mu={s.mu[0]:+.4f} var={s.var:.2e} snr={s.snr_q:.1f}->{s.snr_q_corrected:.1f}")
    space = FeatureSpace(real_mnist_images(10000), extractor="mnist", backend="builtin", kid_subsets=50)
    fp = samples(lambda sc, **kw: qdcompile.sample(unet, sc, **kw), sched)
    print("fp", space(fp), flush=True)
    for name, corr in (("uncorrected", Corrections.none()), ("bias only", Corrections(False, True, False)),
                       ("k + bias + VSC", Corrections())):
        q = QuantizedUNet(unet, meta, backend="simulate", corrections=corr)
        x = samples(q.sample, sched)
        print(name, space(x), f"PSNR vs FP {psnr_db(fp, x):.2f} dB", flush=True)


if __name__ == "__main__":
    main()
