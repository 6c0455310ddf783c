"""PTQD corrections on the MNIST reference model with more samples than the quality table:
calibrate QuantRecipe.ptqd (recon 40 / LSQ 20 iterations, 16 samples x 50 steps, 20 kept, seed 1),
print the per-step noise statistics (k, channel bias, variance, SNR_Q before/after), then FID/KID
(MNIST-classifier features, builtin) of 384 samples (seeds 100-102) uncorrected, with bias
correction only, and with k + bias + VSC, and PSNR of each against FP from the same seeds.
One CPU thread; about 20 minutes.  Usage: python bench/ptqd_check.py
"""
import sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qdcompile  # noqa: E402
from qdcompile.pipeline import QuantizedUNet, Corrections
from qdcompile.evaluate import FeatureSpace, real_mnist_images, psnr_db
torch.set_num_threads(1)
unet, sched = qdcompile.reference_model("mnist")
r = qdcompile.QuantRecipe.ptqd(recon_iters=40, act_lsq_iters=20)
t0=time.time()
meta = qdcompile.calibrate(unet, sched, r, num_samples=16, num_inference_steps=50, num_calib_steps=20, seed=1, progress=False, attach=False)
print("calib", time.time()-t0, flush=True)
for s in meta.noise[8][::5] + [meta.noise[8][-1]]:
    print(s.timestep, "k=%.4f mu=%+.4f var=%.2e snr=%.1f->%.1f" % (s.k, s.mu[0], s.var, s.snr_q, s.snr_q_corrected))
space = FeatureSpace(real_mnist_images(10000), extractor="mnist", backend="builtin", kid_subsets=50)
N=384
res={}
for name, c in [("raw", Corrections.none()), ("bc", Corrections(False, True, False)), ("all", Corrections())]:
    q = QuantizedUNet(unet, meta, backend="simulate", corrections=c)
    out=[]
    for seed in range(3):
        out.append(q.sample(sched, num_images=128, num_inference_steps=50, generator=torch.Generator().manual_seed(100+seed), progress=False))
    x=torch.cat(out); res[name]=x
    print(name, space(x), flush=True)
fp=[qdcompile.sample(unet, sched, num_images=128, num_inference_steps=50, generator=torch.Generator().manual_seed(100+s), progress=False) for s in range(3)]
fp=torch.cat(fp); print("fp", space(fp))
for k,v in res.items(): print(k, "psnr", psnr_db(fp, v))
